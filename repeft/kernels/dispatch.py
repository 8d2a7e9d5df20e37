"""Which backend runs a kernel call: the rules, and ``auto``'s check that a fused kernel is right and faster.

``backend="auto"`` never trusts a fused kernel it has not checked on this
machine. The first call of each *bucket* (op, device, dtype, tokens rounded up
to a power of two, layer shape, bias, dropout, which inputs need gradients)
runs the check on inputs of the bucket's size:

1. correctness: the fused kernel's output, and its gradients when the call
   needs them, against the torch path, within a tolerance for the dtype
   (``TOLERANCE``, relative to the largest reference value);
2. speed: both timed side by side (interleaved, median of ``TIMING_REPS``); the
   fused kernel must take at most ``FASTER_BY`` of the torch time.

A kernel that fails either is not used for that bucket: silently when it is
slower, with one warning when its numbers are wrong. Later calls of the bucket
cost one dict lookup. Decisions live for the process and, if the environment
variable ``REPEFT_KERNEL_CACHE`` names a JSON file, on disk too (keyed by GPU
name and torch/triton versions; ``decision_cache``: a damaged or unwritable file
costs one warning, never a forward). ``kernel_report()`` lists them with reasons;
``repeft info --kernels`` prints them.

Only devices in ``AUTO_DEVICES`` (CUDA) are checked: on CPU the Triton
interpreter is for tests, so ``auto`` stays on torch. Tests add ``"cpu"`` to
run the check under the interpreter and inject wrong or slow kernels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import decision_cache
from .decision_cache import Decision

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "REPEFT_KERNEL"
CACHE_ENV_VAR = decision_cache.ENV_VAR
MAX_TRITON_RANK = 256  # the kernels hold a whole rank block in registers
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTO_DEVICES = ("cuda",)
FASTER_BY = 0.97  # a fused kernel must save at least 3%: a tie is noise, and torch is the safe side
TIMING_REPS = 10
# Largest error relative to the largest reference value, per compute dtype. Both
# paths round in that dtype; a broken kernel is off by O(1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_TOLERANCE = 1e-2

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_triton_ops = None  # repeft.kernels.lora_ops once imported
_decisions: dict[tuple, Decision] = {}
_disk: dict[str, dict] | None = None  # the on-disk cache, read on first use


def load_triton_ops():
    """``repeft.kernels.lora_ops`` (imports triton on first use)."""
    global _triton_ops
    if _triton_ops is None:
        if not _HAS_TRITON:
            raise ImportError("backend='triton' needs the triton package: pip install 'repeft[triton]'")
        from . import lora_ops

        _triton_ops = lora_ops
    return _triton_ops


def autocast_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
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


def _common_unsupported_reason(tensors: list[torch.Tensor]) -> str | None:
    if not _HAS_TRITON:
        return "triton is not installed"
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return "tensors are on different devices"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1"
    if device.type not in ("cuda", "cpu"):
        return f"device {device.type} is not supported"
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
    reason = _common_unsupported_reason([x, weight, lora_A, lora_B] + ([bias] if bias is not None else []))
    if reason is not None:
        return reason
    cast = autocast_dtype(x, weight, lora_A, lora_B)
    dtype = cast or x.dtype
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} is not one of {TRITON_DTYPES}"
    if cast is None and any(t.dtype != x.dtype for t in (weight, lora_A, lora_B)):
        return "x, weight, lora_A and lora_B must share one dtype (or run under autocast)"
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return "weight, lora_A and lora_B must be 2-D"
    if lora_A.shape[0] > MAX_TRITON_RANK:
        return f"rank {lora_A.shape[0]} exceeds {MAX_TRITON_RANK}"
    return None


def mixed_unsupported_reason(out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str | None:
    """Why the mixed-adapter Triton kernels cannot take these tensors, or ``None``."""
    reason = _common_unsupported_reason([out, x, lora_A, lora_B])
    if reason is not None:
        return reason
    if x.dtype not in TRITON_DTYPES or any(t.dtype != x.dtype for t in (out, lora_A, lora_B)):
        return f"out, x and the factors must share one dtype of {TRITON_DTYPES}"
    if lora_A.shape[1] > MAX_TRITON_RANK:
        return f"rank {lora_A.shape[1]} exceeds {MAX_TRITON_RANK}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B)):
        return "the mixed-adapter kernels are for inference (no autograd)"
    return None


class KernelError(ValueError):
    """A kernel backend that does not exist, or that cannot run on these tensors or this machine."""


def explicit_backend(backend: str) -> str:
    """``backend`` with ``"auto"`` replaced by ``REPEFT_KERNEL`` when that is set; checked."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
    if backend not in BACKENDS:
        raise KernelError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS} (check {ENV_VAR})")
    return backend


