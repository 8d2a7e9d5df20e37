"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), as ``accelerate`` sets it up.

Under FSDP2 every parameter, frozen or trainable, is a ``DTensor`` holding
this process's slice of dim 0; a unit's whole weights exist only while the
unit runs. ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml``
makes ``Accelerator.prepare`` shard the model: one unit per decoder layer
(the model's ``_no_split_modules``), units for the input embeddings and for
the final norm with the output head, and the rest (attention-level adapters,
a classification head) in the root unit. A LoRA layer's factors sit in its
decoder layer's unit beside the frozen weights; FSDP2 shards each parameter
on its own, so frozen and trainable parameters share a unit.

Outside a forward pass an adapter's tensors are slices: saving gathers them
(:func:`gathered`, a collective every process must join) and loading cuts a
whole tensor back into this process's slice (:func:`copy_whole_into`). The
optimizer state in a checkpoint is gathered the same way and written once.

Nothing here imports ``accelerate`` or ``torch.distributed`` until it is used,
so ``import repeft`` stays cheap and works on torch builds without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

# In a checkpoint of a sharded run: the optimizer state gathered whole, keyed by parameter name.
GATHERED_OPTIMIZER_NAME = "optimizer_gathered.bin"


# -- sharded tensors ---------------------------------------------------------------------------


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (each process holds a slice of it)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def is_sharded_model(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one is gathered from every process (all of them must call this)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor; any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def copy_whole_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` into ``target``; a sharded ``target`` keeps its slice of it, without communicating.

    Every process must hold the same ``whole`` (each read it from the same file).
    """
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        whole = whole.to(device=target.device, dtype=target.dtype)
        whole = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(whole)


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise ``ValueError`` if ``model`` is sharded: ``what`` needs its whole weights on one process."""
    if is_sharded_model(model):
        raise ValueError(
            f"{what} needs the whole weights on one process, but this model is sharded (FSDP): each process "
            "holds a slice. Save the adapter with model.save_adapter(dir, is_main_process=accelerator.is_main_process) "
            "on every process, then on one process load it onto the base (repeft.load_adapter(base, dir)) and "
            "use that model, or run `repeft export dir --base BASE`"
        )


# -- accelerate's FSDP ---------------------------------------------------------------------------


def uses_fsdp(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (``--use_fsdp``, ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_cpu_processes(accelerator: Accelerator) -> None:
    """Turn on accelerate's FSDP for CPU processes launched with an FSDP config, as it does for GPUs.

    accelerate 1.15 switches to FSDP only on several accelerators (under
    MULTI_GPU and the like, not MULTI_CPU), so CPU processes launched with an
    FSDP config would silently train unsharded. This sets its state the way
    its own GPU branch does, with the plugin it reads from the launch's
    environment. Sharding over gloo is slow: it is for trying a config, and
    for the test suite, which trains this way.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not launched_with_fsdp() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # accelerate keeps the two in step


def reduce_in_float32(accelerator: Accelerator) -> None:
    """Under half-precision FSDP, reduce gradients in float32 (accelerate's policy reduces them in bf16 too).

    Summing N processes' gradients with 8 bits of mantissa loses the small
    ones an adapter learns from; the all-gathered weights and the forward
    pass stay in half precision.
    """
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.reduce_dtype not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def coarse_unit_warning(model: nn.Module, limit: float = 0.5) -> str | None:
    """A warning if one FSDP unit manages more than ``limit`` of the weights, else None.

    Each process gathers a unit's whole weights while it runs, so such a unit
    saves little memory. It happens when the model names no decoder-layer class
    for accelerate's per-layer policy (``_no_split_modules``: BERT has none).
    """
    from torch.distributed.fsdp import FSDPModule

    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    sizes = dict.fromkeys(units, 0)
    for name, param in model.named_parameters():
        owner = max((u for u in units if not u or name.startswith(u + ".")), key=len)  # the innermost unit
        sizes[owner] += param.numel()
    unit, size = max(sizes.items(), key=lambda item: item[1])
    share = size / sum(sizes.values())
    if share <= limit:
        return None
    return (
        f"FSDP unit {unit or '(the root)'} holds {share:.0%} of the weights, which every process gathers whole "
        f"while it runs; {type(model.get_base_model() if hasattr(model, 'get_base_model') else model).__name__} names no decoder-layer class for accelerate's per-layer "
        "policy: set fsdp_transformer_layer_cls_to_wrap in the accelerate config to its layer class (e.g. BertLayer)"
    )


def register_generate(model: nn.Module) -> None:
    """Let ``model.generate`` gather the root unit's weights, as a call of the model does."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "generate")


@contextlib.contextmanager
def state_without_model(accelerator: Accelerator) -> Iterator[None]:
    """Inside the block ``save_state``/``load_state`` leave the sharded model and its optimizer to repeft's hooks.

    Under FSDP accelerate writes (and reads) the whole sharded model, frozen
    base included, before any hook runs, with no switch to skip it: 13 GB in
    every checkpoint of a 7B base. Its lists of prepared models and optimizers
    are emptied for the call; the hooks (:func:`checkpoint_optimizer` and the
    adapter's) save what the run needs. Without FSDP this does nothing.
    """
    if not uses_fsdp(accelerator):
        yield
        return
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def checkpoint_optimizer(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make ``save_state``/``load_state`` keep the optimizer state gathered whole, written by the main process.

    The state holds the trainable parameters only (the optimizer has no
    others) and is keyed by parameter name, so it does not depend on how the
    model was sharded.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer

    def save(models: list, weights: list, output_dir: str) -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered onto the main process
        state = get_optimizer_state_dict(model, optimizer, options=options)
        if accelerator.is_main_process:
            torch.save(state, Path(output_dir) / GATHERED_OPTIMIZER_NAME)

    def load(models: list, input_dir: str) -> None:
        # Every process reads the file (output.dir is shared) and keeps its slice of each tensor.
        state = torch.load(Path(input_dir) / GATHERED_OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
