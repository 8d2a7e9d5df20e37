"""The Triton LoRA kernels against the pure-torch reference, on CPU through the Triton interpreter.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. Shapes are small
(the interpreter runs every program step in numpy) and deliberately not
multiples of the 32-wide interpreter tiles.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from repeft.kernels import add_lora_mixed, lora_linear, lora_linear_torch, resolve_backend, triton_unsupported_reason

pytest.importorskip("triton")

from repeft.kernels import lora_ops, lora_triton  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALING = 0.75


def make_inputs(M, K, N, r, dtype=torch.float32, lead=(), bias=True, bias_grad=False, seed=0):
    """Tensors for one LoRA layer, scaled so outputs are O(1) (fixed absolute tolerances then mean something)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(DEVICE, dtype)

    x = rand(*lead, M, K).requires_grad_()
    weight = rand(N, K, std=K**-0.5)
    b = rand(N).requires_grad_(bias_grad) if bias else None
    lora_A = rand(r, K, std=K**-0.5).requires_grad_()
    lora_B = rand(N, r, std=r**-0.5).requires_grad_()
    return x, weight, b, lora_A, lora_B


def run_with_grads(fn, x, weight, b, lora_A, lora_B, grad_out, **kwargs):
    """Output and the gradients of every input that requires grad, under ``fn``."""
    leaves = [t for t in (x, weight, b, lora_A, lora_B) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    y = fn(x, weight, b, lora_A, lora_B, SCALING, **kwargs)
    y.backward(grad_out)
    return [y.detach()] + [t.grad.clone() for t in leaves]


def as_fp32(*tensors):
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


# --------------------------------------------------------------------------- forward and gradients


@pytest.mark.parametrize("M,K,N", [(1, 50, 45), (37, 50, 45), (70, 33, 66)])
@pytest.mark.parametrize("r", [1, 8, 16])
def test_fp32_matches_reference(M, K, N, r):
    inputs = make_inputs(M, K, N, r, bias_grad=(r == 8))
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = run_with_grads(lora_linear, *inputs, grad_out, backend="triton")
    want = run_with_grads(lora_linear_torch, *inputs, grad_out)
    assert len(got) == len(want) == (5 if r == 8 else 4)  # y, dX, (db), dA, dB
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# bf16 keeps 8 mantissa bits, fp16 11: errors are measured relative to the
# largest reference value, against an fp32 computation on the same rounded inputs.
HALF_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 37])
def test_half_precision_matches_fp32_reference(dtype, M):
    K, N, r = 50, 45, 8
    inputs = make_inputs(M, K, N, r, dtype=dtype, bias_grad=True)
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = run_with_grads(lora_linear, *inputs, grad_out, backend="triton")
    want = run_with_grads(lora_linear_torch, *as_fp32(*inputs), grad_out.float())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        rel_err = (g.float() - w).abs().max() / w.abs().max()
        assert rel_err < HALF_TOLERANCE[dtype], rel_err


