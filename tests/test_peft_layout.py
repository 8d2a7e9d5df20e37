"""PEFT's object layout: ``model.base_model`` is a tuner whose ``.model`` is the transformers model.

PEFT users' code and tools reach layers as ``model.base_model.model.<module>``,
pick adapter parameters with ``model.prefix`` and switch adapters on
``model.base_model``; trainers call ``model.base_model(...)`` for the
backbone's hidden states (transformers' meaning). Each is compared with PEFT
itself where PEFT is installed.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import repeft


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(config).eval()


def wrapped(seed: int = 0) -> repeft.AdapterModel:
    model = repeft.get_peft_model(tiny_llama(seed), repeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", repeft.LoraConfig(r=2, target_modules=["q_proj"]))
    return model


def test_base_model_holds_the_transformers_model_under_peft_names():
    model = wrapped()
    assert model.base_model.model is model.get_base_model()
    assert isinstance(model.get_base_model(), LlamaForCausalLM)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, repeft.lora.LoRALinear)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("base_model.model.model.layers.") for n in names)
    assert model.targeted_module_names == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


def test_same_parameter_names_and_layout_as_peft():
    peft = pytest.importorskip("peft")
    ours = repeft.get_peft_model(tiny_llama(), repeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def layout(model):  # module paths down to the adapted layer, and where the frozen weights sit
        frozen = {n.replace(".base_layer", "") for n, p in model.named_parameters() if not p.requires_grad}
        adapted = {n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
        return frozen, adapted

    assert layout(ours) == layout(theirs)
    assert ours.prefix == theirs.prefix == theirs.base_model.prefix == ours.base_model.prefix == "lora_"
    assert {n for n, _ in ours.named_parameters() if ours.prefix in n} and all(
        "lora_" in n for n, p in ours.named_parameters() if p.requires_grad)


def test_tuner_members_act_on_the_wrapper():
    model = wrapped()
    assert model.base_model.peft_config is model.peft_config
    assert model.active_peft_config is model.peft_config["default"]
    assert model.base_model.active_adapter == "default"
    model.base_model.set_adapter("other")
    assert model.active_adapter == "other" and model.base_model.active_adapters == ["other"]
    model.base_model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


def test_calling_base_model_runs_the_backbone_as_transformers_does():
    model = wrapped()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        assert torch.equal(hidden, model.get_base_model().base_model(input_ids=ids).last_hidden_state)
        # The adapter is in the backbone's layers: perturbing it changes the hidden states.
        model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.fill_(0.5)
        assert not torch.equal(model.base_model(input_ids=ids).last_hidden_state, hidden)
        assert model(input_ids=ids).logits.shape == (2, 5, 64)


def test_non_transformers_model_base_model_call_is_the_whole_model():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = repeft.get_peft_model(mlp, repeft.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(3, 4)
    assert torch.equal(model.base_model(x), model(x))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copy_s_tuner_answers_for_the_copy(clone):
    model = wrapped()
    copied = clone(model)
    assert copied.base_model.model is copied.get_base_model() is not model.get_base_model()
    copied.base_model.set_adapter("other")
    assert copied.active_adapter == "other" and model.active_adapter == "default"


def test_layers_show_peft_s_lora_names_over_the_same_tensors():
    peft = pytest.importorskip("peft")
    ours = repeft.get_peft_model(tiny_llama(), repeft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "embed_tokens"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "embed_tokens"]))
    path = "model.layers.0.self_attn.q_proj"
    layer, peft_layer = ours.get_base_model().get_submodule(path), theirs.get_base_model().get_submodule(path)
    assert layer.r == peft_layer.r and layer.scaling == peft_layer.scaling == {"default": 3.0}
    assert layer.lora_A.keys() == peft_layer.lora_A.keys() == {"default"}
    assert layer.lora_A["default"].weight.shape == peft_layer.lora_A["default"].weight.shape
    assert layer.lora_A["default"].weight is layer.adapters["default"].lora_A  # the parameter, not a copy
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)  # an edit through the view reaches the adapter
    assert torch.equal(layer.adapters["default"].lora_B, torch.ones(32, 4))
    embed, peft_embed = ours.get_base_model().model.embed_tokens, theirs.get_base_model().model.embed_tokens
    assert embed.lora_embedding_A["default"].shape == peft_embed.lora_embedding_A["default"].shape
    assert dict(embed.lora_A) == dict(peft_embed.lora_A) == {}  # an embedding's factors have their own names

    layers = [m for m in ours.modules() if isinstance(m, repeft.AdapterLayer)]
    peft_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    assert len(layers) == len(peft_layers) == 3
    for model, found in ((ours, layers), (theirs, peft_layers)):
        assert not any(m.disable_adapters or m.merged for m in found)
        assert all(m.active_adapters == ["default"] for m in found)
        model.disable_adapter_layers()
        assert all(m.disable_adapters for m in found)
        model.enable_adapter_layers()
        model.merge_adapter()
        assert all(m.merged and m.merged_adapters == ["default"] for m in found)


def test_replora_layers_refuse_peft_s_factor_names_rather_than_show_a_copy():
    model = repeft.get_peft_model(tiny_llama(), repeft.RepLoRAConfig(r=4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(AttributeError, match=r"compute their factors \(RepLoRA\).*factors\(\)"):
        layer.lora_A["default"]
    assert layer.r == {"default": 4}


def test_layer_views_follow_adapters_as_they_come_and_go():
    model = wrapped()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    views = (layer.lora_A, layer.lora_B, layer.r, layer.scaling)
    assert all(set(v) == {"default", "other"} for v in views)
    model.delete_adapter("other")
    assert all(set(v) == {"default"} and "other" not in v for v in views)
    layer.enable_adapters(False)
    assert layer.disable_adapters and layer.active is None
