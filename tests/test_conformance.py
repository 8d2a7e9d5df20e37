"""One conformance suite: PEFT's checklist on every (method, family) pair the support table claims.

The table is the method registry (``repeft.methods``): each method's
registration states the model families it supports, what it promises
(identity at init, mergeable, generate with cache, vision only) and a small
example config for tiny models. Every claimed pair of the model zoo in
``tiny_models`` runs the checklist below with that config, every other pair
must be refused by name, and ``docs/support.md`` must show the table. A new
method is picked up from its registration; nothing here names the methods.

Each family's tiny model is built once and each pair is wrapped and trained
once (``pair``); the tests share it and put back whatever they change.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import repeft
from repeft.attention import SITE
from repeft.layers import AdapterLayer
from repeft.methods import Method, methods, register_method
from tiny_models import FAMILIES, GENERATIVE_FAMILIES, VISION_FAMILIES, logits, tiny_batch, tiny_model, train_steps

TABLE = methods()
CLAIMED = [(m, f) for m, spec in TABLE.items() for f in FAMILIES if f in spec.families]
REFUSED = [(m, f) for m, spec in TABLE.items() for f in FAMILIES if f not in spec.families]
GENERATING = [(m, f) for m, f in CLAIMED if TABLE[m].generates_with_cache and f in GENERATIVE_FAMILIES]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "support.md"


def names(pairs):
    return [f"{m}-{f}" for m, f in pairs]


@functools.cache
def base(family: str) -> torch.nn.Module:
    """The family's tiny model; never wrapped or changed (pairs wrap copies)."""
    return tiny_model(family)


@dataclass
class Pair:
    spec: Method
    reference: torch.nn.Module
    model: repeft.AdapterModel
    batch: dict[str, torch.Tensor]
    base_logits: torch.Tensor
    at_init: torch.Tensor
    trained: torch.Tensor


@functools.cache
def pair(method: str, family: str) -> Pair:
    """``method`` on a copy of the family's model: logits at init, then after two training steps."""
    reference = base(family)
    model = repeft.wrap(copy.deepcopy(reference), TABLE[method].example_config())
    batch = tiny_batch(family)
    at_init = logits(model, batch)
    train_steps(model, batch, steps=2)
    return Pair(TABLE[method], reference, model, batch, logits(reference, batch), at_init, logits(model, batch))


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_free_models(one_thread):
    yield
    pair.cache_clear()
    base.cache_clear()


def base_weights(model: repeft.AdapterModel) -> dict[str, torch.Tensor]:
    """The wrapped model's frozen weights under the plain model's names (a wrapped layer's weights are its own)."""
    state = model.get_base_model().state_dict()
    plain = (k.replace(".base_layer.", ".").replace(".original.", ".") for k in state)
    return {name: state[key] for name, key in zip(plain, state) if ".adapters." not in key}


# -- the table itself --------------------------------------------------------------------------


def test_every_method_has_an_example_config_and_every_claimed_family_a_tiny_model():
    for spec in TABLE.values():
        example = spec.example_config()
        assert type(example) is spec.config and example.method == spec.name
        assert repeft.AdapterConfig.from_json(example.to_json()) == example
        assert set(spec.families) <= set(FAMILIES), f"{spec.name}: add a tiny model to tests/tiny_models.py"
        assert spec.families, spec.name


def test_one_registration_makes_a_method_loadable_and_a_row_of_the_table(monkeypatch):
    @dataclass
    class ScaledConfig(repeft.AdapterConfig):
        method: ClassVar[str] = "scaled"
        scale: float = 1.0

    monkeypatch.setattr(repeft.methods, "_METHODS", dict(TABLE))  # the real table comes back afterwards

    @register_method(ScaledConfig, families=["llama"], identity_at_init=True, generates_with_cache=True,
                     vision_only=False, example={"scale": 0.5})
    def inject_scaled(model, name, config): ...

    row = methods()["scaled"]
    assert (row.name, row.config, row.inject, row.families, row.mergeable) == (
        "scaled", ScaledConfig, inject_scaled, ("llama",), False)
    assert row.example_config() == ScaledConfig(scale=0.5)
    assert repeft.AdapterConfig.from_dict({"method": "scaled", "scale": 2.0}) == ScaledConfig(scale=2.0)
    # A copied module that keeps its original's method name must not replace the original.
    with pytest.raises(ValueError, match="must name a new method, got 'lora'"):
        register_method(repeft.LoRAConfig, families=[], identity_at_init=True, generates_with_cache=True,
                        vision_only=False, example={})
    assert methods()["lora"] == TABLE["lora"]


def test_vision_only_methods_claim_only_image_encoders_and_do_not_generate():
    for spec in TABLE.values():
        text = set(spec.families) - set(VISION_FAMILIES)
        assert (not text) == spec.vision_only, spec.name
        assert not (spec.vision_only and spec.generates_with_cache), spec.name


