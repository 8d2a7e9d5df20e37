"""DoRA (``use_dora=True``) against PEFT itself: same weights give the same logits and gradients, files exchange exactly."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import repeft
from repeft.layers import AdapterLayer
from repeft.methods import methods
from tiny_models import FAMILIES, GENERATIVE_FAMILIES, logits, tiny_batch, tiny_model, train_steps

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# Llama's projections have no bias, GPT-2's Conv1D (fan_in_fan_out) and BERT's nn.Linear have one.
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}
MAGNITUDE = "lora_magnitude_vector"


def with_random_biases(family: str) -> torch.nn.Module:
    """A tiny model whose base biases are nonzero (transformers initialises them to zero): bias handling has work."""
    base = tiny_model(family)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.3)
    return base


def off_init(model):
    """``model`` with every trainable (adapter) tensor moved off its init, the same way for every test."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def peft_dora(family: str, **overrides):
    """A PEFT DoRA model of ``family`` with every adapter tensor moved off its init, and a copy of its base."""
    base = with_random_biases(family)
    reference = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True, fan_in_fan_out=family == "gpt2")
    return off_init(peft.get_peft_model(base, peft.LoraConfig(**{**config, **overrides}))), reference


def as_repeft(peft_model, reference, tmp_path, **kwargs):
    peft_model.save_pretrained(tmp_path / "peft")
    return repeft.from_peft(reference, tmp_path / "peft", **kwargs)


# The end of PEFT's saved name for each of repeft's adapter tensors (the others keep theirs).
PEFT_NAME_ENDS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias"}


