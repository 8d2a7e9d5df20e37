"""Pure-torch LoRA matmul: the reference every other backend must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Return ``out + scaling * dropout(x) @ A^T @ B^T`` (``out`` may be updated in place).

    ``out`` must be a fresh tensor whose value no autograd node needs (a layer's
    output is), so the low-rank product is accumulated into it with one GEMM
    instead of writing a second full-size tensor and adding the two.
    """
    if dropout_p > 0.0 and training:
        x = F.dropout(x, dropout_p, training=True)
    shrunk = F.linear(x, lora_A).reshape(-1, lora_A.shape[0])
    out2d = out.view(-1, out.shape[-1])
    # In-place addmm_ is outside autocast's op list, so under autocast (bf16
    # out, fp32 adapter) cast by hand as autocast would; a no-op otherwise.
    out2d.addmm_(shrunk.to(out.dtype), lora_B.t().to(out.dtype), alpha=scaling)
    return out


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` for a frozen ``W`` (d_out x d_in)."""
    return add_lora(F.linear(x, weight, bias), x, lora_A, lora_B, scaling, dropout_p, training)
