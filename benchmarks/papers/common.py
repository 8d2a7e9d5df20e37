"""Shared harness for the paper-claim reproductions in this folder.

Method-agnostic: an experiment names its *conditions* (``{"LoRA": LoRAConfig(...),
"RepLoRA": RepLoRAConfig(...)}``, or anything else its ``build`` function
understands), gives a ``build(condition) -> nn.Module`` that returns the wrapped
model, and two :class:`Split` objects. :func:`run_grid` then trains every
condition on every (seed, data fraction) cell with the same plain torch loop
and records eval accuracy, loss and F1. :func:`summarize`, :func:`plot_vs_fraction`
and :func:`write_json` turn the records into the committed results.

Fairness rules the loop enforces, so every experiment gets them for free:

* within one seed all conditions see the **same** training subset and the same
  batch order (a ``torch.Generator`` seeded by the seed, independent of the
  model's own RNG use), and the global RNG is re-seeded right before ``build``,
  so a freshly initialised classification head starts identical across
  conditions;
* the subset is stratified (each class keeps its share, at least one example);
* same steps, batch size and schedule for every condition;
* learning rates chosen on data the test split never enters: with an
  :class:`LRSelection`, every condition trains at each rate of one shared grid,
  is scored on a validation split carved out of the training split
  (:func:`holdout`), and only the model of the rate that scored best is
  evaluated on the test split; the chosen rate and the validation score of each
  rate go into the record. Selection may run on some seeds only, the others
  reusing the rate chosen for the same (fraction, condition) (said in each
  record's ``lr_source``).

:func:`paired_differences` compares two conditions seed by seed, which is fair
because within a seed they share the subset and the batch order.

Scripts use it as ``from common import ...`` (they are run as files, so this
folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from verdicts import paired_test, verdict

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def make_parser(description: str, grid: bool = True) -> argparse.ArgumentParser:
    """Parser with the options every experiment shares.

    Size options default to ``None``; :func:`resolve_args` fills them from the
    script's ``default`` preset, or its ``full`` preset under ``--full``.
    Anything given explicitly on the command line wins over both presets.
    ``grid=False`` leaves out ``--steps`` and ``--fractions`` (a script that
    does not run :func:`run_grid`).
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="larger run meant for a GPU (more seeds, steps and data fractions)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run, e.g. --seeds 0 1 2")
    if grid:
        p.add_argument("--steps", type=int, help="optimizer steps per run (same for every condition and fraction)")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--lr", type=float,
                   help="one fixed peak learning rate for every condition, no selection (default: chosen per "
                        "condition from --lr-grid on the validation split)")
    p.add_argument("--lr-grid", type=float, nargs="+", help="peak learning rates to choose from, the same for every condition")
    p.add_argument("--select-seeds", type=seed_or_all, nargs="+",
                   help="seeds on which the lr is chosen (default: the first); the others reuse that choice "
                        "for the same fraction and condition. --select-seeds all: choose on every seed")
    p.add_argument("--validation-fraction", type=float,
                   help="share of the training split held out to choose the lr on (never the test split)")
    if grid:
        p.add_argument("--fractions", type=float, nargs="+", help="fractions of the training set to train on")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and PNG")
    p.add_argument("--tag", default="", help="suffix for the output file names (e.g. lr3e-4)")
    return p


def seed_or_all(text: str) -> int | str:
    return text if text == "all" else int(text)