def peft_named_grads(model) -> dict[str, torch.Tensor]:
    """Adapter gradients under PEFT's saved names, for PEFT and repeft models alike.

    ``base_model.model.<module>.lora_A.weight``, ``...lora_B.bias``, ``...lora_magnitude_vector`` (no
    ``.weight`` in PEFT's files), ``...lora_embedding_A``.
    """
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if isinstance(model, repeft.AdapterModel):
            path, _, part = name.removeprefix("base_model.model.").replace(".adapters.default", "").rpartition(".")
            name = f"base_model.model.{path}.{PEFT_NAME_ENDS.get(part, part)}"
        else:
            name = name.replace(".default", "")
            name = name.removesuffix(".weight") if f"{MAGNITUDE}." in name else name
        grads[name] = p.grad
    return grads


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_at_init_and_only_adapter_parameters_train(family):
    base = tiny_model(family)
    batch = tiny_batch(family)
    with torch.no_grad():
        expected = base(**batch).logits
    model = repeft.wrap(base, repeft.LoraConfig(r=4, target_modules=TARGETS[family], use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-6, rtol=0)
    trainable = {name.rpartition(".")[2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", MAGNITUDE}
    layer = model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj" if family == "llama" else "transformer.h.0.attn.c_attn")
    weight = layer.base_layer.weight.T if family == "gpt2" else layer.base_layer.weight
    # B = 0, so the magnitude starts as each output row's norm of W.
    torch.testing.assert_close(getattr(layer.adapters["default"], MAGNITUDE), weight.norm(dim=1))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_same_logits_and_gradients_as_peft(family, tmp_path):
    peft_model, reference = peft_dora(family)
    model = as_repeft(peft_model, reference, tmp_path, trainable=True)
    batch = tiny_batch(family)
    peft_model.eval()
    model.eval()  # dropout off in the base model too; gradients still flow
    peft_out, out = peft_model(**batch), model(**batch)
    torch.testing.assert_close(out.logits, peft_out.logits, atol=1e-5, rtol=0)
    peft_out.loss.backward()
    out.loss.backward()
    assert any(MAGNITUDE in k for k in assert_grads_like_peft(model, peft_model))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_dropout_as_peft_applies_it(family, tmp_path):
    # PEFT rescales the dropped-out input's base output by (m / ||W + s B A|| - 1): the same random masks
    # (same seed, drawn in the same order) must give the same training-mode logits.
    peft_model, reference = peft_dora(family, lora_dropout=0.3)
    model = as_repeft(peft_model, reference, tmp_path, trainable=True)
    assert model.configs["default"].lora_dropout == 0.3
    batch = tiny_batch(family)
    peft_model.train()
    model.train()
    torch.manual_seed(11)
    expected = peft_model(**batch).logits
    torch.manual_seed(11)
    got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(got, model.eval()(**batch).logits, atol=1e-3)  # dropout really acted


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_files_exchange_exactly_with_peft(family, tmp_path):
    peft_model, reference = peft_dora(family)
    peft_model.save_pretrained(tmp_path / "peft")
    model = repeft.from_peft(copy.deepcopy(reference), tmp_path / "peft")
    # PEFT -> repeft -> PEFT: the same tensors under the same names, and PEFT's DoRA config.
    repeft.export_peft(model, tmp_path / "back")
    written, original = load_file(tmp_path / "back" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(written) == set(original) and any(k.endswith(f".{MAGNITUDE}") for k in written)
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["use_dora"] is True
    # repeft -> PEFT: PEFT loads the export as a DoRA model with the same tensors and logits.
    reloaded = peft.PeftModel.from_pretrained(reference, tmp_path / "back").eval()
    assert reloaded.peft_config["default"].use_dora
    for key, value in peft.get_peft_model_state_dict(reloaded).items():
        assert torch.equal(value, original[key]), key
    batch = tiny_batch(family)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert repeft.get_peft_model_state_dict(model).keys() == original.keys()


def test_peft_state_dict_loads_into_a_dora_adapter():
    peft_model, reference = peft_dora("llama")
    model = repeft.wrap(reference, repeft.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True))
    repeft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(peft_model))
    batch = tiny_batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, peft_model.eval()(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_matches_peft_and_unmerge_restores_the_base(family, tmp_path):
    peft_model, reference = peft_dora(family)
    base_state = copy.deepcopy(reference.state_dict())
    model = as_repeft(peft_model, reference, tmp_path)
    batch = tiny_batch(family)
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge()
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
        model.unmerge()
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
        for path, layer in model.adapter_layers():
            weight = base_state[f"{path.removeprefix('base_model.model.')}.weight"]
            torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
        assert_merged_like_peft(model, peft_model)


def test_merged_export_folds_the_magnitude_in(tmp_path):
    peft_model, reference = peft_dora("llama")
    model = as_repeft(peft_model, reference, tmp_path)
    batch = tiny_batch("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    repeft.export_merged(model, tmp_path / "merged")  # the dequantize-and-merge path
    plain = type(reference).from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(**batch).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "replora"])
def test_save_load_round_trip_keeps_the_magnitude(method, tmp_path):
    config_class = repeft.RepLoRAConfig if method == "replora" else repeft.LoraConfig
    model = repeft.wrap(tiny_model("llama"), config_class(r=4, use_dora=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    batch = tiny_batch("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_adapter(tmp_path / "adapter")
    assert any(k.endswith(f".{MAGNITUDE}") for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    loaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.configs["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)


def test_an_adapter_saved_before_use_dora_loads_as_plain_lora(tmp_path):
    model = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(r=4))
    model.save_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["use_dora"]
    path.write_text(json.dumps(meta))
    loaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.configs["default"].use_dora is False
    assert not any(MAGNITUDE in name for name, _ in loaded.named_parameters())


def test_replora_with_dora_exports_to_peft(tmp_path):
    # DoRA's magnitude sits on RepLoRA's computed factors; PEFT gets the materialised A, B and the magnitude.
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    batch = tiny_batch("llama")
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = repeft.wrap(base, repeft.RepLoRAConfig(r=4, mlp_hidden=8, use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, atol=1e-6, rtol=0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        expected = model(**batch).logits
    repeft.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-5, rtol=0)


def test_mixed_batches_refuse_dora_by_name():
    model = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(r=4, use_dora=True))
    model.add_adapter("plain", repeft.LoraConfig(r=4))
    model.eval()
    with pytest.raises(ValueError, match=r"DoRA adapters \['default'\] cannot share a batch"):
        model(**tiny_batch("llama"), adapter_names=["default", "plain"])


def test_triton_kernel_with_dora_dropout_is_refused_by_name():
    with pytest.raises(ValueError, match="kernel='triton' with use_dora=True and lora_dropout > 0"):
        repeft.LoraConfig(use_dora=True, kernel="triton", lora_dropout=0.1)


def test_dora_on_the_triton_kernel_matches_torch():
    # Without dropout the fused kernel computes W x + s B A x and DoRA rescales it: same logits as torch
    # (on CPU the Triton interpreter runs the kernel).
    pytest.importorskip("triton")
    batch = tiny_batch("llama")
    logits = {}
    for kernel in ("torch", "triton"):
        model = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(r=4, use_dora=True, kernel=kernel))
        torch.manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
            logits[kernel] = model(**batch).logits
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=0)


# The merged export's tolerance: bitsandbytes' int8 matmul also quantizes the activations (about 4e-3 here).
QUANTIZATIONS = {"nf4": ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 1e-4), "int8": ({"load_in_8bit": True}, 2e-2)}


@pytest.mark.parametrize("quantization, merged_atol", QUANTIZATIONS.values(), ids=list(QUANTIZATIONS))
def test_qdora_matches_peft_on_a_bitsandbytes_base(quantization, merged_atol, tmp_path, monkeypatch):
    # The norm is taken of the dequantized weight, as PEFT takes it.
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)  # one 4-bit layout, whatever the CPU
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")

    def quantized():
        config = BitsAndBytesConfig(**quantization)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu").eval()

    peft_model = peft.get_peft_model(quantized(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model = as_repeft(peft_model, quantized(), tmp_path)
    batch = tiny_batch("llama")
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(expected, peft_model.eval()(**batch).logits, atol=1e-5, rtol=0)
    # The merged export dequantizes W and folds DoRA's rescaling in: a float model with the same logits.
    repeft.export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=merged_atol, rtol=0)


def test_dora_trains_on_a_bfloat16_model():
    model = repeft.wrap(tiny_model("llama").to(torch.bfloat16), repeft.LoraConfig(r=4, use_dora=True, lora_dropout=0.1))
    model.train()
    model(**tiny_batch("llama")).loss.backward()
    magnitudes = [p for name, p in model.named_parameters() if name.endswith(MAGNITUDE)]
    assert magnitudes and all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)


LORA_FAMILIES = [f for f in FAMILIES if f in methods()["lora"].families]


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_the_conformance_checklist_with_dora_on_every_lora_family(family, tmp_path):
    # tests/test_conformance.py's checklist, with the LoRA example config plus use_dora, on each family LoRA claims.
    reference = tiny_model(family)
    batch = tiny_batch(family)
    config = dataclasses.replace(methods()["lora"].example_config(), use_dora=True)
    model = repeft.wrap(copy.deepcopy(reference), config)
    assert torch.equal(logits(model, batch), logits(reference, batch))
    magnitudes = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(MAGNITUDE)}
    train_steps(model, batch, steps=2)
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(reference, batch))
    assert magnitudes and all(not torch.equal(model.get_parameter(n), m) for n, m in magnitudes.items())
    model.save_adapter(tmp_path / "adapter")
    assert torch.equal(logits(repeft.load_adapter(copy.deepcopy(reference), tmp_path / "adapter"), batch), trained)
    if family in GENERATIVE_FAMILIES:
        ids = tiny_batch(family, batch=2, seq=6, seed=2)["input_ids"]
        kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_logits": True, "return_dict_in_generate": True}
        cached, uncached = model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw)
        assert torch.equal(cached.sequences, uncached.sequences)
    model.merge()
    torch.testing.assert_close(logits(model, batch), trained, atol=1e-4, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, batch), trained, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), trained, atol=1e-4, rtol=0)


def assert_grads_like_peft(ours, theirs) -> dict[str, torch.Tensor]:
    """Gradients of the same adapter tensors as PEFT's, equal to them; ours, by PEFT's names."""
    got, expected = peft_named_grads(ours), peft_named_grads(theirs)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    return got


def assert_merged_like_peft(ours, theirs) -> None:
    """``merge_and_unload`` of a repeft and a PEFT model give the same state dict (keys and values)."""
    merged, peft_merged = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert merged.keys() == peft_merged.keys()
    for key, value in peft_merged.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=key)
