"""Cost of VPT-deep and VAPT against the frozen base, measured in one run.

For a ViT image classifier (random weights: timing does not depend on them) it times

- inference: one forward pass without gradients;
- a training step: forward, backward and AdamW step. VPT-deep and VAPT train
  their prompts plus the head. The frozen base trains the head too, with its
  backward run through every frozen layer as any in-encoder adapter needs, so the
  ratios to it show what the prompts add; a linear probe (backward stops at the
  head) is listed for scale;

and measures the memory kept for backward (bytes of activations saved by autograd,
counted once per storage, weights excluded; on CUDA also the peak memory a
training step adds to what is resident).
The configurations are run interleaved, step by step, so drift in machine load
hits all of them alike; times are medians. It also prints trainable-parameter
counts of VPT-deep and VAPT at several prompt lengths for ViT-B/16 at 224 px.

    PYTHONPATH=. python benchmarks/visual_prompts.py --preset vit-small --batch 8 --threads 1
    PYTHONPATH=. python benchmarks/visual_prompts.py --preset vit-base --batch 64 --device cuda

Writes ``<out>/visual_prompts_<preset>_<device>.json`` and ``.md`` (a markdown
table; ``--out`` defaults to benchmarks/results) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SavedActivationBytes,
    environment,
    sync,
    time_interleaved,
    write_results,
)

import repeft

PRESETS = {
    "vit-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "vit-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit-tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
}
BASE = "frozen base"


def models_to_compare(args, device: torch.device) -> dict[str, torch.nn.Module]:
    """The frozen base (the ratios' denominator), a linear probe, VPT-deep and VAPT, all with a trainable head."""
    torch.manual_seed(0)
    config = tf.ViTConfig(**PRESETS[args.preset], image_size=args.image_size, patch_size=args.patch_size,
                          num_labels=args.num_labels)
    base = tf.ViTForImageClassification(config).to(device)
    base.requires_grad_(False)
    base.classifier.requires_grad_(True)
    probe = copy.deepcopy(base)
    # Any adapter inside the encoder makes backward run through every frozen layer; the
    # frozen base pays that too (its embeddings output requires grad), so the ratios show
    # only what the prompts add. The linear probe, whose backward stops at the head, is for scale.
    base.vit.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    vpt = repeft.wrap(copy.deepcopy(probe), repeft.VPTConfig(n_prompt=args.n_prompt))
    vapt = repeft.wrap(
        copy.deepcopy(probe),
        repeft.VAPTConfig(n_prompt=args.n_prompt, kernel_size=args.kernel_size, mlp_hidden=args.mlp_hidden),
    )
    return {BASE: base, "linear probe": probe, "VPT-deep": vpt, "VAPT": vapt}


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one training forward, each storage once, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = SavedActivationBytes()
    with saved:
        loss = model(**batch).loss
    del loss
    return sum(n for ptr, n in saved.storages.items() if ptr not in weights)


def run(args) -> dict:
    device = torch.device(args.device)
    models = models_to_compare(args, device)
    g = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device),
        "labels": torch.randint(0, args.num_labels, (args.batch,), generator=g).to(device),
    }
    forward_fns, step_fns, peak = {}, {}, {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def forward(model=model):
            model.eval()
            with torch.no_grad():
                model(pixel_values=batch["pixel_values"])

        def step(model=model, optimizer=optimizer):
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        forward_fns[name], step_fns[name] = forward, step
        if device.type == "cuda":
            step()  # creates optimizer state
            sync(device)
            # All four models stay resident; count what one step adds on top of them.
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync(device)
            peak[name] = torch.cuda.max_memory_allocated() - resident
    forward_s = time_interleaved(forward_fns, device, args.rounds, args.steps)
    step_s = time_interleaved(step_fns, device, args.rounds, args.steps)
    rows = {}
    for name, model in models.items():
        model.train()
        rows[name] = {
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "forward_ms": 1e3 * forward_s[name],
            "step_ms": 1e3 * step_s[name],
            "saved_activations_MiB": saved_activation_bytes(model, batch) / 2**20,
        }
        if name in peak:
            rows[name]["step_peak_MiB"] = peak[name] / 2**20
    base = rows[BASE]
    for row in rows.values():
        row["forward_ratio"] = row["forward_ms"] / base["forward_ms"]
        row["step_ratio"] = row["step_ms"] / base["step_ms"]
        row["saved_activations_ratio"] = row["saved_activations_MiB"] / base["saved_activations_MiB"]
    vpt, vapt = rows["VPT-deep"], rows["VAPT"]
    return {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **environment()},
        "rows": rows,
        "vapt_over_vpt": {
            "forward": vapt["forward_ms"] / vpt["forward_ms"],
            "step": vapt["step_ms"] / vpt["step_ms"],
            "saved_activations": vapt["saved_activations_MiB"] / vpt["saved_activations_MiB"],
        },
        "param_counts_vit_b16_224": parameter_counts(args),
    }


