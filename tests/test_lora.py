"""The design.md section 7 checklist for LoRA and RepLoRA on every core model family."""

from __future__ import annotations

import copy

import pytest
import torch

import repeft
from repeft.layers import AdapterLayer
from repeft.lora import LoRALinear
from tiny_models import CORE_FAMILIES, FAMILIES, tiny_batch, tiny_model

METHODS = {
    "lora": lambda **kw: repeft.LoRAConfig(r=4, lora_alpha=8, **kw),
    "replora": lambda **kw: repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=8, **kw),
}
CASES = [(f, m) for f in CORE_FAMILIES for m in METHODS]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batch, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(params=CASES, ids=[f"{f}-{m}" for f, m in CASES])
def case(request):
    family, method = request.param
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = repeft.wrap(base, METHODS[method]())
    return family, method, model, reference, tiny_batch(family)


def test_identity_at_init(case):
    _, _, model, reference, batch = case
    assert torch.equal(logits(model, batch), logits(reference, batch))


def test_only_adapter_params_get_gradients(case):
    family, _, model, _, batch = case
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        is_adapter = ".adapters.default." in name
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    if family in ("bert", "vit"):
        # Task heads start random, so they train with the adapter.
        assert any("classifier.adapters.default" in n for n, p in model.named_parameters() if p.requires_grad)


def test_base_weights_unchanged_by_training(case):
    _, _, model, reference, batch = case
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    train_steps(model, batch)
    assert not torch.allclose(logits(model, batch), logits(reference, batch))
    for path, layer in model.adapter_layers():
        inner = layer.base_layer if isinstance(layer, LoRALinear) else layer.original
        prefix = path.removeprefix("base_model.")
        for key, value in inner.state_dict().items():
            assert torch.equal(value, before[f"{prefix}.{key}"]), f"{prefix}.{key} changed"


def test_save_load_round_trip(case, tmp_path):
    family, _, model, reference, batch = case
    train_steps(model, batch)
    expected = logits(model, batch)
    model.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    assert loaded.trainable_parameters()[0] == 0  # loaded for inference unless asked otherwise
    trainable = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "adapter", trainable=True)
    assert trainable.trainable_parameters()[0] == model.trainable_parameters()[0]


def test_merge_unmerge_and_unload(case, tmp_path):
    family, _, model, reference, batch = case
    train_steps(model, batch)
    expected = logits(model, batch)
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-4, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "merged")
    reloaded = type(reference).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-4, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-4, rtol=0)


def test_disable_adapter_gives_base(case):
    _, _, model, reference, batch = case
    train_steps(model, batch)
    adapted = logits(model, batch)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=0, rtol=0)
    torch.testing.assert_close(logits(model, batch), adapted, atol=0, rtol=0)
    model.merge()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, batch), adapted, atol=1e-4, rtol=0)


def test_gradient_checkpointing(case):
    family, _, model, _, batch = case
    model.train()
    plain = {}
    torch.manual_seed(0)  # same dropout masks in both passes
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            plain[n] = p.grad.clone()
            p.grad = None
    # transformers >= 5.2 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    torch.manual_seed(0)
    model(**batch).loss.backward()
    for n, g in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_per_architecture(family):
    model = repeft.wrap(tiny_model(family), repeft.LoRAConfig(r=2))
    from repeft.targeting import DEFAULT_TARGET_MODULES

    wrapped = {p.rsplit(".", 1)[-1] for p, layer in model.adapter_layers() if isinstance(layer, LoRALinear)}
    assert wrapped == set(DEFAULT_TARGET_MODULES[family])


def test_multi_adapter_add_switch_delete():
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    batch = tiny_batch("llama")
    model = repeft.wrap(base, METHODS["lora"](), adapter_name="a")
    train_steps(model, batch)
    out_a = logits(model, batch)
    model.add_adapter("b", METHODS["replora"](target_modules=["k_proj", "v_proj"]))
    assert model.active_adapter == "b"
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
    assert type(model.base_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
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
    layer = model.base_model.model.layers[0].self_attn.q_proj
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_and_without_kv_cache(family):
    model = repeft.wrap(tiny_model(family), METHODS["replora"]())
    train_steps(model, tiny_batch(family))
    prompt = tiny_batch(family, batch=2, seq=5)["input_ids"]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, output_logits=True, return_dict_in_generate=True, **kw)
    uncached = model.generate(prompt, use_cache=False, output_logits=True, return_dict_in_generate=True, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


def test_wrapper_behaves_like_the_model():
    model = repeft.wrap(tiny_model("llama"), METHODS["lora"]())
    assert model.config.model_type == "llama"
    assert model.device.type == "cpu"
    model.to(torch.float64)
    batch = tiny_batch("llama")
    assert model(**batch).logits.dtype == torch.float64
    assert model.base_model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.float64


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
