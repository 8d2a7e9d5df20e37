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

DoRA (``use_dora``) as PEFT's ``DoraConvNdVariant``: the magnitude m has PEFT's
shape (1 x out x 1 ...), ``||W + s B A||`` of each output channel (over its
input channels and kernel) at init; ``h = h_W + (g - 1) conv(x', W) + g s B A x'``
with g = m / ||W + s B A|| (a constant, as in ``repeft.dora``) and x' the
dropped-out input (without dropout ``conv(x', W)`` is the base output less its
bias); a merge writes ``g (W + s B A)``.

Refused by name, where PEFT's own adapter would not match its merged weights
or is not defined: a base with ``dilation`` > 1 or a ``padding_mode`` other than
``"zeros"`` (PEFT's A ignores both), RepLoRA on a convolution, and merging a
grouped convolution (``groups`` > 1: B A is then a dense convolution, which a
grouped weight cannot hold; PEFT refuses it too). A grouped convolution trains,
runs, saves and exchanges with PEFT, DoRA included (its norm as PEFT computes
it, see ``LoRAConv._low_rank_weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .lora import DTYPES, LoRAConfig, LoRALinear, init_factors
from .lora_bias import add_lora_bias, lora_bias
from .lora_embedding import AddedLowRank
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
        if config.lora_bias:
            # B is a 1x1 conv over r / groups channels: nn.Conv's bias init bound is 1/sqrt of that fan-in.
            add_lora_bias(self, base.out_channels, config.r // base.groups, config.init_lora_weights, None, dtype)
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = "torch"  # the fused kernel is for linear layers

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B


class LoRAConv(AddedLowRank, LoRALinear):
    """An ``nn.Conv1d``/``Conv2d``/``Conv3d`` plus named low-rank adapters (see the module docstring).

    ``in_features``/``out_features`` are the base layer's channels, as in PEFT.
    """

    def feature_sizes(self, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    def new_factors(self, config: LoRAConfig) -> LoRAConvFactors:
        return LoRAConvFactors(self.base_layer, config)

    def low_rank_out(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``s * conv1x1(conv(dropout(x), A), B)`` in the adapter's dtype, as PEFT computes it."""
        x = x.to(adapter.lora_A.dtype)
        if adapter.dropout_p > 0.0 and self.training:
            x = F.dropout(x, adapter.dropout_p, training=True)
        return self._low_rank(adapter, x)

    def _low_rank(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = adapter.factors()
        base = self.base_layer
        after_A = self._conv(x, lora_A, None, base.stride, base.padding)
        return self._conv(after_A, lora_B, lora_bias(adapter), 1, 0, 1, base.groups) * adapter.scaling

    @property
    def _conv(self):
        return CONV_FUNCTIONS[len(self.base_layer.kernel_size)]

    def _channel_shape(self) -> tuple[int, ...]:
        """A per-output-channel vector's shape against the output (1 x out x 1 ...), PEFT's DoRA magnitude's."""
        return (1, self.out_features) + (1,) * len(self.base_layer.kernel_size)

    def add_magnitude(self, adapter: nn.Module, dtype: torch.dtype) -> None:
        """DoRA's magnitude, ``||W + s B A||`` of each output channel at init, shaped as PEFT's (1 x out x 1 ...)."""
        with torch.no_grad():
            if adapter.lora_A.is_meta:  # a load checking shapes first
                value = torch.empty(self._channel_shape(), dtype=dtype, device="meta")
            else:
                value = self._dora_norm(adapter).view(self._channel_shape()).to(dtype)
        adapter.register_parameter(dora.MAGNITUDE, nn.Parameter(value))

    def _dora_norm(self, adapter: nn.Module) -> torch.Tensor:
        """``||W + s B A||`` of each output channel, fp32 and outside autograd (DoRA's constant norm)."""
        return dora.row_norm(self.base_layer.weight, self._low_rank_weight(adapter))

    def _dora_forward(self, adapter: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA on a convolution: ``result + (g - 1) conv(x', W) + g s B A x'``, g = m / ||W + s B A||.

        x' is x after dropout; without dropout ``conv(x', W)`` is the base output less its bias.
        """
        base = self.base_layer
        x = x.to(adapter.lora_A.dtype)
        gain = dora.magnitude(adapter) / self._dora_norm(adapter).view(self._channel_shape())
        if adapter.dropout_p > 0.0 and self.training:
            x = F.dropout(x, adapter.dropout_p, training=True)
            base_result = self._conv(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)
        else:
            base_result = result if base.bias is None else result - base.bias.view(self._channel_shape())
        return (result + (gain - 1) * base_result + gain * self._low_rank(adapter, x)).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B A`` in fp32, laid out like the base weight (out x in x kernel)."""
        if self.base_layer.groups > 1:
            raise ValueError(
                f"cannot merge LoRA into a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: "
                "its low-rank term is a dense convolution, which the grouped weight cannot hold (PEFT refuses this "
                "merge too); keep the adapter unmerged (it runs as is), or target ungrouped convolutions only"
            )
        return self._low_rank_weight(self.adapters[name])

    def _low_rank_weight(self, adapter: nn.Module) -> torch.Tensor:
        """``s * B A`` as PEFT computes it: B's weights read as a (-1 x r) matrix, A's as (r x -1).

        Without groups that is B A contracted over r. With groups, PEFT's DoRA norm reads the grouped B the same
        way (then it is not the dense term the layer adds; merging stays refused), and repeft's follows it.
        """
        with torch.no_grad():
            lora_A, lora_B = adapter.factors()
            r = lora_A.shape[0]
            delta = (lora_B.float().reshape(-1, r) @ lora_A.float().reshape(r, -1)) * adapter.scaling
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
        r = config.for_module(path).r
        if r % layer.groups:
            raise TargetError(
                f"LoRA with r={r} on the {kind} {path!r} with groups={layer.groups}: as in PEFT, r must be a "
                "multiple of groups (B is a grouped 1x1 convolution); choose such an r (rank_pattern sets it for "
                "this layer alone) or leave the layer out of target_modules"
            )
        if any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros":
            raise TargetError(
                f"target_modules select the {kind} {path!r} with dilation={layer.dilation}, "
                f"padding_mode={layer.padding_mode!r}: PEFT's LoRA convolves with dilation 1 and zero padding "
                "whatever the base layer does, so its adapter does not match its merged weights; repeft adapts "
                "convolutions with dilation 1 and padding_mode='zeros' only. Leave it out of target_modules"
            )
