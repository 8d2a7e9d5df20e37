"""LoRA and RepLoRA beyond the conformance suite (test_conformance.py runs PEFT's checklist on every family):
hand-written formulas, default targets, merged export, mixed adapters, variants, dtypes."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import repeft
from repeft.lora import LoRALinear
from repeft.targeting import DEFAULT_TARGET_MODULES
from tiny_models import CORE_FAMILIES, FAMILIES, logits, tiny_batch, tiny_model, train_steps

METHODS = {
    "lora": lambda **kw: repeft.LoRAConfig(r=4, lora_alpha=8, **kw),
    "replora": lambda **kw: repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=8, **kw),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_per_architecture(family):
    model = repeft.wrap(tiny_model(family), repeft.LoRAConfig(r=2))
    wrapped = {p.rsplit(".", 1)[-1] for p, layer in model.adapter_layers() if isinstance(layer, LoRALinear)}
    assert wrapped == set(DEFAULT_TARGET_MODULES[family])


def test_default_targets_are_peft_choices():
    peft_targets = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    shared = [kind for kind in DEFAULT_TARGET_MODULES if kind in peft_targets]
    assert len(shared) >= 15
    assert {kind: DEFAULT_TARGET_MODULES[kind] for kind in shared} == {kind: peft_targets[kind] for kind in shared}


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_save_merged_loads_with_transformers_alone(family, tmp_path):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = repeft.wrap(base, METHODS["replora"]())
    batch = tiny_batch(family)
    train_steps(model, batch)
    model.save_merged(tmp_path / "merged")
    reloaded = type(reference).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-4, rtol=0)


def test_multi_adapter_add_switch_delete():
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    batch = tiny_batch("llama")
    model = repeft.wrap(base, METHODS["lora"](), adapter_name="a")
    train_steps(model, batch)
    out_a = logits(model, batch)
    model.add_adapter("b", METHODS["replora"](target_modules=["k_proj", "v_proj"]))
    assert model.active_adapter == "a"  # as in PEFT: adding does not switch
    assert all(p.requires_grad == (".adapters.a." in n) for n, p in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), out_a, atol=0, rtol=0)
    model.set_adapter("b")
    assert all(p.requires_grad == (".adapters.b." in n) for n, p in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=0, rtol=0)  # b starts at identity
    train_steps(model, batch)
    out_b = logits(model, batch)
    model.set_adapter("a")
    assert all(p.requires_grad == (".adapters.a." in n) for n, p in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), out_a, atol=0, rtol=0)
    model.delete_adapter("a")
    assert model.active_adapter == "b"
    torch.testing.assert_close(logits(model, batch), out_b, atol=0, rtol=0)
    # q_proj held only adapter "a", so it is a plain nn.Linear again.
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    model.delete_adapter("b")
    assert not list(model.adapter_layers())
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=0, rtol=0)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        model.set_adapter("b")


def test_switching_while_merged_is_refused():
    model = repeft.wrap(tiny_model("llama"), METHODS["lora"](), adapter_name="a")
    model.add_adapter("b", METHODS["lora"]())
    model.merge("a")
    with pytest.raises(ValueError, match="unmerge"):
        model.set_adapter("b")


def test_lora_layer_matches_hand_written_formula():
    torch.manual_seed(0)
    base = tiny_model("llama")
    model = repeft.wrap(base, repeft.LoRAConfig(r=4, lora_alpha=6, target_modules=["model.layers.0.self_attn.q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    factors = layer.adapters["default"]
    torch.nn.init.normal_(factors.lora_B)
    x = torch.randn(3, 5, 32)
    W = layer.base_layer.weight
    expected = x @ W.T + (6 / 4) * (x @ factors.lora_A.T) @ factors.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("share_mlp,axis", [(True, "rank"), (False, "feature")])
def test_replora_variants_train_and_merge(share_mlp, axis):
    config = repeft.RepLoRAConfig(r=4, mlp_hidden=8, share_mlp=share_mlp, axis=axis, target_modules=["q_proj", "o_proj"])
    model = repeft.wrap(tiny_model("llama"), config)
    batch = tiny_batch("llama")
    train_steps(model, batch)
    expected = logits(model, batch)
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-4, rtol=0)


def test_wrapper_behaves_like_the_model():
    model = repeft.wrap(tiny_model("llama"), METHODS["lora"]())
    assert model.config.model_type == "llama"
    assert model.device.type == "cpu"
    model.to(torch.float64)
    batch = tiny_batch("llama")
    assert model(**batch).logits.dtype == torch.float64
    assert model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.float64


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trains_under_bf16_autocast(family):
    model = repeft.wrap(tiny_model(family), METHODS["replora"]())
    batch = tiny_batch(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        reference = model(**batch).logits
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)


def randomize(model, std=0.2):
    torch.manual_seed(4)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_on_every_family_trains_and_merges(family):
    # T5 reads `wo.weight.dtype` in its forward: wrapped layers pass weight and bias through.
    model = repeft.wrap(tiny_model(family), repeft.LoRAConfig(r=2, target_modules="all-linear"))
    batch = tiny_batch(family)
    train_steps(model, batch, steps=1)
    randomize(model, std=0.1)
    expected = logits(model, batch)
    layer = next(layer for _, layer in model.adapter_layers() if isinstance(layer, LoRALinear))
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_lora_on_a_tied_output_head_merges_and_exports_exactly(family, tmp_path):
    # GPT-2's lm_head *is* its input embedding, T5's is `shared`: a merge must not change the embedding.
    base = tiny_model(family)
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    assert head.weight is embedding.weight
    targets = {"gpt2": ["c_attn", "lm_head"], "t5": ["q", "lm_head"]}[family]
    model = randomize(repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=targets)))
    batch = tiny_batch(family)
    expected = logits(model, batch)
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-4, rtol=0)
    model.unmerge()
    assert base.get_output_embeddings().weight is embedding.weight and base.config.tie_word_embeddings
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.save_merged(tmp_path / "merged")
    repeft.export_merged(model, tmp_path / "exported")
    for directory in ("merged", "exported"):
        reloaded = type(base).from_pretrained(tmp_path / directory).eval()
        torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-4, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-4, rtol=0)
    assert plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight


def test_save_pretrained_saves_the_adapter_as_peft_does(tmp_path):
    model = randomize(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    batch = tiny_batch("llama")
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    reloaded.load_adapter(tmp_path / "adapter", "second")
    assert sorted(reloaded.configs) == ["default", "second"]


def test_saved_triton_kernel_choice_falls_back_to_torch_without_a_gpu(tmp_path, monkeypatch):
    model = randomize(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4, kernel="triton")))
    batch = tiny_batch("llama")
    expected = logits(model, batch)
    model.save_adapter(tmp_path / "adapter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match=r"saved with kernel='triton', which cannot run here .*using kernel='torch'"):
        reloaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert reloaded.configs["default"].kernel == "torch"
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=0)
