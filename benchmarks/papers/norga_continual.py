"""NoRGa on its own claim: class-incremental WordNet supersenses, one prefix per task, no replay.

Claim under test (Le et al., "Mixture of Experts Meets Prompt-Based Continual
Learning", code: MoE_PromptCL): NoRGa, the non-linear residual gate on the
prefix scores, ``s -> s + alpha * act(tau * s)``, raises the final average
accuracy of prompt-based class-incremental learning over plain prefixes.

Set-up, following the reference (its ``norga_prompt_engine.py``) where this scale allows:

* tasks: ``wordnet_supersenses``' 40 classes in 5 tasks of 8, the class order
  shuffled by the seed (the reference's ``--shuffle True``); each task trains
  on all training examples of its classes, and only on them: no replay;
* model: all-MiniLM-L6-v2 as ``BertForSequenceClassification``, one 40-way
  head shared by all tasks; while task t trains, the logits of the classes
  outside task t are set to -inf (the reference's ``train_mask``), so the head
  rows of earlier classes stay put but the features under them move;
* task-specific prefixes: task t gets its own prefix adapter (free keys and
  values, ``structure="independent"``, ``--n-prefix`` 5 pairs as in the
  reference's scripts, no prefix dropout); earlier tasks' prefixes are frozen;
* NoRGa (``prefix+NoRGa``): the gate's alpha and tau (1 at the start) train
  with task 0's prefix and are then frozen and shared by every later task's
  prefix, as the reference freezes its ``act_scale`` after task 0;
* classifier alignment after each task from the second on (HiDe-Prompt's, as
  MoE_PromptCL runs it): each class keeps the mean and covariance (+1e-4 I)
  of the head's input (BERT's pooled output) over its training examples,
  computed with its task's prefix when the task ends; the head alone then
  trains on features sampled from those Gaussians for every class seen so far
  (SGD, momentum 0.9, weight decay 5e-4, cosine, ``--ca-lr`` 0.005 and
  ``--ca-epochs`` 80 as in its configs; 5 x batch-size samples per class and
  epoch). This is what lets one head compare classes of different tasks;
  statistics, not examples, so still no replay;
* test, after each task, on the test examples of every task seen so far, with
  the task identity **inferred** (the reference's setting): a frozen MiniLM
  (no adapter) embeds each text (mean-pooled, normalised), the nearest class
  mean among the classes seen so far (means over the training examples of
  each class: statistics, no stored examples) names a class, and that class's
  task's prefix runs. The prediction is over the classes seen so far. The
  accuracy with the task identity **given** (the right task's prefix) is
  recorded beside it, as an upper bound that isolates the prefixes from the
  task inference.

Metrics (the reference's): ``A[i][j]``, accuracy on task j after training task
i; final average accuracy ``mean_j A[T-1][j]``; forgetting
``mean_{j<T-1} (max_i A[i][j] - A[T-1][j])``. The two conditions share the
class order, the head's initial weights and the batch order within a seed, so
their differences pair up seed by seed (``paired``, with the verdict rule of
``verdicts.py``).

Differences from the reference, all of scale: MiniLM on text instead of a
ViT-B/16 on images; prefixes in all 6 layers (the reference: layers 0-4 of 12;
``--norga-layers`` restricts the gate); the task inference is a nearest class
mean on the frozen model, not a trained task-identity head with classifier
alignment (the alignment of the final head is the reference's); no
orthogonality loss, no prompt momentum; prefixes start from repeft's reference
initialisation (small uniform), not U(-1, 1); AdamW at one fixed rate for a
fixed number of steps per task, not the reference's epochs and schedule.

    python benchmarks/papers/norga_continual.py --seeds 0 1 2 3 4   # ~2,600 CPU-s: 25-45 min on 2 idle cores
    python benchmarks/papers/norga_continual.py --smoke --out /tmp   # seconds: the test's run

Writes results/norga_continual[_TAG].json.
"""

from __future__ import annotations

import os

