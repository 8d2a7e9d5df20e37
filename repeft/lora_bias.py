"""PEFT's ``lora_bias=True``: LoRA's B carries a trainable bias b, so the adapter adds ``s * (B A x' + b)``.

As in PEFT (``lora_B = nn.Linear(r, d_out, bias=True)``):

- b starts at zero for ``init_lora_weights=True`` and as ``nn.Linear``
  initialises its bias (uniform in +-1/sqrt(r)) for ``False``; other
  initialisations, DoRA and embeddings refuse it, as PEFT does (RepLoRA too:
  its B is computed, not a free layer);
- dropout acts on x only: ``s * b`` is added whole;
- merging adds ``s * b`` to the base layer's bias, unmerging subtracts it; a
  base layer without bias warns when the adapter is added and refuses to merge.

The bias lives on the factors module as ``lora_B_bias``; PEFT's files name it ``<module>.lora_B.bias``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

LORA_BIAS = "lora_B_bias"


class LoRABiasMergeError(RuntimeError, ValueError):
    """A ``lora_bias`` adapter merged into a layer without bias: PEFT raises RuntimeError, repeft's merges ValueError."""


def lora_bias(adapter: nn.Module) -> torch.Tensor | None:
    """The adapter's ``lora_B`` bias (``lora_bias=True``), or None."""
    return adapter._parameters.get(LORA_BIAS)


def add_lora_bias(factors: nn.Module, out_features: int, r: int, init: bool | str, device, dtype: torch.dtype) -> None:
    """Give a LoRA factors module B's bias, initialised as PEFT initialises it."""
    bias = torch.zeros(out_features, device=device, dtype=dtype)
    if init is False:
        nn.init.uniform_(bias, -1 / math.sqrt(r), 1 / math.sqrt(r))
    factors.register_parameter(LORA_BIAS, nn.Parameter(bias))


def check_config(config: Any) -> None:
    """Refuse what PEFT refuses beside ``lora_bias=True`` (its messages begin the same), and RepLoRA."""
    if not config.lora_bias:
        return
    if config.method != "lora":
        raise ValueError(
            f"lora_bias=True is a LoRA option; {type(config).__name__} computes its factors and has no free lora_B "
            "to carry a bias: use LoRAConfig, or lora_bias=False"
        )
    if config.init_lora_weights not in (True, False):
        raise ValueError(
            "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
            f"init_lora_weights={config.init_lora_weights!r} (as in PEFT)"
        )
    if config.use_dora:
        raise ValueError("The argument lora_bias=True is not supported for DoRA (as in PEFT); pass use_dora=False")


def merged_bias(adapter: nn.Module, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``bias`` (the base layer's) plus ``s * b`` of the adapter's lora_B bias, if it has one."""
    extra = lora_bias(adapter)
    if extra is None:
        return bias
    if bias is None:
        raise LoRABiasMergeError(
            "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias (as in PEFT): "
            "s * b has nowhere to go. Keep the adapter unmerged, or train it with lora_bias=False"
        )
    with torch.no_grad():
        return (bias.float() + adapter.scaling * extra.float()).to(bias.dtype)


def unmerge_bias(adapter: nn.Module, bias: torch.Tensor | None) -> None:
    """Take ``s * b`` back out of the base layer's ``bias`` (in place), if the adapter has a lora_B bias."""
    extra = lora_bias(adapter)
    if extra is not None:
        bias.data.copy_((bias.float() - adapter.scaling * extra.detach().float()).to(bias.dtype))


def add_row_biases(out: torch.Tensor, adapters: list[nn.Module], index: torch.Tensor) -> torch.Tensor:
    """A mixed batch's ``out`` plus ``s * b`` of each row's adapter (nothing for index -1 or an adapter without bias)."""
    if not any(lora_bias(a) is not None for a in adapters):
        return out
    # One row per adapter and a last zero row, which index -1 picks.
    biases = out.new_zeros(len(adapters) + 1, out.shape[-1])
    for i, adapter in enumerate(adapters):
        if lora_bias(adapter) is not None:
            biases[i] = adapter.scaling * lora_bias(adapter)
    return out + biases[index].view(index.shape[0], *[1] * (out.dim() - 2), out.shape[-1])


def warn_about_unbiased_layers(layers: dict[str, nn.Module]) -> None:
    """PEFT's warning: ``lora_bias=True`` on a layer without bias trains and runs, but cannot be merged."""
    unbiased = [path for path, layer in layers.items() if layer.bias is None]
    if unbiased:
        warnings.warn(
            f"`lora_bias=True` was passed but the targeted layer of type {type(layers[unbiased[0]].base_layer).__name__} "
            f"has no bias ({len(unbiased)} layer(s), e.g. {unbiased[0]!r}). This means that merging LoRA weights "
            "won't be possible (as in PEFT); the adapter trains and runs unmerged",
            stacklevel=5,
        )
