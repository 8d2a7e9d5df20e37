"""Adapter matmul kernels.

This package knows nothing of transformers: it takes tensors and returns tensors.
``lora_linear`` computes ``x W^T + b + s * dropout(x) A^T B^T`` and
``add_lora`` adds the low-rank term to an output some other layer already
computed (GPT-2's Conv1D, quantized bases).

Backends: ``"torch"`` (``lora_torch``, the reference) and ``"triton"`` (fused
kernels in ``lora_triton``, wired as custom ops in ``lora_ops``). ``"auto"``
picks Triton for CUDA tensors it supports and torch otherwise; the environment
variable ``REPEFT_KERNEL`` (``auto``, ``triton`` or ``torch``) replaces the
default ``"auto"``. Under autocast both compute in the autocast dtype, as
``F.linear`` does. Triton is optional: it is imported only when first used.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .lora_torch import add_lora
from .lora_torch import lora_linear as lora_linear_torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "REPEFT_KERNEL"
MAX_TRITON_RANK = 256  # the kernels hold a whole rank block in registers
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_triton_ops = None  # repeft.kernels.lora_ops once imported


def _load_triton_ops():
    global _triton_ops
    if _triton_ops is None:
        if not _HAS_TRITON:
            raise ImportError("backend='triton' needs the triton package: pip install 'repeft[triton]'")
        from . import lora_ops

        _triton_ops = lora_ops
    return _triton_ops


def _autocast_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would compute ``F.linear`` in for these tensors, or None if it would not cast them."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type) or any(t.dtype not in TRITON_DTYPES for t in tensors):
        return None
    return torch.get_autocast_dtype(device_type)


def triton_unavailable_reason() -> str | None:
    """Why Triton cannot run on this machine at all, or ``None`` if it may (for some tensors)."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device, and TRITON_INTERPRET is not 1"
    return None


def triton_unsupported_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
) -> str | None:
    """Why the Triton kernels cannot take these tensors, or ``None`` if they can.

    CPU tensors count as supported only under ``TRITON_INTERPRET=1``.
    """
    if not _HAS_TRITON:
        return "triton is not installed"
    tensors = [x, weight, lora_A, lora_B] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        return "tensors are on different devices"
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1"
    if x.device.type not in ("cuda", "cpu"):
        return f"device {x.device.type} is not supported"
    autocast_dtype = _autocast_dtype(x, weight, lora_A, lora_B)
    dtype = autocast_dtype or x.dtype
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} is not one of {TRITON_DTYPES}"
    if autocast_dtype is None and any(t.dtype != x.dtype for t in (weight, lora_A, lora_B)):
        return "x, weight, lora_A and lora_B must share one dtype (or run under autocast)"
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return "weight, lora_A and lora_B must be 2-D"
    if lora_A.shape[0] > MAX_TRITON_RANK:
        return f"rank {lora_A.shape[0]} exceeds {MAX_TRITON_RANK}"
    return None


def resolve_backend(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
) -> str:
    """The backend (``"triton"`` or ``"torch"``) that ``lora_linear`` will use for these tensors."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS} (check {ENV_VAR})")
    if backend == "torch":
        return "torch"
    reason = triton_unsupported_reason(x, weight, bias, lora_A, lora_B)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        return "triton"
    # auto: Triton on CUDA only; on CPU the interpreter is for tests, not speed.
    return "triton" if reason is None and x.device.type == "cuda" else "torch"


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
    """``x W^T + b + scaling * dropout(x) A^T B^T``, on the best backend for these tensors.

    ``weight`` is ``d_out x d_in``, ``lora_A`` ``r x d_in``, ``lora_B`` ``d_out x r``;
    ``x`` has any leading shape. ``backend`` is ``"auto"``, ``"triton"`` or ``"torch"``
    (see the module docstring for the rules).
    """
    if resolve_backend(backend, x, weight, bias, lora_A, lora_B) == "triton":
        ops = _load_triton_ops()
        dtype = _autocast_dtype(x, weight, lora_A, lora_B)
        if dtype is not None:
            # What autocast does for F.linear: compute in its dtype. The casts are
            # differentiable, so fp32 adapters still get fp32 gradients.
            x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
            bias = None if bias is None else bias.to(dtype)
        return ops.lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)


__all__ = [
    "BACKENDS",
    "add_lora",
    "lora_linear",
    "resolve_backend",
    "triton_unavailable_reason",
    "triton_unsupported_reason",
]
