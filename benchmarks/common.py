"""Shared helpers for the benchmarks: timing side by side, training memory, JSON + markdown output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def process_clock(device: torch.device) -> Callable[[], float]:
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so machine noise hits all alike.

    On a CPU run with one thread the clock is this process's CPU time, which other
    jobs on a shared machine barely move; otherwise it is wall time.
    """
    clock = process_clock(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocator, autograd graph caches, lazy inits
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = clock()
            for _ in range(steps):
                fn()
            sync(device)
            samples[name].append((clock() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


class SavedActivationBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts bytes autograd saves for backward, each storage once (exact on any device)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def training_memory(model: torch.nn.Module, step: Callable[[], None], forward_loss: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Bytes of weights, gradients, optimizer state and saved activations of one training step.

    On CUDA the allocator's peak is reported too, as this model's weights and
    optimizer state plus the most the step allocated on top of what was there
    (so other models held by the same process do not count). On CPU there is no
    allocator peak to read, so the sum of the four parts stands in for it.
    """
    device = next(model.parameters()).device
    step()  # creates optimizer state
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    optim = 2 * grads  # AdamW: exp_avg and exp_avg_sq per trainable element
    saved = SavedActivationBytes()
    with saved:
        loss = forward_loss()
    activations = saved.total
    del loss
    result = {"weights": weights, "grads": grads, "optimizer": optim, "activations": activations,
              "total": weights + grads + optim + activations}
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result["cuda_peak"] = weights + optim + torch.cuda.max_memory_allocated() - before
    return result


def add_tiny_llama_args(parser: argparse.ArgumentParser, rounds: int) -> None:
    """Command-line options shared by the tiny-Llama training-step benchmarks."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=rounds, help="round-robin rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=3, help="steps timed per variant per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; with 1, CPU time is measured instead of wall time (robust on a shared machine)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def tiny_llama(args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random Llama of the size the options give (64-dim heads, 4x MLP), seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=args.vocab, max_position_embeddings=args.seq)
    return LlamaForCausalLM(config).to(device, dtype)


def measure_training(variants: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], device: torch.device,
                     rounds: int, steps: int) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Median seconds per AdamW training step on ``batch`` (interleaved) and ``training_memory`` of each model."""
    step_fns, memory = {}, {}
    for name, model in variants.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

        def forward_loss(model=model):
            return model(**batch).loss

        def step(optimizer=optimizer, forward_loss=forward_loss):
            forward_loss().backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        step_fns[name] = step
        memory[name] = training_memory(model, step, forward_loss)
    return time_interleaved(step_fns, device, rounds, steps), memory


def environment() -> dict[str, str]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": str(torch.get_num_threads()),
           "clock": process_clock(torch.device("cuda" if torch.cuda.is_available() else "cpu")).__name__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    return env


def write_results(out: Path, name: str, result: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / (name + '.json')} and {out / (name + '.md')}")
