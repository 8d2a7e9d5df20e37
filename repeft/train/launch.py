"""A step of `repeft train`: check how the processes were launched and join them in an ``accelerate.Accelerator``."""

from __future__ import annotations

import os
import shlex
import sys

import torch
from accelerate import Accelerator, DataLoaderConfiguration

from .. import fsdp
from ..recipe import Recipe, RecipeError


class LaunchError(RuntimeError):
    """The processes started are not the ones asked for."""


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started this one alone.

    ``accelerate launch --num_processes N`` (accelerate 1.15) starts a single
    process with ``--cpu``, and also without ``--multi_gpu`` on a machine with
    fewer than two GPUs; only the environment shows it: ``MASTER_ADDR`` is set
    (for N > 1) but no ``WORLD_SIZE``.
    """
    env = os.environ
    if "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env or "WORLD_SIZE" in env:
        return
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = ["-m", spec.name.removesuffix(".__main__")] if spec is not None else [sys.argv[0]]
    command = shlex.join(["accelerate", "launch", "--multi_gpu", "--num_processes", "N", *program, *sys.argv[1:]])
    raise LaunchError(
        "accelerate launch asked for several processes but started this one alone (it does so with --cpu, "
        "and without --multi_gpu unless there are several GPUs), so it would train alone. "
        f"For N processes on the CPU, joined with gloo, run:\n  {command}\n"
        "(on a machine with GPUs, put CUDA_VISIBLE_DEVICES= in front to keep them on the CPU); "
        "for one process, run the command without accelerate launch."
    )


def make_accelerator(recipe: Recipe) -> Accelerator:
    """An ``Accelerator`` for the recipe's precision and accumulation, joined with the other processes.

    Under an FSDP launch it shards with FSDP2, on CPU processes too (``fsdp.shard_cpu_processes``).
    """
    check_launch()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise LaunchError(
            "repeft train does not run under DeepSpeed: its adapter-only checkpoints and exports are made for "
            "DDP and FSDP2, and were never tested with DeepSpeed's partitioned weights. To shard a base that does "
            "not fit one device, launch with FSDP2: accelerate launch --config_file recipes/accelerate/fsdp2.yaml"
        )
    precision = recipe.train.mixed_precision
    if precision == "auto":
        # Under `accelerate launch` its flag or config decides; run directly, bf16 where the GPU has it.
        if "ACCELERATE_MIXED_PRECISION" in os.environ:
            precision = None
        else:
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        # Without cpu=True accelerate joins CPU-only processes into nothing: each would train alone.
        cpu=not has_accelerator,
        mixed_precision=precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        log_with=_trackers(recipe) or None,
        project_dir=recipe.output.dir if recipe.output.trackers else None,  # where TensorBoard writes
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise LaunchError(f"{world} processes were launched but accelerate joined {accelerator.num_processes}")
    fsdp.shard_cpu_processes(accelerator)
    if fsdp.uses_fsdp(accelerator):
        _check_fsdp(recipe, accelerator)
        fsdp.reduce_in_float32(accelerator)
    return accelerator


def _check_fsdp(recipe: Recipe, accelerator: Accelerator) -> None:
    """Refuse what repeft does not shard: FSDP1, and quantized bases."""
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        raise LaunchError(
            f"repeft train shards with FSDP2 only; the accelerate config asks for fsdp_version {version}. "
            "Set fsdp_version: 2 (see recipes/accelerate/fsdp2.yaml)"
        )
    if recipe.model.quantization != "none":
        raise RecipeError(
            f"model.quantization {recipe.model.quantization} under FSDP is not supported: repeft shards float "
            "bases only. Train a quantized base without FSDP (each process holds the whole 4/8-bit base), "
            "or set model.quantization: none and model.dtype: bfloat16 to shard it"
        )


def _trackers(recipe: Recipe) -> list[str]:
    """accelerate tracker names for ``output.trackers``; a named one that is not installed is refused."""
    if not recipe.output.trackers:
        return []
    from accelerate.tracking import get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if "all" in recipe.output.trackers:
        return available
    missing = [name for name in recipe.output.trackers if name not in available]
    if missing:
        hint = "pip install 'repeft[tensorboard]'" if "tensorboard" in missing else f"pip install {missing[0]}"
        raise RecipeError(f"output.trackers: {', '.join(missing)} is not installed ({hint}); installed: {available}")
    return list(recipe.output.trackers)