def require_triton(reason: str | None) -> str:
    if reason is not None:
        raise KernelError(f"backend='triton' cannot run here: {reason}")
    return "triton"


def check_backend_runs_here(backend: str) -> None:
    """Raise ``KernelError`` if ``backend`` (``"auto"``: ``REPEFT_KERNEL``) is unknown or can never run here.

    Called when an adapter is added, so that a wrong choice fails before any model
    is trained or saved rather than inside the first forward.
    """
    chosen = explicit_backend(backend)
    reason = triton_unavailable_reason() if chosen == "triton" else None
    if reason is not None:
        if backend == "triton":
            raise KernelError(f"kernel='triton' cannot run on this machine ({reason}); use kernel='auto' or 'torch'")
        raise KernelError(f"{ENV_VAR}=triton cannot run on this machine ({reason}); unset it or set it to auto or torch")


def tokens_bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two: calls in one bucket share a decision."""
    return 1 << max(0, tokens - 1).bit_length()


# --------------------------------------------------------------------------- the check


@dataclass
class Probe:
    """One bucket's check: inputs of its size and the three functions to compare.

    ``reference`` is what the fused kernel must equal (the torch path, with the
    fused kernel's dropout mask made explicit when there is dropout);
    ``torch_path`` is what ``auto`` runs otherwise, and is timed against ``fused``.
    """

    make_inputs: Callable[[], list]
    reference: Callable[..., torch.Tensor]
    torch_path: Callable[..., torch.Tensor]
    fused: Callable[..., torch.Tensor]
    backward: bool
    tolerance: float


def decide(key: tuple, bucket: dict[str, Any], device: torch.device, make_probe: Callable[[], Probe]) -> Decision:
    """The cached decision for ``key``, or the result of checking the fused kernel (then cached)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Nothing can be timed inside a CUDA graph capture: torch, until an eager call decides.
        return Decision("torch", "not checked yet (first call was inside a CUDA graph capture)", bucket)
    disk_key = _disk_key(bucket, device)
    saved = _disk_cache().get(disk_key) if disk_key else None
    if saved is not None:
        decision = Decision(**saved)
    else:
        decision = _check(bucket, device, make_probe())
        if disk_key:
            _save_to_disk(disk_key, decision)
    _decisions[key] = decision
    return decision


def _check(bucket: dict[str, Any], device: torch.device, probe: Probe) -> Decision:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"), \
            torch.autocast(device.type, enabled=False):
        inputs = probe.make_inputs()  # drawn from the forked stream, so the caller's is untouched
        with torch.set_grad_enabled(probe.backward):
            want = _outputs(probe.reference, inputs)
            if probe.backward:
                grad_out = torch.randn_like(want[0])
                want = _outputs(probe.reference, inputs, grad_out)
            else:
                grad_out = None
            try:
                got = _outputs(probe.fused, inputs, grad_out)
            except Exception as exc:  # a kernel that cannot even run here loses like a wrong one
                return _mismatch(bucket, f"the fused kernel failed: {type(exc).__name__}: {exc}", None)
            error = max(_relative_error(g, w) for g, w in zip(got, want))
            if not error <= probe.tolerance:  # also catches NaN
                return _mismatch(bucket, f"fused output or gradients differ from torch by {error:.2e} "
                                 f"(tolerance {probe.tolerance:.0e})", error)
            times = _median_ms({"torch": lambda: _step(probe.torch_path, inputs, grad_out),
                                "fused": lambda: _step(probe.fused, inputs, grad_out)}, device)
    torch_ms, fused_ms = times["torch"], times["fused"]
    if fused_ms <= FASTER_BY * torch_ms:
        reason = f"fused is {torch_ms / fused_ms:.2f}x faster ({fused_ms:.3f} vs {torch_ms:.3f} ms)"
        return Decision("triton", reason, bucket, torch_ms, fused_ms, error)
    reason = f"fused is not faster ({fused_ms:.3f} vs {torch_ms:.3f} ms for torch)"
    return Decision("torch", reason, bucket, torch_ms, fused_ms, error)


def _mismatch(bucket: dict[str, Any], what: str, error: float | None) -> Decision:
    warnings.warn(f"repeft: not using the fused kernel for {_describe(bucket)}: {what}; using torch", stacklevel=4)
    return Decision("torch", what, bucket, max_error=error)


def _leaves(inputs: list) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _outputs(fn, inputs, grad_out=None) -> list[torch.Tensor]:
    """``fn``'s output and, with ``grad_out``, the gradients of every input that requires grad."""
    for t in _leaves(inputs):
        t.grad = None
    y = fn(*inputs)
    if grad_out is None:
        return [y.detach().clone()]
    y.backward(grad_out)
    return [y.detach().clone()] + [t.grad.clone() for t in _leaves(inputs)]


def _step(fn, inputs, grad_out) -> None:
    for t in _leaves(inputs):
        t.grad = None
    y = fn(*inputs)
    if grad_out is not None:
        y.backward(grad_out)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().clamp_min(1e-6)
    return ((got.float() - want.float()).abs().max() / scale).item()


def _median_ms(fns: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    """Median milliseconds per call, the functions timed in turn so that noise hits both alike."""
    for fn in fns.values():  # compile, allocate, warm caches
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(TIMING_REPS):
        for name, fn in fns.items():
            samples[name].append(_elapsed_ms(fn, device))
    return {name: statistics.median(s) for name, s in samples.items()}


def _elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


# --------------------------------------------------------------------------- the ops' buckets and probes


def choose_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    dropout_p: float,
    training: bool,
) -> Decision:
    """``auto``'s decision for a ``lora_linear`` call (one dict lookup once the bucket is known)."""
    cast = autocast_dtype(x, weight, lora_A, lora_B)
    dropout = training and dropout_p > 0.0
    needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
             lora_A.requires_grad, lora_B.requires_grad) if torch.is_grad_enabled() else None
    in_features = x.shape[-1]
    tokens = x.numel() // in_features if in_features else 0
    key = ("lora_linear", x.device, x.dtype, weight.dtype, lora_A.dtype, cast, tokens_bucket(tokens), in_features,
           weight.shape[0], lora_A.shape[0], bias is not None, dropout, needs)
    decision = _decisions.get(key)
    if decision is not None:
        return decision
    reason = triton_unsupported_reason(x, weight, bias, lora_A, lora_B)
    dtype = cast or x.dtype
    bucket = dict(op="lora_linear", device=str(x.device), dtype=str(dtype).removeprefix("torch."),
                  tokens=tokens_bucket(tokens), in_features=in_features, out_features=weight.shape[0],
                  rank=lora_A.shape[0], bias=bias is not None, dropout=dropout,
                  grads=[n for n, g in zip(("x", "weight", "bias", "A", "B"), needs or ()) if g])
    if reason is not None:
        _decisions[key] = Decision("torch", f"Triton cannot run it: {reason}", bucket)
        return _decisions[key]
    if tokens == 0:
        return Decision("torch", "empty input", bucket)
    return decide(key, bucket, x.device, lambda: _lora_linear_probe(bucket, dtype, x.device, dropout_p, needs))


