"""Mixed-adapter inference throughput: repeft's ``adapter_names`` vs PEFT's mixed batch, side by side in one run.

A Llama (default hidden 2048, 8 layers, 4x MLP, vocab 32000, bf16) with
``--adapters`` LoRA adapters, r=16 on every projection, adapters in bf16 for
both libraries. The rows of the batch cycle through the adapters and
``"__base__"`` (no adapter). Two modes, both one forward under no_grad:
``prefill`` (batch x seq tokens) and ``decode`` (batch x 1 token, no KV cache:
the linear layers at decode size). Variants:

    base                 the model without adapters (the floor)
    peft_single          PEFT, every row the same adapter (no mixing)
    peft_mixed           PEFT, adapter_names (loops over adapters in Python)
    repeft_single        repeft, every row the same adapter
    repeft_mixed_torch   repeft, adapter_names, gathered batched matmuls
    repeft_mixed_triton  repeft, adapter_names, the segmented kernels (two launches per layer)
    repeft_mixed_auto    repeft, adapter_names, what backend="auto" picks

    python benchmarks/mixed_adapters.py --out results/gpu          # GPU
    python benchmarks/mixed_adapters.py --smoke --out /tmp/mixed   # CPU, tiny: checks the script only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (repeft imports it lazily)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repeft  # noqa: E402
from common import environment, time_interleaved, tiny_llama, write_results  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("base", "peft_single", "peft_mixed", "repeft_single", "repeft_mixed_torch", "repeft_mixed_triton",
            "repeft_mixed_auto")


def build_models(args, device):
    """The base model, a PEFT model and a repeft model with the same ``args.adapters`` adapters."""
    import peft

    base = tiny_llama(args, device, torch.bfloat16).eval()
    names = [f"adapter{i}" for i in range(args.adapters)]
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS), adapter_name=names[0])
    repeft_model = repeft.wrap(copy.deepcopy(base), repeft.LoRAConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, dtype="bfloat16"), names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
        repeft_model.add_adapter(name, repeft.LoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                         dtype="bfloat16"))
    # The same (non-zero) factors in both libraries, in bf16.
    torch.manual_seed(1)
    with torch.no_grad():
        for path, layer in repeft_model.adapter_layers():
            peft_layer = peft_model.base_model.model.get_submodule(path.removeprefix("base_model.model."))
            for name, factors in layer.adapters.items():
                factors.lora_B.normal_(std=0.02)
                peft_layer.lora_A[name].weight.copy_(factors.lora_A)
                peft_layer.lora_B[name].weight.copy_(factors.lora_B)
    peft_model.to(torch.bfloat16).eval()
    repeft_model.eval()
    return base, peft_model, repeft_model, names


def set_kernel(model, kernel: str) -> None:
    for _, layer in model.adapter_layers():
        for factors in layer.adapters.values():
            factors.kernel = kernel


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for mixed_adapters.json / .md")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="rows of the prefill batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row at prefill")
    parser.add_argument("--decode-batch", type=int, default=64, help="rows of the decode batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script runs")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.adapters = 64, 1, 128, 2
        args.batch, args.seq, args.decode_batch, args.rounds, args.steps = 3, 8, 3, 1, 1
    elif device.type != "cuda":
        parser.error("the benchmark needs a CUDA GPU (use --smoke on CPU)")

    base, peft_model, repeft_model, names = build_models(args, device)
    choices = names + ["__base__"]
    result = {"benchmark": "mixed_adapters", "args": {k: str(v) for k, v in vars(args).items()},
              "env": environment(), "modes": {}}
    for mode, rows, seq in (("prefill", args.batch, args.seq), ("decode", args.decode_batch, 1)):
        ids = torch.randint(0, args.vocab, (rows, seq), device=device)
        row_names = [choices[i % len(choices)] for i in range(rows)]

        def forward(model, kernel=None, **kw):
            def run():
                if kernel is not None:
                    set_kernel(repeft_model, kernel)
                with torch.no_grad():
                    model(input_ids=ids, **kw)
            return run

        fns = {"base": forward(base), "peft_single": forward(peft_model),
               "peft_mixed": forward(peft_model, adapter_names=row_names),
               "repeft_single": forward(repeft_model, kernel="auto"),
               "repeft_mixed_torch": forward(repeft_model, kernel="torch", adapter_names=row_names),
               "repeft_mixed_triton": forward(repeft_model, kernel="triton", adapter_names=row_names),
               "repeft_mixed_auto": forward(repeft_model, kernel="auto", adapter_names=row_names)}
        times = time_interleaved({v: fns[v] for v in args.variants}, device, args.rounds, args.steps)
        floor = times.get("base")
        result["modes"][mode] = {v: {"ms": 1e3 * t, "tokens_per_s": rows * seq / t,
                                     "vs_base": t / floor if floor else None} for v, t in times.items()}
    result["auto_decisions"] = [d.__dict__ for d in repeft.kernels.kernel_report() if d.bucket["op"] == "lora_mixed"]

    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: numbers meaningless)"
    lines = [f"{where}; h={args.hidden}, {args.layers} layers, {args.adapters} LoRA adapters r={args.rank} on all "
             f"projections + '__base__' rows, bf16; prefill {args.batch} x {args.seq} tokens, decode {args.decode_batch} x 1.",
             "", "| variant | prefill ms | prefill x base | decode ms | decode x base |", "|---|---:|---:|---:|---:|"]
    for v in args.variants:
        cells = []
        for mode in ("prefill", "decode"):
            row = result["modes"][mode][v]
            cells += [f"{row['ms']:.3f}", f"{row['vs_base']:.3f}" if row["vs_base"] else "-"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    write_results(args.out, "mixed_adapters", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
