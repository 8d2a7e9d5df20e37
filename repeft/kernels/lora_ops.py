"""The Triton LoRA matmul as torch custom ops, with autograd and fake (meta) implementations.

Registering the kernels as ``torch.library`` custom ops lets ``torch.compile``
trace through a LoRA layer without graph breaks (the op is opaque to it, its
fake implementation gives shapes) and lets meta/fake tensors flow through.

Forward op ``repeft::lora_linear(x, W, b, A, B, s, p, seed) -> (y, u)`` with
``u = s * dropout(x) A^T`` (M x r). Autograd saves ``x``, ``u`` and the seed
(plus references to the frozen W and the adapter weights, which cost nothing):
no dropout mask, no ``y``. Backward, with ``v = s * dY B`` (M x r):

    dX = dY W + mask/(1-p) * (v A)      one fused GEMM   (repeft::lora_linear_dx)
    dA = v^T dropout(x)                 skinny reduction (repeft::lora_linear_da)
    dB = dY^T u                         small torch matmul
    db = sum_m dY                       only if the bias trains

``dW`` is computed (``dY^T x``) only if the weight requires grad, which LoRA
layers never do.
"""

from __future__ import annotations

import torch

from . import lora_triton

_SEED_HIGH = 2**62


@torch.library.custom_op("repeft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0]), x.new_empty(0, lora_A.shape[0])
    return lora_triton.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("repeft::lora_linear_dx", mutates_args=())
def _lora_linear_dx_op(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    if grad_y.shape[0] == 0:
        return grad_y.new_empty(0, weight.shape[1])
    return lora_triton.lora_backward_dx(grad_y, weight, lora_A, v, dropout_p, seed)


@_lora_linear_dx_op.register_fake
def _(grad_y, weight, lora_A, v, dropout_p, seed):
    return grad_y.new_empty(grad_y.shape[0], weight.shape[1])


@torch.library.custom_op("repeft::lora_linear_da", mutates_args=())
def _lora_linear_da_op(
    x: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    lora_A: torch.Tensor,
) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros_like(lora_A)
    return lora_triton.lora_backward_da(x, v, dropout_p, seed, lora_A.dtype)


@_lora_linear_da_op.register_fake
def _(x, v, dropout_p, seed, lora_A):
    return torch.empty_like(lora_A)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, u = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # u is rarely used: let its gradient arrive as None, not zeros


def _backward(ctx, grad_y, grad_u):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    if grad_y is None:  # only u reached the loss
        grad_y = x.new_zeros(x.shape[0], weight.shape[0])
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    # v is the gradient reaching dropout(x) A^T: through y (s * dY B) and, if
    # someone used it, through u itself (u = s * dropout(x) A^T).
    v = grad_y @ lora_B
    if grad_u is not None:
        v = v + grad_u
    v = v * ctx.scaling
    grad_x = _lora_linear_dx_op(grad_y, weight, lora_A, v, ctx.dropout_p, seed) if need_x else None
    grad_w = grad_y.t() @ x if need_w else None
    grad_b = grad_y.sum(0) if need_b else None
    grad_A = _lora_linear_da_op(x, v, ctx.dropout_p, seed, lora_A) if need_A else None
    grad_B = grad_y.t() @ u if need_B else None
    return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def new_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed drawn from torch's generator for ``device`` (so ``torch.manual_seed`` fixes it)."""
    return torch.randint(0, _SEED_HIGH, (1,), device=device, dtype=torch.int64)


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` with the fused Triton kernels.

    ``x`` may have any leading shape. Dropout is active when ``training`` and
    ``dropout_p > 0``; its mask comes from ``seed`` (an int64 tensor of one
    element on x's device), drawn with :func:`new_seed` when not given.
    """
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = new_seed(x.device)
    elif p == 0.0:
        seed = None
    x2d = x.reshape(-1, x.shape[-1])
    if _needs_autograd(x, weight, bias, lora_A, lora_B) or torch.compiler.is_compiling():
        y, _ = _lora_linear_op(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    elif x2d.shape[0] == 0:
        y = x2d.new_empty(0, weight.shape[0])
    else:
        # Inference: call the launcher directly. The custom op's dispatch costs tens of
        # microseconds of Python per call, as much as a decode step's kernel.
        y, _ = lora_triton.lora_forward(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    return y.view(*x.shape[:-1], weight.shape[0])


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