def _lora_linear_probe(bucket: dict, dtype: torch.dtype, device: torch.device, dropout_p: float,
                       needs: tuple | None) -> Probe:
    M, K, N, r = bucket["tokens"], bucket["in_features"], bucket["out_features"], bucket["rank"]
    p = dropout_p if bucket["dropout"] else 0.0
    needs = needs or (False,) * 5
    scaling = 0.5
    seed = torch.tensor([1234], device=device, dtype=torch.int64)
    ops = load_triton_ops()
    from . import lora_torch

    def make_inputs():
        def rand(*shape, std=1.0, grad=False):
            return (torch.randn(*shape, device=device) * std).to(dtype).requires_grad_(grad)

        return [rand(M, K, grad=needs[0]), rand(N, K, std=K**-0.5, grad=needs[1]),
                rand(N, grad=needs[2]) if bucket["bias"] else None,
                rand(r, K, std=K**-0.5, grad=needs[3]), rand(N, r, std=r**-0.5, grad=needs[4])]

    def fused(x, weight, bias, lora_A, lora_B):
        return ops.lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, p, p > 0, seed=seed)

    def torch_path(x, weight, bias, lora_A, lora_B):
        return lora_torch.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, p > 0)

    def reference(x, weight, bias, lora_A, lora_B):
        if p == 0:
            return torch_path(x, weight, bias, lora_A, lora_B)
        # The kernels draw their own mask (Philox, not torch's generator): make it explicit.
        keep = load_triton_ops().lora_triton.dropout_keep_mask(seed, M, K, p)
        y = torch.nn.functional.linear(x, weight, bias)
        return lora_torch.add_lora(y, x * keep / (1 - p), lora_A, lora_B, scaling)

    return Probe(make_inputs, reference, torch_path, fused, backward=any(needs), tolerance=tolerance(dtype, device))


