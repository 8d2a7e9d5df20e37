"""Prefix tuning with shared-structure keys and values, and the optional NoRGa gate.

Every attention layer l gets ``n`` extra key/value pairs, placed before the
real ones. Each query attends to them and to the tokens in one softmax::

    attn(q) = softmax([s_P, s_X]) [V_l; V_X],      s = scaling * q k^T

Prefix keys carry no rotary position, are never masked (causal or padding),
and are added inside the attention call, after the KV-cache update, so they
never enter the cache.

Shared structure ("Revisiting Prefix-tuning"): keys and values are the two
halves of one MLP output, ``K_l, V_l = split(W2 tanh(W1 E_l + b1) + b2)``
from a learned embedding E_l, so they share structure. The non-shared
baseline learns K_l and V_l independently; it is also what ``fold_prefix``
turns a trained shared adapter into for export.

NoRGa (non-linear residual gate): prefix scores become
``s_P + alpha_l * act(tau_l * s_P)``, act sigmoid (default), tanh or GELU.
The extra term is passed as an additive mask on the prefix columns, so the
model's own sdpa or eager attention still does one softmax over all keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from .attention import FAMILIES, AttentionAdapter, AttentionCall, Geometry, add_attention_adapter, attention_adapters
from .config import AdapterConfig, option
from .methods import register_method

# The gate activations the NoRGa reference code offers (--gate_act).
NORGA_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": nn.functional.gelu}


@dataclasses.dataclass
class PrefixConfig(AdapterConfig):
    """Prefix tuning: ``n_prefix`` extra key/value vectors in every attention layer.

    ``structure="shared"`` (the shared-structure reparameterization) makes keys
    and values of layer l two halves of one MLP output,
    ``K_l, V_l = split(W2 tanh(W1 E_l + b1) + b2)``, from a learned embedding
    ``E_l`` (``n_prefix x embed_dim``, ``embed_dim=None``: the model's hidden
    size). ``mlp_per_layer=True`` (default) gives each layer its own MLP,
    ``mlp_hidden`` (48) wide, as the paper's code does; ``False`` is repeft's
    own variant, one MLP for all layers. ``structure="independent"`` learns K_l
    and V_l directly: the non-shared baseline, and the form
    ``repeft.fold_prefix`` exports. ``norga=True`` adds the NoRGa gate on prefix
    scores, ``s -> s + alpha * act(tau * s)`` with ``norga_activation`` sigmoid
    (default), tanh or gelu, and learnable per-layer alpha and tau starting at
    ``norga_alpha`` and ``norga_tau``.

    >>> PrefixConfig(n_prefix=8, norga=True).structure
    'shared'
    """

    method: ClassVar[str] = "prefix"

    n_prefix: int = option(16, minimum=1)
    structure: str = option("shared", choices=("shared", "independent"))
    embed_dim: int | None = option(None, minimum=1)
    mlp_hidden: int = option(48, minimum=1)
    mlp_per_layer: bool = True
    norga: bool = False
    norga_alpha: float = 1.0
    norga_tau: float = 1.0
    norga_activation: str = option("sigmoid", choices=tuple(NORGA_ACTIVATIONS))


class PrefixAdapter(AttentionAdapter):
    """Prefix keys/values for every attention layer; subclasses say where they come from."""

    def __init__(self, geometry: Geometry, config: PrefixConfig) -> None:
        super().__init__()
        self.geometry = geometry
        self.config = config
        if config.norga:
            self.norga_alpha = nn.Parameter(torch.full((geometry.n_layers,), float(config.norga_alpha)))
            self.norga_tau = nn.Parameter(torch.full((geometry.n_layers,), float(config.norga_tau)))
            self.norga_activation = NORGA_ACTIVATIONS[config.norga_activation]

    def flat_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values, each ``(n_prefix, kv_heads * head_dim)``."""
        raise NotImplementedError

    def prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values split into heads, each ``(kv_heads, n_prefix, head_dim)``."""
        g = self.geometry
        return tuple(t.view(-1, g.kv_heads, g.head_dim).transpose(0, 1) for t in self.flat_prefix(layer))

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys, values = (t.to(call.key.dtype) for t in self.prefix(call.layer))
        return call.base_with_prefix(keys, values, self._norga_bias(call, keys) if self.config.norga else None)

    def _norga_bias(self, call: AttentionCall, keys: torch.Tensor) -> torch.Tensor:
        """NoRGa's extra term on the prefix scores, ``alpha * act(tau * s_P)``, s_P as the model scores keys."""
        return self.norga_alpha[call.layer] * self.norga_activation(self.norga_tau[call.layer] * call.scores(keys))


