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

The reference set-up (the paper's ViT code, ReparamPrefix
``CV/src/models/vit_prompt/vit.py``): embeddings uniform in ``±sqrt(6 / (3 p² + d))``
(VPT's Xavier bound for a p x p patch), the non-shared baseline from separate
key and value embeddings drawn the same way, and dropout on the prefixes, a
fresh mask for every example of the batch.

NoRGa (non-linear residual gate): prefix scores become
``s_P + alpha_l * act(tau_l * s_P)`` in the layers ``norga_layers`` (all by
default), act one of the reference code's seven gate activations.
The extra term is passed as an additive mask on the prefix columns, so the
model's own sdpa or eager attention still does one softmax over all keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional

from .attention import FAMILIES, AttentionAdapter, AttentionCall, Geometry, add_attention_adapter, attention_adapters
from .config import AdapterConfig, option
from .methods import register_method


def _identity(scores: torch.Tensor) -> torch.Tensor:
    return scores


# The gate activations the NoRGa reference code offers (MoE_PromptCL, --gate_act; None there is the identity).
NORGA_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": functional.gelu, "relu": functional.relu,
                     "softplus": functional.softplus, "elu": functional.elu, "identity": _identity}
# The reference set-up's bound takes a patch's area; models without patches (text) get its ViT-B/16's, 16 x 16.
REFERENCE_PATCH_AREA = 16 * 16


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
    ``repeft.fold_prefix`` exports.

    ``init="reference"`` (default) is the paper's code's: embeddings (shared)
    or keys and values (independent, each drawn on its own) uniform in
    ``±sqrt(6 / (3 p² + width))``, p the model's patch size (16 for models
    without patches). ``init="normal"`` is repeft's earlier start: E_l ~ N(0, 1),
    and the independent prefix starts from the prefixes a fresh shared MLP
    gives. ``prefix_dropout`` (0.1, the paper's prefix scripts) drops prefix
    key and value features in training, a fresh mask per example.

    ``norga=True`` adds the NoRGa gate on prefix scores,
    ``s -> s + alpha * act(tau * s)`` with ``norga_activation`` (sigmoid by
    default; any of the reference code's seven) and learnable per-layer alpha
    and tau starting at ``norga_alpha`` and ``norga_tau``, in the layers
    ``norga_layers`` (``None``: every layer, i.e. every layer with a prefix).

    >>> PrefixConfig(n_prefix=8, norga=True).structure
    'shared'
    """

    method: ClassVar[str] = "prefix"

    # Fields added after adapters were first saved, read as those files meant them.
    saved_before: ClassVar[dict[str, Any]] = {"init": "normal", "prefix_dropout": 0.0, "norga_layers": None}

    n_prefix: int = option(16, minimum=1)
    structure: str = option("shared", choices=("shared", "independent"))
    init: str = option("reference", choices=("reference", "normal"))
    prefix_dropout: float = option(0.1, minimum=0, below=1)
    embed_dim: int | None = option(None, minimum=1)
    mlp_hidden: int = option(48, minimum=1)
    mlp_per_layer: bool = True
    norga: bool = False
    norga_alpha: float = 1.0
    norga_tau: float = 1.0
    norga_activation: str = option("sigmoid", choices=tuple(NORGA_ACTIVATIONS))
    norga_layers: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norga_layers is None:
            return
        self.norga_layers = list(self.norga_layers)
        layers = self.norga_layers
        if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"norga_layers must be distinct layer indices >= 0 (or null: every layer), got {layers!r}")
        if not self.norga:
            raise ValueError("norga_layers chooses where the NoRGa gate acts; set norga=True or leave norga_layers null")

    def gated_layers(self, n_layers: int) -> list[int]:
        """The layers NoRGa gates in a model of ``n_layers`` attention layers (``ValueError`` for one it lacks)."""
        if self.norga_layers is None:
            return list(range(n_layers))
        missing = [i for i in self.norga_layers if i >= n_layers]
        if missing:
            raise ValueError(f"norga_layers {missing} name layers this model lacks: it has {n_layers} attention "
                             f"layers, 0 to {n_layers - 1}")
        return sorted(self.norga_layers)


class PrefixAdapter(AttentionAdapter):
    """Prefix keys/values for every attention layer; subclasses say where they come from."""

    def __init__(self, geometry: Geometry, config: PrefixConfig) -> None:
        super().__init__()
        self.geometry = geometry
        self.config = config
        if config.norga:
            gated = config.gated_layers(geometry.n_layers)
            # norga_alpha[i], norga_tau[i] belong to layer gated[i].
            self.norga_index = {layer: i for i, layer in enumerate(gated)}
            self.norga_alpha = nn.Parameter(torch.full((len(gated),), float(config.norga_alpha)))
            self.norga_tau = nn.Parameter(torch.full((len(gated),), float(config.norga_tau)))
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
        if self.training and self.config.prefix_dropout > 0:
            # As the reference drops its batch-expanded prefixes: a fresh mask for every example.
            batch = call.key.shape[0]
            keys, values = (functional.dropout(t.expand(batch, -1, -1, -1), self.config.prefix_dropout)
                            for t in (keys, values))
        gate = self.norga_index.get(call.layer) if self.config.norga else None
        return call.base_with_prefix(keys, values, None if gate is None else self._norga_bias(call, keys, gate))

    def _norga_bias(self, call: AttentionCall, keys: torch.Tensor, gate: int) -> torch.Tensor:
        """NoRGa's extra term on the prefix scores, ``alpha * act(tau * s_P)``, s_P as the model scores keys."""
        return self.norga_alpha[gate] * self.norga_activation(self.norga_tau[gate] * call.scores(keys))


class SharedPrefix(PrefixAdapter):
    """``K_l, V_l = split(W2 tanh(W1 E_l + b1) + b2)``: one MLP (per model or per layer) makes both.

    Row-vector convention: ``E_l`` is ``(n_prefix, embed_dim)``, ``W1`` is
    ``(embed_dim, mlp_hidden)``, ``W2`` is ``(mlp_hidden, 2 * kv_heads * head_dim)``.
    """

    def __init__(self, geometry: Geometry, config: PrefixConfig, patch_area: int = REFERENCE_PATCH_AREA) -> None:
        super().__init__(geometry, config)
        embed_dim = config.embed_dim or geometry.hidden_size
        kv_dim = geometry.kv_heads * geometry.head_dim
        n_mlps = geometry.n_layers if config.mlp_per_layer else 1
        shape = (geometry.n_layers, config.n_prefix, embed_dim)
        if config.init == "reference":
            self.embedding = nn.Parameter(reference_uniform(shape, patch_area))
        else:  # nn.Embedding's N(0, 1) init, as in the original prefix-tuning code
            self.embedding = nn.Parameter(torch.randn(shape))
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
        return folded.to(self.embedding).train(self.training)  # a new module trains by default: dropout


class IndependentPrefix(PrefixAdapter):
    """Free per-layer keys and values, ``(n_layers, n_prefix, kv_heads * head_dim)`` each."""

    def __init__(self, geometry: Geometry, config: PrefixConfig, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(geometry, config)
        self.keys = nn.Parameter(keys.clone())
        self.values = nn.Parameter(values.clone())

    def flat_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]


def reference_uniform(shape: tuple[int, ...], patch_area: int) -> torch.Tensor:
    """``shape`` drawn from U(-b, b), ``b = sqrt(6 / (3 p² + width))``, p² = ``patch_area``, width the last dimension.

    The reference's bound (VPT's): Xavier-uniform for a layer from a 3-channel
    p x p patch to ``width`` features, ``prompt_dim`` in its code.
    """
    bound = math.sqrt(6 / (3 * patch_area + shape[-1]))
    return torch.empty(shape).uniform_(-bound, bound)


def _linear_parameters(n: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``n`` stacked (weight, bias) pairs with nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    weight = nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound))
    bias = nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound))
    return weight, bias


