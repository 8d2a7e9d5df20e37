"""LoRA on ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``, as PEFT 0.21 computes it (``peft.tuners.lora.layer._ConvNd``).

The factors are conv weights under PEFT's names and shapes:

- ``lora_A`` (r x in_channels x kernel): a convolution with the base layer's
  kernel size, stride and padding (no groups), kaiming-uniform at init
  (``"gaussian"``: normal(0, 1/r));
- ``lora_B`` (out_channels x r/groups x 1 ...): a 1x1 convolution with the
  base layer's groups, zero at init (``init_lora_weights=False``: both drawn
  as ``nn.Conv`` draws its weight).

``h = conv(x, W) + s * conv1x1(conv(dropout(x), A), B)``, the low-rank term
computed in the adapter's dtype and the sum cast back to the base output's.
The delta folded in by a merge is ``s * B A`` contracted over r, one matrix
product per kernel offset, laid out like the base weight (out x in x kernel).

Refused by name, where PEFT's own adapter would not match its merged weights
or is not defined: a base with ``dilation`` > 1 or a ``padding_mode`` other than
``"zeros"`` (PEFT's A ignores both), DoRA and RepLoRA on a convolution, and
merging a grouped convolution (``groups`` > 1: B A is then a dense
convolution, which a grouped weight cannot hold; PEFT refuses it too). A
grouped convolution trains, runs, saves and exchanges with PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import DTYPES, LoRAConfig, LoRALinear, init_factors
from .lora_embedding import sub_batch_forward
from .targeting import TargetError

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dimensions


class LoRAConvFactors(nn.Module):
    """A convolution's factors as conv weights: A (r x in x kernel), B (out x r/groups x 1 ...)."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        dtype = DTYPES[config.dtype]
        ones = (1,) * len(base.kernel_size)
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_channels, *base.kernel_size, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, config.r // base.groups, *ones, dtype=dtype))
        init_factors(self.lora_A, self.lora_B, config)
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = "torch"  # the fused kernel is for linear layers

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B


class LoRAConv(LoRALinear):
    """An ``nn.Conv1d``/``Conv2d``/``Conv3d`` plus named low-rank adapters (see the module docstring).

    ``in_features``/``out_features`` are the base layer's channels, as in PEFT.
    """

    def feature_sizes(self, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    def new_factors(self, config: LoRAConfig) -> LoRAConvFactors:
        groups = self.base_layer.groups
        if config.r % groups:
            raise TargetError(
                f"LoRA with r={config.r} on a {type(self.base_layer).__name__} with groups={groups}: as in PEFT, "
                "r must be a multiple of groups (B is a grouped 1x1 convolution); choose such an r (rank_pattern "
                "sets it for this layer alone) or leave the layer out of target_modules"
            )
        return LoRAConvFactors(self.base_layer, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active
        if adapter is None or self.merged_adapter is not None:
            return result
        return (result + self.low_rank_out(adapter, x)).to(result.dtype)

    def low_rank_out(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``s * conv1x1(conv(dropout(x), A), B)`` in the adapter's dtype, as PEFT computes it."""
        lora_A, lora_B = adapter.factors()
        x = x.to(lora_A.dtype)
        if adapter.dropout_p > 0.0 and self.training:
            x = F.dropout(x, adapter.dropout_p, training=True)
        base = self.base_layer
        conv = CONV_FUNCTIONS[len(base.kernel_size)]
        after_A = conv(x, lora_A, None, base.stride, base.padding)
        return conv(after_A, lora_B, None, 1, 0, 1, base.groups) * adapter.scaling

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sub_batch_forward(self, x, *args, **kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B A`` in fp32, laid out like the base weight (out x in x kernel)."""
        if self.base_layer.groups > 1:
            raise ValueError(
                f"cannot merge LoRA into a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: "
                "its low-rank term is a dense convolution, which the grouped weight cannot hold (PEFT refuses this "
                "merge too); keep the adapter unmerged (it runs as is), or target ungrouped convolutions only"
            )
        adapter = self.adapters[name]
        with torch.no_grad():
            lora_A, lora_B = adapter.factors()
            delta = (lora_B.float().flatten(1) @ lora_A.float().flatten(1)) * adapter.scaling
        return delta.view(self.base_layer.weight.shape)


def refuse_convs(config: LoRAConfig, layers: dict[str, nn.Module]) -> None:
    """Refuse by name, before anything changes, the targeted convolutions repeft cannot adapt as PEFT does."""
    for path, layer in layers.items():
        if not isinstance(layer, CONV_LAYERS):
            continue
        kind = type(layer).__name__
        if config.method != "lora":
            raise TargetError(
                f"target_modules select the {kind} {path!r}: {type(config).__name__} does not adapt convolutions; "
                "leave it out of target_modules (LoRAConfig adapts convolutions; modules_to_save trains one in full)"
            )
        if config.use_dora:
            raise TargetError(
                f"target_modules select the {kind} {path!r}: DoRA on convolutions is not supported by repeft; leave "
                "it out of target_modules, or use use_dora=False (plain LoRA adapts convolutions)"
            )
        if any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros":
            raise TargetError(
                f"target_modules select the {kind} {path!r} with dilation={layer.dilation}, "
                f"padding_mode={layer.padding_mode!r}: PEFT's LoRA convolves with dilation 1 and zero padding "
                "whatever the base layer does, so its adapter does not match its merged weights; repeft adapts "
                "convolutions with dilation 1 and padding_mode='zeros' only. Leave it out of target_modules"
            )
