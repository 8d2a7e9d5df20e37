"""``backend="auto"``: a fused kernel is used only where it was checked to be right and faster.

On CPU ``auto`` never checks (the Triton interpreter is slow); these tests
open the seam (``dispatch.AUTO_DEVICES``) so the check runs on CPU tensors,
then feed it the real interpreted kernels and injected faulty ones: wrong
outputs, wrong gradients, slow, or correct and fast.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch

pytest.importorskip("triton")

from repeft import cli  # noqa: E402
from repeft.kernels import (  # noqa: E402
    add_lora_mixed,
    clear_decisions,
    dispatch,
    kernel_report,
    lora_linear,
    lora_ops,
    lora_torch,
    mixed_torch,
    mixed_triton,
    resolve_backend,
)

SCALING = 0.5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in the interpreter
REFERENCE = lora_torch.lora_linear  # before any test makes the torch path slow
SLOW_S = 0.02  # an injected slow kernel sleeps this long: far above the torch path's time at these sizes


@pytest.fixture(autouse=True)
def checked_on_cpu(monkeypatch):
    """Let ``auto`` run its check on CPU tensors, with fresh decisions and fewer timing repeats."""
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "TIMING_REPS", 3)
    monkeypatch.delenv("REPEFT_KERNEL", raising=False)
    monkeypatch.delenv(dispatch.CACHE_ENV_VAR, raising=False)
    clear_decisions()
    yield
    clear_decisions()


def layer_inputs(M=20, K=24, N=16, r=4, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    weight = torch.randn(N, K, generator=g) * K**-0.5
    bias = torch.randn(N, generator=g)
    lora_A = torch.randn(r, K, generator=g) * K**-0.5
    lora_B = torch.randn(N, r, generator=g) * r**-0.5
    return (x.to(DEVICE).requires_grad_(grad), weight.to(DEVICE), bias.to(DEVICE),
            lora_A.to(DEVICE).requires_grad_(grad), lora_B.to(DEVICE).requires_grad_(grad))


def only_decision():
    (decision,) = kernel_report()
    return decision


class CountingFused:
    """A stand-in for ``lora_ops.lora_linear_triton``: the torch reference, optionally spoiled."""

    def __init__(self, out_error=0.0, grad_scale=1.0, sleep=0.0):
        self.out_error, self.grad_scale, self.sleep, self.calls = out_error, grad_scale, sleep, 0

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False, seed=None):
        self.calls += 1
        time.sleep(self.sleep)
        if self.grad_scale != 1.0 and lora_A.requires_grad:
            lora_A = _ScaleGrad.apply(lora_A, self.grad_scale)
        y = REFERENCE(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
        return y + self.out_error * y.detach().abs().max()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def slow_torch_path(monkeypatch):
    """Make the torch path the slow one, so that a correct stand-in kernel wins the timing."""
    def slow(*args, **kwargs):
        time.sleep(SLOW_S)
        return REFERENCE(*args, **kwargs)

    monkeypatch.setattr(lora_torch, "lora_linear", slow)


# --------------------------------------------------------------------------- the real kernels


def test_real_kernel_is_checked_and_the_faster_path_wins():
    """On CPU the interpreted kernel is right but far slower, so torch wins, silently."""
    inputs = layer_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # slower is not worth a warning
        backend = resolve_backend("auto", *inputs)
    decision = only_decision()
    assert decision.max_error < 1e-4  # the check compared outputs, and they agreed
    assert decision.bucket["tokens"] == 32 and decision.bucket["grads"] == []
    faster = decision.fused_ms <= dispatch.FASTER_BY * decision.torch_ms
    assert backend == ("triton" if faster else "torch")
    if DEVICE == "cpu":
        assert backend == "torch" and "not faster" in decision.reason


def test_real_kernel_with_dropout_and_gradients_passes_the_correctness_check():
    """The dropout probe compares against torch with the kernels' own mask; the gradient probe runs backward."""
    x, weight, bias, lora_A, lora_B = layer_inputs(grad=True)
    lora_linear(x, weight, bias, lora_A, lora_B, SCALING, 0.3, True)
    decision = only_decision()
    assert decision.bucket["dropout"] and decision.bucket["grads"] == ["x", "A", "B"]
    assert decision.max_error < 1e-4, decision.reason


# --------------------------------------------------------------------------- fault injection


