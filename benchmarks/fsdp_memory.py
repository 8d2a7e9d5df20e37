"""Memory per process for LoRA on a Llama-2-7B-shaped base: DDP vs FSDP2 on N processes (computed, not measured).

The model is built on the meta device from Llama-2-7B's shape (hidden 4096,
MLP 11008, 32 layers, vocabulary 32000, untied head) and wrapped by
``repeft.wrap`` with LoRA r=16 on every linear layer of the blocks (or on
q/v only), so the parameter counts are repeft's own; no weights are
allocated. Bytes per process then follow from how each set-up stores them:

- base: frozen, bf16 (2 bytes). DDP keeps it whole on every process; FSDP2
  keeps 1/N. The QLoRA row stores block linear weights as NF4 with double
  quantization (4 + 0.127 bits per weight: an 8-bit absmax per 64 weights and
  a float32 constant per 256 absmax) and the rest in bf16.
- adapter: float32 weights, float32 gradients and AdamW's two float32 moments
  (16 bytes per trainable parameter), whole under DDP, 1/N under FSDP2.
- gathered (FSDP2 only, transient): the units whose whole weights exist while
  they run, in bf16: two decoder layers (the running one and the next,
  prefetched) plus the output head, which accelerate's plan keeps gathered
  from its forward to its backward.

Activations are left out: they depend on batch and sequence length, not on
the sharding (each process runs its own micro-batch either way), and
``train.gradient_checkpointing`` cuts them the same in both.

    python benchmarks/fsdp_memory.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repeft  # noqa: E402
from common import environment, write_results  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
TARGETS = {
    "all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "q, v": ["q_proj", "v_proj"],
}
BF16, ADAPTER_BYTES = 2, 4 + 4 + 8  # float32 weight, gradient, AdamW exp_avg and exp_avg_sq
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)
GIB = 2**30


def counts(rank: int, targets: list[str]) -> dict[str, int]:
    """Parameter counts of the wrapped meta-device model: base, adapter, one decoder layer, head, block linears."""
    with torch.device("meta"):
        model = repeft.wrap(LlamaForCausalLM(LlamaConfig(**LLAMA2_7B)), repeft.LoRAConfig(r=rank, target_modules=targets))
    base = model.get_base_model()
    layer = base.model.layers[0]
    return {
        "base": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "adapter": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "decoder_layer": sum(p.numel() for p in layer.parameters()),  # frozen weights and the adapter in it
        "head": base.lm_head.weight.numel(),
        "block_linear": sum(
            p.numel() for n, p in base.model.layers.named_parameters() if n.endswith(".weight") and p.dim() == 2
            and not p.requires_grad
        ),
    }


def per_process(c: dict[str, int], processes: int, sharded: bool, base_bytes: float) -> dict[str, float]:
    """Bytes per process of the base, the adapter state and the transiently gathered units."""
    share = processes if sharded else 1
    gathered = (2 * c["decoder_layer"] + c["head"]) * BF16 if sharded else 0
    parts = {"base": base_bytes / share, "adapter_state": c["adapter"] * ADAPTER_BYTES / share, "gathered": gathered}
    return {**parts, "total": sum(parts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    rows, result = [], {"model": "Llama-2-7B shape", "config": LLAMA2_7B, "rank": args.rank, "environment": environment(),
                        "computed": True, "targets": {}}
    for label, targets in TARGETS.items():
        c = counts(args.rank, targets)
        bf16_base = c["base"] * BF16
        nf4_base = c["block_linear"] * NF4_DOUBLE_QUANT_BITS / 8 + (c["base"] - c["block_linear"]) * BF16
        setups = {"DDP, bf16 base (any N)": per_process(c, 1, False, bf16_base),
                  "DDP, NF4 base (QLoRA, any N)": per_process(c, 1, False, nf4_base)}
        for n in args.processes:
            setups[f"FSDP2, bf16 base, N={n}"] = per_process(c, n, True, bf16_base)
        result["targets"][label] = {"counts": c, "bytes_per_process": setups}
        for name, parts in setups.items():
            rows.append(f"| {label} | {c['adapter']:,} | {name} | " + " | ".join(
                f"{parts[k] / GIB:.2f}" for k in ("base", "adapter_state", "gathered", "total")) + " |")
    c = result["targets"]["all linear"]["counts"]
    table = "\n".join([
        f"LoRA r={args.rank} on a Llama-2-7B-shaped base ({c['base']:,} frozen parameters): memory per process in GiB, "
        "computed from repeft's parameter counts (not measured); activations excluded.",
        "",
        "| LoRA targets | adapter params | set-up | base | adapter + grads + AdamW | gathered while running | total |",
        "|---|---:|---|---:|---:|---:|---:|",
        *rows,
    ])
    write_results(args.out, "fsdp_memory_llama2-7b", result, table)


if __name__ == "__main__":
    main()
