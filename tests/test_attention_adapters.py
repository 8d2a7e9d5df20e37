"""design.md section 7 for the attention-level adapters: prefix tuning (+ NoRGa) and zero-init attention
(with its ungated baseline, vanilla attention).

Every supported family runs the checklist; the hand-written reference, padding,
caching and generation tests use the grouped-query families (tiny configs have
4 query heads over 2 key/value heads).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import repeft
from repeft.attention import FAMILIES, LAYER_NAME, SITE
from test_lora import logits, train_steps
from tiny_models import tiny_batch, tiny_model

METHODS = {
    "prefix": lambda **kw: repeft.PrefixConfig(n_prefix=3, mlp_hidden=16, **kw),
    "zero_init": lambda **kw: repeft.ZeroInitConfig(n_prompt=3, prompt_type="nonlinear", code_dim=8, mlp_hidden=16, **kw),
    "vanilla": lambda **kw: repeft.ZeroInitConfig(n_prompt=3, gating="none", **kw),
}
# Each method with every option that changes the attention maths switched on.
FULL = {"prefix": lambda: METHODS["prefix"](norga=True), "zero_init": METHODS["zero_init"], "vanilla": METHODS["vanilla"]}
CASES = [(f, m) for f in FAMILIES for m in METHODS]
CAUSAL = ["llama", "qwen2", "gpt2"]


def wrap(family, config, seed=0):
    base = tiny_model(family, seed)
    reference = copy.deepcopy(base)
    return repeft.wrap(base, config), reference


def randomize(model, scale=0.5, seed=0):
    """Move every trainable parameter away from its init (zero-init gates included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def left_padded(batch=3, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : row + 1] = 0  # rows 1, 2 start with 2 and 3 pad tokens
    return ids.masked_fill(mask == 0, 0), mask


# -- the checklist, on every family ------------------------------------------------------


@pytest.fixture(params=CASES, ids=[f"{f}-{m}" for f, m in CASES])
def case(request):
    family, method = request.param
    model, reference = wrap(family, METHODS[method]())
    return family, method, model, reference, tiny_batch(family)


def test_zero_init_is_identity_and_prefix_and_vanilla_are_not(case):
    _, method, model, reference, batch = case
    if method == "zero_init":
        assert torch.equal(logits(model, batch), logits(reference, batch))
    else:
        assert not torch.allclose(logits(model, batch), logits(reference, batch))


def test_only_adapter_params_get_gradients(case):
    _, _, model, _, batch = case
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        is_adapter = ".adapters.default." in name
        assert param.requires_grad == is_adapter, name
        assert (param.grad is not None) == is_adapter, name
    assert any(n.startswith(f"{LAYER_NAME}.adapters.default.") for n, p in model.named_parameters() if p.requires_grad)


def test_training_moves_adapter_only_and_round_trips(case, tmp_path):
    _, _, model, reference, batch = case
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    start = logits(model, batch)
    train_steps(model, batch)
    expected = logits(model, batch)
    assert not torch.allclose(expected, start)
    for key, value in model.base_model.state_dict().items():
        if key in before:  # heads in modules_to_save live under other names
            assert torch.equal(value, before[key]), key
    model.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)


def test_disable_adapter_gives_base(case):
    _, _, model, reference, batch = case
    randomize(model)
    adapted = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), logits(reference, batch))
    assert torch.equal(logits(model, batch), adapted)


# -- an independent reference: llama attention written out by hand -----------------------