def support_tables() -> str:
    """docs/support.md's tables, made from the registry."""
    columns = list(TABLE)
    families = [f for f in FAMILIES if any(f in spec.families for spec in TABLE.values())]
    mark = {True: "yes", False: "no"}
    lines = [
        "| method | identity at init | mergeable | generate with KV cache | vision only |",
        "|---|---|---|---|---|",
        *(f"| {s.name} | {mark[s.identity_at_init]} | {mark[s.mergeable]} | {mark[s.generates_with_cache]} "
          f"| {mark[s.vision_only]} |" for s in TABLE.values()),
        "",
        "| model_type | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {f} | " + " | ".join("✓" if f in TABLE[m].families else "—" for m in columns) + " |" for f in families),
    ]
    return "\n".join(lines)


def test_docs_show_the_support_table():
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"<!-- support-table:start -->\n(.*?)\n<!-- support-table:end -->", text, re.S)
    expected = support_tables()
    assert found is not None and found.group(1) == expected, (
        f"docs/support.md is out of date; put this between its support-table markers:\n{expected}"
    )


# -- the checklist, on every claimed pair --------------------------------------------------------


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_identity_at_init_as_promised(method, family):
    p = pair(method, family)
    assert torch.equal(p.at_init, p.base_logits) == p.spec.identity_at_init


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_only_adapter_parameters_get_gradients(method, family):
    p = pair(method, family)
    model = p.model
    model.zero_grad(set_to_none=True)
    model(**p.batch).loss.backward()
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    with_grad = {n for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    assert trainable and trainable == with_grad
    assert all(".adapters.default." in n for n in trainable), sorted(trainable)


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_training_moves_the_adapter_and_leaves_base_weights(method, family):
    p = pair(method, family)
    assert not torch.allclose(p.trained, p.at_init)
    weights, before = base_weights(p.model), p.reference.state_dict()
    assert weights.keys() == before.keys()
    assert all(torch.equal(weights[k], before[k]) for k in before)


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_save_then_load_onto_a_fresh_base_is_exact(method, family, tmp_path):
    p = pair(method, family)
    p.model.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(copy.deepcopy(p.reference), tmp_path / "adapter")
    assert torch.equal(logits(loaded, p.batch), p.trained)
    assert loaded.trainable_parameters()[0] == 0  # loaded for inference unless asked otherwise


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_merge_and_unmerge_are_exact_or_refused(method, family):
    p = pair(method, family)
    if not p.spec.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            p.model.merge()
        assert torch.equal(logits(p.model, p.batch), p.trained)
        return
    model = copy.deepcopy(p.model)  # unmerging is exact only to rounding: keep the shared model's weights as they are
    model.merge()
    torch.testing.assert_close(logits(model, p.batch), p.trained, atol=1e-4, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, p.batch), p.trained, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain) is type(p.reference) and not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, p.batch), p.trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, family", GENERATING, ids=names(GENERATING))
def test_greedy_generate_with_cache_equals_without(method, family):
    model = pair(method, family).model
    ids = tiny_batch(family, batch=2, seq=6, seed=2)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second row is left-padded
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0,
          "output_logits": True, "return_dict_in_generate": True}
    cached = model.generate(ids.masked_fill(mask == 0, 0), use_cache=True, **kw)
    uncached = model.generate(ids.masked_fill(mask == 0, 0), use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_gradient_checkpointing_gives_the_same_gradients(method, family):
    p = pair(method, family)
    model = p.model

    def gradients():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in both passes
        model(**p.batch).loss.backward()
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}

    model.train()
    try:
        plain = gradients()
        # transformers >= 5.2 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        checkpointed = gradients()
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.zero_grad(set_to_none=True)
        model.eval()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method, family", CLAIMED, ids=names(CLAIMED))
def test_several_adapters_switch_and_disable(method, family):
    p = pair(method, family)
    model = p.model
    model.add_adapter("second", TABLE[method].example_config())
    try:
        assert model.active_adapter == "default"  # adding does not switch, as in PEFT
        assert all(q.requires_grad == (".adapters.default." in n) for n, q in model.named_parameters())
        assert torch.equal(logits(model, p.batch), p.trained)
        model.set_adapter("second")
        assert all(q.requires_grad == (".adapters.second." in n) for n, q in model.named_parameters())
        second = logits(model, p.batch)
        assert torch.equal(second, p.base_logits) == p.spec.identity_at_init
        model.set_adapter("default")
        assert torch.equal(logits(model, p.batch), p.trained)
        with model.disable_adapter():
            assert torch.equal(logits(model, p.batch), p.base_logits)
        model.set_adapter("second")
        assert torch.equal(logits(model, p.batch), second)
    finally:
        model.delete_adapter("second")
    assert model.active_adapter == "default"
    assert all(q.requires_grad == (".adapters.default." in n) for n, q in model.named_parameters())
    assert torch.equal(logits(model, p.batch), p.trained)


# -- every other pair is refused -------------------------------------------------------------------


@pytest.mark.parametrize("method, family", REFUSED, ids=names(REFUSED))
def test_unclaimed_pairs_are_refused_by_name_and_leave_the_model_as_it_was(method, family):
    model = copy.deepcopy(base(family))
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=re.escape(repr(family))):
        repeft.wrap(model, TABLE[method].example_config())
    assert all(q.requires_grad for q in model.parameters())
    assert model.config._attn_implementation == implementation
    assert not any(hasattr(m, SITE) or m._forward_pre_hooks or m._forward_hooks for m in model.modules())