class SharedPrefix(PrefixAdapter):
    """``K_l, V_l = split(W2 tanh(W1 E_l + b1) + b2)``: one MLP (per model or per layer) makes both.

    Row-vector convention: ``E_l`` is ``(n_prefix, embed_dim)``, ``W1`` is
    ``(embed_dim, mlp_hidden)``, ``W2`` is ``(mlp_hidden, 2 * kv_heads * head_dim)``.
    """

    def __init__(self, geometry: Geometry, config: PrefixConfig) -> None:
        super().__init__(geometry, config)
        embed_dim = config.embed_dim or geometry.hidden_size
        kv_dim = geometry.kv_heads * geometry.head_dim
        n_mlps = geometry.n_layers if config.mlp_per_layer else 1
        # nn.Embedding's N(0, 1) init, as in the original prefix-tuning code.
        self.embedding = nn.Parameter(torch.randn(geometry.n_layers, config.n_prefix, embed_dim))
        self.w1, self.b1 = _linear_parameters(n_mlps, embed_dim, config.mlp_hidden)
        self.w2, self.b2 = _linear_parameters(n_mlps, config.mlp_hidden, 2 * kv_dim)

    def flat_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = layer if self.config.mlp_per_layer else 0
        hidden = torch.tanh(self.embedding[layer] @ self.w1[mlp] + self.b1[mlp])
        return (hidden @ self.w2[mlp] + self.b2[mlp]).chunk(2, dim=-1)

    @torch.no_grad()
    def folded(self) -> IndependentPrefix:
        """An ``IndependentPrefix`` holding the keys and values this MLP gives now (same outputs)."""
        flat = [self.flat_prefix(layer) for layer in range(self.geometry.n_layers)]
        folded = IndependentPrefix(
            self.geometry,
            dataclasses.replace(self.config, structure="independent"),
            torch.stack([k for k, _ in flat]),
            torch.stack([v for _, v in flat]),
        )
        if self.config.norga:
            folded.norga_alpha.copy_(self.norga_alpha)
            folded.norga_tau.copy_(self.norga_tau)
        return folded.to(self.embedding)


class IndependentPrefix(PrefixAdapter):
    """Free per-layer keys and values, ``(n_layers, n_prefix, kv_heads * head_dim)`` each."""

    def __init__(self, geometry: Geometry, config: PrefixConfig, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(geometry, config)
        self.keys = nn.Parameter(keys.clone())
        self.values = nn.Parameter(values.clone())

    def flat_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]


def _linear_parameters(n: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``n`` stacked (weight, bias) pairs with nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    weight = nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound))
    bias = nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound))
    return weight, bias


def build_prefix(geometry: Geometry, config: PrefixConfig) -> PrefixAdapter:
    shared = SharedPrefix(geometry, config)
    # The independent baseline starts from the prefixes a fresh shared MLP gives, so the two
    # structures start equal and differ only in how training moves them.
    return shared if config.structure == "shared" else shared.folded()


@register_method(
    PrefixConfig, families=FAMILIES, identity_at_init=False, generates_with_cache=True, vision_only=False,
    example={"n_prefix": 3, "mlp_hidden": 16, "norga": True},
)
def inject_prefix(model, name: str, config: PrefixConfig) -> None:
    add_attention_adapter(model, name, lambda geometry: build_prefix(geometry, config))


def fold_prefix(model, adapter_name: str | None = None) -> None:
    """Replace a shared-structure prefix adapter's MLP by the per-layer K, V it produces now.

    Outputs do not change. The adapter's config becomes ``structure="independent"``,
    so ``save_adapter`` then writes only the final keys and values (and NoRGa
    gates). Save a checkpoint before folding to resume training with the MLP.

    >>> repeft.fold_prefix(model)  # doctest: +SKIP
    >>> model.save_adapter("out/prefix-final")  # doctest: +SKIP
    """
    name = adapter_name or model.active_adapter
    model._check_known(name)
    config = model.configs[name]
    if not isinstance(config, PrefixConfig):
        raise ValueError(f"adapter {name!r} is a {config.method} adapter; fold_prefix folds prefix adapters")
    if config.structure == "independent":
        return
    layer = attention_adapters(model)
    shared = layer.adapters[name]
    folded = shared.folded()
    folded.requires_grad_(any(p.requires_grad for p in shared.parameters()))
    layer.adapters[name] = folded
    model.configs[name] = folded.config