# The 2 cores are shared with other jobs; spinning OpenMP threads slow everyone down (see README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Split, TrainConfig, environment, jsonable, load_text_task, make_parser, mean_std,
                    paired_differences, resolve_args, set_seed, to_device, train, write_json)

import repeft

N_TASKS, CLASSES_PER_TASK = 5, 8
CONDITIONS = ("prefix", "prefix+NoRGa")
METRICS = ("final_accuracy", "forgetting", "final_accuracy_task_given", "forgetting_task_given")
DEFAULT = {"seeds": [0, 1, 2, 3, 4], "steps": 100, "batch_size": 16, "lr": 1e-2, "max_len": 48, "ca_epochs": 80}
FULL = {"seeds": [0, 1, 2, 3, 4], "steps": 500, "batch_size": 32, "lr": 1e-2, "max_len": 80, "ca_epochs": 80}
# A few examples per class and two steps per task: every code path, in seconds.
SMOKE = {"seeds": [0], "steps": 2, "batch_size": 4, "lr": 1e-2, "max_len": 16, "ca_epochs": 2}
SMOKE_PER_CLASS = {"train": 3, "test": 2}


def parse_args(argv: Sequence[str] | None = None):
    parser = make_parser(__doc__, grid=False)
    parser.add_argument("--steps", type=int, help="optimizer steps per task")
    parser.add_argument("--max-len", type=int, help="tokens per text")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="peak lr of the shared head")
    parser.add_argument("--n-prefix", type=int, default=5, help="prefix key/value pairs per layer and task")
    parser.add_argument("--norga-activation", default="sigmoid", choices=sorted(repeft.prefix.NORGA_ACTIVATIONS))
    parser.add_argument("--norga-layers", type=int, nargs="+", help="layers NoRGa gates (default: all)")
    parser.add_argument("--ca-lr", type=float, default=0.005, help="classifier alignment: SGD rate")
    parser.add_argument("--ca-epochs", type=int, help="classifier alignment: epochs (default 80; --smoke: 2)")
    parser.add_argument("--smoke", action="store_true", help="a few examples per class, 2 steps per task, seed 0")
    args = parser.parse_args(argv)
    return resolve_args(args, SMOKE if args.smoke else DEFAULT, FULL)


# -- tasks and task inference -------------------------------------------------------------------


def task_classes(seed: int, n_classes: int = N_TASKS * CLASSES_PER_TASK) -> list[list[int]]:
    """The classes of each task: a seeded shuffle of all classes, cut into ``N_TASKS`` runs."""
    order = list(range(n_classes))
    random.Random(seed).shuffle(order)
    return [sorted(order[t * CLASSES_PER_TASK:(t + 1) * CLASSES_PER_TASK]) for t in range(N_TASKS)]


def first_per_class(labels: torch.Tensor, k: int | None) -> list[int]:
    """All indices, or the first ``k`` of each class (the smoke run)."""
    if k is None:
        return list(range(len(labels)))
    taken: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels.tolist()):
        if taken.get(y, 0) < k:
            taken[y] = taken.get(y, 0) + 1
            keep.append(i)
    return keep


@torch.inference_mode()
def frozen_features(encoder: nn.Module, split: Split, indices: list[int], device: torch.device) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of the frozen ``encoder`` (no adapter), one row per index."""
    rows = []
    for start in range(0, len(indices), 64):
        batch = to_device(split.collate(indices[start:start + 64]), device)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append(nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
    return torch.cat(rows)


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(n_classes, d)``: each class's mean feature, normalised (zeros for a class without examples)."""
    sums = torch.zeros(n_classes, features.shape[1]).index_add_(0, labels, features)
    return nn.functional.normalize(sums, dim=-1)


def infer_tasks(features: torch.Tensor, means: torch.Tensor, seen: list[int], task_of: dict[int, int]) -> torch.Tensor:
    """Each example's task: that of the nearest (cosine) class mean among the ``seen`` classes."""
    nearest = (features @ means[seen].T).argmax(-1)
    return torch.tensor([task_of[seen[i]] for i in nearest.tolist()])