def choose_lora_mixed(out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> Decision:
    """``auto``'s decision for an ``add_lora_mixed`` call."""
    batch = x.shape[0]
    seq = x.numel() // max(1, batch * x.shape[-1])
    key = ("lora_mixed", x.device, x.dtype, out.dtype, lora_A.dtype, tokens_bucket(batch), tokens_bucket(seq),
           x.shape[-1], out.shape[-1], lora_A.shape[1], torch.is_grad_enabled() and x.requires_grad)
    decision = _decisions.get(key)
    if decision is not None:
        return decision
    bucket = dict(op="lora_mixed", device=str(x.device), dtype=str(x.dtype).removeprefix("torch."),
                  batch=tokens_bucket(batch), seq=tokens_bucket(seq), in_features=x.shape[-1],
                  out_features=out.shape[-1], rank=lora_A.shape[1])
    reason = mixed_unsupported_reason(out, x, lora_A, lora_B)
    if reason is not None:
        _decisions[key] = Decision("torch", f"Triton cannot run it: {reason}", bucket)
        return _decisions[key]
    if x.numel() == 0:
        return Decision("torch", "empty input", bucket)
    return decide(key, bucket, x.device, lambda: _lora_mixed_probe(bucket, x.dtype, x.device))


def _lora_mixed_probe(bucket: dict, dtype: torch.dtype, device: torch.device) -> Probe:
    from . import mixed_torch, mixed_triton

    batch, S, K, N, r = bucket["batch"], bucket["seq"], bucket["in_features"], bucket["out_features"], bucket["rank"]
    n = 3

    def make_inputs():
        def rand(*shape, std=1.0):
            return (torch.randn(*shape, device=device) * std).to(dtype)

        # Rows cycle through "no adapter" and the three adapters.
        index = torch.arange(batch, device=device) % (n + 1) - 1
        return [rand(batch, S, N), rand(batch, S, K), rand(n, r, K, std=K**-0.5), rand(n, N, r, std=r**-0.5),
                torch.rand(n, device=device) + 0.5, index]

    def on_copy(fn):
        return lambda out, *args: fn(out.clone(), *args)

    torch_path = on_copy(mixed_torch.add_lora_mixed)
    fused = on_copy(lambda *args: mixed_triton.add_lora_mixed(*args))  # looked up per call: tests replace it
    return Probe(make_inputs, torch_path, torch_path, fused, backward=False, tolerance=tolerance(dtype, device))


# --------------------------------------------------------------------------- report and disk cache


def _describe(bucket: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in bucket.items() if v not in (False, [], None))


def kernel_report() -> list[Decision]:
    """The decisions ``auto`` has made in this process, in the order it made them.

    >>> from repeft.kernels import kernel_report
    >>> [d.backend for d in kernel_report()]  # doctest: +SKIP
    ['triton', 'torch']
    """
    return list(_decisions.values())


def saved_decisions() -> list[Decision]:
    """The decisions in the on-disk cache (``REPEFT_KERNEL_CACHE``), from any process."""
    return [Decision(**saved) for saved in _disk_cache().values()]


def format_report(decisions: list[Decision]) -> str:
    """One line per decision: backend, bucket, reason."""
    if not decisions:
        return "no kernel decisions yet"
    return "\n".join(f"{d.backend:6s}  {_describe(d.bucket)}: {d.reason}" for d in decisions)


def clear_decisions() -> None:
    """Forget the decisions of this process, and which cache problems it warned about (the file is left alone)."""
    global _disk
    _decisions.clear()
    _disk = None
    decision_cache.forget_warnings()


def _disk_key(bucket: dict[str, Any], device: torch.device) -> str | None:
    if not os.environ.get(CACHE_ENV_VAR):
        return None
    import triton

    from .. import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    where = dict(device_name=name, torch=torch.__version__, triton=triton.__version__, repeft=__version__)
    return json.dumps({**bucket, **where, "device": None}, sort_keys=True)


def _disk_cache() -> dict[str, dict]:
    global _disk
    path = os.environ.get(CACHE_ENV_VAR)
    if not path:
        return {}
    if _disk is None:
        _disk = decision_cache.read(path)
    return _disk


def _save_to_disk(key: str, decision: Decision) -> None:
    path = os.environ[CACHE_ENV_VAR]
    entry = dataclasses.asdict(decision)
    cache = _disk_cache()
    cache[key] = entry
    cache.update(decision_cache.add(path, key, entry))