def test_leading_batch_dims_and_frozen_input():
    x, weight, b, lora_A, lora_B = make_inputs(5, 40, 24, 4, lead=(2, 3))
    x.requires_grad_(False)  # as for the first adapted layer: no dX kernel runs
    grad_out = torch.randn(2, 3, 5, 24).to(DEVICE)
    got = run_with_grads(lora_linear, x, weight, b, lora_A, lora_B, grad_out, backend="triton")
    want = run_with_grads(lora_linear_torch, x, weight, b, lora_A, lora_B, grad_out)
    assert got[0].shape == (2, 3, 5, 24)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_noncontiguous_weight_and_no_bias():
    x, weight, _, lora_A, lora_B = make_inputs(20, 36, 28, 8, bias=False)
    weight_t = weight.t().contiguous().t()  # same values, column-major storage
    grad_out = torch.randn(20, 28).to(DEVICE)
    got = run_with_grads(lora_linear, x, weight_t, None, lora_A, lora_B, grad_out, backend="triton")
    want = run_with_grads(lora_linear_torch, x, weight, None, lora_A, lora_B, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_empty_input():
    x, weight, b, lora_A, lora_B = make_inputs(0, 16, 8, 4)
    y = lora_linear(x, weight, b, lora_A, lora_B, SCALING, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 8)
    assert torch.count_nonzero(lora_A.grad) == 0


def test_trainable_weight_gets_its_gradient():
    x, weight, b, lora_A, lora_B = make_inputs(12, 20, 16, 4)
    weight.requires_grad_()
    grad_out = torch.randn(12, 16).to(DEVICE)
    got = run_with_grads(lora_linear, x, weight, b, lora_A, lora_B, grad_out, backend="triton")
    want = run_with_grads(lora_linear_torch, x, weight, b, lora_A, lora_B, grad_out)
    assert len(got) == 5  # y, dX, dW, dA, dB
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_autocast_computes_in_autocast_dtype():
    """fp32 tensors under bf16 autocast (mixed-precision training): both backends compute in bf16 like
    F.linear does, and the fp32 adapter still gets fp32 gradients."""
    inputs = make_inputs(20, 36, 28, 8)
    grad_out = torch.randn(20, 28).to(DEVICE, torch.bfloat16)
    results = {}
    for backend in ("triton", "torch"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert resolve_backend(backend, *inputs) == backend
            results[backend] = run_with_grads(lora_linear, *inputs, grad_out, backend=backend)
    for got, want in zip(results["triton"], results["torch"]):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).abs().max() / want.float().abs().max() < HALF_TOLERANCE[torch.bfloat16]
    assert results["triton"][0].dtype == torch.bfloat16 and results["triton"][2].dtype == torch.float32


# --------------------------------------------------------------------------- dropout


def test_dropout_same_seed_same_output():
    inputs = make_inputs(24, 40, 20, 8)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(lora_linear(*inputs, SCALING, 0.5, True, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_off_outside_training():
    inputs = make_inputs(24, 40, 20, 8)
    evaluated = lora_linear(*inputs, SCALING, 0.5, False, backend="triton")
    torch.testing.assert_close(evaluated, lora_linear_torch(*inputs, SCALING), rtol=1e-4, atol=1e-4)


def read_off_mask(seed, M, K, p):
    """The mask the forward kernel applies, recovered from its output: with W = 0,
    A = B = I, x = 1 and scaling 1, y = dropout(x) = mask / (1 - p)."""
    x = torch.ones(M, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    y = lora_ops.lora_linear_triton(x, torch.zeros(K, K, device=DEVICE), None, eye, eye, 1.0, p, True, seed=seed)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    return kept


def test_dropout_mask_helper_is_the_forward_mask_and_keep_rate_is_right():
    M, K, p = 40, 128, 0.3
    seed = torch.tensor([1234], device=DEVICE)
    kept = read_off_mask(seed, M, K, p)
    assert torch.equal(kept, lora_triton.dropout_keep_mask(seed, M, K, p))
    n = M * K
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * sigma
    # Rows and columns must not share a pattern (a broken offset would repeat it).
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[:, 0], kept[:, 1])


# (300, 40): dA's reduction over M is split across programs; (1, 300): u's over K is.
SPLIT_SHAPES = [(300, 40, 24), (1, 300, 20)]


def test_split_shapes_do_split():
    for M, K, _ in SPLIT_SHAPES:
        block = lora_triton._INTERPRETER_SKINNY["BLOCK_RED"]
        rows, red = (K, M) if M > K else (M, K)
        assert lora_triton.skinny_reduction_chunk(rows, red, block, block, torch.device("cpu")) < red


@pytest.mark.parametrize(
    "dtype,M,K,N",
    [(torch.float32, 37, 50, 45), (torch.bfloat16, 37, 50, 45)] + [(torch.float32, *s) for s in SPLIT_SHAPES],
)
def test_dropout_forward_and_backward_use_one_mask(dtype, M, K, N):
    """Forward and all gradients equal a torch computation with the kernels' mask made explicit."""
    r, p = 8, 0.4
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype=dtype)
    seed = torch.tensor([99], device=DEVICE)
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)

    def triton_fn(x, weight, b, lora_A, lora_B, scaling):
        return lora_ops.lora_linear_triton(x, weight, b, lora_A, lora_B, scaling, p, True, seed=seed)

    keep = lora_triton.dropout_keep_mask(seed, M, K, p)

    def masked_reference(x, weight, b, lora_A, lora_B, scaling):
        dropped = x * keep / (1 - p)
        return x @ weight.t() + b + scaling * (dropped @ lora_A.t()) @ lora_B.t()

    got = run_with_grads(triton_fn, x, weight, b, lora_A, lora_B, grad_out)
    want = run_with_grads(masked_reference, *as_fp32(x, weight, b, lora_A, lora_B), grad_out.float())
    tol = 1e-4 if dtype == torch.float32 else HALF_TOLERANCE[dtype]
    for g, w in zip(got, want):
        assert (g.float() - w).abs().max() / w.abs().max() < tol


# --------------------------------------------------------------------------- custom ops and torch.compile


def test_opcheck():
    x, weight, b, lora_A, lora_B = make_inputs(9, 20, 12, 4)
    x2d = x.detach().requires_grad_()
    for p, seed in ((0.0, None), (0.25, torch.tensor([7], device=DEVICE))):
        torch.library.opcheck(torch.ops.repeft.lora_linear.default, (x2d, weight, b, lora_A, lora_B, 0.5, p, seed))


@pytest.mark.parametrize("use_y", [True, False])
def test_op_gradient_through_its_shrink_output(use_y):
    """The op also returns u = s * x A^T; gradients flowing into u (alone or with y's) are right."""
    x, weight, b, lora_A, lora_B = make_inputs(9, 20, 12, 4)
    c = torch.randn(9, 4).to(DEVICE)

    def loss(y, u):
        return (y.square().sum() if use_y else 0) + (u * c).sum()

    y, u = torch.ops.repeft.lora_linear(x, weight, b, lora_A, lora_B, SCALING, 0.0, None)
    loss(y, u).backward()
    got = [t.grad.clone() for t in (x, lora_A, lora_B)]
    for t in (x, lora_A, lora_B):
        t.grad = None
    u = SCALING * x @ lora_A.t()
    loss(x @ weight.t() + b + u @ lora_B.t(), u).backward()
    for g, t in zip(got, (x, lora_A, lora_B)):
        want = t.grad if t.grad is not None else torch.zeros_like(t)  # B is off the graph without y
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_forward_and_backward():
    """torch.compile traces the layer, dropout seed included, without a graph break.

    The aot_eager backend runs dynamo and AOTAutograd (fake tensors, the
    registered backward) but skips inductor's C++ build, which takes ~20 s here.
    """
    x, weight, b, lora_A, lora_B = make_inputs(8, 32, 24, 4, lead=(2,))

    def loss(x, lora_A, lora_B):
        return lora_linear(x, weight, b, lora_A, lora_B, SCALING, 0.1, True, backend="triton").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    got = compiled(x, lora_A, lora_B)
    got.backward()
    got_grads = [t.grad.clone() for t in (x, lora_A, lora_B)]
    for t in (x, lora_A, lora_B):
        t.grad = None
    torch.manual_seed(0)
    want = loss(x, lora_A, lora_B)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, t in zip(got_grads, (x, lora_A, lora_B)):
        torch.testing.assert_close(g, t.grad)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch):
    inputs = make_inputs(4, 16, 8, 4)
    monkeypatch.delenv("REPEFT_KERNEL", raising=False)
    if DEVICE == "cuda":  # decided by the check (tests/test_kernel_dispatch.py)
        assert resolve_backend("auto", *inputs) in ("triton", "torch")
    else:  # the interpreter is for tests, not speed
        assert resolve_backend("auto", *inputs) == "torch"
    assert resolve_backend("triton", *inputs) == "triton"
    assert resolve_backend("torch", *inputs) == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda", *inputs)

    monkeypatch.setenv("REPEFT_KERNEL", "triton")
    assert resolve_backend("auto", *inputs) == "triton"
    assert resolve_backend("torch", *inputs) == "torch"  # an explicit choice beats the env default
    monkeypatch.setenv("REPEFT_KERNEL", "torch")
    assert resolve_backend("auto", *inputs) == "torch"
    monkeypatch.setenv("REPEFT_KERNEL", "fast")
    with pytest.raises(ValueError, match="REPEFT_KERNEL"):
        resolve_backend("auto", *inputs)


