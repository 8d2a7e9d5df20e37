"""Train-step time and memory of adapters relative to the frozen base, measured side by side in one run.

Variants on one tiny Llama (default h=256, 4 layers, batch 8 x 128 tokens, fp32):
frozen base (no trainable weights, backward still runs to the inputs), full
fine-tuning, PEFT LoRA, repeft LoRA, repeft RepLoRA (all r=16 on every linear
layer of the blocks), and inference (eval mode, no grad) of LoRA, RepLoRA (its
factors cached) and the merged model vs the base. 8k tokens per step:
``--batch 64`` (64 x 128). ``--with-dropout P`` adds the three adapters again
with lora_dropout P.

    python benchmarks/step_overhead.py --out benchmarks/results
    python benchmarks/step_overhead.py --hidden 2048 --layers 8 --seq 1024 --vocab 32000 \
        --dtype bfloat16 --with-dropout 0.05 --out results/gpu     # the GPU suite's Llama shape
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repeft  # noqa: E402
from common import (  # noqa: E402
    add_tiny_llama_args,
    apply_threads,
    environment,
    measure_training,
    time_interleaved,
    tiny_llama,
    write_results,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_variants(args, device):
    base = tiny_llama(args, device, getattr(torch, args.dtype))
    variants = {}

    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.enable_input_require_grads()  # the full backward runs, as it does under any adapter
    variants["frozen base"] = frozen
    variants["full fine-tuning"] = copy.deepcopy(base).requires_grad_(True)
    try:
        import peft
    except ImportError:
        peft = None
        print("peft not installed: skipping the PEFT LoRA row")
    dropouts = {"": args.dropout}
    if args.with_dropout:
        dropouts[" +dropout"] = args.with_dropout
    for suffix, p in dropouts.items():
        adapter = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=p)
        if peft is not None:
            variants["PEFT LoRA" + suffix] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**adapter))
        variants["repeft LoRA" + suffix] = repeft.wrap(copy.deepcopy(base), repeft.LoRAConfig(**adapter))
        variants["repeft RepLoRA" + suffix] = repeft.wrap(copy.deepcopy(base), repeft.RepLoRAConfig(**adapter))
    return base, variants


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_llama_args(parser, rounds=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--with-dropout", type=float, default=0.0, metavar="P",
                        help="also run the adapters with lora_dropout P (rows marked +dropout)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    apply_threads(args)
    device = torch.device(args.device)

    base, variants = build_variants(args, device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    step_time, memory = measure_training(variants, {"input_ids": tokens, "labels": tokens}, device, args.rounds, args.steps)

    # Inference: the adapters unmerged in eval mode (RepLoRA's factors cached), and RepLoRA merged.
    lora, replora = variants["repeft LoRA"].eval(), variants["repeft RepLoRA"].eval()
    merged = copy.deepcopy(replora)
    merged.merge()
    base.eval()

    def infer(model):
        with torch.no_grad():
            model(input_ids=tokens)

    infer_time = time_interleaved({"base": lambda: infer(base), "merged": lambda: infer(merged),
                                   "LoRA": lambda: infer(lora), "RepLoRA": lambda: infer(replora)},
                                  device, args.rounds, args.steps)

    ref_time, ref_mem = step_time["frozen base"], memory["frozen base"]["total"]
    rows = {name: {"step_ms": 1e3 * t, "time_ratio": t / ref_time,
                   "memory_mb": memory[name]["total"] / 2**20, "memory_ratio": memory[name]["total"] / ref_mem,
                   "memory_parts_mb": {k: v / 2**20 for k, v in memory[name].items()}}
            for name, t in step_time.items()}
    if device.type == "cuda":
        ref_peak = memory["frozen base"]["cuda_peak"]
        for name, row in rows.items():
            row["cuda_peak_mb"] = memory[name]["cuda_peak"] / 2**20
            row["cuda_peak_ratio"] = memory[name]["cuda_peak"] / ref_peak
    # Not "repeft ..." like the training rows, which the GPU suite checks against its step targets.
    for name, label in (("merged", "merged inference"), ("LoRA", "LoRA inference"), ("RepLoRA", "RepLoRA inference")):
        rows[label] = {"step_ms": 1e3 * infer_time[name], "time_ratio": infer_time[name] / infer_time["base"]}
    replora_vs_lora = {"train_step": step_time["repeft RepLoRA"] / step_time["repeft LoRA"],
                       "eval_forward": infer_time["RepLoRA"] / infer_time["LoRA"]}
    result = {"benchmark": "step_overhead", "args": {k: str(v) for k, v in vars(args).items()}, "env": environment(),
              "rows": rows, "base_inference_ms": 1e3 * infer_time["base"], "replora_vs_lora": replora_vs_lora}

    peak = "cuda_peak_mb" if device.type == "cuda" else "memory_mb"
    peak_ratio = "cuda_peak_ratio" if device.type == "cuda" else "memory_ratio"
    lines = [f"| variant | step (ms) | time / frozen base | {'peak' if peak == 'cuda_peak_mb' else 'train'} memory (MiB) "
             "| memory / frozen base |", "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        mem = f"{row[peak]:.1f} | {row[peak_ratio]:.3f}" if peak in row else "- | -"
        label = name if not name.endswith("inference") else f"{name} (vs base inference)"
        lines.append(f"| {label} | {row['step_ms']:.1f} | {row['time_ratio']:.3f} | {mem} |")
    lines.append("")
    lines.append(f"RepLoRA / repeft LoRA: train step {replora_vs_lora['train_step']:.3f}x, "
                 f"eval forward {replora_vs_lora['eval_forward']:.3f}x ({args.batch * args.seq} tokens per step).")
    lines.append("")
    where = torch.cuda.get_device_name() if device.type == "cuda" else args.device
    lines.append(f"{where}, h={args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}, {args.dtype}, r={args.rank}, "
                 f"dropout {args.dropout} (+dropout rows: {args.with_dropout}); medians of {args.rounds} interleaved rounds. "
                 + ("Peak memory = the model's weights and AdamW state + the most one step allocates." if device.type == "cuda"
                    else "Train memory = weights + grads + AdamW state + activations saved for backward."))
    write_results(args.out, "step_overhead", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