def parameter_counts(args) -> list[dict]:
    """Trainable prompt parameters (head excluded) of VPT-deep and VAPT on ViT-B/16 at 224 px."""
    with torch.device("meta"):  # shapes only, no memory
        base = tf.ViTModel(tf.ViTConfig(**PRESETS["vit-base"], image_size=224, patch_size=16), add_pooling_layer=False)
    out = []
    for n in (1, 5, 10, 50, 100, 200):
        vpt = repeft.wrap(base, repeft.VPTConfig(n_prompt=n), adapter_name="vpt")
        vpt.add_adapter("vapt", repeft.VAPTConfig(n_prompt=n, kernel_size=args.kernel_size, mlp_hidden=args.mlp_hidden))
        counts = {name: sum(p.numel() for p in tokens.parameters()) for name, tokens in vpt.visual_prompts.adapters.items()}
        out.append({"n_prompt": n, "VPT-deep": counts["vpt"], "VAPT": counts["vapt"]})
        vpt.delete_adapter("vapt")
        vpt.delete_adapter("vpt")
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    has_peak = "step_peak_MiB" in result["rows"][BASE]
    lines = [
        (
            f"ViT preset `{s['preset']}`, {s['image_size']} px, patch {s['patch_size']}, batch {s['batch']}, "
            f"n_prompt {s['n_prompt']} (VAPT: kernel {s['kernel_size']}, mlp_hidden {s['mlp_hidden']}), "
            f"{s.get('gpu', 'CPU')} ({s['threads']} threads), median of {s['rounds']} rounds x {s['steps']} steps, "
            f"torch {s['torch']}, transformers {s['transformers']}."
        ),
        "",
        (
            "| method | trainable params | forward ms | x base | train step ms | x base | saved activations MiB | x base |"
            + (" step peak MiB |" if has_peak else "")
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_peak else ""),
    ]
    for name, r in result["rows"].items():
        peak = f" {r['step_peak_MiB']:.0f} |" if has_peak else ""
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['forward_ms']:.1f} | {r['forward_ratio']:.2f} | "
            f"{r['step_ms']:.1f} | {r['step_ratio']:.2f} | {r['saved_activations_MiB']:.1f} | "
            f"{r['saved_activations_ratio']:.2f} |{peak}"
        )
    o = result["vapt_over_vpt"]
    lines += [
        "",
        (
            f"VAPT over VPT-deep: forward x{o['forward']:.3f}, train step x{o['step']:.3f}, "
            f"saved activations x{o['saved_activations']:.3f}."
        ),
        "",
        "Trainable prompt parameters on ViT-B/16 at 224 px (head excluded):",
        "",
        "| n_prompt | VPT-deep | VAPT | VAPT / VPT-deep |",
        "|---:|---:|---:|---:|",
    ]
    for c in result["param_counts_vit_b16_224"]:
        lines.append(f"| {c['n_prompt']} | {c['VPT-deep']:,} | {c['VAPT']:,} | {c['VAPT'] / c['VPT-deep']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--num-labels", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-prompt", type=int, default=10)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--mlp-hidden", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=1, help="calls timed per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    write_results(args.out, f"visual_prompts_{args.preset}_{torch.device(args.device).type}", result, markdown(result))


if __name__ == "__main__":
    main()
