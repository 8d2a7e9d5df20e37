"""Prefix tuning's reference set-up (issue 25): the paper's initialisation, prefix dropout, NoRGa on chosen layers.

The maths of NoRGa on chosen layers is checked against hand-written attention in
test_attention_adapters.py (variant ``prefix-norga-layer-1-softplus``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import logits, tiny_batch, tiny_model, tiny_vision_model, tiny_vision_config

import repeft
from repeft.attention import AttentionCall


def adapter_of(model):
    return model.attention_adapters.adapters["default"]


def bound(patch_area, width):
    # ReparamPrefix, CV/src/models/vit_prompt/vit.py: val = sqrt(6 / (3 * prod(patch_size) + prompt_dim)).
    return math.sqrt(6.0 / (3 * patch_area + width))


@pytest.mark.parametrize("structure", ["shared", "independent"])
def test_reference_init_draws_uniform_within_the_papers_bound_on_text_models(structure):
    base = tiny_model("llama")
    hidden, kv_width = base.config.hidden_size, 2 * base.config.hidden_size // 4  # 2 of 4 heads hold keys
    model = repeft.wrap(base, repeft.PrefixConfig(n_prefix=64, structure=structure))  # init="reference" by default
    adapter = adapter_of(model)
    if structure == "shared":
        drawn, b = [adapter.embedding], bound(16 * 16, hidden)  # text: the reference ViT-B/16's patch
    else:
        # The paper's non-shared baseline: separate key and value embeddings, no MLP anywhere.
        assert {n for n, _ in adapter.named_parameters()} == {"keys", "values"}
        drawn, b = [adapter.keys, adapter.values], bound(16 * 16, kv_width)
        assert not torch.equal(adapter.keys, adapter.values)
    for t in drawn:
        assert t.abs().max() <= b and t.abs().max() > 0.95 * b  # U(-b, b) fills its range
        assert abs(t.mean().item()) < 0.1 * b


def test_reference_init_takes_a_vision_models_own_patch_size():
    config = tiny_vision_config("vit")
    model = repeft.wrap(tiny_vision_model("vit"), repeft.PrefixConfig(n_prefix=64))
    embedding = adapter_of(model).embedding
    b = bound(config.patch_size**2, config.hidden_size)
    assert embedding.abs().max() <= b and embedding.abs().max() > 0.95 * b


def test_normal_init_is_the_earlier_start():
    model = repeft.wrap(tiny_model("llama"), repeft.PrefixConfig(n_prefix=64, init="normal"))
    embedding = adapter_of(model).embedding
    assert 0.9 < embedding.std().item() < 1.1 and embedding.abs().max() > 2.5


def twin_rows():
    batch = tiny_batch("llama")
    return {k: v[:1].expand(2, *v.shape[1:]) for k, v in batch.items()}


def test_prefix_dropout_draws_a_mask_per_example_in_training_and_is_off_in_eval():
    batch = twin_rows()  # two identical examples
    # NoRGa too: its gate scores the dropped-out keys, one set per example.
    model = repeft.wrap(tiny_model("llama"), repeft.PrefixConfig(n_prefix=8, prefix_dropout=0.5, norga=True))
    plain = repeft.wrap(tiny_model("llama"), repeft.PrefixConfig(n_prefix=8, prefix_dropout=0.0, norga=True))
    plain.attention_adapters.adapters["default"].load_state_dict(adapter_of(model).state_dict())
    expected = logits(plain, batch)
    assert torch.equal(logits(model, batch), expected)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    trained = logits(model, batch)
    assert not torch.allclose(trained[0], trained[1])  # one mask per example
    assert not torch.allclose(trained, expected)
    model.eval()
    assert torch.equal(logits(model, batch), expected)
    plain.train()
    torch.testing.assert_close(logits(plain, batch), expected)  # p = 0: nothing dropped in training either


def test_prefix_dropout_in_training_scales_what_it_keeps(monkeypatch):
    # Features survive with probability 1 - p and are scaled by 1 / (1 - p), as in the reference's nn.Dropout.
    model = repeft.wrap(tiny_model("llama"), repeft.PrefixConfig(n_prefix=8, prefix_dropout=0.25,
                                                               structure="independent"))
    seen = []
    original = AttentionCall.base_with_prefix

    def spy(call, keys, values, prefix_bias=None):
        seen.append(keys)
        return original(call, keys, values, prefix_bias)

    monkeypatch.setattr(AttentionCall, "base_with_prefix", spy)
    batch = tiny_batch("llama")
    model.train()
    with torch.no_grad():
        model(**batch)
    keys = seen[0]
    assert keys.shape[0] == batch["input_ids"].shape[0]  # one set per example
    free = adapter_of(model).prefix(0)[0].expand_as(keys)
    kept = keys != 0
    torch.testing.assert_close(keys[kept], free[kept] / 0.75)
    assert 0.6 < kept.float().mean().item() < 0.9


@pytest.mark.parametrize("options", [
    {"init": "reference", "prefix_dropout": 0.2, "norga": True, "norga_layers": [1], "norga_activation": "elu"},
    {"structure": "independent", "init": "normal", "prefix_dropout": 0.0, "norga": True,
     "norga_activation": "identity"},
], ids=["reference-norga-layer-1", "independent-normal"])
def test_new_options_survive_save_and_load(options, tmp_path):
    base = tiny_model("llama")
    pristine = copy.deepcopy(base)
    model = repeft.wrap(base, repeft.PrefixConfig(n_prefix=3, mlp_hidden=8, **options))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    batch = tiny_batch("llama")
    model.save_adapter(tmp_path / "a")
    loaded = repeft.load_adapter(pristine, tmp_path / "a")
    config = loaded.configs["default"]
    assert {k: getattr(config, k) for k in options} == options
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_norga_parameters_exist_only_for_the_gated_layers_and_fold_keeps_them():
    model = repeft.wrap(tiny_model("llama"), repeft.PrefixConfig(n_prefix=3, norga=True, norga_layers=[1]))
    adapter = adapter_of(model)
    assert adapter.norga_alpha.shape == adapter.norga_tau.shape == (1,)
    with torch.no_grad():
        adapter.norga_alpha.fill_(2.0)
    batch = tiny_batch("llama")
    before = logits(model, batch)
    repeft.fold_prefix(model)
    assert model.configs["default"].norga_layers == [1]
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)


def test_norga_layers_beyond_the_model_are_refused_by_name():
    with pytest.raises(ValueError, match=r"norga_layers \[5\] name layers this model lacks: it has 2"):
        repeft.wrap(tiny_model("llama"), repeft.PrefixConfig(n_prefix=3, norga=True, norga_layers=[0, 5]))


def test_a_prefix_config_saved_before_these_fields_means_what_it_did():
    old = {"method": "prefix", "n_prefix": 3, "norga": True}
    saved = repeft.AdapterConfig.from_saved(old)
    assert (saved.init, saved.prefix_dropout, saved.norga_layers) == ("normal", 0.0, None)
    fresh = repeft.AdapterConfig.from_dict(old)
    assert (fresh.init, fresh.prefix_dropout) == ("reference", 0.1)
