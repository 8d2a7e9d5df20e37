"""Evaluation metrics beyond the loss: classification scores, and which way is better.

>>> scores = classification_scores(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), ["ham", "spam"])
>>> scores["accuracy"], scores["recall/ham"], scores["precision/spam"]
(0.75, 0.6666666666666666, 0.5)
"""

from __future__ import annotations

import torch

# Metrics for which lower is better; every other one is better higher.
LOWER_IS_BETTER = ("loss", "perplexity")


def classification_scores(predictions: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Accuracy; precision, recall and F1 per class (``f1/<name>``) and their macro means.

    A class never predicted has precision 0, one absent from ``labels`` recall
    0 (as scikit-learn's ``zero_division=0``); the macro means average over
    every class in ``names``.
    """
    n = len(names)
    confusion = torch.bincount(labels * n + predictions, minlength=n * n).reshape(n, n).double()  # [true, predicted]
    hits = confusion.diag()
    precision = hits / confusion.sum(0).clamp_min(1)
    recall = hits / confusion.sum(1).clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(hits))
    scores = {
        "accuracy": (hits.sum() / confusion.sum()).item(),
        "precision_macro": precision.mean().item(),
        "recall_macro": recall.mean().item(),
        "f1_macro": f1.mean().item(),
    }
    for i, name in enumerate(names):
        scores.update({f"precision/{name}": precision[i].item(), f"recall/{name}": recall[i].item(), f"f1/{name}": f1[i].item()})
    return scores


def improves(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in the metric's direction."""
    if best is None:
        return True
    return value < best - min_delta if metric in LOWER_IS_BETTER else value > best + min_delta
