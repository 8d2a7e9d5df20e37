"""LoRA on ``nn.Embedding``, as PEFT 0.21 computes it (``peft.tuners.lora.layer.Embedding``).

An embedding is a linear map of one-hot token vectors whose weight is stored
input-major (``num_embeddings x embedding_dim``, PEFT's ``fan_in_fan_out``
layout), so ``LoRAEmbedding`` is a ``LoRALinear`` with that layout: the delta
``(s B A).T``, merging, unmerging and untying a tied weight are LoRALinear's.
Only the forward differs: A's columns are looked up, not multiplied.

- A (``lora_embedding_A``, r x num_embeddings) starts at zero and B
  (``lora_embedding_B``, embedding_dim x r) normal(0, 1), for
  ``init_lora_weights`` True and ``"gaussian"`` alike; ``False`` draws both
  from normal(0, 1) (the adapter changes the output from the start).
- ``h = E(x) + s * F.embedding(x, A.T) @ B.T``, the lookup with the base
  layer's ``padding_idx``/``max_norm``/... as PEFT passes them, times the base
  layer's ``embed_scale`` where it has one (Gemma 3). ``lora_dropout`` is not
  applied: PEFT builds the dropout module for embeddings but never calls it.
- The adapter runs on torch whatever ``kernel`` says (the fused kernel is for
  linear layers).
- DoRA (``use_dora=True``, PEFT's ``DoraEmbeddingLayer``): the magnitude m has
  one entry per embedding dimension, initialised to the norm of each row of
  ``W.T + s B A`` (embedding_dim x num_embeddings, the norm taken over the
  vocabulary); ``h = g * E(x) + g * s * F.embedding(x, A.T) @ B.T`` with
  ``g = m / ||W.T + s B A||_row`` (a constant for autograd). Merging and
  unmerging are ``LoRALinear``'s DoRA merge in this layout.
- ``lora_bias=True`` is refused for embeddings, as PEFT refuses it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .lora import DTYPES, LoRAConfig, LoRALinear
from .targeting import TargetError


class LoRAEmbeddingFactors(nn.Module):
    """An embedding's factors under PEFT's names: A (r x num_embeddings), B (embedding_dim x r)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, r: int, scaling: float, init: bool | str, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.randn(r, num_embeddings, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(embedding_dim, r, dtype=dtype))
        if init is not False:
            # The LoRA paper's reference code: A zero, B as nn.Embedding initialises its weight.
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
        self.scaling = scaling
        self.dropout_p = 0.0  # as in PEFT, dropout is not applied to embeddings
        self.kernel = "torch"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B


class AddedLowRank:
    """``forward`` of LoRA layers whose low-rank term, ``low_rank_out(adapter, x)``, is computed apart from the
    base layer's output and added to it (embeddings and convolutions: no fused kernel); each layer's
    ``_dora_forward(adapter, x, result)`` is its DoRA."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active
        if adapter is None or self.merged_adapter is not None:
            return result
        if dora.magnitude(adapter) is not None:
            return self._dora_forward(adapter, x, result)
        # PEFT adds the adapter's output in its own dtype and casts the sum back to the base's.
        return (result + self.low_rank_out(adapter, x)).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row with its own adapter (index -1: the base layer alone), PEFT's sub-batch loop."""
        names, index = self._row_index(x)
        result = self.base_layer(x, *args, **kwargs)
        for i, name in enumerate(names):
            rows = (index == i).nonzero().squeeze(1)
            if rows.numel():
                result[rows] += self.low_rank_out(self.adapters[name], x[rows]).to(result.dtype)
        return result


class LoRAEmbedding(AddedLowRank, LoRALinear):
    """An ``nn.Embedding`` plus named low-rank adapters (see the module docstring).

    Built as ``LoRAEmbedding(embedding)``: ``in_features`` is ``num_embeddings``, ``out_features`` ``embedding_dim``.
    """

    @property
    def bias(self) -> None:
        return None

    def new_factors(self, config: LoRAConfig) -> LoRAEmbeddingFactors:
        return LoRAEmbeddingFactors(
            self.in_features, self.out_features, config.r, config.scaling, config.init_lora_weights, DTYPES[config.dtype]
        )

    def _dora_forward(self, adapter: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA: g = m / ||W.T + s B A||_row, one entry per embedding dimension (PEFT's DoraEmbeddingLayer)."""
        gain = self.dora_gain(adapter)
        return (gain * result + gain * self.low_rank_out(adapter, x)).to(result.dtype)

    def dora_gain(self, adapter: nn.Module) -> torch.Tensor:
        """DoRA's ``m / ||W.T + s B A||_row`` (embedding_dim entries), the norm a constant as in PEFT."""
        lora_A, lora_B = adapter.factors()
        norm = dora.row_norm(dora.dense_weight(self), adapter.scaling * (lora_B.detach().float() @ lora_A.detach().float()))
        return dora.magnitude(adapter) / norm.to(dora.magnitude(adapter).dtype)

    def low_rank_out(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``s * F.embedding(x, A.T) @ B.T`` (times the base layer's ``embed_scale``), as PEFT computes it."""
        lora_A, lora_B = adapter.factors()
        base = self.base_layer
        after_A = F.embedding(
            x, lora_A.T, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        out = (after_A @ lora_B.T) * adapter.scaling
        embed_scale = _embed_scale(base)
        return out if embed_scale is None else out * embed_scale.to(out.dtype)


def _embed_scale(base: nn.Module) -> torch.Tensor | None:
    """The scalar an embedding multiplies its output by (Gemma 3's ``embed_scale``), as PEFT reads it; else None."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def warn_about_shared_embeddings(model: nn.Module, paths: list[str]) -> None:
    """Warn when a targeted embedding's weight is also another embedding module's that is not targeted.

    T5's ``shared`` holds the weight its encoder's and decoder's ``embed_tokens`` also hold, but the model
    never calls ``shared``: adapting only it changes nothing (PEFT does the same, silently).
    """
    targeted = set(paths)
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Embedding) and name:
            holders.setdefault(id(module.weight), []).append(name)
    for path in paths:
        weight = model.get_submodule(path).weight
        others = [n for n in holders.get(id(weight), []) if n not in targeted and not n.startswith(path + ".")]
        if others:
            warnings.warn(
                f"target_modules adapt the embedding {path!r}, whose weight the embeddings {others} also use; they "
                "stay unadapted, and where the model calls them, not it, the adapter changes nothing. Target "
                "them too, or instead",
                stacklevel=5,
            )


def refuse_embeddings(config: LoRAConfig, embeddings: list[str]) -> None:
    """LoRA and DoRA adapt embeddings as PEFT does; RepLoRA and lora_bias there are refused by name, before anything changes."""
    if not embeddings:
        return
    if config.method != "lora":
        raise TargetError(
            f"target_modules select the embedding {embeddings[0]!r}: {type(config).__name__} shares seeds between "
            "attention projections and does not adapt embeddings; leave it out of target_modules (LoRAConfig adapts "
            "embeddings; modules_to_save trains one in full)"
        )
    if config.lora_bias:
        raise TargetError(
            f"target_modules select the embedding {embeddings[0]!r}: lora_bias=True is not supported for Embedding "
            "layers (as in PEFT); leave it out of target_modules, or use lora_bias=False"
        )
