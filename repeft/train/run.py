"""The prepared run: model, optimizer, schedule and loaders handed to ``accelerate``, and the run's progress.

:func:`prepare` builds a :class:`Run`; the later steps (``resume``, ``loop``,
``evaluation``, ``outputs``) read and update it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import fsdp
from ..layers import ModulesToSave
from ..model import AdapterModel
from ..recipe import Recipe, RecipeError
from .loaders import RunData, RunExamples, make_loaders
from .resume import State, checkpoint_adapter_only

if TYPE_CHECKING:
    from .outputs import MetricsLog


@dataclass
class Run:
    """A prepared run: the objects the loop uses and its progress (``state``)."""

    recipe: Recipe
    accelerator: Accelerator
    model: AdapterModel  # the adapter model itself, for saving
    ddp_model: torch.nn.Module  # what accelerate prepared (DDP-wrapped, or sharded in place), for forward passes
    tokenizer: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    eval_loader: DataLoader | None
    n_examples: int
    trainable: int
    total: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    labels: list[str]  # class names (classification)
    answers: list[tuple[list[int], str]]  # (prompt, expected answer) per eval example, when evaluation generates
    notes: list[str]  # what truncation and packing did to the data
    made_from: dict[str, Any]  # what the run is made from, recorded in each checkpoint (resume.record_made_from)
    state: State = field(default_factory=State)
    resumed_from: Path | None = None
    checked_step: int = 0  # the last step at which the loss and the adapter were checked finite
    best_adapter: dict[str, torch.Tensor] | None = None  # with output.best: the best evaluation's adapter (on CPU)
    stopped_early: bool = False
    log: MetricsLog = field(init=False)  # opened by outputs.open_outputs
    bar: tqdm | None = None  # the loop's progress bar, while and after it runs

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output.dir)

    @property
    def text(self) -> bool:
        return self.recipe.task != "image_classification"

    @property
    def sharded(self) -> bool:
        return fsdp.uses_fsdp(self.accelerator)

    def say(self, line: str) -> None:
        """Print a line of its own on the main process, never glued to the progress bar.

        On a terminal tqdm clears the bar and redraws it under the line; in a
        redirected log the bar's last state ends its line first.
        """
        if not self.accelerator.is_main_process:
            return
        bar = self.bar
        if bar is not None and not bar.disable:
            if bar.fp.isatty():
                bar.write(line)
                return
            if not bar.fp.at_line_start:  # the bar drew since the last line: end its line
                bar.fp.write("\n")
                bar.fp.flush()
        print(line, flush=True)


class LineTrackingStream:
    """A text stream that remembers whether its output ends a line (tqdm redraws with ``\\r``, no newline)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def prepare(
    recipe: Recipe, accelerator: Accelerator, model: AdapterModel, tokenizer: Any, data: RunData, examples: RunExamples
) -> Run:
    """Loaders, optimizer and schedule, handed to ``accelerate``; the run's length in optimizer steps."""
    trainable, total = model.trainable_parameters()
    train_loader, eval_loader = make_loaders(recipe, model, tokenizer, examples)
    n_examples = len(train_loader.dataset)
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe),
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
        eps=recipe.optim.eps,
        weight_decay=recipe.optim.weight_decay,
    )
    ddp_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # FSDP replaces each parameter by a sharded one (and the optimizer's with it).
    params = [p for p in model.parameters() if p.requires_grad]
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    # Length: optimizer steps, counted after the loader is sharded across processes (at least one batch:
    # loaders.build_run_examples checked there is a global batch).
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / recipe.train.grad_accum)
    total_steps = recipe.train.max_steps or recipe.train.epochs * steps_per_epoch
    warmup = recipe.schedule.warmup_steps or int(recipe.schedule.warmup_ratio * total_steps)
    # Not passed to prepare(): accelerate would step it once per process per step, but
    # total_steps already counts steps of the global batch.
    scheduler = transformers.get_scheduler(recipe.schedule.name, optimizer, warmup, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    checkpoint_adapter_only(accelerator, model)
    if fsdp.uses_fsdp(accelerator):
        fsdp.checkpoint_optimizer(accelerator, ddp_model, optimizer)
        fsdp.register_generate(model)
        warning = fsdp.coarse_unit_warning(model)
        if warning:
            accelerator.print(f"warning: {warning}", file=sys.stderr)
    return Run(
        recipe=recipe,
        accelerator=accelerator,
        model=model,
        ddp_model=ddp_model,
        tokenizer=tokenizer,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        eval_loader=eval_loader,
        n_examples=n_examples,
        trainable=trainable,
        total=total,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        labels=data.labels,
        answers=examples.answers,
        notes=examples.notes,
        made_from=data.made_from,
    )


def _param_groups(model: AdapterModel, recipe: Recipe) -> list[dict[str, Any]]:
    """The adapter's parameters at ``optim.lr``, then the trained heads' (``modules_to_save``) at ``optim.head_lr``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if recipe.optim.head_lr is None:
        return [{"params": trainable}]
    heads = {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in heads]},
              {"params": [p for p in trainable if id(p) in heads], "lr": recipe.optim.head_lr}]
    if not groups[1]["params"]:
        raise RecipeError("optim.head_lr is set, but this adapter trains no head (modules_to_save); remove head_lr")
    return [g for g in groups if g["params"]]
