"""Mixed-adapter batches: ``model(..., adapter_names=[...])`` gives each row its own adapter (or none).

The reference is the model run on each row alone with that adapter active (or
with adapters disabled for ``"__base__"``). Adapters differ in method (LoRA,
RepLoRA), rank, scaling and target modules, so a layer may hold only some of them.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import repeft

NAMES = ["c", "__base__", "a", "b", "a"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # kernel="triton" runs in the interpreter on CPU


def build(family="llama", kernel="auto"):
    attn = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    other = ["o_proj", "down_proj"] if family == "llama" else ["c_proj"]
    model = repeft.wrap(tiny_model(family), repeft.LoRAConfig(r=4, target_modules=attn, kernel=kernel), "a")
    model.add_adapter("b", repeft.LoRAConfig(r=8, lora_alpha=4, target_modules=attn + other, kernel=kernel))
    model.add_adapter("c", repeft.RepLoRAConfig(r=2, target_modules=other, kernel=kernel))
    torch.manual_seed(3)
    with torch.no_grad():  # trained-looking adapters: B (and RepLoRA's last layer) away from zero
        for _, layer in model.adapter_layers():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
    return model.to(DEVICE).eval()


def alone(model, name, fn):
    """``fn()`` with only adapter ``name`` on (``"__base__"``: none)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def input_ids(rows=len(NAMES), seq=6):
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_row_gets_its_adapter(family):
    model = build(family)
    ids = input_ids()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            want = alone(model, name, lambda: model(input_ids=ids[row : row + 1]).logits)
            torch.testing.assert_close(mixed[row : row + 1], want, rtol=1e-5, atol=1e-5)
    # The adapters really differ (otherwise the comparison proves little).
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3) and not torch.allclose(mixed[2], mixed[3], atol=1e-3)


def test_triton_kernels_in_a_mixed_batch():
    """kernel='triton' runs the segmented kernels (Triton interpreter on CPU) for the whole model."""
    model = build(kernel="triton")
    ids = input_ids(rows=3, seq=5)
    names = ["b", "c", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            want = alone(model, name, lambda: model(input_ids=ids[row : row + 1]).logits)
            torch.testing.assert_close(mixed[row : row + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_mixed_adapters(beams):
    model = build()
    ids = input_ids(rows=3, seq=4)
    names = ["a", "__base__", "c"]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=beams, num_return_sequences=beams, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        for row, name in enumerate(names):
            want = alone(model, name, lambda: model.generate(input_ids=ids[row : row + 1], **kw))
            assert torch.equal(mixed[row * beams : (row + 1) * beams], want)


def test_generate_stacks_each_layers_factors_once_per_call(monkeypatch):
    model = build()
    calls = []
    for _, layer in model.adapter_layers():
        for adapter in layer.adapters.values():
            factors = adapter.factors
            monkeypatch.setattr(adapter, "factors", lambda f=factors: calls.append(1) or f())
    ids = input_ids(rows=3, seq=4)
    names = ["a", "b", "c"]
    with torch.no_grad():
        model.generate(input_ids=ids, adapter_names=names, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                       pad_token_id=0)
    once = sum(len([n for n in names if n in layer.adapters]) for _, layer in model.adapter_layers())
    assert len(calls) == once  # not once per generated token
    calls.clear()
    model(input_ids=ids, adapter_names=names).logits.sum().backward()  # with autograd: built in the graph
    assert len(calls) == once and any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_layers_are_restored_after_the_call():
    model = build()
    ids = input_ids(rows=2)
    model.set_adapter("b")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model(input_ids=ids, adapter_names=["a", "c"])
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert all(getattr(layer, "row_adapters", None) is None for _, layer in model.adapter_layers())


def test_bad_adapter_names():
    model = build()
    ids = input_ids(rows=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(input_ids=ids, adapter_names=["a", "nope"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(input_ids=ids, adapter_names="a")
    with pytest.raises(ValueError, match="entries but the batch has"):
        model(input_ids=input_ids(rows=3), adapter_names=["a", "b"])
    model.train()
    with pytest.raises(ValueError, match="for inference"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    model.merge("a")
    with pytest.raises(ValueError, match="unmerge"):
        model(input_ids=ids, adapter_names=["a", "b"])


@pytest.mark.parametrize("names", [["a", "c"], [], ["a", "b", "c", "a", "b"]], ids=["fewer", "none", "more"])
def test_adapter_names_must_give_one_name_per_row(names):
    model = build()
    with torch.no_grad(), pytest.raises(ValueError, match="entries but the batch has 4 rows: give exactly one"):
        model(input_ids=input_ids(rows=4), adapter_names=names)
    with torch.no_grad(), pytest.raises(ValueError, match="entries but the batch has 4 rows: give exactly one"):
        model.generate(input_ids=input_ids(rows=4), adapter_names=names, max_new_tokens=2, pad_token_id=0)


def test_generate_expands_names_for_beams_only_as_generate_does():
    """Beams and return sequences repeat each prompt's name; a batch of another size is still refused."""
    model = build()
    ids = input_ids(rows=2, seq=4)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        assert model.generate(input_ids=ids, adapter_names=["a", "b"], **kw).shape[0] == 4
        with pytest.raises(ValueError, match="entries but the batch has 2 rows"):
            model.generate(input_ids=ids, adapter_names=["a"], **kw)  # not stretched to the 4 rows of beams
        # A name list as long as the beams is not a name per prompt.
        with pytest.raises(ValueError, match="entries but the batch has 2 rows"):
            model.generate(input_ids=ids, adapter_names=["a", "a", "b", "b"], **kw)


def test_generate_with_beams_on_an_encoder_decoder():
    """T5's encoder sees one row per prompt, its decoder one per beam: both run each prompt's adapter."""
    model = repeft.wrap(tiny_model("t5"), repeft.LoRAConfig(r=4, target_modules=["q", "v"]), "a")
    model.add_adapter("b", repeft.LoRAConfig(r=2, target_modules=["q", "v", "o"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model = model.to(DEVICE).eval()
    ids = input_ids(rows=3, seq=4)
    names = ["b", "__base__", "a"]
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        for row, name in enumerate(names):
            want = alone(model, name, lambda: model.generate(input_ids=ids[row : row + 1], **kw))
            assert torch.equal(mixed[row * 2 : (row + 1) * 2], want)


def test_disable_adapter_wins_over_adapter_names():
    """Inside ``disable_adapter()`` every row runs the base model, whatever adapter_names says."""
    model = build()
    ids = input_ids(rows=3)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
            inside = model(input_ids=ids, adapter_names=["a", "b", "c"]).logits
            with pytest.raises(ValueError, match="unknown adapter"):  # the names are still checked
                model(input_ids=ids, adapter_names=["a", "b", "nope"])
        torch.testing.assert_close(inside, base, rtol=0, atol=0)
        mixed = model(input_ids=ids, adapter_names=["a", "b", "c"]).logits  # enabled again afterwards
    assert not torch.allclose(mixed, base, atol=1e-3)
