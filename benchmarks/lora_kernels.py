"""Time and memory of one LoRA linear layer: plain matmul vs PEFT vs repeft's kernels.

For every (d, r) the layer is d x d without bias (Llama projections), bf16,
frozen base. Variants:

    plain          x W^T (the frozen base alone: the floor)
    peft           peft.tuners.lora.Linear around nn.Linear, eager
    peft_compile   torch.compile of that layer (only at --compile-at D R: it compiles per shape)
    repeft_torch   repeft.kernels.lora_linear(backend="torch")
    repeft_triton  repeft.kernels.lora_linear(backend="triton")
    repeft_auto    repeft.kernels.lora_linear(backend="auto"): what the dispatcher picks (in the JSON)

Modes: ``fwd`` (inference at --tokens, under no_grad), ``fwd_bwd`` (training
step of the layer at --tokens: forward, then backward from a fixed dY into x
and the adapter; W frozen) and ``decode`` (inference at --decode-tokens).
Times are medians from triton.testing.do_bench (warmup, L2 flushed between
runs); memory is the peak allocated during one call above what was allocated
before it. ``--smoke`` runs tiny sizes on CPU (Triton through its interpreter)
to check the script itself; its numbers mean nothing.

    python benchmarks/lora_kernels.py --out results/kernels          # GPU: full grid
    python benchmarks/lora_kernels.py --smoke --out /tmp/kernels     # CPU sanity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (repeft imports it lazily)

from repeft.kernels import kernel_report, lora_linear  # noqa: E402

VARIANTS = ("plain", "peft", "peft_compile", "repeft_torch", "repeft_triton", "repeft_auto")
MODES = ("fwd", "fwd_bwd", "decode")


Layer = Callable[[torch.Tensor], torch.Tensor]


def make_layer(variant: str, d: int, r: int, dtype: torch.dtype, device: str) -> tuple[Layer, list[torch.Tensor]]:
    """A callable x -> y for one variant (frozen d x d base, rank-r adapter) and its trainable tensors."""
    base = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    if variant == "plain":
        return base, []
    if variant in ("peft", "peft_compile"):
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        layer = PeftLoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r)
        # Keep the adapter in the base dtype (get_peft_model may upcast it to
        # fp32, which would make PEFT slower for a reason unrelated to fusion).
        layer.to(device=device, dtype=dtype)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        trainable = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return (torch.compile(layer, dynamic=False) if variant == "peft_compile" else layer), trainable
    A = torch.nn.Parameter(torch.randn(r, d, device=device, dtype=dtype) * d**-0.5)
    B = torch.nn.Parameter(torch.randn(d, r, device=device, dtype=dtype) * 0.02)
    backend = variant.removeprefix("repeft_")

    def repeft_layer(x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, base.weight, None, A, B, 2.0, backend=backend)

    return repeft_layer, [A, B]


def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor], device: str) -> float:
    """Median milliseconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory allocated during one call, above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(layer: Layer, trainable: list[torch.Tensor], d: int, tokens: int, decode_tokens: int,
            dtype: torch.dtype, device: str) -> dict[str, dict]:
    """``{mode: {"ms": ..., "peak_mib": ..., "tokens": ...}}`` for one layer."""
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    x_decode = torch.randn(decode_tokens, d, device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_()
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def decode():
        with torch.no_grad():
            return layer(x_decode)

    def fwd_bwd():
        layer(x_grad).backward(grad_out)

    results = {}
    for mode, fn, grads, n in (("fwd", fwd, [], tokens), ("fwd_bwd", fwd_bwd, [x_grad, *trainable], tokens),
                               ("decode", decode, [], decode_tokens)):
        fn()  # compile / first-call / dispatcher-check costs stay out of the numbers
        for t in grads:
            t.grad = None
        mem = peak_mib(fn, device)
        for t in grads:
            t.grad = None
        results[mode] = dict(ms=bench_ms(fn, grads, device), peak_mib=mem, tokens=n)
    return results


def add_ratios(rows: list[dict]) -> None:
    """Each row's time and memory relative to the plain matmul of the same shape and mode."""
    plain = {(x["mode"], x["d"], x["r"], x["tokens"]): x for x in rows if x["variant"] == "plain"}
    for row in rows:
        ref = plain.get((row["mode"], row["d"], row["r"], row["tokens"]))
        row["time_vs_plain"] = row["ms"] / ref["ms"] if ref else None
        row["mem_vs_plain"] = row["peak_mib"] / ref["peak_mib"] if ref and ref["peak_mib"] else None


def markdown(rows: list[dict], variants: list[str], meta: dict) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, peft {meta['peft']}; "
             f"dtype {meta['dtype']}. Cells: median ms (x plain). Memory: peak MiB above inputs (x plain).", ""]
    cell = {(x["variant"], x["mode"], x["d"], x["r"]): x for x in rows}
    for mode in MODES:
        shapes = sorted({(x["d"], x["r"], x["tokens"]) for x in rows if x["mode"] == mode})
        for what, key, ratio in (("time", "ms", "time_vs_plain"), ("peak memory", "peak_mib", "mem_vs_plain")):
            if key == "peak_mib" and all(x["peak_mib"] is None for x in rows):
                continue
            lines += [f"### {mode}: {what}", "", "| d | r | tokens | " + " | ".join(variants) + " |",
                      "|---|---|---|" + "---|" * len(variants)]
            for d, r, tokens in shapes:
                cells = []
                for v in variants:
                    x = cell.get((v, mode, d, r))
                    if x is None or x[key] is None:
                        cells.append("")
                    elif v == "plain" or x[ratio] is None:
                        cells.append(f"{x[key]:.3f}")
                    else:
                        cells.append(f"{x[key]:.3f} ({x[ratio]:.2f}x)")
                lines.append(f"| {d} | {r} | {tokens} | " + " | ".join(cells) + " |")
            lines.append("")
    auto = meta.get("auto_decisions", [])
    if auto:
        lines += ["### what backend='auto' chose", ""]
        lines += [f"- {d['backend']}: {', '.join(f'{k}={v}' for k, v in d['bucket'].items() if v not in (False, [], None))}"
                  f" ({d['reason']})" for d in auto]
        lines.append("")
    return "\n".join(lines)


