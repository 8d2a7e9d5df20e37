"""Train-step time of attention-level adapters relative to the frozen base, PEFT and repeft side by side.

Variants on one tiny Llama (default h=256, 4 layers, batch 8 x 128 tokens, fp32):
frozen base (backward still runs to the inputs), PEFT prefix tuning with and
without its MLP (prefix_projection), repeft prefix (shared MLP, independent
K/V, shared + NoRGa), PEFT AdaptionPrompt and repeft zero-init attention
(linear and non-linear prompts), all on every layer. Pairs compared:
PEFT prefix + projection vs repeft shared, PEFT prefix without projection vs
repeft independent, PEFT AdaptionPrompt vs repeft zero-init (NoRGa has no PEFT counterpart).

    python benchmarks/attention_adapters.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repeft  # noqa: E402
from common import add_tiny_llama_args, apply_threads, environment, measure_training, tiny_llama, write_results  # noqa: E402

# repeft variant -> the PEFT variant it is measured against. NoRGa has no PEFT counterpart:
# its row shows what the gate costs on top of the shared prefix.
COUNTERPART = {
    "repeft prefix (shared MLP)": "PEFT prefix (projection)",
    "repeft prefix (independent)": "PEFT prefix (no projection)",
    "repeft zero-init (linear)": "PEFT AdaptionPrompt",
    "repeft zero-init (non-linear)": "PEFT AdaptionPrompt",
}


def build_variants(args, device):
    base = tiny_llama(args, device)
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    frozen = fresh().requires_grad_(False)
    frozen.enable_input_require_grads()  # the full backward runs, as it does under any adapter
    variants = {"frozen base": frozen}
    try:
        import peft

        for name, projection in (("PEFT prefix (projection)", True), ("PEFT prefix (no projection)", False)):
            prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.n_prefix,
                                             prefix_projection=projection, encoder_hidden_size=args.mlp_hidden)
            variants[name] = peft.get_peft_model(fresh(), prefix)
        adaption = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=args.n_prompt, adapter_layers=args.layers)
        variants["PEFT AdaptionPrompt"] = peft.get_peft_model(fresh(), adaption)
    except ImportError:
        print("peft not installed: skipping the PEFT rows")
    prefix = dict(n_prefix=args.n_prefix, mlp_hidden=args.mlp_hidden)
    variants["repeft prefix (shared MLP)"] = repeft.wrap(fresh(), repeft.PrefixConfig(**prefix))
    variants["repeft prefix (shared MLP, NoRGa)"] = repeft.wrap(fresh(), repeft.PrefixConfig(**prefix, norga=True))
    variants["repeft prefix (independent)"] = repeft.wrap(fresh(), repeft.PrefixConfig(**prefix, structure="independent"))
    for kind in ("linear", "non-linear"):
        zero_init = repeft.ZeroInitConfig(n_prompt=args.n_prompt, prompt_type=kind.replace("-", ""))
        variants[f"repeft zero-init ({kind})"] = repeft.wrap(fresh(), zero_init)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_llama_args(parser, rounds=7)
    parser.add_argument("--n-prefix", type=int, default=16)
    parser.add_argument("--n-prompt", type=int, default=10)
    parser.add_argument("--mlp-hidden", type=int, default=512, help="prefix MLP width (PEFT encoder_hidden_size)")
    args = parser.parse_args()
    apply_threads(args)
    device = torch.device(args.device)

    variants = build_variants(args, device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}  # as padded batches come
    step_time, memory = measure_training(variants, batch, device, args.rounds, args.steps)
    trainable = {name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in variants.items()}

    ref_time, ref_mem = step_time["frozen base"], memory["frozen base"]["total"]
    rows = {name: {"step_ms": 1e3 * t, "time_ratio": t / ref_time, "trainable_params": trainable[name],
                   "memory_mb": memory[name]["total"] / 2**20, "memory_ratio": memory[name]["total"] / ref_mem}
            for name, t in step_time.items()}
    verdicts = {name: rows[name]["time_ratio"] <= rows[peft]["time_ratio"]
                for name, peft in COUNTERPART.items() if peft in rows}
    result = {"benchmark": "attention_adapters", "args": {k: str(v) for k, v in vars(args).items()},
              "env": environment(), "rows": rows, "at_or_below_peft": verdicts}

    lines = ["| variant | trainable params | step (ms) | time / frozen base | train memory / frozen base | vs PEFT |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        versus = ""
        if name in verdicts:
            peft_ratio = rows[COUNTERPART[name]]["time_ratio"]
            versus = f"{'<=' if verdicts[name] else '>'} {COUNTERPART[name]} ({peft_ratio:.3f})"
        lines.append(f"| {name} | {row['trainable_params']:,} | {row['step_ms']:.1f} | {row['time_ratio']:.3f} | "
                     f"{row['memory_ratio']:.3f} | {versus} |")
    lines.append("")
    lines.append(f"{args.device}, h={args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}, fp32, "
                 f"n_prefix={args.n_prefix}, prefix MLP width {args.mlp_hidden}, n_prompt={args.n_prompt} on all layers; "
                 f"medians of {args.rounds} interleaved rounds of {args.steps} AdamW steps. Train memory = weights + "
                 "grads + AdamW state + activations saved for backward.")
    write_results(args.out, "attention_adapters", result, "\n".join(lines))


if __name__ == "__main__":
    main()