def resolve_args(args: argparse.Namespace, default: dict[str, Any], full: dict[str, Any]) -> argparse.Namespace:
    """Fill options left at ``None`` from the preset that applies."""
    preset = full if args.full else default
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "select_seeds", None) is None and getattr(args, "seeds", None):
        args.select_seeds = args.seeds[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------
# Seeds and data
# ---------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def stratified_subsample(labels: Sequence[int] | torch.Tensor, fraction: float, seed: int) -> list[int]:
    """Indices of a class-stratified random subset holding ``fraction`` of each class.

    Each class keeps ``round(fraction * n_class)`` examples, at least one, so a
    rare class never vanishes from a small subset. ``fraction >= 1`` returns all
    indices. The draw depends only on ``seed``, not on global RNG state.
    """
    labels = [int(y) for y in labels]
    if fraction >= 1:
        return list(range(len(labels)))
    if fraction <= 0:
        raise ValueError(f"fraction must be > 0, got {fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    chosen: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        k = max(1, round(fraction * len(idx)))
        chosen.extend(rng.sample(idx, k))
    return sorted(chosen)


@dataclass
class Split:
    """A labelled split that any model can consume.

    ``collate(indices)`` returns the model's keyword inputs (without labels) for
    those examples, on CPU; ``lengths`` (e.g. token counts) lets batches group
    similar lengths so dynamic padding wastes little.
    """

    labels: torch.Tensor
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    lengths: Sequence[int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Split:
        """The examples at ``indices``, renumbered from 0."""
        indices = list(indices)
        return Split(labels=self.labels[indices], collate=lambda idx: self.collate([indices[i] for i in idx]),
                     lengths=None if self.lengths is None else [self.lengths[i] for i in indices])


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """``(rest, held_out)``: a stratified ``fraction`` of ``split`` set aside, e.g. as a validation set.

    Choosing a learning rate on it instead of the test set keeps the test
    numbers of the final run free of that choice.
    """
    held = stratified_subsample(split.labels, fraction, seed)
    held_set = set(held)
    return split.subset([i for i in range(len(split)) if i not in held_set]), split.subset(held)


def text_split(tok: Any, name: str, split: str, max_len: int) -> Split:
    """A shipped text dataset (``repeft.data.load_text_dataset``) tokenized once, padded per batch."""
    from repeft.data import load_text_dataset

    rows = load_text_dataset(name, split)
    return tokenized_split(tok, [r["text"] for r in rows], [r["label"] for r in rows], max_len)


@dataclass
class TextTask:
    """A shipped text dataset ready for :func:`run_grid`, with the MiniLM the text experiments adapt."""

    name: str
    labels: tuple[str, ...]
    train: Split
    test: Split
    model_path: Path

    def builder(self, wrap: Callable[[nn.Module, Any], nn.Module]) -> Callable[[Any], nn.Module]:
        """``build(condition)`` for :func:`run_grid`: a fresh MiniLM classifier with a new head, then ``wrap``."""
        from transformers import AutoModelForSequenceClassification

        def build(condition: Any) -> nn.Module:
            base = AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=len(self.labels))
            return wrap(base, condition)

        return build

    def describe(self, max_len: int) -> dict[str, Any]:
        counts = torch.bincount(self.test.labels, minlength=len(self.labels))
        return {"name": self.name, "classes": len(self.labels), "train": len(self.train), "test": len(self.test),
                "max_len": max_len, "test_majority_accuracy": counts.max().item() / len(self.test)}


def load_text_task(name: str, max_len: int) -> TextTask:
    """MiniLM's tokenizer over a shipped dataset (``repeft.data``): train and test splits, label names."""
    import transformers
    from transformers import AutoTokenizer

    from repeft.data import label_names, minilm_path

    transformers.logging.set_verbosity_error()  # "classifier newly initialised", once per run
    transformers.logging.disable_progress_bar()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    return TextTask(name=name, labels=label_names(name), train=text_split(tok, name, "train", max_len),
                    test=text_split(tok, name, "test", max_len), model_path=Path(path))


def tokenized_split(tok: Any, texts: Sequence[str], labels: Sequence[int], max_len: int) -> Split:
    """``texts`` tokenized once; batches are padded only to their own longest text."""
    ids = [tok(text, truncation=True, max_length=max_len)["input_ids"] for text in texts]
    pad = tok.pad_token_id

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    return Split(labels=torch.tensor(list(labels)), collate=collate, lengths=[len(x) for x in ids])


def train_batches(indices: Sequence[int], batch_size: int, steps: int, generator: torch.Generator,
                  lengths: Sequence[int] | None = None) -> Iterator[list[int]]:
    """``steps`` batches drawn epoch after epoch, each epoch a fresh permutation of ``indices``.

    An epoch's last batch may be smaller; a batch never spans two epochs, so
    it never holds the same example twice (which matters for tiny subsets).
    With ``lengths``, each run of up to 32 batches of the permutation is sorted
    by length before being cut into batches, and the epoch's batches are then
    shuffled (what ``group_by_length`` does in HF's Trainer): the same
    examples, much less padding.
    """
    indices = list(indices)
    mega = 32 * batch_size
    made = 0
    while True:
        perm = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        batches: list[list[int]] = []
        for start in range(0, len(perm), mega):
            chunk = perm[start: start + mega]
            if lengths is not None:
                chunk.sort(key=lambda i: lengths[i])
            batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
        for b in torch.randperm(len(batches), generator=generator).tolist():
            if made == steps:
                return
            made += 1
            yield batches[b]


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float = 0.1  # linear warm-up, then linear decay to zero
    weight_decay: float = 0.0  # none: decay would act differently on LoRA's A, B and on RepLoRA's MLPs
    max_grad_norm: float = 1.0
    log_every: int = 10  # training-loss curve resolution (mean over each window)
    # Peak learning rates for some parameters, by a substring of their name: {"classifier": 1e-2}
    # trains the head at 1e-2 and everything else at ``lr``. The schedule scales all alike.
    lr_by_name: dict[str, float] | None = None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(model: nn.Module, split: Split, indices: Sequence[int], cfg: TrainConfig, device: torch.device,
          generator: torch.Generator) -> list[float]:
    """Plain loop: AdamW over the trainable parameters, linear schedule, cross-entropy on ``.logits``.

    Returns the mean training loss of each ``log_every``-step window.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    params = [p for _, p in named]
    opt = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    curve: list[float] = []
    window: list[float] = []
    for idx in train_batches(indices, cfg.batch_size, cfg.steps, generator, split.lengths):
        batch = to_device(split.collate(idx), device)
        labels = split.labels[idx].to(device)
        loss = nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == cfg.log_every:
            curve.append(sum(window) / len(window))
            window = []
    if window:
        curve.append(sum(window) / len(window))
    return curve


def param_groups(named: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """One optimizer group per learning rate: ``cfg.lr_by_name``'s first matching key, else ``cfg.lr``."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in named:
        lr = next((v for k, v in (cfg.lr_by_name or {}).items() if k in name), cfg.lr)
        groups.setdefault(lr, []).append(p)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 64) -> dict[str, float]:
    """Accuracy, mean cross-entropy, macro-F1 and, for two classes, F1 of label 1 (the positive class)."""
    model.eval()
    order = list(range(len(split)))
    if split.lengths is not None:
        order.sort(key=lambda i: split.lengths[i])
    chunks: list[torch.Tensor] = []
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        chunks.append(model(**to_device(split.collate(idx), device)).logits.float().cpu())
    logits = torch.empty(len(split), chunks[0].shape[-1])
    logits[torch.tensor(order)] = torch.cat(chunks)
    return classification_metrics(logits, split.labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(-1)
    n_classes = logits.shape[-1]
    f1s = []
    for c in range(n_classes):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    out = {
        "accuracy": (pred == labels).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "macro_f1": sum(f1s) / n_classes,
    }
    if n_classes == 2:
        out["f1_pos"] = f1s[1]
    return out


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# ---------------------------------------------------------------------------
# The grid: conditions x seeds x fractions
# ---------------------------------------------------------------------------


@dataclass
class LRSelection:
    """Choose each condition's peak learning rate on a validation split, from one grid shared by all.

    ``seeds``: the seeds that choose (``None``: every seed); any other seed
    reuses the rate a choosing seed picked for the same fraction and condition.
    The best rate has the highest validation ``metric``; ties go to the lower
    validation loss.

    >>> rest, val = holdout(train_split, 0.1, seed=VALIDATION_SEED)   # doctest: +SKIP
    >>> LRSelection(grid=(1e-3, 3e-3, 1e-2), validation=val, seeds=[0])  # doctest: +SKIP
    """

    grid: Sequence[float]
    validation: Split
    seeds: Sequence[int] | None = None
    metric: str = "accuracy"

    def chooses_on(self, seed: int) -> bool:
        return self.seeds is None or seed in self.seeds

    def better(self, a: dict[str, float], b: dict[str, float] | None) -> bool:
        """Whether validation metrics ``a`` beat ``b``."""
        return b is None or (a[self.metric], -a["loss"]) > (b[self.metric], -b["loss"])


VALIDATION_SEED = 1234  # one fixed validation split per dataset, whatever the run's seeds


def lr_selection(args: argparse.Namespace, train_split: Split) -> tuple[Split, LRSelection | None]:
    """``(training pool, selection)`` from the shared options: no selection (and the whole split) under ``--lr``.

    Otherwise a stratified ``--validation-fraction`` of ``train_split`` is set
    aside (the same examples for every seed) and data fractions are of the rest.
    """
    if args.lr is not None:
        return train_split, None
    pool, validation = holdout(train_split, args.validation_fraction, VALIDATION_SEED)
    seeds = None if "all" in args.select_seeds else list(args.select_seeds)
    return pool, LRSelection(grid=list(args.lr_grid), validation=validation, seeds=seeds)


def run_grid(conditions: dict[str, Any], build: Callable[[Any], nn.Module], train_split: Split, eval_split: Split,
             fractions: Sequence[float], seeds: Sequence[int], cfg: TrainConfig | dict[str, TrainConfig],
             device: torch.device, on_record: Callable[[list[dict]], None] | None = None,
             selection: LRSelection | None = None) -> list[dict]:
    """Train and evaluate every condition on every (seed, fraction); one record per (seed, fraction, condition).

    ``cfg`` may be a dict by condition name; steps and batch size should still
    agree. With ``selection`` its grid replaces ``cfg.lr`` (``cfg.lr_by_name``
    still applies), and ``eval_split`` (the test split) only ever sees the
    model of the chosen rate. Choosing seeds run first.

    ``on_record(records_so_far)`` is called after each record, so a script can
    write partial results (a crash or Ctrl-C then loses one cell, not all).
    """
    if selection is not None:  # choosing seeds first, so the others find the rate to reuse
        seeds = sorted(seeds, key=lambda s: not selection.chooses_on(s))
    chosen: dict[tuple[float, str], tuple[float, int]] = {}
    records: list[dict] = []
    total = len(seeds) * len(fractions) * len(conditions)
    for seed in seeds:
        for fraction in fractions:
            subset = stratified_subsample(train_split.labels, fraction, seed)
            for name, condition in conditions.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run_cfg = cfg[name] if isinstance(cfg, dict) else cfg
                if selection is None:
                    lrs, source = [run_cfg.lr], "fixed"
                elif selection.chooses_on(seed):
                    lrs, source = list(selection.grid), "validation"
                else:
                    if (fraction, name) not in chosen:
                        raise ValueError(f"no choosing seed ran fraction {fraction:g}, {name!r}: add one to "
                                         "--select-seeds")
                    lr, by = chosen[(fraction, name)]
                    lrs, source = [lr], f"reused from seed {by}"
                best = None  # (validation metrics, lr, model, curve)
                by_lr = {}
                for lr in lrs:
                    model, curve = train_once(build, condition, train_split, subset, replace(run_cfg, lr=lr), seed,
                                              device)
                    if len(lrs) == 1:
                        best = (None, lr, model, curve)
                        break
                    val = evaluate(model, selection.validation, device)
                    by_lr[f"{lr:g}"] = {"accuracy": val["accuracy"], "loss": val["loss"]}
                    print(f"    {name} lr {lr:g}: validation accuracy {val['accuracy']:.4f} loss {val['loss']:.4f}",
                          flush=True)
                    if selection.better(val, best[0] if best else None):
                        best = (val, lr, model, curve)
                    del model
                _, lr, model, curve = best
                if source == "validation":
                    chosen[(fraction, name)] = (lr, seed)
                t_train = time.perf_counter() - t0
                metrics = evaluate(model, eval_split, device)
                rec = {"condition": name, "seed": seed, "fraction": fraction, "n_train": len(subset),
                       "trainable_params": count_trainable(model), "lr": lr, "lr_source": source,
                       **({"validation_by_lr": by_lr} if by_lr else {}),
                       **metrics, "train_loss_curve": curve,
                       "train_seconds": round(t_train, 1),  # all rates tried, with their validation passes
                       "eval_seconds": round(time.perf_counter() - t0 - t_train, 1),
                       # CPU time of all threads: unlike wall time, barely moved by other jobs on shared cores.
                       "cpu_seconds": round(time.process_time() - c0, 1)}
                records.append(rec)
                print(f"[{len(records)}/{total}] seed {seed} frac {fraction:g} (n={len(subset)}) {name} lr {lr:g} "
                      f"({source}): " + " ".join(f"{k} {metrics[k]:.4f}" for k in metrics)
                      + f"  ({rec['train_seconds']:.0f}+{rec['eval_seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU)",
                      flush=True)
                del model, best
                if on_record is not None:
                    on_record(records)
    return records


def train_once(build: Callable[[Any], nn.Module], condition: Any, split: Split, subset: Sequence[int],
               cfg: TrainConfig, seed: int, device: torch.device) -> tuple[nn.Module, list[float]]:
    """One training run. The RNG is re-seeded before ``build`` and the batch order comes from its own
    generator, so every condition and every rate of a seed starts from the same head and sees the same batches."""
    set_seed(seed)
    model = build(condition).to(device)
    curve = train(model, split, subset, cfg, device, torch.Generator().manual_seed(seed))
    return model, curve


def paired_differences(records: list[dict], baseline: str, other: str, metric: str,
                       x: str = "fraction") -> dict[str, dict[str, Any]]:
    """``other - baseline`` in ``metric`` seed by seed, per ``x`` value: the differences, their mean ± std,
    the paired tests' p-values and the verdict by the rule of ``verdicts.py``.

    Pairs share the seed, hence the training subset and the batch order; only
    cells where both ran count.
    """
    value = {(r["condition"], r[x], r["seed"]): r[metric] for r in records}
    out: dict[str, dict[str, Any]] = {}
    for (cond, xv, seed), v in sorted(value.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if cond == other and (baseline, xv, seed) in value:
            out.setdefault(f"{xv:g}", {"seeds": [], "differences": []})
            out[f"{xv:g}"]["seeds"].append(seed)
            out[f"{xv:g}"]["differences"].append(v - value[(baseline, xv, seed)])
    for cell in out.values():
        cell.update(mean_std(cell["differences"]))
        cell["n_positive"] = sum(d > 0 for d in cell["differences"])
        cell.update(paired_test(cell["differences"], metric), verdict=verdict(cell["differences"], metric))
    return out


def paired_table(records: list[dict], baseline: str, others: Sequence[str], metrics: Sequence[str],
                 x: str = "fraction", x_label: str = "data fraction") -> str:
    """Markdown: one row per (x, other), cells ``other - baseline`` seed by seed as ``mean ± std (k/n >0, p)``.

    ``k/n >0``: of the n seeds, k had a positive difference; ``p``: the paired t-test's two-sided p-value.
    """
    head = f"| {x_label} | vs {baseline} | " + " | ".join(f"Δ {m}" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    diffs = {(o, m): paired_differences(records, baseline, o, m, x) for o in others for m in metrics}
    xs = sorted({xv for d in diffs.values() for xv in d}, key=float)
    for xv in xs:
        for o in others:
            cells = [diffs[(o, m)].get(xv) for m in metrics]
            if any(c is None for c in cells):
                continue
            lines.append(f"| {xv} | {o} | " + " | ".join(
                f"{c['mean']:+.4f} ± {c['std']:.4f} ({c['n_positive']}/{c['n']} >0, p {_p(c['p_t'])})" for c in cells) + " |")
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def chosen_lrs(records: list[dict], x: str = "fraction") -> dict[str, dict[str, list[float]]]:
    """``{condition: {x value: [lr of each seed]}}``, the rates the runs used."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in records:
        out.setdefault(r["condition"], {}).setdefault(f"{r[x]:g}", []).append(r["lr"])
    return out


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(records: list[dict], metrics: Sequence[str], x: str = "fraction") -> dict[str, dict[str, dict]]:
    """``{condition: {str(x value): {metric: {mean, std, n}}}}`` over seeds."""
    out: dict[str, dict[str, dict]] = {}
    for rec in records:
        cell = out.setdefault(rec["condition"], {}).setdefault(f"{rec[x]:g}", {})
        for m in metrics:
            cell.setdefault(m, []).append(rec[m])
    return {c: {xv: {m: mean_std(v) for m, v in cell.items()} for xv, cell in by_x.items()}
            for c, by_x in out.items()}


def grid_results(records: list[dict], metrics: Sequence[str], comparisons: dict[str, Sequence[str]]) -> dict:
    """What a result JSON holds beside the records: summary over seeds, chosen rates, paired differences.

    ``comparisons`` maps a baseline condition to the conditions compared with it seed by seed.
    """
    present = {r["condition"] for r in records}
    return {"summary": summarize(records, metrics), "chosen_lr": chosen_lrs(records),
            "paired": {f"{o} - {b}": {m: paired_differences(records, b, o, m) for m in metrics}
                       for b, others in comparisons.items() for o in others if {b, o} <= present}}


def report(records: list[dict], metrics: Sequence[str], comparisons: dict[str, Sequence[str]],
           n_train: dict[str, int] | None = None) -> str:
    """Markdown: mean ± std per condition, the chosen rates, then the paired differences."""
    lines = [markdown_table(summarize(records, metrics), metrics, n_train=n_train), "", "chosen peak lr (per seed):"]
    lines += [f"  {c}: " + ", ".join(f"{xv}: {'/'.join(f'{lr:g}' for lr in lrs)}" for xv, lrs in by_x.items())
              for c, by_x in chosen_lrs(records).items()]
    present = {r["condition"] for r in records}
    for baseline, others in comparisons.items():
        if baseline in present and present & set(others):
            lines += ["", paired_table(records, baseline, others, metrics)]
    return "\n".join(lines)


def markdown_table(summary: dict[str, dict[str, dict]], metrics: Sequence[str], x_label: str = "data fraction",
                   digits: dict[str, int] | None = None, n_train: dict[str, int] | None = None) -> str:
    """One row per (x, condition), one column per metric, cells ``mean ± std``."""
    digits = digits or {}
    head = f"| {x_label} | " + ("n train | " if n_train else "") + "method | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    xs = sorted({xv for by_x in summary.values() for xv in by_x}, key=float)
    for xv in xs:
        for cond, by_x in summary.items():
            if xv not in by_x:
                continue
            cells = []
            for m in metrics:
                s, d = by_x[xv][m], digits.get(m, 4)
                cells.append(f"{s['mean']:.{d}f} ± {s['std']:.{d}f}")
            n = f"{n_train[xv]} | " if n_train else ""
            lines.append(f"| {xv} | {n}{cond} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def environment() -> dict[str, str]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "torch_threads": str(torch.get_num_threads()), "cpu_count": str(os.cpu_count())}
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    if hasattr(os, "getloadavg"):  # other jobs on the same cores inflate wall times; this shows how much
        env["load_average_1_5_15min"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return env


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {"type": type(obj).__name__, **jsonable(asdict(obj))}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class PlotSpec:
    metric: str
    label: str
    lower_is_better: bool = False


def plot_vs_fraction(records: list[dict], specs: Sequence[PlotSpec], path: Path, title: str,
                     x: str = "fraction", x_label: str = "fraction of training data", log_x: bool = True,
                     references: dict[str, tuple[float, str]] | None = None) -> None:
    """One panel per metric: mean ± std over seeds per condition, the single seeds as faint dots.

    ``references`` maps a metric to ``(value, label)`` drawn as a dashed line
    (e.g. the majority-class accuracy).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(r["condition"] for r in records))
    fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.6), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for k, cond in enumerate(conditions):
            color = f"C{k}"
            rs = [r for r in records if r["condition"] == cond]
            xs = sorted({r[x] for r in rs})
            stats = [mean_std([r[spec.metric] for r in rs if r[x] == xv]) for xv in xs]
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3,
                        color=color, label=cond)
            ax.scatter([r[x] for r in rs], [r[spec.metric] for r in rs], s=8, alpha=0.35, color=color)
        if references and spec.metric in references:
            value, label = references[spec.metric]
            ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
        if log_x:
            ax.set_xscale("log")
            ticks = sorted({r[x] for r in records})
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel(spec.label + (" (lower is better)" if spec.lower_is_better else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# One claim on a text task: the whole command-line experiment
# ---------------------------------------------------------------------------

TEXT_METRICS = ("accuracy", "loss", "macro_f1")


@dataclass
class TextClaim:
    """A paper claim tested on a shipped text task with MiniLM: what :func:`run_text_claim` needs.

    ``conditions(args)`` gives ``{name: repeft config}``; ``comparisons`` maps a
    baseline to the conditions paired with it seed by seed; ``add_arguments``
    adds the script's own options. Presets name the shared options
    (seeds, steps, batch_size, fractions, lr_grid, validation_fraction,
    max_len, select_seeds).
    """

    experiment: str
    claim: str
    doc: str
    conditions: Callable[[argparse.Namespace], dict[str, Any]]
    comparisons: dict[str, Sequence[str]]
    default: dict[str, Any]
    full: dict[str, Any]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    head_lr: float = 1e-2  # the new head: fixed, the same for every condition (a 40-way head is slow at 2e-3)


def run_text_claim(claim: TextClaim, argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, run the grid with lr selection, write ``results/<experiment>[_TAG].json/.png``."""
    import repeft

    parser = make_parser(claim.doc)
    parser.add_argument("--dataset", default="wordnet_supersenses", choices=["wordnet_supersenses", "sms_spam"],
                        help="sms_spam: the quick smoke task (saturates: it cannot tell these methods apart)")
    parser.add_argument("--head-lr", type=float, default=claim.head_lr, help="peak lr of the new head, all conditions")
    parser.add_argument("--max-len", type=int, help="tokens per text (glosses: the longest has 75)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG (and print the tables) from the JSON an earlier run wrote")
    if claim.add_arguments:
        claim.add_arguments(parser)
    args = resolve_args(parser.parse_args(argv), claim.default, claim.full)
    stem = claim.experiment + (f"_{args.tag}" if args.tag else "")
    out_json, out_png = args.out / f"{stem}.json", args.out / f"{stem}.png"
    if args.replot:
        result = json.loads(out_json.read_text())
        plot_text_claim(result, out_png)
        print(report(result["records"], TEXT_METRICS, claim.comparisons, result["data"]["n_train_per_fraction"]))
        return result

    task = load_text_task(args.dataset, args.max_len)
    pool, selection = lr_selection(args, task.train)
    conditions = claim.conditions(args)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 0.0,
                      lr_by_name={"classifier": args.head_lr})
    n_train = {f"{f:g}": len(stratified_subsample(pool.labels, f, 0)) for f in args.fractions}
    t_start = time.perf_counter()

    def payload(records: list[dict], done: bool) -> dict:
        return {
            "experiment": claim.experiment, "complete": done, "claim": claim.claim,
            "model": f"sentence-transformers/all-MiniLM-L6-v2 (BertForSequenceClassification, new "
                     f"{len(task.labels)}-way head)",
            "data": {**task.describe(args.max_len), "train_pool": len(pool),
                     "validation": len(selection.validation) if selection else 0, "n_train_per_fraction": n_train},
            "lr_grid": list(args.lr_grid) if selection else [args.lr],
            "lr_selection": "fixed --lr" if selection is None else
            f"best validation accuracy (ties: lower loss) on seeds {selection.seeds or 'all'}; "
            "other seeds reuse that rate for the same fraction and condition",
            "conditions": conditions, "train_config": cfg, "device": args.device, "seeds": args.seeds,
            "fractions": args.fractions, "command": sys.argv, "environment": environment(),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            **grid_results(records, TEXT_METRICS, claim.comparisons), "records": records,
        }

    records = run_grid(conditions, task.builder(repeft.wrap), pool, task.test, args.fractions, args.seeds, cfg,
                       args.device, on_record=lambda recs: write_json(out_json, payload(recs, False)),
                       selection=selection)
    result = jsonable(payload(records, True))  # plain dicts, as --replot reads them back
    write_json(out_json, result)
    plot_text_claim(result, out_png)
    print()
    print(report(records, TEXT_METRICS, claim.comparisons, n_train))
    print(f"\nwall time {result['wall_seconds']:.0f} s; wrote {out_json} and {out_png}")
    return result


def plot_text_claim(result: dict, path: Path) -> None:
    cfg, data = result["train_config"], result["data"]
    plot_vs_fraction(
        result["records"],
        [PlotSpec("accuracy", "test accuracy"), PlotSpec("loss", "test loss", True),
         PlotSpec("macro_f1", "test macro F1")],
        path,
        f"{result['experiment']}: MiniLM on {data['name']}, {cfg['steps']} steps x batch {cfg['batch_size']}, "
        f"lr from {result['lr_grid']} on validation, {len(result['seeds'])} seeds (mean ± std)",
        references={"accuracy": (data["test_majority_accuracy"], "majority class"),
                    "loss": (math.log(data["classes"]), "uniform prediction")},
    )
