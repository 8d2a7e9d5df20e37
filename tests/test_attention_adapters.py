"""The attention-level adapters, prefix tuning (+ NoRGa) and zero-init attention (with its ungated
baseline, vanilla attention), against attention written out by hand for each family.

PEFT's checklist on every supported family is in test_conformance.py. Here:
each family's attention with the adapters in it, written out from its modeling
file (rotary, key norms, soft-capping, sliding windows, fused projections);
padding, caches and generation for the variants the conformance suite does not
run; folding, several adapters and errors. Tiny decoders have 4 query heads
over 2 key/value heads.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import repeft
from repeft.attention import LAYER_NAME, SITE
from tiny_models import VISION_FAMILIES, logits, tiny_batch, tiny_model, train_steps

METHODS = {
    "prefix": lambda **kw: repeft.PrefixConfig(n_prefix=3, mlp_hidden=16, **kw),
    "zero_init": lambda **kw: repeft.ZeroInitConfig(n_prompt=3, prompt_type="nonlinear", code_dim=8, mlp_hidden=16, **kw),
    "vanilla": lambda **kw: repeft.ZeroInitConfig(n_prompt=3, gating="none", **kw),
}
# Each method with every option that changes the attention maths switched on.
FULL = {"prefix": lambda: METHODS["prefix"](norga=True), "zero_init": METHODS["zero_init"], "vanilla": METHODS["vanilla"]}
CAUSAL = ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "opt"]


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


# -- an independent reference: each family's attention written out by hand ----------------------

# What makes each family's attention differ bites at the tiny sizes: Gemma 2 caps logits at 0.5 and slides a
# 3-token window on layer 0 (so does Gemma 3, and Mistral / Mixtral here on every layer) over 6-token inputs.
SLIDING = {"sliding_window": 3}
REFERENCE_FAMILIES = {
    "llama": {}, "mistral": SLIDING, "mixtral": SLIDING, "qwen2_moe": {}, "qwen3": {}, "gemma2": {},
    "gemma3_text": {}, "olmo2": {}, "gpt_neox": {}, "opt": {}, "deit": {}, "dinov2_with_registers": {},
}
OUTPUT_PROJECTION = {"gpt_neox": "dense", "opt": "out_proj"}


def linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def rms_norm(x, norm, eps, one_plus=False):
    """RMSNorm over the last axis; Gemma scales by (1 + weight), the others by weight."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * (1 + norm.weight if one_plus else norm.weight)


def heads(t, n):
    """(..., tokens, n * head_dim) -> (..., n, tokens, head_dim)."""
    return t.unflatten(-1, (n, -1)).transpose(-2, -3)


