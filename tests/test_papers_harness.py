"""The paper-reproduction harness (benchmarks/papers/common.py): subsets, batches, metrics, one tiny grid."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import repeft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "papers"))
import common


def test_stratified_subsample_keeps_class_shares_and_is_seeded():
    labels = [0] * 90 + [1] * 10
    sub = common.stratified_subsample(labels, 0.3, seed=1)
    assert sum(labels[i] == 1 for i in sub) == 3 and sum(labels[i] == 0 for i in sub) == 27
    assert sub == common.stratified_subsample(labels, 0.3, seed=1)
    assert sub != common.stratified_subsample(labels, 0.3, seed=2)
    # a rare class never vanishes, and the full fraction is everything
    assert sum(labels[i] == 1 for i in common.stratified_subsample(labels, 0.01, seed=0)) == 1
    assert common.stratified_subsample(labels, 1.0, seed=0) == list(range(100))


def test_train_batches_same_for_same_generator_seed_and_cover_the_subset():
    idx = list(range(0, 40, 2))
    lengths = list(range(40))

    def draw():
        return list(common.train_batches(idx, 4, 12, torch.Generator().manual_seed(3), lengths))

    batches = draw()
    assert batches == draw() and len(batches) == 12
    # 20 examples = 5 batches of 4 per epoch: the first 5 batches are exactly one epoch
    assert all(len(b) == 4 for b in batches)
    assert sorted(i for b in batches[:5] for i in b) == idx
    # a batch never spans epochs, so a subset smaller than two batches has no repeats in a batch
    small = list(common.train_batches([1, 2, 3, 4, 5], 4, 6, torch.Generator().manual_seed(0), lengths))
    assert all(len(set(b)) == len(b) for b in small) and sorted(len(b) for b in small[:2]) == [1, 4]


def test_holdout_is_a_stratified_disjoint_split_whose_collate_maps_back():
    labels = torch.tensor([0] * 40 + [1] * 10)
    split = common.Split(labels=labels, collate=lambda idx: {"x": torch.tensor(idx)}, lengths=list(range(50)))
    rest, held = common.holdout(split, 0.2, seed=0)
    assert len(held) == 10 and int(held.labels.sum()) == 2 and len(rest) == 40
    # the parts' collate and lengths name the original examples, and together they cover each once
    orig_held = held.collate(list(range(len(held))))["x"].tolist()
    orig_rest = rest.collate(list(range(len(rest))))["x"].tolist()
    assert sorted(orig_held + orig_rest) == list(range(50))
    assert held.labels.tolist() == labels[orig_held].tolist() and held.lengths == orig_held


def test_classification_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 1])
    m = common.classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1_pos"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))  # tp 2, fp 0, fn 1
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_lr_by_name_sets_the_peak_lr_of_matching_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 2))
    split = common.Split(labels=torch.tensor([0, 1] * 4), collate=lambda idx: {"x": torch.arange(4).repeat(len(idx), 1)})

    class Wrapped(torch.nn.Module):  # run_grid-style model: keyword inputs, output with .logits
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return type("Out", (), {"logits": self.body(x)})

    wrapped = Wrapped()
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    cfg = common.TrainConfig(steps=2, batch_size=4, lr=1e-2, lr_by_name={"body.2": 0.0})
    groups = common.param_groups(list(wrapped.named_parameters()), cfg)
    assert sorted((g["lr"], len(g["params"])) for g in groups) == [(0.0, 2), (1e-2, 1)]
    common.train(wrapped, split, range(8), cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    after = dict(wrapped.named_parameters())
    assert torch.equal(after["body.2.weight"], before["body.2.weight"])  # lr 0: the Linear stays put
    assert not torch.equal(after["body.0.weight"], before["body.0.weight"])


def test_mean_std_is_sample_std():
    s = common.mean_std([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3


def test_tiny_grid_runs_writes_json_and_plot(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n = 24
    ids = torch.randint(3, VOCAB, (n, 8), generator=gen)
    labels = torch.arange(n) % 3
    split = common.Split(labels=labels, collate=lambda idx: {"input_ids": ids[idx]}, lengths=[8] * n)

    def build(config):
        return repeft.wrap(tiny_model("bert").train(), config)

    conditions = {"LoRA": repeft.LoRAConfig(r=2), "RepLoRA": repeft.RepLoRAConfig(r=2, mlp_hidden=4)}
    cfg = {"LoRA": common.TrainConfig(steps=3, batch_size=4, lr=1e-2, log_every=2),
           "RepLoRA": common.TrainConfig(steps=3, batch_size=4, lr=3e-2, log_every=2)}
    records = common.run_grid(conditions, build, split, split, [0.5, 1.0], [0, 1], cfg, torch.device("cpu"))
    assert len(records) == 2 * 2 * 2
    assert {r["condition"]: r["lr"] for r in records} == {"LoRA": 1e-2, "RepLoRA": 3e-2}
    assert all(len(r["train_loss_curve"]) == 2 for r in records)
    summary = common.summarize(records, ["accuracy", "loss"])
    assert summary["LoRA"]["0.5"]["loss"]["n"] == 2
    assert "± " in common.markdown_table(summary, ["accuracy", "loss"])
    common.write_json(tmp_path / "r.json", {"conditions": conditions, "records": records})
    assert json.loads((tmp_path / "r.json").read_text())["conditions"]["LoRA"]["type"] == "LoRAConfig"
    pytest.importorskip("matplotlib")
    common.plot_vs_fraction(records, [common.PlotSpec("accuracy", "acc")], tmp_path / "r.png", "t")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_run_grid_takes_one_train_config_per_condition():
    ids = torch.randint(3, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    split = common.Split(labels=torch.arange(8) % 2, collate=lambda idx: {"input_ids": ids[idx]})
    cfgs = {name: common.TrainConfig(steps=steps, batch_size=4, lr=1e-2, log_every=1) for name, steps in [("a", 2), ("b", 3)]}
    records = common.run_grid({"a": repeft.LoRAConfig(r=2), "b": repeft.LoRAConfig(r=2)},
                              lambda c: repeft.wrap(tiny_model("bert").train(), c), split, split, [1.0], [0], cfgs,
                              torch.device("cpu"))
    assert [len(r["train_loss_curve"]) for r in records] == [2, 3]
