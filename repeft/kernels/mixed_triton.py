"""Triton kernels for mixed-adapter LoRA: one launch per stage for all adapters of a layer.

Every row b of the batch (a sequence, ``S`` tokens) uses adapter
``i = adapter_index[b]`` (``-1``: none). The rows of one sequence share their
adapter, so each program works on a tile of one sequence and needs one
adapter's factors, read through an offset (a gathered, segmented matmul):

``_segment_shrink_kernel``  ``u[b] = scaling[i] * x[b] A[i]^T`` (S x r per row)
``_segment_expand_kernel``  ``out[b] += u[b] B[i]^T``, read-add-write of the
    base output in one pass.

Rows without an adapter skip their loops. The reference is
``mixed_torch.add_lora_mixed``; accumulation is fp32, ``u`` is stored in the
input dtype as the reference's is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_triton import _dot, _dot_options, _rank_block


@triton.jit
def _segment_shrink_kernel(
    X, A, Scaling, Index, U,
    S, K, R, blocks_per_row,
    stride_xb, stride_xs, stride_xk, stride_an, stride_ar, stride_ak, stride_ub, stride_us, stride_ur,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // blocks_per_row
    adapter = tl.load(Index + b).to(tl.int64)
    if adapter >= 0:
        offs_s = (pid % blocks_per_row) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_r = tl.arange(0, BLOCK_R)
        s_ok = offs_s < S
        r_ok = offs_r < R
        x_row = X + b.to(tl.int64) * stride_xb
        a_mat = A + adapter * stride_an
        u = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x_tile = tl.load(x_row + offs_s[:, None] * stride_xs + offs_k[None, :] * stride_xk,
                             mask=s_ok[:, None] & k_ok[None, :], other=0.0)
            a_tile = tl.load(a_mat + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                             mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            u = _dot(x_tile, a_tile, u, INPUT_PRECISION, UPCAST)
        u = u * tl.load(Scaling + adapter)
        tl.store(U + b.to(tl.int64) * stride_ub + offs_s[:, None] * stride_us + offs_r[None, :] * stride_ur,
                 u.to(U.dtype.element_ty), mask=s_ok[:, None] & r_ok[None, :])


@triton.jit
def _segment_expand_kernel(
    U, B, Index, Out,
    S, N, R, blocks_per_row,
    stride_ub, stride_us, stride_ur, stride_bn_adapter, stride_bn, stride_br, stride_ob, stride_os, stride_on,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // blocks_per_row
    adapter = tl.load(Index + b).to(tl.int64)
    if adapter >= 0:
        offs_s = (pid % blocks_per_row) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        s_ok = offs_s < S
        n_ok = offs_n < N
        u_row = U + b.to(tl.int64) * stride_ub
        b_mat = B + adapter * stride_bn_adapter
        acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            u_tile = tl.load(u_row + offs_s[:, None] * stride_us + offs_r[None, :] * stride_ur,
                             mask=s_ok[:, None] & r_ok[None, :], other=0.0)
            b_tile = tl.load(b_mat + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                             mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(u_tile, b_tile, acc, INPUT_PRECISION, UPCAST)
        out_ptrs = Out + b.to(tl.int64) * stride_ob + offs_s[:, None] * stride_os + offs_n[None, :] * stride_on
        ok = s_ok[:, None] & n_ok[None, :]
        acc += tl.load(out_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=ok)


def _mixed_config(S: int, device: torch.device) -> dict:
    if device.type != "cuda":
        # One small fixed config for the interpreter (see lora_triton).
        return dict(BLOCK_S=16, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1)
    # Decode (S = 1) wastes most of a 16-row tile but stays one launch per stage.
    block_s = 16 if S <= 16 else 64
    return dict(BLOCK_S=block_s, BLOCK_K=128 if block_s == 16 else 64, BLOCK_N=128, num_warps=4, num_stages=3)


def add_lora_mixed(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``mixed_torch.add_lora_mixed`` in two launches, whatever the number of adapters (inference only)."""
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])
    out3 = out.view(batch, -1, out.shape[-1])
    S, K = x3.shape[1], x3.shape[2]
    N, R = out3.shape[2], lora_A.shape[1]
    if batch == 0 or S == 0:
        return out
    cfg = _mixed_config(S, x.device)
    block_s, warps, stages = cfg["BLOCK_S"], cfg["num_warps"], cfg["num_stages"]
    blocks_per_row = triton.cdiv(S, block_s)
    u = torch.empty(batch, S, R, device=x.device, dtype=x.dtype)
    scaling = scaling.to(x.device, torch.float32)
    dot = _dot_options(x.dtype, x.device)
    rank_block = _rank_block(R)
    _segment_shrink_kernel[(batch * blocks_per_row,)](
        x3, lora_A, scaling, adapter_index, u,
        S, K, R, blocks_per_row,
        *x3.stride(), *lora_A.stride(), *u.stride(),
        BLOCK_S=block_s, BLOCK_K=cfg["BLOCK_K"], BLOCK_R=rank_block, num_warps=warps, num_stages=stages, **dot,
    )
    _segment_expand_kernel[(batch * blocks_per_row, triton.cdiv(N, cfg["BLOCK_N"]))](
        u, lora_B, adapter_index, out3,
        S, N, R, blocks_per_row,
        *u.stride(), *lora_B.stride(), *out3.stride(),
        BLOCK_S=block_s, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=min(rank_block, 64),
        num_warps=warps, num_stages=stages, **dot,
    )
    return out
