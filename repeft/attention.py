"""One registered attention function that runs attention-level adapters in every supported family.

transformers 5 computes attention as
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, **kw)``,
after rotary embeddings and after the KV-cache update. Adding an attention
adapter renames the model's implementation from ``"sdpa"`` / ``"eager"`` to
``"repeft_sdpa"`` / ``"repeft_eager"``. The functions registered under those
names look up the attention module's layer (tagged when the first adapter is
added, since ViT-style modules carry no ``layer_idx``), hand the call to the
active adapter as an ``AttentionCall``, and the adapter runs the original
implementation for the base part. Because the cache was updated before the
call, prefix and prompt keys never enter it: cached and uncached generation
attend to the same keys, and a user's cache holds only real tokens.

A mask function is registered under each new name too: for a name without
one, transformers skips mask creation and passes ``attention_mask=None``,
which would silently drop padding. The mask functions are the originals, so
the base part of every call sees exactly the mask it would have seen.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .layers import AdapterLayer, place_beside

# Base implementations the adapters can run on, with the mask function each reads.
BASE_MASKS = {"sdpa": sdpa_mask, "eager": eager_mask}
# Attribute on each tagged attention module: its AttentionSite.
SITE = "_repeft_attention_site"
# Name of the AttentionAdapters layer on the AdapterModel.
LAYER_NAME = "attention_adapters"


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps what attention adapters need.

    ``attention``: class name of its self-attention module. ``kv_proj``: its
    frozen key and value projections, as two layer names or one fused layer.
    ``fused``: the fused layer's layout, ``"blocks"`` (``[query | key | value]``,
    GPT-2, Phi-3) or ``"per_head"`` (``[q_h | k_h | v_h]`` head after head,
    GPT-NeoX). ``key_norm``: the norm the model puts on its keys before rotary
    (Qwen3, Gemma 3, OLMo 2), which prompts projected through ``kv_proj`` get
    too; ``key_norm_per_head``: whether it normalises each head's features
    (Qwen3, Gemma 3) or all key features at once (OLMo 2).
    """

    attention: str
    kv_proj: tuple[str, ...]
    fused: str = "blocks"
    key_norm: str | None = None
    key_norm_per_head: bool = True


_SEPARATE = ("k_proj", "v_proj")
# The architectures tested in tests/test_attention_adapters.py and tests/test_conformance.py; anything else is refused.
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaAttention", _SEPARATE),
    "mistral": Family("MistralAttention", _SEPARATE),
    "mixtral": Family("MixtralAttention", _SEPARATE),
    "qwen2": Family("Qwen2Attention", _SEPARATE),
    "qwen2_moe": Family("Qwen2MoeAttention", _SEPARATE),
    "qwen3": Family("Qwen3Attention", _SEPARATE, key_norm="k_norm"),
    "gemma": Family("GemmaAttention", _SEPARATE),
    "gemma2": Family("Gemma2Attention", _SEPARATE),
    "gemma3_text": Family("Gemma3Attention", _SEPARATE, key_norm="k_norm"),
    "olmo2": Family("Olmo2Attention", _SEPARATE, key_norm="k_norm", key_norm_per_head=False),
    "phi3": Family("Phi3Attention", ("qkv_proj",)),
    "gpt2": Family("GPT2Attention", ("c_attn",)),
    "gpt_neox": Family("GPTNeoXAttention", ("query_key_value",), fused="per_head"),
    "opt": Family("OPTAttention", _SEPARATE),
    "bert": Family("BertSelfAttention", ("key", "value")),
    "roberta": Family("RobertaSelfAttention", ("key", "value")),
    "vit": Family("ViTAttention", _SEPARATE),
    "deit": Family("DeiTAttention", _SEPARATE),
    "dinov2": Family("Dinov2Attention", _SEPARATE),
    "dinov2_with_registers": Family("Dinov2WithRegistersAttention", _SEPARATE),
}
# Architectures checked and found not to fit, with the reason their refusal gives.
UNFIT: dict[str, str] = {
    "t5": "T5 adds a learned relative position bias to every attention score, which has no value for prefix keys",
    "falcon": "Falcon computes attention inline instead of through transformers' AttentionInterface",
}


class Geometry(NamedTuple):
    """Shapes an attention adapter is built for."""

    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int


