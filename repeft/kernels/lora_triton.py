"""Triton kernels for the LoRA matmul ``y = x W^T + b + s * dropout(x) A^T B^T``.

Three kernels cover the forward and the backward:

``_skinny_kernel``  ``out = scale * dropout(P) @ Q`` where ``Q`` has only ``r``
    columns. Forward: ``u = s/(1-p) * (mask * x) @ A^T`` (M x r). Backward:
    ``dA^T = 1/(1-p) * (mask * x)^T @ v`` (d_in x r), the same product read
    through transposed strides. The reduction can be split over programs
    (partial sums in fp32, summed by the caller) when there are few rows.

``_lora_gemm_kernel``  ``C = P @ Q + dropout(U @ V) + bias``: one GEMM whose
    K-loop over the big operands is followed by a short loop over the rank,
    accumulating into the same registers, so the low-rank term never exists as
    a full-size tensor. Forward: ``y = x @ W^T + u @ B^T + b``. Backward:
    ``dX = dY @ W + mask/(1-p) * (v @ A)``, the mask applied to the low-rank
    part only (it sits on x's side of A).

``_lora_decode_kernel``  the forward for a few tokens (M <= 16, no dropout) in
    one launch: the K-loop accumulates ``x W^T`` and ``x A^T`` together, then
    the rank step adds ``u B^T``. At decode the cost is launches, not FLOPs.

The dropout mask is never stored: every kernel that needs it regenerates it from
``(seed, m * d_in + k)`` with Philox (``tl.rand``), so the forward and backward
agree element for element. Everything accumulates in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, cols, mask_stride_row, mask_stride_col, p):
    """Dropout keep decision for elements ``(rows, cols)`` of a tensor read with the given strides.

    The random stream is indexed by the element's position in the original
    ``M x d_in`` input, so kernels that read x transposed get the same mask.
    """
    offsets = rows.to(tl.int64)[:, None] * mask_stride_row + cols.to(tl.int64)[None, :] * mask_stride_col
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``; ``UPCAST`` routes bf16 through fp32 (exact) for the interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _skinny_kernel(
    P, Q, Out, seed_ptr,
    ROWS, RED, C, RED_PER_SPLIT,
    stride_pr, stride_pl, stride_ql, stride_qc, stride_os, stride_or, stride_oc,
    mask_stride_row, mask_stride_red,
    scale, p,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``Out[split] = scale * dropout(P)[:, chunk] @ Q[chunk, :]`` for one chunk of the reduction."""
    pid_rows = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < ROWS
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    red_start = pid_split * RED_PER_SPLIT
    red_end = tl.minimum(red_start + RED_PER_SPLIT, RED)
    for l0 in range(red_start, red_end, BLOCK_RED):
        red = l0 + tl.arange(0, BLOCK_RED)
        red_ok = red < red_end
        p_tile = tl.load(
            P + rows64[:, None] * stride_pr + red[None, :] * stride_pl,
            mask=row_ok[:, None] & red_ok[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            keep = _keep(seed, rows, red, mask_stride_row, mask_stride_red, p)
            p_tile = tl.where(keep, p_tile, 0.0)
        q_tile = tl.load(
            Q + red[:, None] * stride_ql + cols[None, :] * stride_qc,
            mask=red_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc = _dot(p_tile, q_tile, acc, INPUT_PRECISION, UPCAST)

    acc = acc * scale
    out_ptrs = Out + pid_split * stride_os + rows64[:, None] * stride_or + cols[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_gemm_kernel(
    P, Q, U, V, Bias, Out, seed_ptr,
    M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,
    mask_stride_m, mask_stride_n,
    keep_scale, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``Out = P @ Q + dropout(U @ V) + bias``; P is M x K, Q is K x N, U is M x R, V is R x N."""
    # Grouped launch order: programs that run together share rows of P and
    # columns of Q, so those stay in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * grid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_m64 = offs_m.to(tl.int64)

    # Main product: the K-loop of an ordinary GEMM.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        p_tile = tl.load(P + offs_m64[:, None] * stride_pm + offs_k[None, :] * stride_pk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q_tile = tl.load(Q + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(p_tile, q_tile, acc, INPUT_PRECISION, UPCAST)

    # Low-rank product: a few more steps over the rank, after the K-loop (an
    # accumulator that enters the K-loop from other instructions serializes
    # Hopper's async MMAs). Without dropout it lands in the same accumulator;
    # with dropout it needs its own, because the mask multiplies this term only.
    if HAS_DROPOUT:
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        low_rank = acc
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        u_tile = tl.load(U + offs_m64[:, None] * stride_um + offs_r[None, :] * stride_ur,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        v_tile = tl.load(V + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        low_rank = _dot(u_tile, v_tile, low_rank, INPUT_PRECISION, UPCAST)
    if HAS_DROPOUT:
        keep = _keep(tl.load(seed_ptr), offs_m, offs_n, mask_stride_m, mask_stride_n, p)
        acc += tl.where(keep, low_rank * keep_scale, 0.0)
    else:
        acc = low_rank

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_decode_kernel(
    X, W, A, B, Bias, Out, U,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_om, stride_on, stride_um, stride_ur,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The whole layer for a few tokens (M <= BLOCK_M) in one launch: ``Out = X W^T + (s X A^T) B^T + b``.

    Each program owns a column tile of Out and all rows. Its K-loop reads X
    once and accumulates both ``X W^T`` and the shrink ``u = X A^T`` (A is
    small, so every program recomputing u costs L2 reads, not HBM ones). The
    first program also writes u, which the backward needs.
    """
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x_tile = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_tile = tl.load(A + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _dot(x_tile, w_tile, acc, INPUT_PRECISION, UPCAST)
        u = _dot(x_tile, a_tile, u, INPUT_PRECISION, UPCAST)

    # u is rounded to the input dtype, as the two-kernel path and the torch reference store it.
    u = (u * scale).to(U.dtype.element_ty)
    if pid_n == 0:
        tl.store(U + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u, mask=m_ok[:, None] & r_ok[None, :])
    b_tile = tl.load(B + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    acc = _dot(u, b_tile, acc, INPUT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _keep_mask_kernel(Out, seed_ptr, M, K, p, BLOCK: tl.constexpr):
    """Write the keep mask the other kernels use for an ``M x K`` input (for tests and debugging)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(seed_ptr), rows, cols, K, 1, p)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(Out + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8), mask=ok)


# --------------------------------------------------------------------------- launch helpers

# The interpreter runs each program step in numpy: one fixed, small config
# keeps CPU tests fast and deterministic (autotuning does not work there).
_INTERPRETER_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
_INTERPRETER_SKINNY = dict(BLOCK_ROWS=32, BLOCK_RED=32, num_warps=4, num_stages=1)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemm_config(M: int, N: int, dtype: torch.dtype, device: torch.device, has_dropout: bool) -> dict:
    """Tile sizes for the fused GEMM: big tiles when they still fill the GPU, smaller ones otherwise."""
    if device.type != "cuda":
        return dict(_INTERPRETER_GEMM)
    block_k = 32 if dtype == torch.float32 else 64
    sms = _num_sms(device)
    if M <= 16:
        # Decode-sized: memory bound on Q, so narrow column tiles give more programs.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=2 * block_k, GROUP_M=1, num_warps=4, num_stages=4)
    if has_dropout:
        # Philox keeps ~6 registers per element of the tile live; beyond 32
        # elements per thread (on top of two accumulators) ptxas spills.
        if triton.cdiv(M, 64) * triton.cdiv(N, 128) >= sms:
            return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    # 128 x 256 fp32 tiles would need more than the 227 KiB of shared memory an H100 SM has.
    if dtype != torch.float32 and triton.cdiv(M, 128) * triton.cdiv(N, 256) >= sms:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)
    if triton.cdiv(M, 128) * triton.cdiv(N, 128) >= sms:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)


# Up to this many tokens the forward is one launch (``_lora_decode_kernel``).
DECODE_MAX_TOKENS = 16


def rank_tile_steps(rank_block: int, dtype: torch.dtype, longest: int) -> int:
    """The K step (at most ``longest``) that keeps an A^T tile (K step x rank) within 32 KiB.

    Pipelined several stages deep next to the other operand's tile, a larger one
    overflows the 227 KiB of shared memory an H100/H200 SM has (fp32 at rank 256
    did, in benchmarks/kernels_sm90_check.py).
    """
    block = longest
    while block > 32 and block * rank_block * dtype.itemsize > 32768:
        block //= 2
    return block


def _decode_config(rank_block: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles for the one-launch few-token forward: narrow column tiles (memory bound on W), long K steps."""
    if device.type != "cuda":
        return dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_N=32, BLOCK_K=rank_tile_steps(rank_block, dtype, 128), num_warps=4, num_stages=4)


def _dot_options(dtype: torch.dtype, device: torch.device) -> dict:
    """How tl.dot runs: fp32 follows torch's TF32 switch, so both backends round alike;
    bf16 is upcast on the interpreter (CPU), whose native bf16 dot gives wrong results."""
    precision = None
    if dtype == torch.float32:
        precision = "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(INPUT_PRECISION=precision, UPCAST=device.type == "cpu" and dtype == torch.bfloat16)


def _rank_block(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(r))


def _keep_scale(p: float) -> float:
    # p == 1 drops everything (as torch does); the scale is then irrelevant.
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _skinny_config(dtype: torch.dtype, c: int, device: torch.device) -> dict:
    """Tile sizes for the skinny kernel (c = rank columns)."""
    if device.type != "cuda":
        return dict(_INTERPRETER_SKINNY)
    # Keep the Q tile (BLOCK_RED x BLOCK_C) at 16K 16-bit elements, 8K fp32 ones, so
    # three pipeline stages fit in shared memory up to rank 256.
    tile_elems = 8192 if dtype == torch.float32 else 16384
    block_red = max(16, min(128, tile_elems // _rank_block(c)))
    # From rank 128 the fp32 accumulator (64 x BLOCK_C) needs 8 warps to stay in registers.
    return dict(BLOCK_ROWS=64, BLOCK_RED=block_red, num_warps=8 if c > 64 else 4, num_stages=3)


def skinny_reduction_chunk(rows: int, red: int, block_rows: int, block_red: int, device: torch.device) -> int:
    """How much of the reduction one program of the skinny kernel covers (a multiple of ``block_red``).

    With few row blocks the reduction is split so that the GPU gets about two
    programs per SM, each chunk at least 4 steps long. On the interpreter the
    target is 4 programs, so that CPU tests exercise the split path too.
    """
    target_programs = 2 * _num_sms(device) if device.type == "cuda" else 4
    row_programs = triton.cdiv(rows, block_rows)
    split = max(1, min(triton.cdiv(target_programs, row_programs), triton.cdiv(red, 4 * block_red)))
    return max(1, triton.cdiv(triton.cdiv(red, split), block_red)) * block_red


def skinny_matmul(
    P: torch.Tensor,
    Q: torch.Tensor,
    out_dtype: torch.dtype,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    mask_strides: tuple[int, int],
    column_major: bool = False,
) -> torch.Tensor:
    """``scale * dropout(P) @ Q`` for P (rows x red) and a narrow Q (red x c, c <= a few hundred).

    ``mask_strides`` maps P's (row, red) index to the flat index of that element
    in the original ``M x d_in`` input, which is what the dropout stream is keyed on.
    ``column_major`` lays the result out so that its transpose is contiguous.
    """
    rows, red = P.shape
    c = Q.shape[1]
    cfg = _skinny_config(P.dtype, c, P.device)
    red_per_split = skinny_reduction_chunk(rows, red, cfg["BLOCK_ROWS"], cfg["BLOCK_RED"], P.device)
    split = max(1, triton.cdiv(red, red_per_split))
    buffer_dtype = out_dtype if split == 1 else torch.float32  # partial sums stay in fp32
    if column_major:
        out = torch.empty(split, c, rows, device=P.device, dtype=buffer_dtype).transpose(1, 2)
    else:
        out = torch.empty(split, rows, c, device=P.device, dtype=buffer_dtype)
    has_dropout = seed is not None
    _skinny_kernel[(triton.cdiv(rows, cfg["BLOCK_ROWS"]), split)](
        P, Q, out, seed if has_dropout else P,
        rows, red, c, red_per_split,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), out.stride(0), out.stride(1), out.stride(2),
        mask_strides[0], mask_strides[1],
        scale, dropout_p,
        HAS_DROPOUT=has_dropout, BLOCK_C=_rank_block(c),
        **_dot_options(P.dtype, P.device), **cfg,
    )
    return out[0] if split == 1 else out.sum(0).to(out_dtype)


def lora_gemm(
    P: torch.Tensor,
    Q: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """``P @ Q + dropout(U @ V) + bias`` in one kernel; dropout (if ``seed``) is keyed on Out's (m, n)."""
    M, K = P.shape
    N = Q.shape[1]
    R = U.shape[1]
    out = torch.empty(M, N, device=P.device, dtype=P.dtype)
    has_dropout = seed is not None
    cfg = _gemm_config(M, N, P.dtype, P.device, has_dropout)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_gemm_kernel[grid](
        P, Q, U, V, bias if bias is not None else P, out, seed if has_dropout else P,
        M, N, K, R,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
        U.stride(0), U.stride(1), V.stride(0), V.stride(1),
        out.stride(0), out.stride(1),
        N, 1,
        _keep_scale(dropout_p), dropout_p,
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout,
        BLOCK_R=min(_rank_block(R), 64),
        **_dot_options(P.dtype, P.device), **cfg,
    )
    return out


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, u)`` with ``u = s * dropout(x) A^T`` (M x r) and ``y = x W^T + u B^T + b``.

    ``x`` is 2-D (M x d_in). ``u`` already carries the scaling, so the backward
    gets ``dB = dY^T u`` from it directly.
    """
    if seed is None and x.shape[0] <= DECODE_MAX_TOKENS:
        return lora_decode(x, weight, bias, lora_A, lora_B, scaling)
    u = skinny_matmul(x, lora_A.t(), x.dtype, scaling * _keep_scale(dropout_p), dropout_p, seed,
                      mask_strides=(x.shape[1], 1))
    y = lora_gemm(x, weight.t(), u, lora_B.t(), bias, 0.0, None)
    return y, u


def lora_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_forward`` without dropout for at most ``DECODE_MAX_TOKENS`` rows, in one launch."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    u = torch.empty(M, R, device=x.device, dtype=x.dtype)
    rank_block = _rank_block(R)
    cfg = _decode_config(rank_block, x.dtype, x.device)
    _lora_decode_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x, weight, lora_A, lora_B, bias if bias is not None else x, out, u,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1), u.stride(0), u.stride(1),
        scaling,
        HAS_BIAS=bias is not None, BLOCK_M=DECODE_MAX_TOKENS, BLOCK_R=rank_block,
        **_dot_options(x.dtype, x.device), **cfg,
    )
    return out, u


def lora_backward_dx(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """``dX = dY W + mask/(1-p) * (v A)`` with ``v = s * dY B`` (M x r), in one GEMM."""
    return lora_gemm(grad_y, weight, v, lora_A, None, dropout_p, seed)


def lora_backward_da(
    x: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dA = v^T dropout(x)`` (r x d_in), computed as ``(dropout(x)^T v)^T`` by the skinny kernel."""
    K = x.shape[1]
    dA_t = skinny_matmul(x.t(), v, out_dtype, _keep_scale(dropout_p), dropout_p, seed,
                         mask_strides=(1, K), column_major=True)
    return dA_t.t().contiguous()  # already contiguous unless the split partials were re-laid out


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The boolean keep mask (M x K) that the kernels use for ``seed`` and ``dropout_p``."""
    out = torch.empty(M, K, device=seed.device, dtype=torch.int8)
    block = 32
    _keep_mask_kernel[(triton.cdiv(M, block), triton.cdiv(K, block))](out, seed, M, K, dropout_p, BLOCK=block)
    return out.bool()
