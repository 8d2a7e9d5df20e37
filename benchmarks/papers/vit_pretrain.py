"""Pretrain a small ViT on MNIST digits 0-4, to be adapted to digits 5-9 by the VAPT vs VPT experiment.

No pretrained ViT is available offline, so the visual-prompt experiments use a
stand-in backbone made here: a ``transformers`` ``ViTForImageClassification``
built from a config (28x28 grey images, 4x4 patches -> a 7x7 grid + [CLS],
hidden 128, 6 layers, 4 heads, MLP 512; ~1.2M parameters), trained from scratch
on the digits 0-4 of the shipped ``mnist_5k`` train split (2,000 images) and
measured on the digits 0-4 of its test split (500 images). Digits 5-9 (train
and test) are never seen here, so adapting to them is a task with disjoint
classes and disjoint images. This is a far smaller and weaker backbone than the
ImageNet-21k ViT-B/16 of the VPT / VAPT papers; say so wherever it is used.

    python benchmarks/papers/vit_pretrain.py            # ~8.5 CPU-minutes (about 5-9 min on 2 idle cores)
    python benchmarks/papers/vit_pretrain.py --full     # more epochs, for a GPU

Saves the model (``save_pretrained``) plus ``preprocess.json`` (normalisation)
and ``pretrain.json`` (held-out accuracy) to ``--model-dir`` (default
``$REPEFT_CACHE/papers/vit_mnist04[_full]``, i.e. ``~/.cache/repeft/...``; not
committed), and the metrics + plot to results/vit_pretrain[_full].json / .png.
Other scripts call :func:`load_backbone`, which pretrains first if needed.
"""

from __future__ import annotations

import os

# The 2 cores are shared with other jobs. OpenMP threads that spin-wait at barriers (the default)
# then burn each other's time slices: training steps ran 3-10x slower here. Sleeping threads cost
# little on an idle machine. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import classification_metrics, environment, make_parser, pick_device, set_seed, write_json  # noqa: I001
from repeft.data import load_image_dataset

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
ADAPT_CLASSES = (5, 6, 7, 8, 9)
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (mnist_5k: 0.1313 / 0.3086)

DEFAULT = {"epochs": 30, "batch_size": 64, "lr": 1e-3, "seeds": [0]}
FULL = {"epochs": 100, "batch_size": 128, "lr": 1e-3, "seeds": [0]}


def vit_config(num_labels: int = len(PRETRAIN_CLASSES)) -> ViTConfig:
    return ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=128, num_hidden_layers=6,
                     num_attention_heads=4, intermediate_size=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=num_labels)


def default_model_dir(full: bool = False) -> Path:
    cache = os.environ.get("REPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "repeft")
    return Path(cache) / "papers" / ("vit_mnist04_full" if full else "vit_mnist04")


def digits_subset(split: str, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """mnist_5k images of ``classes``, normalised, labels renumbered 0..len(classes)-1."""
    x, y = load_image_dataset("mnist_5k", split)
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return (x[keep] - MEAN) / STD, relabel[y[keep]]


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random affine (rotation +-10 deg, scale 0.9-1.1, shift +-2 px): 2,000 images overfit without it."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, scale, shift = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1], u[:, 2:] * (2 / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    background = -MEAN / STD  # a black pixel after normalisation
    return nn.functional.grid_sample(x - background, grid, align_corners=False) + background


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(pixel_values=x[i: i + 256].to(device)).logits.float().cpu()
                        for i in range(0, len(x), 256)])
    return classification_metrics(logits, y)


