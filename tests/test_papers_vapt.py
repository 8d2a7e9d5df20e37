"""benchmarks/papers/vapt_vs_vpt.py: parameter counts on the stand-in ViT, the linear probe, the splits."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import ViTForImageClassification

import repeft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "papers"))
import common
import vapt_vs_vpt
import vit_pretrain


def random_backbone() -> ViTForImageClassification:
    return ViTForImageClassification(vit_pretrain.vit_config())  # the experiment's architecture, no pretraining


def test_parameter_counts_follow_the_documented_formulas_and_vapt_is_smaller():
    d, layers, n, k, hidden = 128, 6, 10, 3, 8
    grid_after_filter = (7 - k + 1) ** 2  # 28 / patch 4 = 7x7 patches, 3x3 unpadded filter
    head = d * 5 + 5
    vpt = vapt_vs_vpt.parameter_counts(repeft.wrap(random_backbone(), repeft.VPTConfig(n_prompt=n)))
    vapt = vapt_vs_vpt.parameter_counts(
        repeft.wrap(random_backbone(), repeft.VAPTConfig(n_prompt=n, kernel_size=k, mlp_hidden=hidden)))
    # docs/methods/vapt.md: VPT-deep L n d; VAPT n d + (L-1)(2d + K^2 + (H'W' + 1) n) + 2 d mlp_hidden.
    assert vpt == {"adapter": layers * n * d, "with_head": layers * n * d + head}
    vapt_expected = n * d + (layers - 1) * (2 * d + k * k + (grid_after_filter + 1) * n) + 2 * d * hidden
    assert vapt == {"adapter": vapt_expected, "with_head": vapt_expected + head}
    assert vapt["adapter"] < vpt["adapter"]


def test_head_only_trains_just_the_classifier():
    model = vapt_vs_vpt.head_only(random_backbone())
    assert vapt_vs_vpt.parameter_counts(model) == {"adapter": 0, "with_head": 128 * 5 + 5}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_default_validation_split_is_a_disjoint_stratified_quarter_of_train():
    train, test = vapt_vs_vpt.adapt_splits()
    args = common.resolve_args(common.make_parser("t").parse_args([]), vapt_vs_vpt.DEFAULT, vapt_vs_vpt.FULL)
    pool, selection = common.lr_selection(args, train)
    held = selection.validation
    assert (len(pool), len(held), len(train), len(test)) == (1500, 500, 2000, 500)
    assert torch.bincount(held.labels).tolist() == [100] * 5

    def images(split):
        return split.collate(list(range(len(split))))["pixel_values"].flatten(1)

    both = torch.cat([images(pool), images(held)])
    # Together they are the training split: the same 2,000 images, none in both parts.
    assert len(both) == 2000 and torch.equal(both.unique(dim=0), images(train).unique(dim=0))