# -- the metrics --------------------------------------------------------------------------------


def final_average_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one; ``matrix[i][j]``: task j after training task i."""
    return statistics.fmean(matrix[-1])


def forgetting(matrix: list[list[float]]) -> float:
    """Mean over the tasks before the last of (best accuracy on it at any stage - accuracy at the end).

    The reference's definition (``np.max`` over every stage, the last included, so never negative).
    """
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return statistics.fmean(max(matrix[i][j] for i in range(j, last + 1)) - matrix[last][j] for j in range(last))


# -- one run --------------------------------------------------------------------------------------


class MaskedLogits(nn.Module):
    """The model with the logits of classes outside ``allowed`` (a bool mask) set to -inf."""

    def __init__(self, model: nn.Module, allowed: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.allowed = allowed

    def forward(self, **batch) -> SimpleNamespace:
        logits = self.model(**batch).logits
        return SimpleNamespace(logits=logits.masked_fill(~self.allowed.to(logits.device), float("-inf")))


def prefix_config(norga: bool, args) -> repeft.PrefixConfig:
    # modules_to_save=[]: the head is the base model's own, shared by every task's adapter.
    return repeft.PrefixConfig(n_prefix=args.n_prefix, structure="independent", prefix_dropout=0.0, norga=norga,
                               norga_activation=args.norga_activation,
                               norga_layers=args.norga_layers if norga else None, modules_to_save=[])


def add_task_prefix(model: repeft.AdapterModel | None, base: nn.Module, task: int, config: repeft.PrefixConfig):
    """Task ``task``'s prefix, made active and trainable (the others frozen), with the shared head trainable."""
    name = f"task{task}"
    if model is None:
        model = repeft.wrap(base, config, adapter_name=name)
    else:
        model.add_adapter(name, config)
        model.set_adapter(name)  # adding does not switch (as in PEFT)
    if config.norga and task > 0:
        # MoE_PromptCL trains the gate (act_scale) on the first task only; every task then shares it frozen.
        first, new = (model.attention_adapters.adapters[f"task{t}"] for t in (0, task))
        for gate in ("norga_alpha", "norga_tau"):
            getattr(new, gate).data.copy_(getattr(first, gate).data)
            getattr(new, gate).requires_grad_(False)
    model.get_base_model().classifier.requires_grad_(True)
    return model


@torch.inference_mode()
def class_statistics(model: repeft.AdapterModel, split: Split, indices: list[int],
                     device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{class: (mean, covariance + 1e-4 I)}`` of the head's input (BERT's pooled output) under the active prefix."""
    model.eval()
    features = torch.cat([model.get_base_model().bert(**to_device(split.collate(indices[i:i + 64]), device))
                          .pooler_output.float().cpu() for i in range(0, len(indices), 64)])
    labels = split.labels[indices]
    stats = {}
    for c in labels.unique().tolist():
        f = features[labels == c]
        stats[c] = (f.mean(0), torch.cov(f.T) + 1e-4 * torch.eye(f.shape[1]))
    return stats


def align_classifier(head: nn.Linear, stats: dict[int, tuple[torch.Tensor, torch.Tensor]], seen: list[int],
                     args) -> None:
    """Train ``head`` alone on features sampled from each seen class's Gaussian, logits masked to ``seen``."""
    device = head.weight.device
    allowed = torch.zeros(head.out_features, dtype=torch.bool, device=device)
    allowed[seen] = True
    optimizer = torch.optim.SGD(head.parameters(), lr=args.ca_lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.ca_epochs)
    gaussians = {c: torch.distributions.MultivariateNormal(*stats[c]) for c in seen}
    per_class = 5 * args.batch_size
    for _ in range(args.ca_epochs):
        features = torch.cat([gaussians[c].sample((per_class,)) for c in seen]).to(device)
        labels = torch.tensor(seen, device=device).repeat_interleave(per_class)
        order = torch.randperm(len(labels), device=device)
        for start in range(0, len(order), per_class):
            batch = order[start:start + per_class]
            logits = head(features[batch]).masked_fill(~allowed, float("-inf"))
            loss = nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()