def test_dispatch_falls_back_or_refuses_unsupported_tensors(monkeypatch):
    monkeypatch.delenv("REPEFT_KERNEL", raising=False)
    x, weight, b, lora_A, lora_B = make_inputs(4, 16, 8, 4)
    mixed = (x, weight.double(), b, lora_A, lora_B)
    assert "share one dtype" in triton_unsupported_reason(*mixed)
    assert resolve_backend("auto", *mixed) == "torch"
    with pytest.raises(ValueError, match="share one dtype"):
        resolve_backend("triton", *mixed)
    big_rank = make_inputs(4, 16, 8, 300)
    assert "rank 300" in triton_unsupported_reason(*big_rank)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            lora_linear(x, weight, b, lora_A, lora_B, SCALING, backend="triton")


def test_env_var_routes_lora_linear(monkeypatch):
    calls = []
    real = lora_ops.lora_linear_triton
    monkeypatch.setattr(lora_ops, "lora_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(4, 16, 8, 4)
    monkeypatch.setenv("REPEFT_KERNEL", "triton")
    lora_linear(*inputs, SCALING)
    monkeypatch.setenv("REPEFT_KERNEL", "torch")
    lora_linear(*inputs, SCALING)
    assert len(calls) == 1


def test_import_without_triton():
    """repeft.kernels imports, and runs on torch, where triton is not installed; 'triton' says why it can't."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, repeft.kernels as k\n"
        "x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)\n"
        "assert k.lora_linear(x, w, None, a, b, 1.0).shape == (3, 5)\n"
        "try:\n"
        "    k.lora_linear(x, w, None, a, b, 1.0, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, REPEFT_KERNEL="auto")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


# --------------------------------------------------------------------------- decode: one launch for few tokens


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_few_tokens_run_in_one_launch(monkeypatch, M, bias):
    """Up to 16 tokens without dropout the forward is the single decode kernel, inference and training alike."""
    def not_here(*args, **kwargs):
        raise AssertionError("the two-kernel path ran for a few-token forward")

    monkeypatch.setattr(lora_triton, "skinny_matmul", not_here)
    monkeypatch.setattr(lora_triton, "lora_gemm", not_here)
    inputs = make_inputs(M, 50, 45, 8, bias=bias)
    with torch.no_grad():
        got = lora_linear(*inputs, SCALING, backend="triton")
    torch.testing.assert_close(got, lora_linear_torch(*inputs, SCALING), rtol=1e-4, atol=1e-4)
    # With gradients the same kernel also hands u to the backward.
    y, u = torch.ops.repeft.lora_linear(inputs[0].reshape(M, -1), *inputs[1:], SCALING, 0.0, None)
    torch.testing.assert_close(u, SCALING * inputs[0].detach() @ inputs[3].detach().t(), rtol=1e-4, atol=1e-4)


def test_inference_skips_the_custom_op(monkeypatch):
    """Under no_grad the launcher is called directly (the op's dispatch is Python overhead at decode)."""
    def not_here(*args, **kwargs):
        raise AssertionError("custom op called in inference")

    monkeypatch.setattr(lora_ops, "_lora_linear_op", not_here)
    inputs = make_inputs(3, 20, 12, 4)
    with torch.no_grad():
        got = lora_linear(*inputs, SCALING, backend="triton")
    torch.testing.assert_close(got, lora_linear_torch(*inputs, SCALING), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- mixed-adapter batches


def mixed_inputs(batch, S, K, N, ranks, dtype=torch.float32):
    """Stacked factors of adapters with the given ranks (lower ranks zero-padded), O(1) outputs."""
    g = torch.Generator().manual_seed(0)
    r = max(ranks)
    lora_A = torch.zeros(len(ranks), r, K)
    lora_B = torch.zeros(len(ranks), N, r)
    for i, ri in enumerate(ranks):
        lora_A[i, :ri] = torch.randn(ri, K, generator=g) * K**-0.5
        lora_B[i, :, :ri] = torch.randn(N, ri, generator=g) * ri**-0.5
    x = torch.randn(batch, S, K, generator=g)
    out = torch.randn(batch, S, N, generator=g)
    scaling = torch.rand(len(ranks), generator=g) + 0.5
    return [t.to(DEVICE, dtype) for t in (out, x, lora_A, lora_B)] + [scaling]


def mixed_by_hand(out, x, lora_A, lora_B, scaling, index):
    """Each row with its own adapter, one at a time (independent of both backends)."""
    out = out.float().clone()
    for b, i in enumerate(index.tolist()):
        if i >= 0:
            out[b] += scaling[i].item() * (x[b].float() @ lora_A[i].float().t()) @ lora_B[i].float().t()
    return out


@pytest.mark.parametrize("S", [1, 19])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_adapters_match_each_row_alone(backend, S):
    out, x, lora_A, lora_B, scaling = mixed_inputs(5, S, 40, 36, ranks=[8, 3, 5])
    index = torch.tensor([2, -1, 0, 1, 0], device=DEVICE)
    want = mixed_by_hand(out, x, lora_A, lora_B, scaling, index)
    got = add_lora_mixed(out.clone(), x, lora_A, lora_B, scaling, index, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], out[1])  # the row without an adapter is untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_triton_half_precision(dtype):
    out, x, lora_A, lora_B, scaling = mixed_inputs(3, 7, 40, 36, ranks=[4, 4], dtype=dtype)
    index = torch.tensor([1, 0, -1], device=DEVICE)
    got = add_lora_mixed(out.clone(), x, lora_A, lora_B, scaling, index, backend="triton")
    want = mixed_by_hand(out, x, lora_A, lora_B, scaling, index)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() / want.abs().max() < HALF_TOLERANCE[dtype]


def test_mixed_triton_refuses_what_it_cannot_run():
    out, x, lora_A, lora_B, scaling = mixed_inputs(2, 3, 16, 8, ranks=[4])
    index = torch.tensor([0, 0], device=DEVICE)
    with pytest.raises(ValueError, match="share one dtype"):
        add_lora_mixed(out.double(), x, lora_A, lora_B, scaling, index, backend="triton")
    with pytest.raises(ValueError, match="inference"):
        add_lora_mixed(out, x.requires_grad_(), lora_A, lora_B, scaling, index, backend="triton")
