"""Memory of the trainable model and step time of LoRA on an fp32, 8-bit and 4-bit base, in one run.

A tiny Llama (default h=512, 4 layers, vocab 2048) is saved once and loaded
back the way users load it: plain fp32, and with ``BitsAndBytesConfig`` as
LLM.int8 (8-bit), NF4 and NF4 with double quantization (4-bit, fp32 compute).
Each base goes through ``repeft.prepare_quantized_model`` (no checkpointing)
and gets the same LoRA, r=16 on every linear layer of the blocks, trained
with AdamW.

Memory = base weights as stored (quantized codes and their scales; linear
layers of the blocks and everything else, i.e. embeddings, norms and the
output head, which bitsandbytes leaves in float, shown apart) + adapter
weights + their gradients + AdamW state. It is counted tensor by tensor, each
storage once, so it is exact on any device. Step time is forward + backward +
optimizer step, the median of interleaved rounds, relative to the fp32 base.

    python benchmarks/quantized_memory.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repeft  # noqa: E402
from common import environment, time_interleaved, write_results  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "fp32": None,
    "int8 (LLM.int8)": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4 + double quant": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}


def base_weight_bytes(model: repeft.AdapterModel) -> dict[str, int]:
    """Bytes of the base model's stored tensors: block linear layers vs the rest, each storage once."""
    base = model.get_base_model()
    linear = tuple(
        f"{name}." for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and ".adapters." not in name and not name.endswith("lm_head")
    )
    seen: set[int] = set()
    sizes = {"linear": 0, "other": 0}
    for key, tensor in base.state_dict().items():  # includes bitsandbytes' absmax / SCB entries
        storage = tensor.untyped_storage()
        if ".adapters." in key or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        sizes["linear" if key.startswith(linear) else "other"] += storage.nbytes()
    return sizes


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=2, help="steps timed per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=args.vocab, max_position_embeddings=args.seq, tie_word_embeddings=False)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    steps, memory = {}, {}
    with tempfile.TemporaryDirectory() as checkpoint:
        LlamaForCausalLM(config).save_pretrained(checkpoint)
        for name, qconfig in VARIANTS.items():
            base = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=qconfig, device_map={"": device})
            base = repeft.prepare_quantized_model(base, gradient_checkpointing=False)
            model = repeft.wrap(base, repeft.LoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def step(model=model, optimizer=optimizer):
                model(input_ids=tokens, labels=tokens).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated, as they are during training

            step()  # creates gradients and optimizer state
            parts = base_weight_bytes(model)
            parts["adapter"] = tensor_bytes(params)
            parts["grads"] = tensor_bytes(p.grad for p in params)
            parts["optimizer"] = tensor_bytes(v for state in optimizer.state.values() for v in state.values())
            memory[name] = parts
            steps[name] = step
    step_time = time_interleaved(steps, device, args.rounds, args.steps)

    ref_time = step_time["fp32"]
    ref_mem = sum(memory["fp32"].values())
    rows = {name: {"step_ms": 1e3 * t, "time_ratio": t / ref_time,
                   "memory_mb": sum(memory[name].values()) / 2**20,
                   "memory_ratio": sum(memory[name].values()) / ref_mem,
                   "memory_parts_mb": {k: v / 2**20 for k, v in memory[name].items()}}
            for name, t in step_time.items()}
    import bitsandbytes

    env = {**environment(), "bitsandbytes": bitsandbytes.__version__}
    result = {"benchmark": "quantized_memory", "args": {k: str(v) for k, v in vars(args).items()}, "env": env, "rows": rows}

    header = ("| base | block linear weights (MiB) | other weights (MiB) | adapter + grads + AdamW (MiB) "
              "| trainable model (MiB) | memory / fp32 | step (ms) | time / fp32 |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        mb = row["memory_parts_mb"]
        lines.append(f"| {name} | {mb['linear']:.2f} | {mb['other']:.2f} | {mb['adapter'] + mb['grads'] + mb['optimizer']:.2f} "
                     f"| {row['memory_mb']:.2f} | {row['memory_ratio']:.3f} | {row['step_ms']:.1f} | {row['time_ratio']:.2f} |")
    lines.append("")
    lines.append(f"{args.device} ({env['threads']} threads), Llama h={args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                 f"batch {args.batch} x {args.seq}, LoRA r={args.rank} on {', '.join(TARGETS)}; fp32 compute; medians of "
                 f"{args.rounds} interleaved rounds of {args.steps} steps. Memory counts stored tensors (quantization "
                 "scales included), not activations.")
    write_results(args.out, "quantized_memory", result, "\n".join(lines))


if __name__ == "__main__":
    main()
