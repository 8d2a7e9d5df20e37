"""Pure-torch mixed-adapter LoRA: a different adapter (or none) for each row of a batch.

The reference the segmented Triton kernels (``mixed_triton``) must match, and
the path ``backend="torch"`` runs. It gathers each row's factors and does two
batched matmuls, so its cost does not grow with the number of adapters and it
never syncs with the host (PEFT's mixed batch loops over adapters in Python).
"""

from __future__ import annotations

import torch


def add_lora_mixed(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``out[b] += scaling[i] * x[b] A[i]^T B[i]^T`` with ``i = adapter_index[b]``; rows with ``i < 0`` keep ``out``.

    ``x`` is ``batch x ... x d_in`` and ``out`` (updated in place, so no autograd
    node may need it) ``batch x ... x d_out``; ``lora_A`` is ``n x r x d_in``,
    ``lora_B`` ``n x d_out x r`` (adapters of lower rank padded with zeros),
    ``scaling`` has ``n`` entries, ``adapter_index`` is ``batch`` integers.

    >>> x, out = torch.randn(2, 3, 4), torch.zeros(2, 3, 5)
    >>> A, B = torch.randn(1, 2, 4), torch.randn(1, 5, 2)
    >>> y = add_lora_mixed(out, x, A, B, torch.tensor([1.0]), torch.tensor([0, -1]))
    >>> bool(y[1].eq(0).all()), torch.allclose(y[0], x[0] @ A[0].T @ B[0].T, atol=1e-5)
    (True, True)
    """
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])
    out3 = out.view(batch, -1, out.shape[-1])
    rows = adapter_index.clamp_min(0)
    row_scale = torch.where(adapter_index >= 0, scaling.to(x.device, torch.float32)[rows], 0.0)
    shrunk = torch.bmm(x3, lora_A[rows].transpose(1, 2)) * row_scale[:, None, None].to(x.dtype)
    # As add_lora: the product goes into out in its dtype (autocast does not cover baddbmm_).
    out3.baddbmm_(shrunk.to(out.dtype), lora_B[rows].transpose(1, 2).to(out.dtype))
    return out
