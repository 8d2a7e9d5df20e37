"""VAPT: visual prompts computed from the patch tokens of the layer they enter.

For layer l >= 1 with input patch tokens X (N = H x W of them, width d)::

    Z = LN_l(X)                          per-token LayerNorm, seen as a (d, H, W) grid
    C = k_l * Z                          one K x K filter shared by all d channels ("valid":
                                         H' = H-K+1, W' = W-K+1), then channel dropout
    T = A_l C + b_l                      token-wise map from the H'W' grid positions to
                                         n_prompt tokens; A_l (n_prompt x H'W'), b_l zero at init
    P_l = T + W2 drop(act(W1 T))         feature MLP (d -> mlp_hidden -> d, no biases, dropout on
                                         the hidden units) shared by every token and every layer,
                                         with a residual

so P_l = 0 at init. Layer 0 has no earlier layer to read from and uses static
prompts, as VPT does. Parameters per layer: 2d (LN) + K^2 + (H'W' + 1) n_prompt,
plus n_prompt d for layer 0 and 2 d mlp_hidden for the MLP. ``PatchesToTokens``
computes the first three lines as one map over the grid (see there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import option
from .methods import register_method
from .replora import ACTIVATIONS
from .visual_prompts import (
    VIT_FAMILIES,
    PromptTokens,
    StaticPrompts,
    VisualPromptConfig,
    attach_prompts,
    patch_fan_in,
    patch_grid,
    vit_backbone,
)


@dataclass
class VAPTConfig(VisualPromptConfig):
    """VAPT (Le et al., 2025): prompts of layer l >= 1 computed from that layer's patch tokens.

    ``P_l = T + W2 dropout(act(W1 T))`` with ``T = A_l · dropout(k_l * LN_l(X_l)) + b_l``, where
    X_l is the layer input's patch grid, ``k_l * ·`` a ``kernel_size`` x ``kernel_size``
    filter applied to every channel (N(0, 1) at init), and A_l a zero-initialised map from
    grid positions to ``n_prompt`` tokens; W1 (``mlp_hidden`` x d), W2 are shared by all
    layers. ``channel_dropout`` and ``mlp_dropout`` are the reference code's two dropouts
    (0.1 each); ``kernel_size`` 2 and the per-layer LayerNorm's ``norm_eps`` 1e-5 are the
    official config's (``None``: the backbone's ``layer_norm_eps``, 1e-12 for ViT, what
    adapters saved before ``norm_eps`` existed use). Layer 0 uses static prompts as in
    VPT. ``image_size`` (int or [height, width]) fixes the patch grid A_l is built for;
    ``None`` takes the model config's ``image_size``.

    >>> VAPTConfig(n_prompt=10, mlp_hidden=8).kernel_size
    2
    """

    method: ClassVar[str] = "vapt"
    saved_before: ClassVar[dict[str, Any]] = {"mlp_dropout": 0.0, "norm_eps": None}

    kernel_size: int = option(2, minimum=1)
    channel_dropout: float = option(0.1, minimum=0.0, below=1.0)
    mlp_hidden: int = option(8, minimum=1)
    mlp_dropout: float = option(0.1, minimum=0.0, below=1.0)
    activation: str = option("relu", choices=tuple(ACTIVATIONS))
    image_size: int | list[int] | None = None
    norm_eps: float | None = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number or None (the backbone's eps), got {self.norm_eps!r}")
        if self.image_size is not None:
            size = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
                raise ValueError(f"image_size must be a positive int or [height, width], got {self.image_size!r}")
            self.image_size = size if size[0] != size[1] else size[0]


class PatchesToTokens(nn.Module):
    """T = A · dropout(k * LN(X)) + b: one layer's patch grid to (batch, n_prompt, d) tokens.

    The filter k and the map A both act on grid positions only, the same way on
    every channel, so they compose into one (n_prompt x HW) map over the original
    grid, ``M = A ⊛ k`` (each row of A, seen as an H' x W' image, fully convolved
    with k), and channel dropout commutes with both. Computing
    ``T = dropout(M LN(X)) + b`` gives the same tokens while keeping only LN(X) for
    backward, not the filtered (d, H', W') grid of every layer.
    """

    def __init__(self, hidden_size: int, grid: tuple[int, int], kernel_size: int, n_prompt: int,
                 channel_dropout: float, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        # A single filter for all channels: the paper's channel-wise convolution, K^2 parameters.
        # N(0, 1), as the reference code's ChannelWiseConv2d (torch.randn), not nn.Conv2d's 1/K-sized init.
        self.kernel = nn.Parameter(torch.randn(1, 1, kernel_size, kernel_size))
        # Zeroes whole channels of (batch, d, n_prompt), as Dropout2d would on (batch, d, H', W').
        self.channel_dropout = nn.Dropout1d(channel_dropout)
        self.filtered_grid = (grid[0] - kernel_size + 1, grid[1] - kernel_size + 1)
        self.token_map = nn.Linear(self.filtered_grid[0] * self.filtered_grid[1], n_prompt)
        # Zero map: prompts start at exactly zero and grow from there.
        nn.init.zeros_(self.token_map.weight)
        nn.init.zeros_(self.token_map.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        maps = self.token_map.weight.view(-1, 1, *self.filtered_grid)
        combined = F.conv_transpose2d(maps, self.kernel).flatten(1)  # M = A ⊛ k, (n_prompt, H W)
        tokens = combined @ self.norm(patches)  # (batch, n_prompt, d)
        tokens = self.channel_dropout(tokens.transpose(1, 2)).transpose(1, 2)
        return tokens + self.token_map.bias[:, None]


class AdaptivePrompts(PromptTokens):
    """VAPT's prompts: static for layer 0, ``P_l = T_l + MLP(T_l)`` from the patch tokens after that."""

    def __init__(self, backbone_config, grid: tuple[int, int], config: VAPTConfig) -> None:
        super().__init__()
        c, d = backbone_config, backbone_config.hidden_size
        self.n_prompt = config.n_prompt
        self.grid = grid
        self.first = StaticPrompts(1, config.n_prompt, d, patch_fan_in(c), config.prompt_dropout)
        self.layers = nn.ModuleDict({
            str(layer): PatchesToTokens(d, grid, config.kernel_size, config.n_prompt, config.channel_dropout,
                                        layer_norm_eps(c, config))
            for layer in range(1, c.num_hidden_layers)
        })
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_hidden, bias=False),
            # One slot for activation and dropout keeps the saved names (mlp.0, mlp.2) of older adapters.
            nn.Sequential(ACTIVATIONS[config.activation](), nn.Dropout(config.mlp_dropout)),
            nn.Linear(config.mlp_hidden, d, bias=False),
        )

    def forward(self, layer: int, patches: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            return self.first(0, patches)
        # Adapter maths in the adapter's dtype (fp32 by default) under a half-precision base.
        tokens = self.layers[str(layer)](patches.to(self.mlp[0].weight.dtype))
        return tokens + self.mlp(tokens)


@register_method(
    VAPTConfig, families=VIT_FAMILIES, identity_at_init=False, generates_with_cache=False, vision_only=True,
    example={"n_prompt": 3, "kernel_size": 2, "mlp_hidden": 4},
)
def inject_vapt(model, adapter_name: str, config: VAPTConfig) -> None:
    _, backbone = vit_backbone(model.get_base_model())
    c = backbone.config
    image_size = config.image_size if config.image_size is not None else c.image_size
    grid = patch_grid(image_size, c.patch_size)
    if min(grid) < config.kernel_size:
        raise ValueError(
            f"kernel_size {config.kernel_size} does not fit the {grid[0]}x{grid[1]} patch grid of "
            f"{image_size} images with patch_size {c.patch_size}; use kernel_size <= {min(grid)}"
        )
    _warn_if_float16_layer_norm_overflows(backbone, config)
    attach_prompts(model, adapter_name, AdaptivePrompts(c, grid, config))


def layer_norm_eps(backbone_config, config: VAPTConfig) -> float:
    """The eps of VAPT's per-layer LayerNorms: ``config.norm_eps``, or the backbone's when it is None."""
    return config.norm_eps if config.norm_eps is not None else getattr(backbone_config, "layer_norm_eps", 1e-5)


def _warn_if_float16_layer_norm_overflows(backbone: nn.Module, config: VAPTConfig) -> None:
    """VAPT's prompts start at exactly zero; a float16 LayerNorm with a tiny eps has no finite gradient there.

    For a constant token the LayerNorm's 1/sqrt(var + eps) is 1/sqrt(eps): 1e6 for
    ViT's eps 1e-12, past float16's largest value (65504), so the first backward
    pass returns NaN gradients (measured on CPU; eps 1e-9 and above are fine). The
    LayerNorms in question are the backbone's own (before attention and MLP), which
    see the prompt tokens; VAPT's ``norm_eps`` does not change this.
    """
    if config.inference_mode or backbone.dtype != torch.float16:
        return
    eps = getattr(backbone.config, "layer_norm_eps", 1e-5)
    if eps ** -0.5 > torch.finfo(torch.float16).max:
        warnings.warn(
            f"training VAPT on a float16 model whose LayerNorm eps is {eps:g}: its prompts start at zero, where "
            "that LayerNorm's gradient overflows float16 and the first step turns NaN. Load the model in bfloat16, "
            "or in float32 with fp16 autocast (accelerate's --mixed_precision fp16)",
            stacklevel=4,
        )