def test_wrong_output_is_rejected_with_one_warning(monkeypatch):
    inputs = layer_inputs()
    want = REFERENCE(*inputs, SCALING)
    monkeypatch.setattr(lora_ops, "lora_linear_triton", CountingFused(out_error=0.05))
    slow_torch_path(monkeypatch)  # it would win on time: only correctness stops it
    with pytest.warns(UserWarning, match="not using the fused kernel.*differ"):
        y = lora_linear(*inputs, SCALING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decision is cached: no second warning
        lora_linear(*inputs, SCALING)
    decision = only_decision()
    assert decision.backend == "torch" and decision.max_error == pytest.approx(0.05, rel=0.2)
    torch.testing.assert_close(y, want)  # the call that ran the check got torch's answer


def test_wrong_gradient_is_rejected_where_gradients_are_needed(monkeypatch):
    fused = CountingFused(grad_scale=1.5)
    monkeypatch.setattr(lora_ops, "lora_linear_triton", fused)
    slow_torch_path(monkeypatch)
    inference = layer_inputs()
    assert resolve_backend("auto", *inference) == "triton"  # forward right and faster
    training = layer_inputs(grad=True)
    with pytest.warns(UserWarning, match="differ"):
        assert resolve_backend("auto", *training) == "torch"
    assert [d.backend for d in kernel_report()] == ["triton", "torch"]


def test_kernel_that_raises_is_rejected(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(lora_ops, "lora_linear_triton", broken)
    with pytest.warns(UserWarning, match="out of shared memory"):
        assert resolve_backend("auto", *layer_inputs()) == "torch"


def test_slow_kernel_is_rejected_silently(monkeypatch):
    monkeypatch.setattr(lora_ops, "lora_linear_triton", CountingFused(sleep=SLOW_S))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", *layer_inputs()) == "torch"
    assert "not faster" in only_decision().reason


def test_right_and_faster_kernel_is_used_after_one_check(monkeypatch):
    fused = CountingFused()
    monkeypatch.setattr(lora_ops, "lora_linear_triton", fused)
    slow_torch_path(monkeypatch)
    inputs = layer_inputs()
    lora_linear(*inputs, SCALING)
    checked = fused.calls
    for tokens in (20, 17, 32):  # one bucket: 17..32 tokens
        lora_linear(*layer_inputs(M=tokens), SCALING)
    assert fused.calls == checked + 3  # no second check, every call went to the fused kernel
    decision = only_decision()
    assert decision.backend == "triton" and "faster" in decision.reason
    lora_linear(*layer_inputs(M=40), SCALING)  # a new bucket is checked on its own
    assert len(kernel_report()) == 2


def test_check_leaves_the_random_stream_alone(monkeypatch):
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    resolve_backend("auto", *layer_inputs())
    torch.testing.assert_close(torch.rand(3), want)


def test_cpu_auto_uses_torch_without_checking(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda",))
    fused = CountingFused()
    monkeypatch.setattr(lora_ops, "lora_linear_triton", fused)
    assert resolve_backend("auto", *layer_inputs()) == "torch"
    assert fused.calls == 0 and kernel_report() == []


def test_compile_traces_auto_without_checking():
    inputs = layer_inputs()

    def f(x):
        return lora_linear(x, *inputs[1:], SCALING)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(inputs[0]), REFERENCE(*inputs, SCALING))
    assert kernel_report() == []


# --------------------------------------------------------------------------- disk cache and report


def test_disk_cache_is_reused_by_a_new_process(monkeypatch, tmp_path):
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(cache))
    fused = CountingFused()
    monkeypatch.setattr(lora_ops, "lora_linear_triton", fused)
    slow_torch_path(monkeypatch)
    inputs = layer_inputs()
    assert resolve_backend("auto", *inputs) == "triton"
    saved = json.loads(cache.read_text())
    assert len(saved) == 1 and next(iter(saved.values()))["backend"] == "triton"

    clear_decisions()  # what a new process starts with
    calls = fused.calls
    assert resolve_backend("auto", *inputs) == "triton"
    assert fused.calls == calls  # read from disk, not checked again


def saved_cache(monkeypatch, tmp_path):
    """A cache file holding one real decision ("triton" for ``layer_inputs()``), and that decision's key."""
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(cache))
    monkeypatch.setattr(lora_ops, "lora_linear_triton", CountingFused())
    slow_torch_path(monkeypatch)
    assert resolve_backend("auto", *layer_inputs()) == "triton"
    clear_decisions()
    (key,) = json.loads(cache.read_text())
    return cache, key