def build_prefix(geometry: Geometry, config: PrefixConfig, patch_area: int = REFERENCE_PATCH_AREA) -> PrefixAdapter:
    """The adapter ``config`` describes; ``patch_area`` (pixels per patch) sets the reference init's bound."""
    if config.structure == "shared":
        return SharedPrefix(geometry, config, patch_area)
    if config.init == "reference":
        # The paper's non-shared baseline: separate key and value embeddings, each drawn like the shared one.
        shape = (geometry.n_layers, config.n_prefix, geometry.kv_heads * geometry.head_dim)
        return IndependentPrefix(geometry, config, reference_uniform(shape, patch_area),
                                 reference_uniform(shape, patch_area))
    # repeft's earlier start: the prefixes a fresh shared MLP gives, so the two structures start
    # equal and differ only in how training moves them.
    return SharedPrefix(geometry, config).folded()


def model_patch_area(model) -> int:
    """Pixels per patch of the base model (a ViT's ``config.patch_size`` squared); the reference's 16 x 16 without one."""
    config = getattr(model.get_base_model(), "config", None)
    size = getattr(config, "patch_size", None)
    if size is None:
        return REFERENCE_PATCH_AREA
    return size * size if isinstance(size, int) else math.prod(size)


@register_method(
    PrefixConfig, families=FAMILIES, identity_at_init=False, generates_with_cache=True, vision_only=False,
    example={"n_prefix": 3, "mlp_hidden": 16, "norga": True},
)
def inject_prefix(model, name: str, config: PrefixConfig) -> None:
    patch_area = model_patch_area(model)
    add_attention_adapter(model, name, lambda geometry: build_prefix(geometry, config, patch_area))


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
