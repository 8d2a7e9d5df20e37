"""Adapter matmul kernels.

This package knows nothing of transformers: it takes tensors and returns tensors.
``lora_linear`` computes ``x W^T + b + s * dropout(x) A^T B^T``; ``add_lora``
adds the low-rank term to an output some other layer already computed (GPT-2's
Conv1D, quantized bases); ``add_lora_mixed`` adds a different adapter's term
to each row of a batch (mixed-adapter inference).

Backends: ``"torch"`` (``lora_torch`` / ``mixed_torch``, the references) and
``"triton"`` (fused kernels in ``lora_triton`` / ``mixed_triton``, the LoRA
matmul wired as custom ops in ``lora_ops``). ``"auto"`` uses a fused kernel for
a shape bucket only after checking, once per process, that it matches torch
and is faster (``dispatch``); the environment variable ``REPEFT_KERNEL``
(``auto``, ``triton`` or ``torch``) replaces the default ``"auto"``. Under
autocast both compute in the autocast dtype, as ``F.linear`` does. Triton is
optional: it is imported only when first used.
"""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    Decision,
    KernelError,
    check_backend_runs_here,
    clear_decisions,
    format_report,
    kernel_report,
    mixed_unsupported_reason,
    triton_unavailable_reason,
    triton_unsupported_reason,
)
from .lora_torch import add_lora
from .lora_torch import lora_linear as lora_linear_torch
from .mixed_torch import add_lora_mixed as add_lora_mixed_torch


def resolve_backend(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> str:
    """The backend (``"triton"`` or ``"torch"``) that ``lora_linear`` will use for these arguments.

    With ``"auto"`` on a GPU, the first call of a shape bucket runs the check
    (see ``repeft.kernels.dispatch``); ``kernel_report()`` says what was chosen and why.
    """
    backend = dispatch.explicit_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return dispatch.require_triton(triton_unsupported_reason(x, weight, bias, lora_A, lora_B))
    if x.device.type not in dispatch.AUTO_DEVICES or torch.compiler.is_compiling():
        # The Triton interpreter (CPU) is for tests, not speed; under torch.compile
        # inductor fuses the torch path itself, and nothing can be timed while tracing.
        return "torch"
    return dispatch.choose_lora_linear(x, weight, bias, lora_A, lora_B, dropout_p, training).backend


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

    >>> x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    >>> lora_linear(x, w, None, a, b, 0.5).shape
    torch.Size([3, 5])
    """
    if resolve_backend(backend, x, weight, bias, lora_A, lora_B, dropout_p, training) == "triton":
        ops = dispatch.load_triton_ops()
        dtype = dispatch.autocast_dtype(x, weight, lora_A, lora_B)
        if dtype is not None:
            # What autocast does for F.linear: compute in its dtype. The casts are
            # differentiable, so fp32 adapters still get fp32 gradients.
            x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
            bias = None if bias is None else bias.to(dtype)
        return ops.lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)


def add_lora_mixed(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    adapter_index: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Add adapter ``adapter_index[b]``'s low-rank term to row ``b`` of ``out`` (``-1``: none), in place.

    Shapes as in ``mixed_torch.add_lora_mixed`` (stacked factors ``n x r x d_in`` and
    ``n x d_out x r``, ``scaling`` of ``n``, ``adapter_index`` of ``batch``). ``"triton"``
    runs two launches for all adapters (inference only); ``"auto"`` chooses as for ``lora_linear``.

    >>> x, out = torch.randn(2, 3, 4), torch.zeros(2, 3, 5)
    >>> A, B = torch.randn(1, 2, 4), torch.randn(1, 5, 2)
    >>> add_lora_mixed(out, x, A, B, torch.tensor([1.0]), torch.tensor([-1, 0]))[0].abs().sum().item()
    0.0
    """
    backend = dispatch.explicit_backend(backend)
    if backend == "triton":
        dispatch.require_triton(mixed_unsupported_reason(out, x, lora_A, lora_B))
    elif backend == "auto" and x.device.type in dispatch.AUTO_DEVICES and not torch.compiler.is_compiling():
        backend = dispatch.choose_lora_mixed(out, x, lora_A, lora_B).backend
    if backend == "triton":
        from . import mixed_triton

        return mixed_triton.add_lora_mixed(out, x, lora_A, lora_B, scaling, adapter_index)
    return add_lora_mixed_torch(out, x, lora_A, lora_B, scaling, adapter_index)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Decision",
    "KernelError",
    "add_lora",
    "add_lora_mixed",
    "check_backend_runs_here",
    "clear_decisions",
    "format_report",
    "kernel_report",
    "lora_linear",
    "resolve_backend",
    "triton_unavailable_reason",
    "triton_unsupported_reason",
]
