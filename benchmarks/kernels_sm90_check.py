"""Compile the Triton LoRA kernels for an H100 (sm_90a) without a GPU and report their resources.

For each tile config the launchers in ``repeft.kernels.lora_triton`` pick (for
representative shapes, dtypes, with and without dropout), this compiles the
kernel with the argument specializations a real launch gets (unit strides as
constants, 16-byte aligned pointers and sizes), assembles it with the ptxas
bundled with triton, and prints shared memory, registers and spills. A config
that needs more than the SM's 227 KiB of shared memory, spills registers or
serializes the wgmma pipeline is flagged. It checks compilation and resources
only; timings need a GPU (benchmarks/lora_kernels.py).

    python benchmarks/kernels_sm90_check.py                         # a few minutes on 2 CPU cores
    python benchmarks/kernels_sm90_check.py --kinds decode mixed     # only the decode and mixed-adapter kernels

Written against triton 3.9 (``ASTSource`` signature/attrs format).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from repeft.kernels import lora_triton, mixed_triton

H100_SMS = 132
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
GEMM_ARGS = ("P Q U V Bias Out seed_ptr M N K R stride_pm stride_pk stride_qk stride_qn stride_um stride_ur "
             "stride_vr stride_vn stride_om stride_on mask_stride_m mask_stride_n keep_scale p").split()
DECODE_ARGS = ("X W A B Bias Out U M N K R stride_xm stride_xk stride_wn stride_wk stride_ar stride_ak stride_bn "
               "stride_br stride_om stride_on stride_um stride_ur scale").split()
SEGMENT_ARGS = ("P Q Scaling Index Out S RED C blocks_per_row stride_pb stride_ps stride_pl stride_qa stride_ql "
                "stride_qc stride_ob stride_os stride_oc").split()
SKINNY_ARGS = ("P Q Out seed_ptr ROWS RED C RED_PER_SPLIT stride_pr stride_pl stride_ql stride_qc stride_os "
               "stride_or stride_oc mask_stride_row mask_stride_red scale p").split()
# Which integer arguments are 1 in each real launch (triton turns those into constants).
UNIT = {
    "forward": {"stride_pk", "stride_qk", "stride_ur", "stride_vr", "stride_on", "mask_stride_n"},
    "dx": {"stride_pk", "stride_qn", "stride_ur", "stride_vn", "stride_on", "mask_stride_n"},
    "shrink": {"stride_pl", "stride_ql", "stride_oc", "mask_stride_red"},
    "da": {"stride_pr", "stride_qc", "stride_or", "mask_stride_row"},
    "decode": {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_on", "stride_ur"},
    "mixed_shrink": {"stride_pl", "stride_ql", "stride_oc"},  # x rows, A rows (read as A^T), u rows
    "mixed_expand": {"stride_pl", "stride_ql", "stride_oc"},  # u rows, B rows (read as B^T), out rows
}
KINDS = ("gemm", "skinny", "decode", "mixed")


def compile_sm90(fn, arg_names, types, unit, constexprs, num_warps, num_stages):
    """Compile ``fn`` for sm_90a; return (shared bytes, ptxas -v report)."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, (name, ty) in enumerate(zip(arg_names, types)):
        if name in unit:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = ty
            if ty != "fp32":  # pointers and sizes: triton assumes 16-byte alignment when it holds at launch
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    return kernel.metadata.shared, report


def verdict(shared: int, report: str) -> str:
    registers = next(line.split("Used ")[1].split(",")[0] for line in report.splitlines() if "Used " in line)
    spills = next(line.strip() for line in report.splitlines() if "spill stores" in line)
    problems = [p for p, bad in (("SHARED MEMORY", shared > SMEM_LIMIT),
                                 ("SPILLS", not spills.startswith("0 bytes stack")),
                                 ("WGMMA SERIALIZED", "serialized" in report)) if bad]
    return f"smem {shared:6d}  {registers}  {spills}  {' '.join(problems) or 'ok'}"


