"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) on a ``LoRALinear``, as PEFT computes it.

A DoRA adapter is a LoRA adapter (any factors module: LoRA's free A and B or
RepLoRA's computed ones) plus a trainable magnitude vector m, one entry per
output feature, stored on the factors module as ``lora_magnitude_vector``:

    W' = m / ||W + s B A||_row * (W + s B A)

``||.||_row`` is the norm of each output row (PEFT's "column-wise" norm of the
d_out x d_in weight). m starts as ``||W + s B A||_row``, so W' = W + s B A at
init (the base model, since B = 0). As in the paper (section 4.3) and PEFT, the
norm is treated as a constant: no gradient flows through it.

Forward, with g = m / ||W + s B A||_row and b the base layer's bias:

- dropout off (eval, or ``lora_dropout=0``): ``g * (W x + s B A x) + b``; the
  bracket is ``repeft.kernels.lora_linear`` on a plain ``nn.Linear``, so the
  fused kernel (``kernel``) computes it;
- dropout on: PEFT's ``W x + b + (g - 1) W x' + g s B A x'`` with x' = dropout(x):
  the magnitude rescales the dropped-out input's base term, as in PEFT. This
  needs the dropped-out ``W x'`` beside the base output, so it runs on torch.

The norm is computed in float32 from the dequantized weight, so DoRA works on
bitsandbytes 4-bit/8-bit bases too (QDoRA), as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import add_lora, lora_linear
from .quantization import dequantize_weight, quant_type

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, in PEFT's files and in repeft's


def magnitude(adapter: nn.Module) -> torch.Tensor | None:
    """The adapter's DoRA magnitude vector, or None for a plain LoRA adapter."""
    return adapter._parameters.get(MAGNITUDE)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a d_out x d_in matrix (dequantized to float32 for a bitsandbytes layer)."""
    base = layer.base_layer
    weight = dequantize_weight(base) if quant_type(base) is not None else base.weight
    return weight.T if layer.fan_in_fan_out else weight


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||W + delta||`` of each output row (a convolution's: over its input channels and kernel), in float32 and
    outside autograd (DoRA's constant norm)."""
    with torch.no_grad():
        return torch.linalg.norm((weight.float() + delta.float()).flatten(1), dim=1)


def add_magnitude(layer: nn.Module, adapter: nn.Module, dtype: torch.dtype) -> None:
    """Give ``adapter`` (a factors module of ``layer``) DoRA's magnitude, initialised to ``||W + s B A||_row``.

    An adapter built on the meta device (a load checking shapes first) gets an empty one.
    """
    with torch.no_grad():
        lora_A, lora_B = adapter.factors()
        if lora_A.is_meta:
            value = torch.empty(layer.out_features, dtype=dtype, device="meta")
        else:
            value = row_norm(dense_weight(layer), adapter.scaling * (lora_B.float() @ lora_A.float())).to(dtype)
    adapter.register_parameter(MAGNITUDE, nn.Parameter(value))


def dora_forward(layer: nn.Module, adapter: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The DoRA layer's output for ``x`` (see the module docstring)."""
    lora_A, lora_B = (f.to(x.dtype) for f in adapter.factors())
    scaling = adapter.scaling
    weight = dense_weight(layer)
    norm = row_norm(weight, scaling * (lora_B.detach().float() @ lora_A.detach().float()))
    gain = (magnitude(adapter) / norm).to(x.dtype)
    base = layer.base_layer
    if adapter.dropout_p > 0.0 and layer.training:
        dropped = F.dropout(x, adapter.dropout_p, training=True)
        low_rank = F.linear(F.linear(dropped, lora_A), lora_B) * scaling
        return base(x, *args, **kwargs) + (gain - 1) * F.linear(dropped, weight.to(x.dtype)) + gain * low_rank
    if type(base) is nn.Linear:
        unbiased = lora_linear(x, base.weight, None, lora_A, lora_B, scaling, backend=adapter.kernel)
    else:
        out = layer.base_out(x, *args, **kwargs)
        unbiased = add_lora(out if base.bias is None else out - base.bias, x, lora_A, lora_B, scaling)
    out = gain.to(unbiased.dtype) * unbiased
    return out if base.bias is None else out + base.bias


def merge_gain(layer: nn.Module, adapter: nn.Module, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output gain ``m / ||W + delta||_row`` shaped to multiply a weight laid out like the base layer's.

    ``weight`` and ``delta`` are laid out like the base layer's weight (d_in x d_out for GPT-2's Conv1D,
    out x in x kernel for a convolution, whose magnitude PEFT shapes 1 x out x 1 ...).
    """
    if layer.fan_in_fan_out:
        weight, delta = weight.T, delta.T
    gain = magnitude(adapter).detach().float().reshape(-1) / row_norm(weight, delta)
    return gain.view(1, -1) if layer.fan_in_fan_out else gain.view(-1, *(1,) * (weight.dim() - 1))
