"""Time and memory of one LoRA linear layer: plain matmul vs PEFT vs repeft's kernels.

For every (d, r, tokens) the layer is d x d without bias (Llama projections),
bf16, frozen base. Variants:

    plain          x W^T (the frozen base alone: the floor)
    peft           peft.tuners.lora.Linear around nn.Linear, eager
    peft_compile   torch.compile of that layer
    repeft_torch   repeft.kernels.lora_linear(backend="torch")
    repeft_triton  repeft.kernels.lora_linear(backend="triton")

Modes: ``fwd`` (inference, under no_grad) and ``fwd_bwd`` (training step of the
layer: forward, then backward from a fixed dY into x and the adapter; W frozen).
Times are medians from triton.testing.do_bench (warmup, L2 flushed between
runs); memory is the peak allocated during one call above what was allocated
before it. ``--smoke`` runs tiny sizes on CPU (Triton through its interpreter)
to check the script itself; its numbers mean nothing.

    python benchmarks/kernels.py --out results/kernels          # GPU: full grid
    python benchmarks/kernels.py --smoke --out /tmp/kernels     # CPU sanity
"""

from __future__ import annotations

import argparse
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

from repeft.kernels import lora_linear  # noqa: E402

VARIANTS = ("plain", "peft", "peft_compile", "repeft_torch", "repeft_triton")
MODES = ("fwd", "fwd_bwd")


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


def measure(layer: Layer, trainable: list[torch.Tensor], d: int, tokens: int, dtype: torch.dtype,
            device: str) -> dict[str, dict]:
    """``{mode: {"ms": ..., "peak_mib": ...}}`` for one layer at one token count."""
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_()
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        layer(x_grad).backward(grad_out)

    results = {}
    for mode, fn, grads in (("fwd", fwd, []), ("fwd_bwd", fwd_bwd, [x_grad, *trainable])):
        fn()  # compile / first-call costs stay out of both numbers
        for t in grads:
            t.grad = None
        mem = peak_mib(fn, device)
        for t in grads:
            t.grad = None
        results[mode] = dict(ms=bench_ms(fn, grads, device), peak_mib=mem)
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
    cell = {(x["variant"], x["mode"], x["d"], x["r"], x["tokens"]): x for x in rows}
    shapes = sorted({(x["d"], x["r"], x["tokens"]) for x in rows})
    for mode in MODES:
        for what, key, ratio in (("time", "ms", "time_vs_plain"), ("peak memory", "peak_mib", "mem_vs_plain")):
            if key == "peak_mib" and all(x["peak_mib"] is None for x in rows):
                continue
            lines += [f"### {mode}: {what}", "", "| d | r | tokens | " + " | ".join(variants) + " |",
                      "|---|---|---|" + "---|" * len(variants)]
            for d, r, tokens in shapes:
                cells = []
                for v in variants:
                    x = cell.get((v, mode, d, r, tokens))
                    if x is None or x[key] is None:
                        cells.append("")
                    elif v == "plain" or x[ratio] is None:
                        cells.append(f"{x[key]:.3f}")
                    else:
                        cells.append(f"{x[key]:.3f} ({x[ratio]:.2f}x)")
                lines.append(f"| {d} | {r} | {tokens} | " + " | ".join(cells) + " |")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path prefix: writes <out>.json and <out>.md")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512, 8192])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script runs")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16
    if args.smoke:
        args.dims, args.ranks, args.tokens = [48], [8], [1, 20]
    elif device != "cuda":
        parser.error("the benchmark needs a CUDA GPU (use --smoke on CPU)")
    # One compiled PEFT layer per shape: more entries than dynamo keeps by default.
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096

    meta = dict(versions(), dtype=str(dtype).removeprefix("torch."),
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: numbers meaningless)")
    rows = []
    for d in args.dims:
        for r in args.ranks:
            for variant in args.variants:
                torch.manual_seed(0)
                layer, trainable = make_layer(variant, d, r, dtype, device)
                for tokens in args.tokens:
                    result = measure(layer, trainable, d, tokens, dtype, device)
                    rows += [dict(variant=variant, mode=m, d=d, r=r, tokens=tokens, **v) for m, v in result.items()]
                    print(f"d={d} r={r} tokens={tokens} {variant:14s} fwd {result['fwd']['ms']:.3f} ms  "
                          f"fwd_bwd {result['fwd_bwd']['ms']:.3f} ms", flush=True)
                del layer, trainable
    add_ratios(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    out.with_suffix(".md").write_text(markdown(rows, args.variants, meta))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