DAMAGED_CACHES = {
    "a list": lambda key: "[]",
    "a string": lambda key: '"kernels"',
    "deeply nested": lambda key: "[" * 100_000 + "]" * 100_000,
    "not UTF-8": lambda key: b'{"\xff": 1}'.decode("latin-1"),
    "entry not an object": lambda key: json.dumps({key: 1}),
    "entry missing fields": lambda key: json.dumps({key: {"backend": "triton"}}),
    "entry with unknown backend": lambda key: json.dumps({key: {"backend": "bogus", "reason": "", "bucket": {}}}),
    "entry with extra field": lambda key: json.dumps({key: {"backend": "torch", "reason": "", "bucket": {}, "x": 1}}),
    "entry with text timing": lambda key: json.dumps({key: {"backend": "torch", "reason": "", "bucket": {}, "torch_ms": "1"}}),
}


@pytest.mark.parametrize("damage", list(DAMAGED_CACHES))
def test_a_damaged_cache_is_ignored_with_one_warning(damage, monkeypatch, tmp_path):
    cache, key = saved_cache(monkeypatch, tmp_path)
    cache.write_text(DAMAGED_CACHES[damage](key), encoding="latin-1")
    with pytest.warns(UserWarning, match="ignoring the kernel cache") as caught:
        assert resolve_backend("auto", *layer_inputs()) == "triton"  # checked again, then saved
    assert len([w for w in caught if "kernel cache" in str(w.message)]) == 1
    saved = json.loads(cache.read_text())  # rewritten whole, with the valid decision
    assert saved[key]["backend"] == "triton"
    assert [d.backend for d in dispatch.saved_decisions()] == ["triton"]


def test_an_unwritable_cache_keeps_decisions_in_the_process(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(tmp_path / "a-file" / "kernels.json"))  # cannot be created
    monkeypatch.setattr(lora_ops, "lora_linear_triton", CountingFused())
    slow_torch_path(monkeypatch)
    with pytest.warns(UserWarning, match="ignoring the kernel cache") as caught:
        assert resolve_backend("auto", *layer_inputs()) == "triton"
    assert len([w for w in caught if "kernel cache" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, though each new bucket tries to save
        assert resolve_backend("auto", *layer_inputs()) == "triton"
        assert resolve_backend("auto", *layer_inputs(M=40)) == "triton"
    assert len(kernel_report()) == 2


CACHE_WRITER = """
import pathlib, sys, time
from repeft.kernels import dispatch
ready = pathlib.Path(sys.argv[3])
(ready / sys.argv[1]).touch()
while len(list(ready.iterdir())) < 2:  # both processes start saving at once
    time.sleep(0.001)
for i in range(int(sys.argv[2])):
    dispatch._save_to_disk(f"{sys.argv[1]}-{i}", dispatch.Decision("torch", "test", {"i": i}))
"""


def test_processes_saving_at_once_keep_all_their_entries(monkeypatch, tmp_path):
    import os
    import subprocess
    import sys

    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(tmp_path / "kernels.json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    (tmp_path / "ready").mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", CACHE_WRITER, name, "40", tmp_path / "ready"], env=env)
               for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert sorted(saved) == sorted(f"{name}-{i}" for name in ("a", "b") for i in range(40))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_report_and_cli(monkeypatch, capsys):
    resolve_backend("auto", *layer_inputs())
    assert cli.main(["info", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "lora_linear" in out and "not faster" in out


def test_cli_checks_a_given_shape(monkeypatch, capsys):
    assert cli.main(["info", "--kernels", "--shape", "24", "16", "4", "20", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "in_features=24" in out and "tokens=32" in out


# --------------------------------------------------------------------------- mixed-adapter op


def mixed_inputs(batch=4, S=5, K=24, N=16, r=4, n=2):
    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(batch, S, N, generator=g), torch.randn(batch, S, K, generator=g),
               torch.randn(n, r, K, generator=g), torch.randn(n, N, r, generator=g),
               torch.tensor([0.5, 2.0]), torch.tensor([1, -1, 0, 1]))
    return [t.to(DEVICE) for t in tensors]


def test_mixed_auto_checks_the_real_kernel_and_rejects_a_wrong_one(monkeypatch):
    out, *rest = mixed_inputs()
    want = mixed_torch.add_lora_mixed(out.clone(), *rest)
    torch.testing.assert_close(add_lora_mixed(out.clone(), *rest), want)
    decision = only_decision()
    assert decision.bucket["op"] == "lora_mixed" and decision.max_error < 1e-4
    assert DEVICE == "cuda" or decision.backend == "torch"

    clear_decisions()
    real = mixed_triton.add_lora_mixed
    monkeypatch.setattr(mixed_triton, "add_lora_mixed", lambda out, *a: real(out, *a).mul_(1.1))
    with pytest.warns(UserWarning, match="differ"):
        torch.testing.assert_close(add_lora_mixed(out.clone(), *rest), want)