def versions() -> dict:
    import peft

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, peft=peft.__version__, python=platform.python_version())


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path prefix: writes <out>.json and <out>.md")
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the fwd and fwd_bwd modes")
    parser.add_argument("--decode-tokens", type=int, default=1, help="tokens of the decode mode")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--compile-at", type=int, nargs=2, default=[4096, 16], metavar=("D", "R"),
                        help="the one (d, r) where peft_compile runs (each shape and mode compiles anew)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script runs")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the grid ``args`` describes; return ``{"meta": ..., "results": rows}``."""
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16
    if args.smoke:
        args.dims, args.ranks, args.tokens, args.decode_tokens, args.compile_at = [48], [8], 20, 1, [48, 8]
    elif device != "cuda":
        raise SystemExit("the kernel benchmark needs a CUDA GPU (use --smoke on CPU)")
    # One compiled PEFT layer per shape: more entries than dynamo keeps by default.
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096

    meta = dict(versions(), dtype=str(dtype).removeprefix("torch."), tokens=args.tokens,
                decode_tokens=args.decode_tokens,
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: numbers meaningless)")
    rows = []
    for d in args.dims:
        for r in args.ranks:
            for variant in args.variants:
                if variant == "peft_compile" and [d, r] != list(args.compile_at):
                    continue
                torch.manual_seed(0)
                layer, trainable = make_layer(variant, d, r, dtype, device)
                result = measure(layer, trainable, d, args.tokens, args.decode_tokens, dtype, device)
                rows += [dict(variant=variant, mode=m, d=d, r=r, **v) for m, v in result.items()]
                print(f"d={d} r={r} {variant:14s} " + "  ".join(f"{m} {v['ms']:.3f} ms" for m, v in result.items()),
                      flush=True)
                del layer, trainable
    add_ratios(rows)
    meta["auto_decisions"] = [dataclasses.asdict(x) for x in kernel_report()]
    return dict(meta=meta, results=rows)


def write(result: dict, out: Path, variants: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result["results"], variants, result["meta"]))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    write(run(args), Path(args.out), args.variants)


if __name__ == "__main__":
    main()