@torch.inference_mode()
def predict(model: nn.Module, split: Split, indices: list[int], device: torch.device) -> torch.Tensor:
    """Predicted labels of ``indices``, in their order (batched by length)."""
    model.eval()
    order = sorted(range(len(indices)), key=lambda i: split.lengths[indices[i]])
    out = torch.empty(len(indices), dtype=torch.long)
    for start in range(0, len(order), 64):
        chunk = order[start:start + 64]
        logits = model(**to_device(split.collate([indices[i] for i in chunk]), device)).logits
        out[torch.tensor(chunk)] = logits.argmax(-1).cpu()
    return out


def run_condition(condition: str, seed: int, args, task, data) -> dict:
    """Train the 5 tasks in order under ``condition``; the accuracy matrices with inferred and given task identity."""
    from transformers import AutoModelForSequenceClassification

    tasks, n_classes = data["tasks"], len(task.labels)
    config = prefix_config(condition.endswith("+NoRGa"), args)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      lr_by_name={"classifier": args.head_lr})
    set_seed(seed)  # the same head for both conditions
    base = AutoModelForSequenceClassification.from_pretrained(task.model_path, num_labels=n_classes)
    model, generator = None, torch.Generator().manual_seed(seed)  # the same batch order for both conditions
    inferred, given, task_inference, curves, stats = [], [], [], [], {}
    t0, c0 = time.perf_counter(), time.process_time()
    for t, classes in enumerate(tasks):
        model = add_task_prefix(model, base, t, config)
        model.to(args.device)
        current = torch.zeros(n_classes, dtype=torch.bool)
        current[classes] = True
        curves.append(train(MaskedLogits(model, current), task.train, data["train_by_task"][t], cfg, args.device,
                            generator))
        seen = [c for ts in tasks[:t + 1] for c in ts]
        stats.update(class_statistics(model, task.train, data["train_by_task"][t], args.device))
        if t > 0:
            align_classifier(model.get_base_model().classifier, stats, seen, args)
        allowed = torch.zeros(n_classes, dtype=torch.bool)
        allowed[seen] = True
        masked = MaskedLogits(model, allowed)
        row_inferred, row_given, row_task = [], [], []
        for j in range(t + 1):
            idx = data["test_by_task"][j]
            labels = task.test.labels[idx]
            model.set_adapter(f"task{j}")
            row_given.append((predict(masked, task.test, idx, args.device) == labels).float().mean().item())
            guess = infer_tasks(data["test_features"][j], data["means"], seen, data["task_of"])
            row_task.append((guess == j).float().mean().item())
            preds = torch.empty(len(idx), dtype=torch.long)
            for k in guess.unique().tolist():
                chosen = (guess == k).nonzero().flatten().tolist()
                model.set_adapter(f"task{k}")
                preds[chosen] = predict(masked, task.test, [idx[i] for i in chosen], args.device)
            row_inferred.append((preds == labels).float().mean().item())
        inferred.append(row_inferred)
        given.append(row_given)
        task_inference.append(row_task)
        print(f"  seed {seed} {condition} after task {t}: accuracy (task inferred) "
              + " ".join(f"{a:.3f}" for a in row_inferred) + " | given " + " ".join(f"{a:.3f}" for a in row_given),
              flush=True)
    gates = {}
    if config.norga:
        first = model.attention_adapters.adapters["task0"]
        gates = {"alpha": first.norga_alpha.tolist(), "tau": first.norga_tau.tolist()}
    return {"condition": condition, "seed": seed, "n_tasks": N_TASKS,
            "final_accuracy": final_average_accuracy(inferred), "forgetting": forgetting(inferred),
            "final_accuracy_task_given": final_average_accuracy(given), "forgetting_task_given": forgetting(given),
            "task_inference_accuracy": statistics.fmean(task_inference[-1]),
            "accuracy_matrix": inferred, "accuracy_matrix_task_given": given,
            "task_inference_matrix": task_inference, "norga_gate_after_task0": gates, "train_loss_curves": curves,
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}