def rope(x, positions, theta=10000.0):
    """Llama's rotary embedding, (batch, heads, seq, dim) at (batch, seq) positions."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions[:, None, :, None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def hand_written_attention(attn, x, positions, padding, prefix=None, norga=None, prompts=None, gate=None):
    """Causal GQA attention of one llama layer, with prefix keys/values or prompts.

    prefix: (keys, values), (kv_heads, n, head_dim) each; norga: (alpha, tau, activation);
    prompts: (n, hidden) projected by this layer's k_proj / v_proj, in a softmax
    of their own scaled by tanh(gate), gate: (heads,); with gate=None (vanilla
    attention) they join the tokens' softmax.
    """
    b, s, _ = x.shape
    heads, kv_heads, d = 4, 2, 8
    split = lambda t, h: t.view(b, s, h, d).transpose(1, 2)  # noqa: E731
    q = rope(split(x @ attn.q_proj.weight.T, heads), positions)
    k = rope(split(x @ attn.k_proj.weight.T, kv_heads), positions)
    v = split(x @ attn.v_proj.weight.T, kv_heads)
    group = lambda t: t.repeat_interleave(heads // kv_heads, dim=-3)  # noqa: E731  kv head j serves heads 2j, 2j+1
    k, v = group(k), group(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    visible = torch.ones(s, s).tril().bool()[None, None] & padding.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    if prompts is not None:
        pk = (prompts @ attn.k_proj.weight.T).view(-1, kv_heads, d).transpose(0, 1)
        pv = (prompts @ attn.v_proj.weight.T).view(-1, kv_heads, d).transpose(0, 1)
        if gate is None:
            prefix = (pk, pv)
    if prefix is not None:
        pk, pv = group(prefix[0]), group(prefix[1])
        prefix_scores = q @ pk.transpose(-1, -2) / math.sqrt(d)
        if norga is not None:
            alpha, tau, act = norga
            prefix_scores = prefix_scores + alpha * act(tau * prefix_scores)
        scores = torch.cat([prefix_scores, scores], dim=-1)
        v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=-2)
    out = torch.softmax(scores, dim=-1) @ v
    if gate is not None:
        pk, pv = group(pk), group(pv)
        prompt_out = torch.softmax(q @ pk.transpose(-1, -2) / math.sqrt(d), dim=-1) @ pv
        out = out + torch.tanh(gate)[None, :, None, None] * prompt_out
    return out.transpose(1, 2).reshape(b, s, heads * d) @ attn.o_proj.weight.T


def captured_attention(model, ids, mask, positions):
    """(module, input hidden states, output) of every llama self-attention in one forward."""
    seen = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((m, kwargs["hidden_states"], out[0])), with_kwargs=True)
        for layer in model.base_model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["prefix", "prefix-one-mlp-norga", "prefix-norga-tanh", "zero_init-linear",
                                     "zero_init-nonlinear", "zero_init-deepshare", "vanilla-linear",
                                     "vanilla-nonlinear-top-1"])
def test_hooked_llama_matches_hand_written_attention(variant, implementation):
    base = tiny_model("llama")
    base.set_attn_implementation(implementation)
    config = {
        "prefix": METHODS["prefix"](),
        "prefix-one-mlp-norga": METHODS["prefix"](mlp_per_layer=False, norga=True, norga_alpha=0.7, norga_tau=1.3),
        "prefix-norga-tanh": METHODS["prefix"](norga=True, norga_activation="tanh"),
        "zero_init-linear": repeft.ZeroInitConfig(n_prompt=3),
        "zero_init-nonlinear": METHODS["zero_init"](),
        "zero_init-deepshare": METHODS["zero_init"](prompt_network="deepshare", activation="gelu"),
        "vanilla-linear": METHODS["vanilla"](),
        "vanilla-nonlinear-top-1": METHODS["zero_init"](gating="none", n_layers=1),
    }[variant]
    model = repeft.wrap(base, config)
    randomize(model)
    adapter = model.attention_adapters.adapters["default"]
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for layer, (attn, x, out) in enumerate(captured_attention(model, ids, mask, positions)):
        if variant.startswith("prefix"):
            act = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}[config.norga_activation]
            norga = (adapter.norga_alpha[layer], adapter.norga_tau[layer], act) if config.norga else None
            expected = hand_written_attention(attn, x, positions, mask, prefix=adapter.prefix(layer), norga=norga)
        elif layer < adapter.first_layer:
            expected = hand_written_attention(attn, x, positions, mask)
        else:
            index = layer - adapter.first_layer
            gate = adapter.gates[index] if config.gating == "zero_init" else None
            expected = hand_written_attention(attn, x, positions, mask, prompts=adapter.layer_prompts(index), gate=gate)
        real = mask.bool()  # padded queries attend to nothing but the adapter; compare the real ones
        torch.testing.assert_close(out[real], expected.detach()[real], atol=1e-5, rtol=1e-5)


def test_shared_prefix_mlp_and_nonlinear_prompts_match_their_formulas():
    model, _ = wrap("llama", METHODS["prefix"]())
    a = model.attention_adapters.adapters["default"]
    flat = torch.tanh(a.embedding[1] @ a.w1[1] + a.b1[1]) @ a.w2[1] + a.b2[1]  # split(W2_l tanh(W1_l E_l + b1_l) + b2_l)
    keys, values = a.prefix(1)
    torch.testing.assert_close(keys, flat[:, :16].view(3, 2, 8).transpose(0, 1))
    torch.testing.assert_close(values, flat[:, 16:].view(3, 2, 8).transpose(0, 1))
    assert a.w1.shape == (2, 32, 16) and a.embedding.shape == (2, 3, 32)  # an MLP and an E_l per layer
    one, _ = wrap("llama", METHODS["prefix"](mlp_per_layer=False))
    assert one.attention_adapters.adapters["default"].w1.shape == (1, 32, 16)  # repeft's own: one MLP for all

    model, _ = wrap("llama", METHODS["zero_init"](prompt_network="deepshare", activation="tanh"))
    z = model.attention_adapters.adapters["default"]
    prompts = z.out.weight @ torch.tanh(z.hidden.weight @ z.codes[1].T + z.hidden.bias[:, None]) + z.out.bias[:, None]
    torch.testing.assert_close(z.layer_prompts(1), prompts.T)  # P_l = W2 act(W1 E_l + b1) + b2, row by row
    assert abs(torch.stack([z.layer_prompts(i) for i in range(2)]).std().item() - 1) < 1e-4

    model, _ = wrap("llama", METHODS["zero_init"]())  # hypermodel: one code per layer makes all its prompts
    h = model.attention_adapters.adapters["default"]
    assert h.codes.shape == (2, 8)
    with torch.no_grad():
        h.out.weight.normal_()  # off its near-zero init
    flat = h.out.weight @ torch.relu(h.hidden.weight @ h.codes[1] + h.hidden.bias) + h.out.bias
    torch.testing.assert_close(h.layer_prompts(1), flat.view(3, 32))  # vec(P_l) = W2 relu(W1 e_l + b1) + b2


def test_hypermodel_prompts_start_near_zero():
    model, _ = wrap("llama", repeft.ZeroInitConfig(n_prompt=10, prompt_type="nonlinear"))
    h = model.attention_adapters.adapters["default"]
    prompts = torch.stack([h.layer_prompts(i) for i in range(2)])
    assert prompts.abs().max() < 1e-3 and prompts.abs().max() > 0
    assert (h.hidden.in_features, h.hidden.out_features, type(h.act).__name__) == (64, 64, "ReLU")  # the paper's script


def test_eager_and_sdpa_agree():
    ids, mask = left_padded()
    batch = {"input_ids": ids, "attention_mask": mask}
    outputs = {}
    for implementation in ("sdpa", "eager"):
        base = tiny_model("qwen2")
        base.set_attn_implementation(implementation)
        model = repeft.wrap(base, METHODS["prefix"](norga=True))
        model.add_adapter("z", METHODS["zero_init"]())
        randomize(model)
        outputs[implementation, "z"] = logits(model, batch)
        model.set_adapter("default")
        outputs[implementation, "default"] = logits(model, batch)
        model.delete_adapter("z")
        model.delete_adapter("default")
        assert base.config._attn_implementation == implementation
    real = mask.bool()
    for name in ("default", "z"):
        torch.testing.assert_close(outputs["sdpa", name][real], outputs["eager", name][real], atol=1e-5, rtol=1e-5)


# -- padding, caches, generation ----------------------------------------------------------


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("method", list(METHODS))
def test_left_padded_rows_equal_unpadded_sequences(family, method):
    model, _ = wrap(family, FULL[method]())
    randomize(model)
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = logits(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    for row in range(len(ids)):
        real = mask[row].bool()
        alone = logits(model, {"input_ids": ids[row, real][None]})
        torch.testing.assert_close(batched[row, real], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_right_padded_encoder_rows_equal_unpadded(family):
    model, _ = wrap(family, METHODS["prefix"](norga=True))
    model.add_adapter("z", METHODS["zero_init"]())
    model.add_adapter("v", METHODS["vanilla"]())
    randomize(model)
    ids, mask = left_padded()
    ids, mask = ids.flip(-1), mask.flip(-1)  # right padding, as encoders are usually fed
    for name in ("default", "z", "v"):
        model.set_adapter(name)
        batched = logits(model, {"input_ids": ids, "attention_mask": mask})
        for row in range(len(ids)):
            alone = logits(model, {"input_ids": ids[row, mask[row].bool()][None]})
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_and_without_cache_on_left_padded_batches(family, method):
    model, _ = wrap(family, FULL[method]())
    randomize(model)
    ids, mask = left_padded()
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
          "output_logits": True, "return_dict_in_generate": True}
    uncached = model.generate(ids, use_cache=False, **kw)
    implementations = ["dynamic", "static"] if family == "llama" else ["dynamic"]
    for cache in implementations:
        cached = model.generate(ids, use_cache=True, cache_implementation=cache, **kw)
        assert torch.equal(cached.sequences, uncached.sequences), cache
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_user_cache_is_used_and_holds_only_real_tokens(method):
    model, _ = wrap("qwen2", METHODS[method]())
    randomize(model)
    ids = tiny_batch("qwen2", seq=7)["input_ids"]
    full = logits(model, {"input_ids": ids})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
        assert first.past_key_values is cache and cache.get_seq_length() == 4  # no prefix/prompt keys in it
        second = model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "vit"])
@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_checkpointing(family, method):
    model, _ = wrap(family, METHODS[method]())
    randomize(model)
    batch = tiny_batch(family)
    model.train()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model(**batch).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


# -- variants, several adapters, folding, errors -----------------------------------------


@pytest.mark.parametrize("config", [
    repeft.PrefixConfig(n_prefix=3, structure="independent"),
    repeft.PrefixConfig(n_prefix=3, mlp_hidden=16, mlp_per_layer=False, embed_dim=8),
    repeft.PrefixConfig(n_prefix=3, mlp_hidden=16, norga=True, norga_activation="gelu"),
    repeft.ZeroInitConfig(n_prompt=3, prompt_type="linear", n_layers=1),
    repeft.ZeroInitConfig(n_prompt=3, prompt_type="nonlinear", prompt_network="deepshare", code_dim=8, mlp_hidden=16),
    repeft.ZeroInitConfig(n_prompt=3, prompt_type="nonlinear", n_layers=1, gating="none"),
], ids=["independent", "one-mlp", "norga-gelu", "zero-init-top-1", "deepshare", "vanilla-nonlinear-top-1"])
def test_variants_train_and_round_trip(config, tmp_path):
    model, reference = wrap("llama", config)
    batch = tiny_batch("llama")
    train_steps(model, batch)
    model.save_adapter(tmp_path / "a")
    loaded = repeft.load_adapter(reference, tmp_path / "a")
    assert dataclasses.replace(loaded.configs["default"], inference_mode=False) == config  # gating included
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_vanilla_attention_has_no_gates_and_the_same_initial_prompts():
    gated, _ = wrap("llama", repeft.ZeroInitConfig(n_prompt=3))
    vanilla, _ = wrap("llama", METHODS["vanilla"]())
    gated, vanilla = (m.attention_adapters.adapters["default"] for m in (gated, vanilla))
    assert {n for n, _ in gated.named_parameters()} == {"prompts", "gates"}
    assert {n for n, _ in vanilla.named_parameters()} == {"prompts"}
    assert torch.equal(gated.prompts, vanilla.prompts)  # same seed, same start: only the attention differs


def test_independent_prefix_starts_where_shared_does():
    shared, _ = wrap("llama", METHODS["prefix"](), seed=0)
    torch.manual_seed(1)
    shared_adapter = repeft.prefix.build_prefix(shared.attention_adapters.geometry, METHODS["prefix"]())
    torch.manual_seed(1)
    independent = repeft.prefix.build_prefix(shared.attention_adapters.geometry, METHODS["prefix"](structure="independent"))
    for layer in range(2):
        for a, b in zip(shared_adapter.prefix(layer), independent.prefix(layer)):
            torch.testing.assert_close(a, b)
    assert {n for n, _ in independent.named_parameters()} == {"keys", "values"}


def test_zero_init_top_layers_only():
    model, _ = wrap("llama", repeft.ZeroInitConfig(n_prompt=3, n_layers=1))
    adapter = model.attention_adapters.adapters["default"]
    assert adapter.gates.shape == (1, 4) and adapter.first_layer == 1
    randomize(model)
    ids = tiny_batch("llama")["input_ids"]
    with model.disable_adapter():
        plain = captured_attention(model, ids, None, None)
    adapted = captured_attention(model, ids, None, None)
    assert torch.equal(adapted[0][2], plain[0][2])  # layer 0 untouched
    assert not torch.allclose(adapted[1][2], plain[1][2])
    with pytest.raises(ValueError, match="only 2 attention layers"):
        repeft.wrap(tiny_model("llama"), repeft.ZeroInitConfig(n_layers=3))


def test_fold_prefix_keeps_outputs_and_exports_final_keys_and_values(tmp_path):
    model, reference = wrap("llama", METHODS["prefix"](norga=True))
    batch = tiny_batch("llama")
    train_steps(model, batch)
    expected = logits(model, batch)
    model.save_adapter(tmp_path / "checkpoint")  # training checkpoint: MLP and embeddings
    repeft.fold_prefix(model)
    assert model.configs["default"].structure == "independent"
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)
    model.save_adapter(tmp_path / "final")
    state = model.adapter_state_dict()
    assert {k.rsplit(".", 1)[-1] for k in state} == {"keys", "values", "norga_alpha", "norga_tau"}
    assert state[f"{LAYER_NAME}.keys"].shape == (2, 3, 16)  # (layers, n_prefix, kv_heads * head_dim)
    final = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "final")
    torch.testing.assert_close(logits(final, batch), expected, atol=1e-5, rtol=0)
    resumed = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "checkpoint", trainable=True)
    assert {"embedding", "w1", "w2"} <= {k.rsplit(".", 1)[-1] for k in resumed.adapter_state_dict()}
    train_steps(resumed, batch)
    model.add_adapter("z", METHODS["zero_init"]())
    with pytest.raises(ValueError, match="fold_prefix folds prefix adapters"):
        repeft.fold_prefix(model, "z")


def test_several_adapters_switch_and_restore_the_model():
    model, reference = wrap("llama", METHODS["prefix"]())
    batch = tiny_batch("llama")
    attention_modules = [layer.self_attn for layer in model.base_model.model.layers]
    assert model.config._attn_implementation == "repeft_sdpa"
    assert [getattr(m, SITE).index for m in attention_modules] == [0, 1]
    train_steps(model, batch)
    out_prefix = logits(model, batch)
    model.add_adapter("z", METHODS["zero_init"]())
    assert torch.equal(logits(model, batch), logits(reference, batch))  # z starts at identity
    assert all(p.requires_grad == (".adapters.z." in n) for n, p in model.named_parameters())
    train_steps(model, batch)
    out_z = logits(model, batch)
    model.add_adapter("lora", repeft.LoRAConfig(r=2))
    assert torch.equal(logits(model, batch), logits(reference, batch))  # attention adapters step aside
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), out_prefix)
    model.delete_adapter("default")
    model.set_adapter("z")
    assert torch.equal(logits(model, batch), out_z)
    model.delete_adapter("z")
    assert model.config._attn_implementation == "sdpa"
    assert LAYER_NAME not in model._modules
    assert not any(hasattr(m, SITE) for m in attention_modules)
    assert torch.equal(logits(model, batch), logits(reference, batch))


def test_unsupported_architecture_and_implementation_are_refused():
    base = tiny_model("t5")
    with pytest.raises(ValueError, match="support the model types llama, mistral, qwen2.*model_type 't5'"):
        repeft.wrap(base, METHODS["prefix"]())
    assert all(p.requires_grad for p in base.parameters())  # a failed wrap hands the model back
    base = tiny_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        repeft.wrap(base, METHODS["zero_init"]())
    assert not any(hasattr(m, SITE) for m in base.modules())


@pytest.mark.parametrize("kwargs, match", [
    ({"n_prefix": 0}, "n_prefix must be a positive integer"),
    ({"structure": "mixed"}, "structure must be 'shared' or 'independent'"),
    ({"embed_dim": -1}, "embed_dim must be a positive integer"),
    ({"norga_activation": "relu"}, "norga_activation must be one of"),
])
def test_bad_prefix_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        repeft.PrefixConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_prompt": True}, "n_prompt must be a positive integer"),
    ({"prompt_type": "deep"}, "prompt_type must be 'linear' or 'nonlinear'"),
    ({"prompt_network": "hyper"}, "prompt_network must be 'hypermodel' or 'deepshare'"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"gating": "vanilla"}, "gating must be 'zero_init' or 'none'"),
])
def test_bad_zero_init_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        repeft.ZeroInitConfig(**kwargs)


@pytest.mark.parametrize("page", ["prefix.md", "zero_init.md"])
def test_method_page_example_runs(page, tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parent.parent / "docs" / "methods" / page).read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, page, "exec"), {})
    diff = float(re.search(r"max \|diff\| = (\S+)", capsys.readouterr().out).group(1))
    assert diff < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_torch_compile(method):
    model, _ = wrap("llama", FULL[method]())
    randomize(model)
    batch = tiny_batch("llama")
    model(**batch).loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model.base_model)
    out = compiled(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.logits, logits(model, batch), atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
