"""Triton kernels for mixed-adapter LoRA: one launch per stage for all adapters of a layer.

Every row b of the batch (a sequence, ``S`` tokens) uses adapter
``i = adapter_index[b]`` (``-1``: none). The rows of one sequence share their
adapter, so each program works on a tile of one sequence and needs one
adapter's factors, read through an offset (a gathered, segmented matmul):

``_segment_matmul_kernel`` runs twice: the shrink ``u[b] = scaling[i] * x[b] A[i]^T``
(S x r per row), then the expand ``out[b] += u[b] B[i]^T``, a read-add-write of
the base output in one pass.

Rows without an adapter skip their loops. The reference is
``mixed_torch.add_lora_mixed``; accumulation is fp32, ``u`` is stored in the
input dtype as the reference's is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_triton import _dot, _dot_options, _rank_block, rank_tile_steps


@triton.jit
def _segment_matmul_kernel(
    P, Q, Scaling, Index, Out,
    S, RED, C, blocks_per_row,
    stride_pb, stride_ps, stride_pl, stride_qa, stride_ql, stride_qc, stride_ob, stride_os, stride_oc,
    SCALED: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``Out[b] (+)= scaling[i] * P[b] @ Q[i]`` for ``i = Index[b] >= 0``, one tile of one row's sequence.

    Shrink: P = x (S x d_in), Q[i] = A_i^T, scaled, written. Expand: P = u
    (S x r), Q[i] = B_i^T, added into the base output.
    """
    pid = tl.program_id(0)
    b = pid // blocks_per_row
    adapter = tl.load(Index + b).to(tl.int64)
    if adapter >= 0:
        offs_s = (pid % blocks_per_row) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        s_ok = offs_s < S
        c_ok = offs_c < C
        p_row = P + b.to(tl.int64) * stride_pb
        q_mat = Q + adapter * stride_qa
        acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        for l0 in range(0, RED, BLOCK_RED):
            offs_l = l0 + tl.arange(0, BLOCK_RED)
            l_ok = offs_l < RED
            p_tile = tl.load(p_row + offs_s[:, None] * stride_ps + offs_l[None, :] * stride_pl,
                             mask=s_ok[:, None] & l_ok[None, :], other=0.0)
            q_tile = tl.load(q_mat + offs_l[:, None] * stride_ql + offs_c[None, :] * stride_qc,
                             mask=l_ok[:, None] & c_ok[None, :], other=0.0)
            acc = _dot(p_tile, q_tile, acc, INPUT_PRECISION, UPCAST)
        if SCALED:
            acc = acc * tl.load(Scaling + adapter)
        out_ptrs = Out + b.to(tl.int64) * stride_ob + offs_s[:, None] * stride_os + offs_c[None, :] * stride_oc
        ok = s_ok[:, None] & c_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=ok)


def _mixed_config(S: int, rank_block: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        # One small fixed config for the interpreter (see lora_triton).
        return dict(BLOCK_S=16, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1)
    # Decode (S = 1) wastes most of a 16-row tile but stays one launch per stage.
    block_s = 16 if S <= 16 else 64
    block_k = rank_tile_steps(rank_block, dtype, 128 if block_s == 16 else 64)
    # Past rank 64 the fp32 accumulator (BLOCK_S x rank) needs 8 warps to stay in registers.
    return dict(BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_N=128, num_warps=8 if rank_block > 64 else 4, num_stages=3)


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
    rank_block = _rank_block(R)
    cfg = _mixed_config(S, rank_block, x.dtype, x.device)
    block_s, warps, stages = cfg["BLOCK_S"], cfg["num_warps"], cfg["num_stages"]
    blocks_per_row = triton.cdiv(S, block_s)
    u = torch.empty(batch, S, R, device=x.device, dtype=x.dtype)
    dot = dict(_dot_options(x.dtype, x.device), BLOCK_S=block_s, num_warps=warps, num_stages=stages)
    # Shrink: u[b] = s_i x[b] A_i^T (A_i^T read through A's strides).
    _segment_matmul_kernel[(batch * blocks_per_row, 1)](
        x3, lora_A, scaling.to(x.device, torch.float32), adapter_index, u,
        S, K, R, blocks_per_row,
        *x3.stride(), lora_A.stride(0), lora_A.stride(2), lora_A.stride(1), *u.stride(),
        SCALED=True, ACCUMULATE=False, BLOCK_RED=cfg["BLOCK_K"], BLOCK_C=rank_block, **dot,
    )
    # Expand: out[b] += u[b] B_i^T.
    _segment_matmul_kernel[(batch * blocks_per_row, triton.cdiv(N, cfg["BLOCK_N"]))](
        u, lora_B, u, adapter_index, out3,
        S, R, N, blocks_per_row,
        *u.stride(), lora_B.stride(0), lora_B.stride(2), lora_B.stride(1), *out3.stride(),
        SCALED=False, ACCUMULATE=True, BLOCK_RED=min(rank_block, 64), BLOCK_C=cfg["BLOCK_N"], **dot,
    )
    return out
