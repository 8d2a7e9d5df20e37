"""Adapter files: bad input is refused with a clear message and nothing is half-loaded or half-written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import repeft
from repeft import files
from tiny_models import tiny_batch, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    model.save_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


def assert_untouched(base, reference):
    """A failed load leaves the model exactly as it was: no adapter layers, same grads."""
    assert all(type(a) is type(b) for a, b in zip(base.modules(), reference.modules()))
    assert [p.requires_grad for p in base.parameters()] == [p.requires_grad for p in reference.parameters()]


def test_adapter_dir_contents(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((saved / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["format_version"] == 1
    assert meta["config"]["r"] == 4
    assert meta["base_model"]["architecture"]["hidden_size"] == 32
    assert "model.layers.0.self_attn.q_proj" in meta["adapted_modules"]
    assert "model.layers.0.self_attn.q_proj.lora_A" in load_file(saved / "adapter_model.safetensors")


def test_truncated_weights_are_rejected(saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    base = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match="corrupt or truncated"):
        repeft.load_adapter(base, saved)
    assert_untouched(base, tiny_model("llama"))


def test_corrupt_config_is_rejected(saved):
    (saved / "adapter_config.json").write_text('{"format": "repeft", ')
    with pytest.raises(repeft.AdapterFileError, match="not valid JSON"):
        repeft.load_adapter(tiny_model("llama"), saved)


def test_missing_key_is_rejected(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.v_proj.lora_B"]
    save_file(tensors, weights)
    base = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match="missing model.layers.1.self_attn.v_proj.lora_B"):
        repeft.load_adapter(base, saved)
    assert_untouched(base, tiny_model("llama"))


def test_shape_mismatch_is_rejected(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(4, 31)
    save_file(tensors, weights)
    with pytest.raises(repeft.AdapterFileError, match=r"wrong shape.*q_proj.lora_A: file \(4, 31\), model \(4, 32\)"):
        repeft.load_adapter(tiny_model("llama"), saved)


def test_adapter_for_another_base_is_rejected(saved):
    other = tiny_model("mistral")
    with pytest.raises(repeft.AdapterFileError, match="made for another base model: model_type='llama'"):
        repeft.load_adapter(other, saved)
    assert_untouched(other, tiny_model("mistral"))


def test_failed_load_into_wrapped_model_keeps_its_adapters(saved):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=2), adapter_name="mine")
    batch = tiny_batch("llama")
    before = model(**batch).logits
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.lora_B"] = torch.zeros(3, 4)
    save_file(tensors, weights)
    with pytest.raises(repeft.AdapterFileError):
        model.load_adapter(saved, "other")
    assert list(model.configs) == ["mine"] and model.active_adapter == "mine"
    torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)


def test_pickle_files_are_never_loaded(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "repeft", "format_version": 1}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(repeft.AdapterFileError, match="pickle files are never loaded"):
        repeft.load_adapter(tiny_model("llama"), tmp_path)


def test_peft_dir_passed_to_load_adapter_points_to_from_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(repeft.AdapterFileError, match="repeft.from_peft"):
        repeft.load_adapter(tiny_model("llama"), tmp_path)


def test_crash_during_save_leaves_previous_adapter_intact(saved, monkeypatch):
    before = {k: v.clone() for k, v in load_file(saved / "adapter_model.safetensors").items()}
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(saved)
    after = load_file(saved / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temp dirs left behind


def test_crash_during_merged_export_leaves_nothing(tmp_path, monkeypatch):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(type(model.base_model), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed"):
        model.save_pretrained(tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_target_that_matches_nothing_names_closest_modules():
    base = tiny_model("llama")
    with pytest.raises(repeft.TargetError, match="'q_prj' matches no module.*closest linear layer names: q_proj"):
        repeft.wrap(base, repeft.LoRAConfig(target_modules=["q_prj"]))
    assert_untouched(base, tiny_model("llama"))
    with pytest.raises(repeft.TargetError, match="regex 'attn.*' matches no linear layer"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules="attn.*"))
    with pytest.raises(repeft.TargetError, match="LlamaAttention"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=["self_attn"]))


def test_targets_by_suffix_and_regex():
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=r"model\.layers\.1\..*_proj"))
    paths = [p for p, _ in model.adapter_layers()]
    assert len(paths) == 7 and all(".layers.1." in p for p in paths)
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=["layers.0.mlp.up_proj"]))
    assert [p for p, _ in model.adapter_layers()] == ["base_model.model.layers.0.mlp.up_proj"]
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules="all-linear"))
    assert not any("lm_head" in p for p, _ in model.adapter_layers())


def test_unsupported_architecture_without_targets_explains_what_to_pass():
    import transformers as tf

    base = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=50))
    with pytest.raises(repeft.TargetError, match="no default target_modules for model_type 'bloom'.*query_key_value"):
        repeft.wrap(base, repeft.LoRAConfig())


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        repeft.LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\] for LoRAConfig"):
        repeft.AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ValueError, match="activation must be one of"):
        repeft.RepLoRAConfig(activation="swish")
    config = repeft.RepLoRAConfig(r=3, share_mlp=True)
    assert repeft.AdapterConfig.from_json(config.to_json()) == config


def test_wrapping_twice_is_refused():
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig())
    with pytest.raises(TypeError, match="add_adapter"):
        repeft.wrap(model, repeft.LoRAConfig())
