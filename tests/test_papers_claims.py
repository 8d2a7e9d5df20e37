"""benchmarks/papers text-claim scripts: the conditions each compares (no model is loaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import repeft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "papers"))
import common
import prefix_tuning
import replora_vs_lora
import zero_init_prompts


def default_args(claim: common.TextClaim, argv: list[str] = ()):
    parser = common.make_parser("t")
    claim.add_arguments(parser)
    return common.resolve_args(parser.parse_args(list(argv)), claim.default, claim.full)


@pytest.mark.parametrize("module", [replora_vs_lora, zero_init_prompts, prefix_tuning])
def test_every_compared_condition_runs_by_default_with_one_grid_and_selection_on_validation(module):
    claim = module.CLAIM
    args = default_args(claim)
    names = set(claim.conditions(args))
    baseline, others = next(iter(claim.comparisons.items()))  # the claim's own comparison
    assert {baseline, *others} <= names
    assert args.lr is None and len(args.lr_grid) >= 3 and args.select_seeds == [0] and len(args.seeds) >= 3
    assert 0 < args.validation_fraction < 1


def test_replora_and_lora_differ_only_in_the_reparameterization():
    cond = replora_vs_lora.CLAIM.conditions(default_args(replora_vs_lora.CLAIM))
    lora, shared, residual = cond["LoRA"], cond["RepLoRA shared"], cond["RepLoRA residual"]
    assert isinstance(lora, repeft.LoRAConfig)
    for rep in (shared, residual):
        assert isinstance(rep, repeft.RepLoRAConfig)
        assert (lora.r, lora.lora_alpha, lora.target_modules) == (rep.r, rep.lora_alpha, rep.target_modules)
    assert shared.form == repeft.RepLoRAConfig().form == "shared"  # the library default, the paper's form
    assert residual.form == "residual"
    linear = replora_vs_lora.CLAIM.conditions(default_args(replora_vs_lora.CLAIM, ["--conditions", "RepLoRA shared linear"]))
    assert (linear["RepLoRA shared linear"].form, linear["RepLoRA shared linear"].reparam) == ("shared", "linear")


def test_prefix_conditions_have_equal_length_and_cover_both_shared_variants():
    cond = prefix_tuning.CLAIM.conditions(default_args(prefix_tuning.CLAIM))
    earlier = {n: c for n, c in cond.items() if "reference" not in n}
    assert {c.n_prefix for c in earlier.values()} == {16} and not any(c.norga for c in cond.values())
    # The runs before issue 25, spelled out now that the library defaults are the reference's.
    assert {(c.init, c.prefix_dropout) for c in earlier.values()} == {("normal", 0.0)}
    assert cond["independent"].structure == "independent"
    assert (cond["shared (per layer)"].structure, cond["shared (per layer)"].mlp_per_layer) == ("shared", True)
    assert (cond["shared (one MLP)"].structure, cond["shared (one MLP)"].mlp_per_layer) == ("shared", False)
    gated = prefix_tuning.CLAIM.conditions(default_args(prefix_tuning.CLAIM,
                                                        ["--conditions", "shared (per layer)+NoRGa"]))
    assert gated["shared (per layer)+NoRGa"].norga and gated["shared (per layer)+NoRGa"].mlp_per_layer


def test_prefix_reference_set_up_is_the_reparamprefix_code_s():
    cond = prefix_tuning.CLAIM.conditions(default_args(prefix_tuning.CLAIM))
    free, shared = cond["independent (reference set-up)"], cond["shared (reference set-up)"]
    # vit.py: uniform Xavier-style bound, separate K and V embeddings (SHARE_KV=False) or a 48-wide MLP per
    # layer (SHARE_KV=True, "non-linear"); the prefix scripts: DROPOUT 0.1; CUB: NUM_TOKENS 20 = 10 pairs.
    assert (free.structure, shared.structure, shared.mlp_per_layer, shared.mlp_hidden) == (
        "independent", "shared", True, 48)
    for c in (free, shared):
        assert (c.init, c.prefix_dropout, c.n_prefix, c.norga) == ("reference", 0.1, 10, False)
    # The claim's own comparison is the reference set-up's pair.
    assert next(iter(prefix_tuning.CLAIM.comparisons.items())) == (
        "independent (reference set-up)", ["shared (reference set-up)"])


def test_prefix_grid_reaches_below_the_rate_the_shared_forms_chose_and_above_the_independent_one():
    # The first WordNet run chose 1e-3 (its lowest rate) for the shared forms and 0.1 (its highest) for the
    # independent prefix: a choice on the grid's edge says nothing about the rates beyond it.
    for preset in (prefix_tuning.DEFAULT, prefix_tuning.FULL):
        grid = sorted(preset["lr_grid"])
        assert grid[0] < 1e-3 / 10 and grid[-1] > 0.1 * 3


def test_zero_init_conditions_cover_vanilla_linear_and_both_non_linear_networks():
    cond = zero_init_prompts.CLAIM.conditions(default_args(zero_init_prompts.CLAIM))
    assert (cond["vanilla"].gating, cond["vanilla"].prompt_type) == ("none", "linear")
    assert (cond["linear"].gating, cond["linear"].prompt_type) == ("zero_init", "linear")
    networks = {cond[f"non-linear ({n})"].prompt_network for n in ("hypermodel", "deepshare")}
    assert networks == {"hypermodel", "deepshare"}
    assert all(c.gating == "zero_init" for n, c in cond.items() if n.startswith("non-linear"))
    assert len({(c.n_prompt, c.n_layers) for c in cond.values()}) == 1