def pretrain(model_dir: Path, epochs: int, batch_size: int, lr: float, seed: int, device: torch.device) -> dict:
    set_seed(seed)
    x_tr, y_tr = digits_subset("train", PRETRAIN_CLASSES)
    x_te, y_te = digits_subset("test", PRETRAIN_CLASSES)
    model = ViTForImageClassification(vit_config()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch  # one epoch of warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(seed)
    curve = []
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(x_tr), generator=gen).split(batch_size):
            xb = augment(x_tr[idx], gen).to(device)
            loss = nn.functional.cross_entropy(model(pixel_values=xb).logits, y_tr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        metrics = evaluate(model, x_te, y_te, device)
        curve.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **metrics})
        print(f"epoch {epoch + 1}/{epochs}: train loss {curve[-1]['train_loss']:.4f}, held-out 0-4 accuracy "
              f"{metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    info = {
        "backbone": "ViTForImageClassification from config, trained from scratch (no pretrained ViT offline)",
        "config": vit_config().to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_data": "mnist_5k train, digits 0-4 (2,000 images), random affine augmentation",
        "heldout_data": "mnist_5k test, digits 0-4 (500 images)", "classes": list(PRETRAIN_CLASSES),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": 0.05, "seed": seed,
        "schedule": "AdamW, 1 epoch linear warm-up, cosine to 0, grad clip 1.0",
        "heldout": curve[-1], "curve": curve, "device": str(device),
        "train_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
        "environment": environment(),
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    write_json(model_dir / "preprocess.json", {"mean": MEAN, "std": STD, "image_size": 28,
                                               "classes": list(PRETRAIN_CLASSES)})
    write_json(model_dir / "pretrain.json", info)  # written last: its presence marks a finished model
    return info


def load_backbone(model_dir: Path | None = None, device: torch.device | str = "cpu",
                  num_labels: int = len(ADAPT_CLASSES)) -> ViTForImageClassification:
    """The pretrained ViT with a fresh ``num_labels`` head; pretrains it first (default size) if missing."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if not (model_dir / "pretrain.json").is_file():
        print(f"no pretrained ViT in {model_dir}; pretraining it now (default size)")
        pretrain(model_dir, DEFAULT["epochs"], DEFAULT["batch_size"], DEFAULT["lr"], 0, torch.device(device))
    model = ViTForImageClassification.from_pretrained(model_dir, num_labels=num_labels, ignore_mismatched_sizes=True)
    # A fresh head even when the label count matches (5 -> 5): the 0-4 head means nothing for digits 5-9.
    # ViT's own init (truncated normal, std initializer_range), drawn from the global RNG, so seeding first
    # gives every condition of an experiment the same starting head.
    model.classifier = nn.Linear(model.config.hidden_size, num_labels)
    nn.init.trunc_normal_(model.classifier.weight, std=model.config.initializer_range)
    nn.init.zeros_(model.classifier.bias)
    return model.to(device)


def plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [c["epoch"] for c in curve]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    a1.plot(epochs, [c["train_loss"] for c in curve], label="train (augmented)")
    a1.plot(epochs, [c["loss"] for c in curve], label="held-out 0-4")
    a1.set_xlabel("epoch"), a1.set_ylabel("cross-entropy"), a1.legend(), a1.grid(alpha=0.3)
    a2.plot(epochs, [c["accuracy"] for c in curve], color="C1")
    a2.set_xlabel("epoch"), a2.set_ylabel("held-out 0-4 accuracy"), a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = make_parser(__doc__, grid=False)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--model-dir", type=Path, help="where to save the model (default: the cache, see above)")
    args = parser.parse_args()
    preset = FULL if args.full else DEFAULT
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model_dir = args.model_dir or default_model_dir(args.full)
    info = pretrain(model_dir, args.epochs, args.batch_size, args.lr, args.seeds[0], device)
    stem = "vit_pretrain" + ("_full" if args.full else "") + (f"_{args.tag}" if args.tag else "")
    write_json(args.out / f"{stem}.json", {**info, "model_dir": str(model_dir)})
    plot(info["curve"], args.out / f"{stem}.png",
         f"ViT (6x128, patch 4) from scratch on MNIST 0-4 ({info['parameters']:,} params)")
    print(f"held-out 0-4 accuracy {info['heldout']['accuracy']:.4f}; {info['train_seconds']:.0f} s wall, "
          f"{info['cpu_seconds']:.0f} s CPU; model in {model_dir}; results in {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
