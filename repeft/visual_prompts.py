"""Visual prompts for ViT-family encoders: the hooks that splice prompt tokens in.

While a visual-prompt adapter is active, the encoder runs on the sequence::

    [class token(s) | n_prompt prompt tokens | patch tokens]

- before layer 0 the prompt tokens are inserted after the class token(s)
  (class, distillation or register tokens, whatever the family puts first);
- before layer l >= 1 they are replaced by the adapter's prompts for layer l
  (deep prompts), or left as layer l-1 made them (shallow VPT);
- before the encoder's final LayerNorm they are removed, so pooling, heads and
  ``last_hidden_state`` see the base model's layout. Intermediate
  ``hidden_states`` (``output_hidden_states=True``) keep them.

All of this happens in forward pre-hooks on modules of the frozen base model,
so the base model's code, module tree and state dict are untouched. The hooks
are pure functions of their inputs and the adapter parameters (they keep no
per-call state), so running them again gives the same tokens: that keeps them
correct under activation checkpointing whether transformers checkpoints a
layer's ``forward`` (5.x: hooks run once, outside) or its ``__call__`` (hooks
recomputed in backward, dropout replayed from the saved RNG state).

The methods live in their own modules and plug into these hooks through the
``PromptTokens`` interface: VPT's static prompts in ``vpt.py``, VAPT's
input-dependent ones in ``vapt.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, option
from .layers import AdapterLayer, place_beside
from .targeting import TargetError, model_type

# Attribute of the AdapterModel that holds every visual-prompt adapter; saved
# tensors are keyed under it, e.g. ``visual_prompts.prompts``.
CONTAINER = "visual_prompts"


# -- the config fields VPT and VAPT share ----------------------------------------------------


@dataclass
class VisualPromptConfig(AdapterConfig):
    """Fields shared by VPT and VAPT: ``n_prompt`` tokens per layer, dropout on static prompts."""

    n_prompt: int = option(10, minimum=1)
    prompt_dropout: float = option(0.0, minimum=0.0, below=1.0)


# -- where prompts go in each supported family -----------------------------------------------


@dataclass(frozen=True)
class ViTFamily:
    """Where one ViT-family backbone keeps its encoder layers and final norm, and how many tokens precede the patches."""

    layers: str
    final_norm: str
    prefix_tokens: Callable[[Any], int]


VIT_FAMILIES: dict[str, ViTFamily] = {
    "vit": ViTFamily("layers", "layernorm", lambda config: 1),
    "deit": ViTFamily("layers", "layernorm", lambda config: 2),  # class + distillation token
    "dinov2": ViTFamily("encoder.layer", "layernorm", lambda config: 1),
    "dinov2_with_registers": ViTFamily("encoder.layer", "layernorm", lambda config: 1 + config.num_register_tokens),
}


def vit_backbone(model: nn.Module) -> tuple[ViTFamily, nn.Module]:
    """The family entry and the backbone (``ViTModel``, ``Dinov2Model``, ...) inside a transformers model."""
    kind = model_type(model)
    if kind not in VIT_FAMILIES:
        raise TargetError(
            f"visual prompts support the ViT families {sorted(VIT_FAMILIES)}; got model_type {kind!r} "
            f"({type(model).__name__})"
        )
    # PreTrainedModel.base_model is the backbone of a task model and the model itself otherwise.
    return VIT_FAMILIES[kind], getattr(model, "base_model", model)


def patch_grid(image_size: int | list[int] | tuple[int, int], patch_size: int | list[int]) -> tuple[int, int]:
    """(rows, columns) of patches the patch embedding makes from an image of ``image_size``.

    >>> patch_grid(224, 16)
    (14, 14)
    """
    (height, width), (ph, pw) = _pair(image_size), _pair(patch_size)
    return height // ph, width // pw


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# -- prompt tokens --------------------------------------------------------------------------


class PromptTokens(nn.Module):
    """One adapter's prompts: ``forward(layer, patches)`` gives layer ``layer``'s prompt tokens.

    ``patches`` are the layer input's patch tokens (batch, num_patches, d). Returning
    None keeps the prompt tokens the previous layer produced. ``grid`` is the patch
    grid the prompts need, or None if any image size works.
    """

    n_prompt: int
    grid: tuple[int, int] | None = None

    def forward(self, layer: int, patches: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError


class StaticPrompts(PromptTokens):
    """VPT's prompts: a learned (n_prompt x d) matrix per layer, the same for every image.

    ``depth`` is how many layers get their own prompts, counted from layer 0.
    """

    def __init__(self, depth: int, n_prompt: int, hidden_size: int, patch_fan_in: int, dropout: float) -> None:
        super().__init__()
        self.n_prompt = n_prompt
        self.prompts = nn.Parameter(torch.empty(depth, n_prompt, hidden_size))
        # VPT's init: Xavier-uniform with the patch embedding's fan-in (channels x patch area)
        # and the width as fan-out, so prompts start at the scale of patch embeddings.
        bound = math.sqrt(6.0 / (patch_fan_in + hidden_size))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def forward(self, layer: int, patches: torch.Tensor) -> torch.Tensor | None:
        if layer >= len(self.prompts):
            return None
        return self.dropout(self.prompts[layer].expand(patches.shape[0], -1, -1))


def patch_fan_in(config) -> int:
    ph, pw = _pair(config.patch_size)
    return config.num_channels * ph * pw


# -- the hooks ------------------------------------------------------------------------------


class VisualPrompts(AdapterLayer):
    """All visual-prompt adapters of one model, and the hooks that splice the active one's tokens in.

    It sits on the ``AdapterModel`` (not inside the base model); ``adapters`` maps
    adapter names to ``PromptTokens``. Created by the first visual-prompt adapter,
    removed with its hooks when the last one is deleted.
    """

    def __init__(self, family: ViTFamily, backbone: nn.Module) -> None:
        super().__init__()
        config = backbone.config
        self.num_prefix = family.prefix_tokens(config)
        self.patch_size = _pair(config.patch_size)
        layers = backbone.get_submodule(family.layers)
        self._handles = [backbone.register_forward_pre_hook(self._check_inputs, with_kwargs=True)]
        self._handles += [
            layer.register_forward_pre_hook(partial(self._before_layer, index), with_kwargs=True)
            for index, layer in enumerate(layers)
        ]
        self._handles.append(backbone.get_submodule(family.final_norm).register_forward_pre_hook(self._strip))

    def unwrapped(self) -> None:
        # Called when the last adapter goes: take the hooks off the base model; None says "remove me".
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _check_inputs(self, backbone: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tokens = self.active
        if tokens is None:
            return
        pixels = args[0] if args else kwargs.get("pixel_values")
        if isinstance(pixels, (list, tuple)):
            sizes = sorted({"x".join(map(str, p.shape[-2:])) for p in pixels if torch.is_tensor(p)})
            raise TypeError(
                f"pixel_values must be one (batch, channels, height, width) tensor; got a {type(pixels).__name__} "
                f"of {len(pixels)} images (sizes {', '.join(sizes)}). A ViT-family model embeds a batch at one "
                "size: resize the images to one size (the image processor's do_resize) or send each size as its "
                "own batch."
            )
        if tokens.grid is not None and torch.is_tensor(pixels) and pixels.dim() == 4:
            grid = patch_grid(tuple(pixels.shape[-2:]), self.patch_size)
            if grid != tokens.grid:
                raise ValueError(
                    f"adapter {self.active_adapter!r} maps a {tokens.grid[0]}x{tokens.grid[1]} patch grid to its "
                    f"prompts, but {pixels.shape[-2]}x{pixels.shape[-1]} images give a {grid[0]}x{grid[1]} grid. "
                    "Resize the images, or add the adapter with VAPTConfig(image_size=...) set to this size "
                    "(and call the model with interpolate_pos_encoding=True where the model needs it)."
                )

    def _before_layer(self, index: int, layer: nn.Module, args: tuple, kwargs: dict[str, Any]):
        tokens = self.active
        if tokens is None:
            return None
        # Every supported family passes hidden_states (and the mask) positionally.
        hidden, *rest = args
        k = self.num_prefix
        if index == 0:
            mask = rest[0] if rest else kwargs.get("attention_mask")
            if mask is not None:
                raise ValueError(
                    "visual prompts do not support an attention_mask that masks patches: the prompt tokens would "
                    "need entries in it. Pass attention_mask=None (an all-ones mask is the same)."
                )
            patches = hidden[:, k:]
        else:
            patches = hidden[:, k + tokens.n_prompt :]
        prompts = tokens(index, patches)
        if prompts is None:
            return None
        hidden = torch.cat([hidden[:, :k], prompts.to(hidden.dtype), patches], dim=1)
        return (hidden, *rest), kwargs

    def _strip(self, norm: nn.Module, args: tuple):
        tokens = self.active
        if tokens is None:
            return None
        hidden, *rest = args
        k = self.num_prefix
        return (torch.cat([hidden[:, :k], hidden[:, k + tokens.n_prompt :]], dim=1), *rest)


def attach_prompts(model, adapter_name: str, tokens: PromptTokens) -> None:
    """Add ``tokens`` as adapter ``adapter_name``, creating the model's ``VisualPrompts`` on first use."""
    family, backbone = vit_backbone(model.get_base_model())
    container = model._modules.get(CONTAINER)
    if container is None:
        container = VisualPrompts(family, backbone).train(backbone.training)
        model.add_module(CONTAINER, container)
    # New modules start in training mode; follow the base model's mode (dropout off in eval) instead.
    container.adapters[adapter_name] = place_beside(tokens, backbone).train(backbone.training)