def rotate(x, cos, sin):
    """Rotary embedding on the first cos.shape[-1] features (a quarter of them in GPT-NeoX, all elsewhere)."""
    n = cos.shape[-1]
    first, second = x[..., : n // 2], x[..., n // 2 : n]
    rotated = x[..., :n] * cos[:, None] + torch.cat([-second, first], -1) * sin[:, None]
    return torch.cat([rotated, x[..., n:]], -1)


def projections(family, config, attn, x):
    """Queries, keys and values of x (..., tokens, hidden) through attn's frozen weights, split into heads,
    with the family's query/key norms and query scaling but no rotary."""
    n_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    if family == "gpt_neox":  # one fused layer, [q_h | k_h | v_h] head after head
        q, k, v = linear(x, attn.query_key_value).unflatten(-1, (n_heads, 3, -1)).unbind(-2)
        return tuple(t.transpose(-2, -3) for t in (q, k, v))
    q, k, v = (linear(x, getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj"))
    if family == "olmo2":  # norms over all heads' features
        q, k = rms_norm(q, attn.q_norm, config.rms_norm_eps), rms_norm(k, attn.k_norm, config.rms_norm_eps)
    q, k, v = heads(q, n_heads), heads(k, kv_heads), heads(v, kv_heads)
    if family in ("qwen3", "gemma3_text"):  # norms over each head's features
        one_plus = family == "gemma3_text"
        q = rms_norm(q, attn.q_norm, config.rms_norm_eps, one_plus)
        k = rms_norm(k, attn.k_norm, config.rms_norm_eps, one_plus)
    if family == "opt":  # OPT scales its queries before attention
        q = q * q.shape[-1] ** -0.5
    return q, k, v


def hand_written_attention(family, config, layer, attn, x, rotary, padding,
                           prefix=None, norga=None, prompts=None, gate=None):
    """One attention layer of ``family`` with prefix keys/values or prompts, from its weights.

    prefix: (keys, values), (kv_heads, n, head_dim) each; norga: (alpha, tau, activation);
    prompts: (n, hidden) projected by this layer's key/value projections (key
    norm, no rotary), in a softmax of their own scaled by tanh(gate), gate:
    (heads,); with gate=None (vanilla attention) they join the tokens' softmax.
    Prefix and prompt keys are visible to every query: no causal mask, padding
    or sliding window. All logits are scaled and soft-capped the family's way.
    """
    q, k, v = projections(family, config, attn, x)
    if rotary is not None:
        q, k = rotate(q, *rotary), rotate(k, *rotary)
    group = lambda t: t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3)  # noqa: E731  one kv head per group
    if family in ("gemma2", "gemma3_text"):
        scale = config.query_pre_attn_scalar**-0.5
    else:
        scale = 1.0 if family == "opt" else q.shape[-1] ** -0.5  # OPT's queries come scaled
    cap = config.attn_logit_softcapping if family == "gemma2" else None

    def logits_of(keys):
        s = q @ group(keys).transpose(-1, -2) * scale
        return s if cap is None else cap * torch.tanh(s / cap)

    scores = logits_of(k)
    if family not in VISION_FAMILIES:
        i = torch.arange(x.shape[1])
        visible = i[None, :] <= i[:, None]
        layer_types = getattr(config, "layer_types", None)
        if getattr(config, "sliding_window", None) and (layer_types is None or layer_types[layer] == "sliding_attention"):
            visible = visible & (i[:, None] - i[None, :] < config.sliding_window)
        scores = scores.masked_fill(~(visible & padding.bool()[:, None, None, :]), float("-inf"))
    v = group(v)
    if prompts is not None:
        _, pk, pv = projections(family, config, attn, prompts)
        if gate is None:
            prefix = (pk, pv)
    if prefix is not None:
        prefix_scores = logits_of(prefix[0])
        if norga is not None:
            alpha, tau, act = norga
            prefix_scores = prefix_scores + alpha * act(tau * prefix_scores)
        scores = torch.cat([prefix_scores, scores], dim=-1)
        v = torch.cat([group(prefix[1]).expand(x.shape[0], -1, -1, -1), v], dim=-2)
    out = torch.softmax(scores, dim=-1) @ v
    if gate is not None:
        out = out + torch.tanh(gate)[None, :, None, None] * (torch.softmax(logits_of(pk), dim=-1) @ group(pv))
    out_proj = getattr(attn, OUTPUT_PROJECTION.get(family, "o_proj"))
    return linear(out.transpose(1, 2).flatten(2), out_proj)


def captured_attention(model, inputs):
    """(module, input hidden states, rotary (cos, sin) or None, output) of every adapted attention in one forward."""
    seen = []

    def hook(module, args, kwargs, out):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append((module, x, kwargs.get("position_embeddings"), out[0]))

    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in model.attention_adapters.attention_modules]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


VARIANTS = {
    "prefix": lambda: METHODS["prefix"](),
    "prefix-mlp-per-layer-norga": lambda: METHODS["prefix"](mlp_per_layer=True, norga=True, norga_alpha=0.7, norga_tau=1.3),
    "prefix-one-mlp-norga-tanh": lambda: METHODS["prefix"](mlp_per_layer=False, norga=True, norga_activation="tanh"),
    # The reference gates only the layers that carry its prefixes (0-4 of 12); here the gate acts on layer 1 only.
    "prefix-norga-layer-1-softplus": lambda: METHODS["prefix"](norga=True, norga_layers=[1], norga_alpha=0.7,
                                                               norga_activation="softplus"),
    "zero_init-linear": lambda: repeft.ZeroInitConfig(n_prompt=3),
    "zero_init-nonlinear": METHODS["zero_init"],
    "zero_init-deepshare": lambda: METHODS["zero_init"](prompt_network="deepshare", activation="gelu"),
    "vanilla-linear": METHODS["vanilla"],
    "vanilla-nonlinear-top-1": lambda: METHODS["zero_init"](gating="none", n_layers=1),
}
# Llama: every variant under both implementations; the other families: each method with its maths
# switched on, under the implementation the model loads with (and Gemma 3 under eager too).
REFERENCE_CASES = [("llama", v, i) for v in VARIANTS for i in ("sdpa", "eager")] + [
    (f, v, i)
    for f in REFERENCE_FAMILIES if f != "llama"
    for v in ("prefix-mlp-per-layer-norga", "zero_init-nonlinear", "vanilla-linear")
    for i in ((None, "eager") if f == "gemma3_text" else (None,))
]


def reference_base(family):
    """The family's tiny model with sharp attention (larger query/key weights, so Gemma 2's cap bites) and
    query/key norm weights away from their init, so a wrong mask, cap or norm shows in the outputs."""
    base = tiny_model(family, **REFERENCE_FAMILIES[family])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query_key_value.weight")):
                param.mul_(10)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.add_(0.5 * torch.randn(param.shape, generator=g))
    return base


@pytest.mark.parametrize("family, variant, implementation", REFERENCE_CASES,
                         ids=[f"{f}-{v}-{i or 'default'}" for f, v, i in REFERENCE_CASES])
def test_matches_hand_written_attention(family, variant, implementation):
    base = reference_base(family)
    if implementation is not None:
        base.set_attn_implementation(implementation)
    config = VARIANTS[variant]()
    model = repeft.wrap(base, config)
    randomize(model)
    adapter = model.attention_adapters.adapters["default"]
    if family in VISION_FAMILIES:
        inputs, mask = {"pixel_values": tiny_batch(family)["pixel_values"]}, None
    else:
        ids, mask = left_padded()
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    text = base.config.get_text_config()
    for layer, (attn, x, rotary, out) in enumerate(captured_attention(model, inputs)):
        args = (family, text, layer, attn, x, rotary, mask)
        if variant.startswith("prefix"):
            act = {"sigmoid": torch.sigmoid, "tanh": torch.tanh,
                   "softplus": lambda s: s.clamp(min=0) + torch.log1p(torch.exp(-s.abs()))}[config.norga_activation]
            gated = sorted(config.norga_layers or range(len(adapter.norga_alpha))) if config.norga else []
            norga = None
            if layer in gated:  # one alpha, tau per gated layer, in layer order
                norga = (adapter.norga_alpha[gated.index(layer)], adapter.norga_tau[gated.index(layer)], act)
            expected = hand_written_attention(*args, prefix=adapter.prefix(layer), norga=norga)
        elif layer < adapter.first_layer:
            expected = hand_written_attention(*args)
        else:
            index = layer - adapter.first_layer
            gate = adapter.gates[index] if config.gating == "zero_init" else None
            expected = hand_written_attention(*args, prompts=adapter.layer_prompts(index), gate=gate)
        real = mask.bool() if mask is not None else slice(None)  # padded queries: compare the real ones
        torch.testing.assert_close(out[real], expected.detach()[real], atol=1e-5, rtol=1e-5)


def test_gemma2_soft_capping_and_sliding_window_bite_in_the_reference_cases():
    # Otherwise those cases could not tell a capped score or a windowed mask from a plain one.
    base = reference_base("gemma2")
    config = base.config
    model = repeft.wrap(base, repeft.ZeroInitConfig(n_prompt=3))
    ids, mask = left_padded()
    attn, x, _, _ = captured_attention(model, {"input_ids": ids, "attention_mask": mask})[0]
    q, k, _ = projections("gemma2", config, attn, x)
    _, prompt_keys, _ = projections("gemma2", config, attn, model.attention_adapters.adapters["default"].prompts[0])
    cap = config.attn_logit_softcapping
    for keys in (k, prompt_keys):
        scores = q @ keys.repeat_interleave(2, dim=-3).transpose(-1, -2) * config.query_pre_attn_scalar**-0.5
        assert (cap * torch.tanh(scores / cap) - scores).abs().max() > 0.1
    assert config.layer_types[0] == "sliding_attention" and config.sliding_window < ids.shape[1]


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


# The conformance suite generates with a dynamic cache for prefix + NoRGa and zero-init on every family;
# here: a static cache, and vanilla attention.
GENERATE_CASES = [("llama", m, "static") for m in METHODS] + [(f, "vanilla", "dynamic") for f in CAUSAL]


@pytest.mark.parametrize("family, method, cache", GENERATE_CASES, ids=["-".join(c) for c in GENERATE_CASES])
def test_generate_with_and_without_cache_on_left_padded_batches(family, method, cache):
    model, _ = wrap(family, FULL[method]())
    randomize(model)
    ids, mask = left_padded()
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
          "output_logits": True, "return_dict_in_generate": True}
    uncached = model.generate(ids, use_cache=False, **kw)
    cached = model.generate(ids, use_cache=True, cache_implementation=cache, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_user_cache_is_used_and_holds_only_real_tokens(method):
    model, _ = wrap("qwen2", METHODS[method]())
    randomize(model)
    ids = tiny_batch("qwen2", seq=7)["input_ids"]
    full = logits(model, {"input_ids": ids})
    cache = DynamicCache(config=model.config)
    # transformers renamed the argument and output field past_key_values to cache (5.24 warns on the old name).
    name = "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], use_cache=True, **{name: cache})
        assert getattr(first, name) is cache and cache.get_seq_length() == 4  # no prefix/prompt keys in it
        second = model(input_ids=ids[:, 4:], use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, atol=1e-5, rtol=1e-5)


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


def test_independent_prefix_under_init_normal_starts_where_shared_does():
    shared, _ = wrap("llama", METHODS["prefix"](), seed=0)
    torch.manual_seed(1)
    shared_adapter = repeft.prefix.build_prefix(shared.attention_adapters.geometry, METHODS["prefix"](init="normal"))
    torch.manual_seed(1)
    independent = repeft.prefix.build_prefix(shared.attention_adapters.geometry,
                                             METHODS["prefix"](structure="independent", init="normal"))
    for layer in range(2):
        for a, b in zip(shared_adapter.prefix(layer), independent.prefix(layer)):
            torch.testing.assert_close(a, b)
    assert {n for n, _ in independent.named_parameters()} == {"keys", "values"}


def test_zero_init_top_layers_only():
    model, _ = wrap("llama", repeft.ZeroInitConfig(n_prompt=3, n_layers=1))
    adapter = model.attention_adapters.adapters["default"]
    assert adapter.gates.shape == (1, 4) and adapter.first_layer == 1
    randomize(model)
    inputs = {"input_ids": tiny_batch("llama")["input_ids"]}
    with model.disable_adapter():
        plain = captured_attention(model, inputs)
    adapted = captured_attention(model, inputs)
    assert torch.equal(adapted[0][3], plain[0][3])  # layer 0 untouched
    assert not torch.allclose(adapted[1][3], plain[1][3])
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
    attention_modules = [layer.self_attn for layer in model.base_model.model.model.layers]
    assert model.config._attn_implementation == "repeft_sdpa"
    assert [getattr(m, SITE).index for m in attention_modules] == [0, 1]
    train_steps(model, batch)
    out_prefix = logits(model, batch)
    model.add_adapter("z", METHODS["zero_init"]())
    assert torch.equal(logits(model, batch), out_prefix)  # adding does not switch, as in PEFT
    model.set_adapter("z")
    assert torch.equal(logits(model, batch), logits(reference, batch))  # z starts at identity
    assert all(p.requires_grad == (".adapters.z." in n) for n, p in model.named_parameters())
    train_steps(model, batch)
    out_z = logits(model, batch)
    model.add_adapter("lora", repeft.LoRAConfig(r=2))
    model.set_adapter("lora")
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


def test_attention_implementations_other_than_sdpa_and_eager_are_refused():
    # Refusals of unsupported architectures are in test_conformance.py.
    base = tiny_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        repeft.wrap(base, METHODS["zero_init"]())
    assert not any(hasattr(m, SITE) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())  # a failed wrap hands the model back


@pytest.mark.parametrize("kwargs, match", [
    ({"n_prefix": 0}, "n_prefix must be a positive integer"),
    ({"structure": "mixed"}, "structure must be 'shared' or 'independent'"),
    ({"embed_dim": -1}, "embed_dim must be a positive integer"),
    ({"norga_activation": "swish"}, "norga_activation must be one of"),
    ({"init": "xavier"}, "init must be 'reference' or 'normal'"),
    ({"prefix_dropout": 1.0}, r"prefix_dropout must be a number in \[0, 1\)"),
    ({"norga": True, "norga_layers": []}, "norga_layers must be distinct layer indices"),
    ({"norga": True, "norga_layers": [0, 0]}, "norga_layers must be distinct layer indices"),
    ({"norga": True, "norga_layers": [-1]}, "norga_layers must be distinct layer indices"),
    ({"norga_layers": [0]}, "set norga=True"),
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
    compiled = torch.compile(model.get_base_model())
    out = compiled(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.logits, logits(model, batch), atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