def check_new_kernels(name: str, dtype: torch.dtype, dot: dict, kinds: list[str]) -> None:
    """The decode kernel and the mixed-adapter kernels, at the configs their launchers pick."""
    cuda = torch.device("cuda")
    ptr = "*" + TRITON_TYPE[dtype]
    for r in (16, 64, 256):
        rank_block = lora_triton._rank_block(r)
        if "decode" in kinds:
            cfg = lora_triton._decode_config(rank_block, dtype, cuda)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            types = [ptr] * 7 + ["i32"] * 16 + ["fp32"]
            consts = dict(HAS_BIAS=True, BLOCK_M=lora_triton.DECODE_MAX_TOKENS, BLOCK_R=rank_block, **dot, **cfg)
            shared, report = compile_sm90(lora_triton._lora_decode_kernel, DECODE_ARGS, types, UNIT["decode"], consts,
                                          warps, stages)
            print(f"decode {name:9s} r={r:3d} {cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{warps} s{stages}: "
                  f"{verdict(shared, report)}", flush=True)
        if "mixed" not in kinds:
            continue
        for S in (1, 512):
            cfg = mixed_triton._mixed_config(S, rank_block, dtype, cuda)
            for stage, scaled, block_red, block_c in (("shrink", True, cfg["BLOCK_K"], rank_block),
                                                      ("expand", False, min(rank_block, 64), cfg["BLOCK_N"])):
                types = [ptr, ptr, "*fp32", "*i64", ptr] + ["i32"] * 13
                consts = dict(SCALED=scaled, ACCUMULATE=not scaled, BLOCK_S=cfg["BLOCK_S"], BLOCK_RED=block_red,
                              BLOCK_C=block_c, **dot)
                shared, report = compile_sm90(mixed_triton._segment_matmul_kernel, SEGMENT_ARGS, types,
                                              UNIT[f"mixed_{stage}"], consts, cfg["num_warps"], cfg["num_stages"])
                print(f"mixed  {name:9s} {stage} S={S:3d} r={r:3d}: {verdict(shared, report)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="which kernels to compile")
    kinds = parser.parse_args().kinds
    lora_triton._num_sms = lambda device: H100_SMS
    cuda = torch.device("cuda")
    seen = set()
    for dtype, precision in ((torch.bfloat16, None), (torch.float32, "ieee"), (torch.float32, "tf32")):
        ptr = "*" + TRITON_TYPE[dtype]
        dot = dict(INPUT_PRECISION=precision, UPCAST=False)
        name = TRITON_TYPE[dtype] if precision is None else f"{TRITON_TYPE[dtype]}/{precision}"
        check_new_kernels(name, dtype, dot, kinds)
        for M, N in ((8192, 8192), (2048, 4096), (512, 1024), (1, 4096)):
            if "gemm" not in kinds:
                break
            for kind, has_dropout in (("forward", False), ("dx", False), ("dx", True)):
                cfg = dict(lora_triton._gemm_config(M, N, dtype, cuda, has_dropout))
                key = (name, kind, has_dropout, tuple(cfg.items()))
                if key in seen:
                    continue
                seen.add(key)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                types = [ptr] * 6 + ["*i64"] + ["i32"] * 16 + ["fp32", "fp32"]
                consts = dict(HAS_BIAS=kind == "forward", HAS_DROPOUT=has_dropout, BLOCK_R=64, **dot, **cfg)
                shared, report = compile_sm90(lora_triton._lora_gemm_kernel, GEMM_ARGS, types, UNIT[kind], consts,
                                              warps, stages)
                print(f"gemm   {name:9s} {kind:7s} dropout={has_dropout!s:5} "
                      f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{warps} s{stages}: {verdict(shared, report)}",
                      flush=True)
        for kind, has_dropout in (("shrink", False), ("shrink", True), ("da", False), ("da", True)):
            if "skinny" not in kinds:
                break
            for r in (16, 256):
                block_c = lora_triton._rank_block(r)
                cfg = lora_triton._skinny_config(dtype, r, cuda)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                types = [ptr] * 2 + ["*fp32", "*i64"] + ["i32"] * 13 + ["fp32", "fp32"]
                consts = dict(HAS_DROPOUT=has_dropout, BLOCK_C=block_c, **dot, **cfg)
                shared, report = compile_sm90(lora_triton._skinny_kernel, SKINNY_ARGS, types, UNIT[kind], consts,
                                              warps, stages)
                print(f"skinny {name:9s} {kind:7s} dropout={has_dropout!s:5} r={r:3d} "
                      f"{cfg['BLOCK_ROWS']}x{cfg['BLOCK_RED']}x{block_c} w{warps} s{stages}: {verdict(shared, report)}",
                      flush=True)


if __name__ == "__main__":
    main()