@dataclass
class AttentionCall:
    """One call of the attention function, as the model made it.

    ``query`` is ``(batch, heads, q_len, head_dim)`` with rotary applied; ``key``
    and ``value`` are ``(batch, kv_heads, kv_len, head_dim)`` including the cache;
    ``mask`` is whatever the model's mask function built (see ``base_mask``).
    """

    module: nn.Module
    layer: int
    family: Family
    implementation: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict[str, Any]

    def base(
        self, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model's original attention; returns ``(batch, q_len, heads, head_dim)`` and its weights."""
        return base_function(self.implementation, self.module)(self.module, self.query, key, value, mask, **self.kwargs)

    @property
    def scaling(self) -> float:
        scaling = self.kwargs.get("scaling")
        return self.query.shape[-1] ** -0.5 if scaling is None else scaling

    @property
    def dropout(self) -> float:
        return self.kwargs.get("dropout", 0.0)

    def base_mask(self) -> torch.Tensor | None:
        """The mask with its implicit meaning made explicit: bool (True = attend) or additive float.

        sdpa reads ``mask=None`` on a causal module with several queries as
        ``is_causal=True``, a top-left aligned triangle; every other ``None``
        means all keys are visible and is returned as ``None``.
        """
        if self.mask is not None:
            return self.mask
        is_causal = self.kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(self.module, "is_causal", True)
        q_len, kv_len = self.query.shape[2], self.key.shape[2]
        if self.implementation == "sdpa" and is_causal and q_len > 1:
            return torch.ones(q_len, kv_len, dtype=torch.bool, device=self.query.device).tril()[None, None]
        return None

    def base_with_prefix(
        self, keys: torch.Tensor, values: torch.Tensor, prefix_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model's original attention with extra keys in front of the tokens', one softmax over both.

        ``keys`` and ``values`` are ``(kv_heads, n, head_dim)``, shared by the
        batch, or ``(batch, kv_heads, n, head_dim)``, one set per example (e.g.
        after dropout); without rotary. Every query sees every extra key: causality and
        padding concern only the tokens. ``prefix_bias``, ``(batch, heads,
        q_len, n)``, is added to the extra keys' scores; it travels as their
        columns of an additive mask, so the model's own sdpa or eager call
        still does the one softmax.
        """
        batch = self.key.shape[0]
        key = torch.cat([keys.expand(batch, -1, -1, -1), self.key], dim=2)
        value = torch.cat([values.expand(batch, -1, -1, -1), self.value], dim=2)
        return self.base(key, value, self._prefixed_mask(keys.shape[-2], prefix_bias))

    def _prefixed_mask(self, n: int, prefix_bias: torch.Tensor | None) -> torch.Tensor | None:
        base = self.base_mask()
        if prefix_bias is None:
            if base is None:
                return None
            # Every query sees every extra key: True in a bool mask, 0 in an additive one.
            visible = base.new_full((*base.shape[:-1], n), True if base.dtype == torch.bool else 0.0)
            return torch.cat([visible, base], dim=-1)
        dtype = self.query.dtype
        if base is None:
            base = torch.zeros((), device=self.query.device)
        elif base.dtype == torch.bool:
            base = torch.where(base, 0.0, torch.finfo(dtype).min)
        base = base.to(dtype).expand(*prefix_bias.shape[:-1], self.key.shape[2])
        return torch.cat([prefix_bias.to(dtype), base], dim=-1)

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        """Every query's attention logits for extra ``keys``: ``(batch, heads, q_len, n)``.

        ``keys`` as ``base_with_prefix`` takes them, ``([batch,] kv_heads, n, head_dim)``.
        The logits are what the model computes for its own keys: scaled, one key head
        per group of query heads, and soft-capped where the model caps its
        logits (Gemma 2's ``attn_logit_softcapping``); no mask.
        """
        query = self.query
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[-3], dim=-3)
        scores = self.scaling * (query @ keys.transpose(-1, -2))
        softcap = self.kwargs.get("softcap")
        return scores if softcap is None else softcap * torch.tanh(scores / softcap)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``states`` (n, hidden) from the layer's own projections, no rotary.

        Returns two ``(kv_heads, n, head_dim)`` tensors, split into heads the way
        the model splits its own keys, keys through the model's key norm if it has one.
        """
        kv_heads, head_dim = self.key.shape[1], self.key.shape[-1]
        family = self.family
        if len(family.kv_proj) == 2:
            keys, values = (getattr(self.module, name)(states) for name in family.kv_proj)
        elif family.fused == "per_head":
            _, keys, values = getattr(self.module, family.kv_proj[0])(states).view(-1, kv_heads, 3, head_dim).unbind(2)
        else:  # [query | key | value]: keys and values are the last 2 * kv_heads * head_dim features
            fused = getattr(self.module, family.kv_proj[0])(states)
            keys, values = fused[..., -2 * kv_heads * head_dim :].chunk(2, dim=-1)
        norm = getattr(self.module, family.key_norm) if family.key_norm else None
        if norm is not None and not family.key_norm_per_head:
            keys = norm(keys.reshape(-1, kv_heads * head_dim))
        keys, values = (t.reshape(-1, kv_heads, head_dim).transpose(0, 1) for t in (keys, values))
        if norm is not None and family.key_norm_per_head:
            keys = norm(keys)
        return keys, values


class AttentionAdapter(nn.Module):
    """Base of the per-adapter modules in ``AttentionAdapters``: they change one attention call."""

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


@dataclass
class AttentionSite:
    """What a tagged attention module knows: the adapters' layer and its own index."""

    adapters: AttentionAdapters
    index: int


class AttentionAdapters(AdapterLayer):
    """All attention-level adapters of a model, in one layer on the ``AdapterModel``.

    The attention modules are not children of this layer (they belong to the
    base model); each carries an ``AttentionSite`` pointing here. When the last
    adapter goes, ``unwrapped`` removes the tags and restores the original
    attention implementation.
    """

    def __init__(self, family: Family, geometry: Geometry, implementation: str,
                 modules: list[nn.Module], configs: list[Any]) -> None:
        super().__init__()
        self.family = family
        self.geometry = geometry
        self.implementation = implementation
        # Plain lists, not submodules: saving or moving this layer must not touch the base model.
        self.attention_modules = modules
        self.model_configs = configs
        for index, module in enumerate(modules):
            setattr(module, SITE, AttentionSite(self, index))
        for config in configs:
            config._attn_implementation = f"repeft_{implementation}"

    def unwrapped(self) -> None:
        for module in self.attention_modules:
            delattr(module, SITE)
        for config in self.model_configs:
            config._attn_implementation = self.implementation
        return None


def base_function(implementation: str, module: nn.Module) -> Callable:
    if implementation == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # "eager" is not registered anywhere: each modeling file defines its own.
    return sys.modules[type(module).__module__].eager_attention_forward


def _registered_attention(implementation: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        site = module.__dict__.get(SITE)
        adapter = site.adapters.active if site is not None else None
        if adapter is None:  # disabled, another method active, or an untagged module (cross-attention)
            return base_function(implementation, module)(module, query, key, value, attention_mask, **kwargs)
        call = AttentionCall(module, site.index, site.adapters.family, implementation,
                             query, key, value, attention_mask, kwargs)
        return adapter.attend(call)

    attention.__name__ = f"repeft_{implementation}_attention"
    return attention


for _implementation, _mask in BASE_MASKS.items():
    AttentionInterface.register(f"repeft_{_implementation}", _registered_attention(_implementation))
    AttentionMaskInterface.register(f"repeft_{_implementation}", _mask)


def attention_adapters(model) -> AttentionAdapters:
    """The model's ``AttentionAdapters`` layer, created (and the model switched over) on first use.

    Raises ``ValueError`` for an architecture not in ``FAMILIES`` or an attention
    implementation other than sdpa / eager.
    """
    existing = model._modules.get(LAYER_NAME)
    if existing is not None:
        return existing
    base = model.get_base_model()
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        why = f" ({UNFIT[model_type]})" if model_type in UNFIT else ""
        raise ValueError(
            f"attention adapters (prefix, zero-init) support the model types {', '.join(FAMILIES)}; "
            f"{type(base).__name__} has model_type {model_type!r}{why}. LoRA and RepLoRA work on any architecture."
        )
    family = FAMILIES[model_type]
    modules = [
        m for m in base.modules()
        if type(m).__name__ == family.attention and not getattr(m, "is_cross_attention", False)
    ]
    if not modules:
        raise ValueError(f"found no {family.attention} module in {type(base).__name__} to attach attention adapters to")
    configs = list({id(c): c for c in [config, *(m.config for m in modules)]}.values())
    implementations = {c._attn_implementation for c in configs}
    if len(implementations) != 1 or not implementations <= set(BASE_MASKS):
        raise ValueError(
            f"attention adapters run on the 'sdpa' or 'eager' attention implementation; this model uses "
            f"{sorted(map(str, implementations))}. Load it with attn_implementation='sdpa'."
        )
    implementation = implementations.pop()
    if model_type == "gpt2" and config.reorder_and_upcast_attn and implementation == "eager":
        # GPT-2 takes its own upcasting path only under the name "eager", which wrapping renames.
        raise ValueError("GPT-2 with reorder_and_upcast_attn=True under eager attention is not supported; use sdpa")
    text = config.get_text_config()
    heads = text.num_attention_heads
    geometry = Geometry(
        n_layers=len(modules),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        hidden_size=text.hidden_size,
    )
    layer = AttentionAdapters(family, geometry, implementation, modules, configs)
    model.add_module(LAYER_NAME, layer)
    return layer


def add_attention_adapter(model, name: str, make: Callable[[Geometry], AttentionAdapter]) -> None:
    """Injector helper: attach ``make(geometry)`` as adapter ``name`` of the model's attention layer."""
    layer = attention_adapters(model)
    layer.adapters[name] = place_beside(make(layer.geometry), model.get_base_model())
