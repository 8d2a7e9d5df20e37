"""benchmarks/papers/norga_continual.py: the metrics, the task split, and its --smoke run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "papers"))
import norga_continual


def test_final_accuracy_and_forgetting_follow_the_reference_definitions():
    # matrix[i][j]: task j after training task i. Task 0 peaked at 0.9 after task 1, ends at 0.5;
    # task 1 went 0.6 -> 0.6; task 2 is the last task (no forgetting counted for it).
    matrix = [[0.8], [0.9, 0.6], [0.5, 0.6, 0.7]]
    assert norga_continual.final_average_accuracy(matrix) == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert norga_continual.forgetting(matrix) == pytest.approx(((0.9 - 0.5) + (0.6 - 0.6)) / 2)
    # A task that ends above its earlier best counts 0, not a negative forgetting (np.max includes the end).
    assert norga_continual.forgetting([[0.4], [0.7, 0.9]]) == 0.0
    assert norga_continual.forgetting([[0.4]]) == 0.0


def test_tasks_split_the_40_classes_into_5_disjoint_runs_of_8_by_seed():
    tasks = norga_continual.task_classes(0)
    assert [len(t) for t in tasks] == [8] * 5
    assert sorted(c for t in tasks for c in t) == list(range(40))
    assert tasks == norga_continual.task_classes(0) and tasks != norga_continual.task_classes(1)


def test_task_inference_picks_the_task_of_the_nearest_seen_class_mean():
    means = torch.eye(4)
    features = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8], [0.1, 0.0, 0.0, 0.9]])
    task_of = {0: 0, 1: 0, 2: 1, 3: 1}
    assert norga_continual.infer_tasks(features, means, [0, 1, 2, 3], task_of).tolist() == [0, 1, 1]
    # Unseen classes are not candidates: with classes 0 and 1 only, every example goes to task 0.
    assert norga_continual.infer_tasks(features, means, [0, 1], task_of).tolist() == [0, 0, 0]


def test_later_tasks_share_the_first_task_s_norga_gate_frozen():
    from tiny_models import tiny_model

    args = norga_continual.parse_args(["--smoke"])
    config = norga_continual.prefix_config(True, args)
    base = tiny_model("llama")
    base.classifier = torch.nn.Linear(32, 4)  # the helper trains the base model's head
    model = norga_continual.add_task_prefix(None, base, 0, config)
    first = model.attention_adapters.adapters["task0"]
    with torch.no_grad():
        first.norga_alpha.fill_(0.3)
    model = norga_continual.add_task_prefix(model, base, 1, config)
    second = model.attention_adapters.adapters["task1"]
    assert torch.equal(second.norga_alpha, first.norga_alpha) and not second.norga_alpha.requires_grad
    assert not any(p.requires_grad for p in first.parameters())
    assert second.keys.requires_grad and base.classifier.weight.requires_grad


def test_smoke_run_writes_paired_results(tmp_path):
    result = norga_continual.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "norga_continual_smoke.json").read_text())
    assert saved["complete"] and saved["task_identity"].startswith("inferred")
    records = saved["records"]
    assert [r["condition"] for r in records] == list(norga_continual.CONDITIONS)
    for r in records:
        matrix = r["accuracy_matrix"]
        assert [len(row) for row in matrix] == [1, 2, 3, 4, 5]  # after task i, tasks 0..i
        assert r["final_accuracy"] == pytest.approx(norga_continual.final_average_accuracy(matrix))
    assert set(saved["paired"]["prefix+NoRGa - prefix"]) == set(norga_continual.METRICS)
    assert result["records"][1]["norga_gate_after_task0"]["alpha"]


def test_classifier_alignment_learns_the_seen_classes_from_their_gaussians_only():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 6)
    stats = {c: (5 * torch.eye(4)[c], 0.1 * torch.eye(4)) for c in (1, 3)}
    args = norga_continual.parse_args(["--smoke"])
    args.ca_epochs, args.ca_lr = 20, 0.05
    norga_continual.align_classifier(head, stats, [1, 3], args)
    with torch.no_grad():
        logits = head(torch.stack([stats[1][0], stats[3][0]]))
    assert logits[:, [1, 3]].argmax(-1).tolist() == [0, 1]  # each class mean goes to its class
