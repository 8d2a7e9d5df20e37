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
import verdicts


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


class Threshold(torch.nn.Module):
    """Predicts class 1 when its one weight exceeds the input threshold ``t``; starts at 0.

    Training on examples with a far-away threshold and label 1 pushes the weight up by about the
    learning rate per Adam step, so the weight a run ends with tells the rate it trained at.
    """

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, t):
        logit = self.w - t
        return type("Out", (), {"logits": torch.stack([torch.zeros_like(logit), logit], -1)})


def threshold_split(thresholds: list[float], labels: list[int], log: list | None = None) -> common.Split:
    t = torch.tensor(thresholds)

    def collate(idx):
        if log is not None:
            log.append(len(idx))
        return {"t": t[idx]}

    return common.Split(labels=torch.tensor(labels), collate=collate)


def test_lr_selection_picks_on_validation_and_scores_only_the_chosen_model_on_test():
    train = threshold_split([100.0] * 8, [1] * 8)
    # After 5 steps the weight is ~3e-3, ~0.3 or ~30 for the three rates. Validation wants 0.03 < w < 3
    # (the middle rate); the test split wants w > 10 (only the largest rate): a pick made on test would differ.
    validation = threshold_split([0.03, 0.03, 3.0, 3.0], [1, 1, 0, 0])
    test_calls: list[int] = []
    test = threshold_split([10.0] * 6, [1] * 6, log=test_calls)
    selection = common.LRSelection(grid=[1e-3, 1e-1, 10.0], validation=validation, seeds=[0])
    cfg = common.TrainConfig(steps=5, batch_size=4, lr=0.0, max_grad_norm=0.0)
    records = common.run_grid({"m": None}, lambda _: Threshold(), train, test, [1.0], [1, 0], cfg,
                              torch.device("cpu"), selection=selection)
    # the choosing seed runs first although listed second; the other seed reuses its rate
    assert [(r["seed"], r["lr"], r["lr_source"]) for r in records] == [(0, 1e-1, "validation"),
                                                                      (1, 1e-1, "reused from seed 0")]
    val = records[0]["validation_by_lr"]
    assert val["0.1"]["accuracy"] == 1.0 and val["0.001"]["accuracy"] == 0.5 and val["10"]["accuracy"] == 0.5
    assert "validation_by_lr" not in records[1]
    assert all(r["accuracy"] == 0.0 for r in records)  # the chosen (middle) model fails the test split, as built
    assert sum(test_calls) == 2 * len(test)  # one test pass per record, none for the rates not chosen


def test_lr_selection_needs_a_choosing_seed_for_every_cell():
    split = threshold_split([1.0] * 4, [1] * 4)
    selection = common.LRSelection(grid=[1e-2], validation=split, seeds=[5])
    with pytest.raises(ValueError, match="select-seeds"):
        common.run_grid({"m": None}, lambda _: Threshold(), split, split, [1.0], [0],
                        common.TrainConfig(steps=1, batch_size=2, lr=0.0), torch.device("cpu"), selection=selection)


def test_lr_selection_options_hold_out_a_fixed_validation_split_or_use_the_fixed_rate():
    parser = common.make_parser("t")
    split = common.Split(labels=torch.arange(40) % 4, collate=lambda idx: {"i": torch.tensor(idx)})
    preset = {"seeds": [3, 4], "lr_grid": [1e-3, 1e-2], "validation_fraction": 0.2}
    args = common.resolve_args(parser.parse_args([]), preset, preset)
    pool, selection = common.lr_selection(args, split)
    assert selection.seeds == [3] and selection.grid == [1e-3, 1e-2]
    held = selection.validation.collate(list(range(len(selection.validation))))["i"].tolist()
    kept = pool.collate(list(range(len(pool))))["i"].tolist()
    assert len(held) == 8 and not set(held) & set(kept) and len(kept) == 32
    assert held == common.lr_selection(args, split)[1].validation.collate(list(range(8)))["i"].tolist()
    every = common.resolve_args(parser.parse_args(["--select-seeds", "all"]), preset, preset)
    assert common.lr_selection(every, split)[1].seeds is None
    fixed = common.resolve_args(parser.parse_args(["--lr", "1e-3"]), preset, preset)
    assert common.lr_selection(fixed, split) == (split, None)


def test_paired_differences_match_seed_by_seed():
    records = [{"condition": c, "seed": s, "fraction": 0.1, "accuracy": a}
               for c, s, a in [("A", 0, 0.5), ("B", 0, 0.75), ("A", 1, 0.5), ("B", 1, 0.25), ("A", 2, 0.0),
                                 ("B", 3, 1.0)]]
    d = common.paired_differences(records, "A", "B", "accuracy")["0.1"]
    assert d["seeds"] == [0, 1] and d["differences"] == [0.25, -0.25]  # seeds 2 and 3 have no pair
    assert d["mean"] == 0.0 and d["std"] == pytest.approx(0.25 * 2 ** 0.5) and d["n_positive"] == 1
    assert "+0.0000 ± 0.3536 (1/2 >0, p 1.000)" in common.paired_table(records, "A", ["B"], ["accuracy"])
    assert d["verdict"] == "too few seeds (2 < 5)"


def test_paired_tests_and_the_verdict_rule():
    # By hand: differences 1..5 have t = 3 / (sqrt(2.5) / sqrt(5)) = 4.243 on 4 degrees of freedom, two-sided
    # p = 0.0132 (t tables); 5 of 5 seeds the same way: sign test p = 2 / 2**5 = 0.0625.
    test = verdicts.paired_test([1, 2, 3, 4, 5], "accuracy")
    assert test["p_t"] == pytest.approx(0.01324, abs=5e-5) and test["p_sign"] == pytest.approx(0.0625)
    assert test["n_claimed"] == 5
    assert verdicts.paired_test([1, 2, 3, 4, 5], "loss")["n_claimed"] == 0  # a loss should go down
    assert verdicts.verdict([1, 2, 3, 4, 5], "accuracy") == "held"
    assert verdicts.verdict([1, 2, 3, 4, 5], "loss") == "reversed"
    assert verdicts.verdict([1, -2, 3, -4, 5], "accuracy") == "not shown"
    assert verdicts.verdict([1, 2, 3], "accuracy") == "too few seeds (3 < 5)"
    assert verdicts.paired_test([1, 1, 1], "accuracy")["p_t"] is None  # no spread: the t-test is undefined
    assert verdicts.paired_test([1, 1, 1], "accuracy")["p_sign"] == pytest.approx(0.25)