def seed_data(seed: int, task, train_keep: list[int], test_keep: list[int], train_features: torch.Tensor,
              test_features: torch.Tensor) -> dict:
    """A seed's tasks, the train and test indices of each, and the task-inference inputs."""
    tasks = task_classes(seed, len(task.labels))
    task_of = {c: t for t, classes in enumerate(tasks) for c in classes}
    train_labels, test_labels = task.train.labels[train_keep], task.test.labels[test_keep]
    by_task = lambda keep, labels: [[keep[i] for i, y in enumerate(labels.tolist()) if task_of[y] == t]  # noqa: E731
                                    for t in range(N_TASKS)]
    test_by_task = by_task(test_keep, test_labels)
    position = {i: p for p, i in enumerate(test_keep)}
    return {"tasks": tasks, "task_of": task_of, "train_by_task": by_task(train_keep, train_labels),
            "test_by_task": test_by_task,
            "test_features": [test_features[[position[i] for i in idx]] for idx in test_by_task],
            "means": class_means(train_features, train_labels, len(task.labels))}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    task = load_text_task("wordnet_supersenses", args.max_len)
    limits = SMOKE_PER_CLASS if args.smoke else {"train": None, "test": None}
    train_keep = first_per_class(task.train.labels, limits["train"])
    test_keep = first_per_class(task.test.labels, limits["test"])
    t_start = time.perf_counter()
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(task.model_path).to(args.device).eval()
    train_features = frozen_features(encoder, task.train, train_keep, args.device)
    test_features = frozen_features(encoder, task.test, test_keep, args.device)
    del encoder
    stem = "norga_continual" + ("_smoke" if args.smoke else "") + (f"_{args.tag}" if args.tag else "")
    out_json = args.out / f"{stem}.json"
    records: list[dict] = []

    def payload(done: bool) -> dict:
        comparison = {m: paired_differences(records, "prefix", "prefix+NoRGa", m, x="n_tasks") for m in METRICS}
        summary = {c: {m: mean_std([r[m] for r in records if r["condition"] == c])
                       for m in (*METRICS, "task_inference_accuracy")}
                   for c in CONDITIONS if any(r["condition"] == c for r in records)}
        return {"experiment": "norga_continual", "complete": done,
                "claim": "NoRGa's gate on prefix scores raises final average accuracy (and lowers forgetting) in "
                         "class-incremental learning with task-specific prefixes",
                "model": "sentence-transformers/all-MiniLM-L6-v2 (BertForSequenceClassification, one 40-way head)",
                "data": {"name": task.name, "tasks": N_TASKS, "classes_per_task": CLASSES_PER_TASK,
                         "train": len(train_keep), "test": len(test_keep), "max_len": args.max_len},
                "task_identity": "inferred (nearest class mean of frozen MiniLM features among the classes seen so "
                                 "far); *_task_given metrics: given",
                "conditions": {c: prefix_config(c.endswith("+NoRGa"), args) for c in CONDITIONS},
                "train": {"steps_per_task": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                          "head_lr": args.head_lr, "classifier_alignment": {"lr": args.ca_lr,
                                                                            "epochs": args.ca_epochs}},
                "seeds": args.seeds, "device": args.device, "command": sys.argv, "environment": environment(),
                "wall_seconds": round(time.perf_counter() - t_start, 1), "summary": summary,
                "paired": {"prefix+NoRGa - prefix": comparison}, "records": records}

    for seed in args.seeds:
        data = seed_data(seed, task, train_keep, test_keep, train_features, test_features)
        for condition in CONDITIONS:
            records.append(run_condition(condition, seed, args, task, data))
            write_json(out_json, payload(False))
    result = jsonable(payload(True))
    write_json(out_json, result)
    for c, by_metric in result["summary"].items():
        print(f"{c}: " + ", ".join(f"{m} {s['mean']:.4f} ± {s['std']:.4f}" for m, s in by_metric.items()))
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {out_json}")
    return result


if __name__ == "__main__":
    main()
