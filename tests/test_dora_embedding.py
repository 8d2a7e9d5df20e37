"""DoRA (``use_dora=True``) on ``nn.Embedding`` against PEFT itself and against the maths written out here."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import repeft
from repeft.lora_embedding import LoRAEmbedding
from test_dora import as_repeft, assert_grads_like_peft, assert_merged_like_peft, off_init
from test_lora_embedding import batch_with_padding
from tiny_models import logits, tiny_batch, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# Gemma 3's embedding has a padding_idx and multiplies its output by embed_scale.
TARGETS = {"llama": ["embed_tokens", "q_proj"], "gemma3_text": ["embed_tokens", "v_proj"], "gpt2": ["wte", "c_attn"]}
MAGNITUDE = "lora_magnitude_vector"


def peft_dora(family: str, **overrides):
    """A PEFT DoRA model of ``family`` with every adapter tensor off its init, and an untouched copy of its base."""
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True, fan_in_fan_out=family == "gpt2")
    return off_init(peft.get_peft_model(base, peft.LoraConfig(**{**config, **overrides}))), reference


def embedding(model: repeft.AdapterModel) -> LoRAEmbedding:
    return next(m for m in model.get_base_model().modules() if isinstance(m, LoRAEmbedding))


def test_identity_at_init_and_the_magnitude_is_the_norm_over_the_vocabulary():
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    expected = logits(base, batch)
    model = repeft.wrap(base, repeft.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True))
    assert torch.equal(logits(model, batch), expected)
    layer = embedding(model)
    # A = 0 at init, so m = ||W.T||_row: one entry per embedding dimension, the norm over the vocabulary.
    torch.testing.assert_close(getattr(layer.adapters["default"], MAGNITUDE), layer.base_layer.weight.norm(dim=0))
    model.train()
    model(**batch).loss.backward()
    with_grad = {name.rpartition(".")[2] for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", MAGNITUDE}


def test_the_layer_computes_the_rescaled_lookup(tmp_path):
    peft_model, reference = peft_dora("llama")
    layer = embedding(as_repeft(peft_model, reference, tmp_path))
    adapter = layer.adapters["default"]
    A, B, m, s = adapter.lora_embedding_A, adapter.lora_embedding_B, getattr(adapter, MAGNITUDE), 8 / 4
    W = layer.base_layer.weight
    x = tiny_batch("llama")["input_ids"]
    gain = m / (W.T + s * B @ A).norm(dim=1)
    expected = gain * (W[x] + s * A.T[x] @ B.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_same_weights_give_peft_logits_and_gradients(family, tmp_path):
    theirs, reference = peft_dora(family)
    ours = as_repeft(theirs, reference, tmp_path, trainable=True)
    batch = batch_with_padding(family)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-6, rtol=0)
    for model in (theirs, ours):
        model(**batch).loss.backward()
    assert any(f"{TARGETS[family][0]}.{MAGNITUDE}" in k for k in assert_grads_like_peft(ours, theirs))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_merge_matches_peft_and_unmerge_restores_the_base(family, tmp_path):
    theirs, reference = peft_dora(family)
    base_state = copy.deepcopy(reference.state_dict())
    ours = as_repeft(theirs, reference, tmp_path)
    batch = tiny_batch(family)
    expected = logits(ours, batch)
    ours.merge()
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)
    ours.unmerge()
    torch.testing.assert_close(embedding(ours).base_layer.weight, base_state["model.embed_tokens.weight"], atol=1e-6, rtol=0)
    assert_merged_like_peft(ours, theirs)


def test_merging_a_tied_embedding_leaves_the_head_on_the_base_weight(tmp_path):
    # GPT-2's lm_head is its wte: the merge unties it (as for plain LoRA), so the logits stay the adapter's.
    theirs, reference = peft_dora("gpt2")
    ours = as_repeft(theirs, reference, tmp_path)
    batch = tiny_batch("gpt2")
    expected = logits(ours, batch)
    plain = ours.merge_and_unload()
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_files_exchange_exactly_with_peft(family, tmp_path):
    theirs, reference = peft_dora(family)
    ours = as_repeft(theirs, copy.deepcopy(reference), tmp_path)
    repeft.export_peft(ours, tmp_path / "back")
    written, original = load_file(tmp_path / "back" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    original = {k: v for k, v in original.items() if not k.endswith("base_layer.weight")}  # save_embedding_layers
    assert set(written) == set(original)
    assert any(k.endswith(f"{TARGETS[family][0]}.{MAGNITUDE}") for k in written)
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["use_dora"] is True
    reloaded = peft.PeftModel.from_pretrained(reference, tmp_path / "back").eval()
    batch = tiny_batch(family)
    torch.testing.assert_close(logits(reloaded, batch), logits(ours, batch), atol=1e-6, rtol=0)


def test_save_load_round_trip_keeps_the_magnitude(tmp_path):
    theirs, reference = peft_dora("llama")
    ours = as_repeft(theirs, copy.deepcopy(reference), tmp_path)
    batch = tiny_batch("llama")
    expected = logits(ours, batch)
    ours.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(reference, tmp_path / "adapter")
    assert getattr(embedding(loaded).adapters["default"], MAGNITUDE) is not None
    assert torch.equal(logits(loaded, batch), expected)


def test_gradient_of_the_magnitude_is_the_gain_path_written_out():
    # d loss / d m for loss = sum(h * g_out): h = (m / n) * (E x + s A.T[x] B.T), n constant.
    model = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True, init_lora_weights=False))
    layer = embedding(model)
    adapter = layer.adapters["default"]
    x = tiny_batch("llama")["input_ids"]
    upstream = torch.randn(*x.shape, layer.out_features)
    (layer(x) * upstream).sum().backward()
    A, B, W, s = adapter.lora_embedding_A.detach(), adapter.lora_embedding_B.detach(), layer.base_layer.weight, 8 / 4
    norm = (W.T + s * B @ A).norm(dim=1)
    unscaled = F.embedding(x, W) + s * F.embedding(x, A.T) @ B.T
    torch.testing.assert_close(getattr(adapter, MAGNITUDE).grad, (upstream * unscaled / norm).sum(dim=(0, 1)), atol=1e-4, rtol=1e-5)
