"""``lora_bias=True`` (lora_B carries a bias) against PEFT itself and against the maths written out here."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import repeft
from tiny_models import logits, tiny_batch, tiny_model
from test_dora import assert_grads_like_peft, assert_merged_like_peft, off_init, with_random_biases
from test_mixed_batch import alone

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# GPT-2's Conv1D (fan_in_fan_out) and BERT's nn.Linear have a bias; Llama's projections have none.
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}
BIASED = ["gpt2", "bert"]
BIAS = "lora_B_bias"  # repeft's name for PEFT's lora_B.bias


def peft_biased(family: str, **overrides):
    """A PEFT ``lora_bias`` model with every adapter tensor off its init, and an untouched copy of its base."""
    base = with_random_biases(family)
    reference = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], lora_bias=True, fan_in_fan_out=family == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Llama's projections have no bias: PEFT warns that merging is impossible
        model = peft.get_peft_model(base, peft.LoraConfig(**{**config, **overrides}))
    return off_init(model), reference


def as_repeft(peft_model, reference, tmp_path, **kwargs) -> repeft.AdapterModel:
    peft_model.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return repeft.from_peft(reference, tmp_path / "peft", **kwargs)


def adapter_layer(model: repeft.AdapterModel, family: str):
    path = {"llama": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn",
            "bert": "bert.encoder.layer.0.attention.self.query"}[family]
    return model.get_base_model().get_submodule(path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # no task head trained in full
def test_identity_at_init_and_only_adapter_parameters_get_gradients(family):
    base = with_random_biases(family)
    batch = tiny_batch(family)
    expected = logits(base, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = repeft.wrap(base, repeft.LoraConfig(r=4, target_modules=TARGETS[family], lora_bias=True))
    assert torch.equal(logits(model, batch), expected)  # B and its bias start at zero, as in PEFT
    biases = [p for n, p in model.named_parameters() if n.endswith(BIAS)]
    assert biases and all(not p.any() for p in biases)
    # PEFT's names on the layer: lora_B["default"].bias is the adapter's own parameter, lora_A has none.
    layer = adapter_layer(model, family)
    assert layer.lora_B["default"].bias is getattr(layer.adapters["default"], BIAS) and layer.lora_A["default"].bias is None
    model.train()
    model(**batch).loss.backward()
    with_grad = {name.rpartition(".")[2] for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"lora_A", "lora_B", BIAS}
    assert all(p.grad.abs().sum() > 0 for p in biases)


def test_init_false_draws_the_bias_as_nn_linear_does():
    # PEFT's lora_B is nn.Linear(r, d_out, bias=True): its bias is uniform in +-1/sqrt(r).
    model = repeft.wrap(with_random_biases("bert"), repeft.LoraConfig(r=4, target_modules=["query"], lora_bias=True, init_lora_weights=False))
    bias = getattr(adapter_layer(model, "bert").adapters["default"], BIAS)
    assert bias.any() and bias.abs().max() <= 1 / math.sqrt(4)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_the_layer_computes_w_x_plus_b_plus_s_times_b_a_x_plus_lora_bias(family, tmp_path):
    peft_model, reference = peft_biased(family)
    layer = adapter_layer(as_repeft(peft_model, reference, tmp_path), family)
    adapter = layer.adapters["default"]
    weight = layer.base_layer.weight.T if family == "gpt2" else layer.base_layer.weight
    x = torch.randn(3, 5, weight.shape[1])
    s = 8 / 4
    expected = x @ weight.T + layer.base_layer.bias + s * (x @ adapter.lora_A.T @ adapter.lora_B.T + getattr(adapter, BIAS))
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_same_logits_and_gradients_as_peft(family, tmp_path):
    peft_model, reference = peft_biased(family)
    model = as_repeft(peft_model, reference, tmp_path, trainable=True)
    batch = tiny_batch(family)
    peft_model.eval(), model.eval()
    torch.testing.assert_close(logits(model, batch), logits(peft_model, batch), atol=1e-6, rtol=0)
    for m in (peft_model, model):
        m(**batch).loss.backward()
    assert any(k.endswith("lora_B.bias") for k in assert_grads_like_peft(model, peft_model))


def test_dropout_leaves_the_bias_as_peft_does(tmp_path):
    # PEFT drops out x before lora_A; s * b is added whole. Same seed, same masks: same training-mode logits.
    peft_model, reference = peft_biased("bert", lora_dropout=0.3)
    model = as_repeft(peft_model, reference, tmp_path, trainable=True)
    batch = tiny_batch("bert")
    peft_model.train(), model.train()
    torch.manual_seed(11)
    expected = peft_model(**batch).logits
    torch.manual_seed(11)
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", BIASED)
def test_merge_matches_peft_and_unmerge_restores_the_base(family, tmp_path):
    peft_model, reference = peft_biased(family)
    base_state = copy.deepcopy(reference.state_dict())
    model = as_repeft(peft_model, reference, tmp_path)
    batch = tiny_batch(family)
    expected = logits(model, batch)
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge()
    for path, layer in model.adapter_layers():
        path = path.removeprefix("base_model.model.")
        torch.testing.assert_close(layer.base_layer.weight, base_state[f"{path}.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.bias, base_state[f"{path}.bias"], atol=1e-6, rtol=0)
    assert_merged_like_peft(model, peft_model)


def test_merged_export_folds_the_bias_in(tmp_path):
    peft_model, reference = peft_biased("bert")
    model = as_repeft(peft_model, reference, tmp_path)
    batch = tiny_batch("bert")
    expected = logits(model, batch)
    repeft.export_merged(model, tmp_path / "merged")  # the dequantize-and-merge path
    plain = type(reference).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)


def test_a_layer_without_bias_warns_and_refuses_to_merge_as_peft_does():
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    with pytest.warns(UserWarning, match=r"`lora_bias=True` was passed but the targeted layer of type Linear has no bias"):
        model = repeft.wrap(base, repeft.LoraConfig(r=4, target_modules=TARGETS["llama"], lora_bias=True, init_lora_weights=False))
    before = copy.deepcopy(model.state_dict())
    expected = logits(model, batch)
    # PEFT raises RuntimeError; repeft's merge errors are ValueError: it is both.
    for error in (RuntimeError, ValueError):
        with pytest.raises(error, match="Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"):
            model.merge()
    assert model.merged_adapter() is None
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_files_exchange_exactly_with_peft(family, tmp_path):
    peft_model, reference = peft_biased(family)
    model = as_repeft(peft_model, copy.deepcopy(reference), tmp_path)
    assert model.configs["default"].lora_bias
    # PEFT -> repeft -> PEFT: the same tensors under the same names, lora_B.bias included.
    repeft.export_peft(model, tmp_path / "back")
    written, original = load_file(tmp_path / "back" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(written) == set(original) and any(k.endswith(".lora_B.bias") for k in written)
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["lora_bias"] is True
    # repeft -> PEFT: PEFT loads the export as a lora_bias model with the same logits.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(reference, tmp_path / "back").eval()
    assert reloaded.peft_config["default"].lora_bias
    batch = tiny_batch(family)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    assert repeft.get_peft_model_state_dict(model).keys() == original.keys()


def test_peft_state_dict_loads_into_a_lora_bias_adapter():
    peft_model, reference = peft_biased("gpt2")
    model = repeft.wrap(reference, repeft.LoraConfig(r=4, target_modules=TARGETS["gpt2"], lora_bias=True))
    repeft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(peft_model))
    batch = tiny_batch("gpt2")
    torch.testing.assert_close(logits(model, batch), logits(peft_model.eval(), batch), atol=1e-6, rtol=0)


def test_save_load_round_trip_keeps_the_bias(tmp_path):
    model = repeft.wrap(with_random_biases("bert"), repeft.LoraConfig(r=4, target_modules=TARGETS["bert"], lora_bias=True, init_lora_weights=False))
    batch = tiny_batch("bert")
    expected = logits(model, batch)
    model.save_adapter(tmp_path / "adapter")
    assert any(k.endswith(".lora_B.bias") for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))  # PEFT's name
    loaded = repeft.load_adapter(with_random_biases("bert"), tmp_path / "adapter")
    assert loaded.configs["default"].lora_bias
    assert torch.equal(logits(loaded, batch), expected)


def test_mixed_batch_gives_each_row_its_adapter_and_bias():
    model = repeft.wrap(with_random_biases("gpt2"), repeft.LoraConfig(r=4, target_modules=TARGETS["gpt2"], lora_bias=True, init_lora_weights=False))
    model.add_adapter("plain", repeft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.eval()
    batch = tiny_batch("gpt2", batch=3)
    names = ["default", "__base__", "plain"]
    mixed = logits(model, batch, adapter_names=names)
    for row, name in enumerate(names):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[row : row + 1], alone(model, name, lambda: logits(model, one)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_lora_weights": "gaussian"}, "The argument lora_bias=True is only supported with init_lora_weights=True or False"),
        ({"use_dora": True}, "The argument lora_bias=True is not supported for DoRA"),
        # repeft lacks PiSSA itself, but beside lora_bias it names lora_bias first, as PEFT does
        ({"init_lora_weights": "pissa"}, "The argument lora_bias=True is only supported with init_lora_weights=True or False"),
    ],
)
def test_what_peft_refuses_beside_lora_bias_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        repeft.LoraConfig(lora_bias=True, **kwargs)
    with pytest.raises(ValueError, match=match):
        peft.LoraConfig(lora_bias=True, **kwargs)


def test_replora_refuses_lora_bias_by_name():
    with pytest.raises(ValueError, match="lora_bias=True is a LoRA option; RepLoRAConfig computes its factors"):
        repeft.RepLoRAConfig(lora_bias=True)


def test_the_triton_kernel_with_lora_bias_matches_torch():
    # The fused kernel computes W x + b_W + s B A x; s * b is added after it (on CPU the Triton interpreter runs it).
    pytest.importorskip("triton")
    batch = tiny_batch("bert")
    results = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(5)
        config = repeft.LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True, init_lora_weights=False, kernel=kernel)
        model = repeft.wrap(with_random_biases("bert"), config)
        results[kernel] = logits(model, batch)
    torch.testing.assert_close(results["triton"], results["torch"], atol=1e-4, rtol=0)
