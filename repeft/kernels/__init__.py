"""Adapter matmul kernels.

This package knows nothing of transformers: it takes tensors and returns tensors.
``lora_linear`` computes ``x W^T + b + s * dropout(x) A^T B^T`` and
``add_lora`` adds the low-rank term to an output some other layer already
computed (GPT-2's Conv1D, quantized bases).
"""

from __future__ import annotations

import torch

from .lora_torch import add_lora
from .lora_torch import lora_linear as lora_linear_torch


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T``, on the best backend for these tensors."""
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)


__all__ = ["add_lora", "lora_linear"]
