"""``repeft train``: run a recipe on 1 or N processes through ``accelerate``.

:func:`train` reads as its steps, one module each:

1. ``launch``: check the launch and join the processes in an ``accelerate.Accelerator``
   (DDP or FSDP2, mixed precision, gradient accumulation);
2. ``loaders``: read and check the data (files, or rows passed from Python), before any model loads;
3. ``resume``: find the checkpoints to resume from (and refuse a changed recipe or data, or a directory
   holding another run);
4. ``build`` and ``loaders``: the tokenizer, then the examples tokenized, packed and checked, then (only then)
   the base model wrapped with the adapter;
5. ``run``: loaders, optimizer and schedule handed to ``accelerate`` in a :class:`~repeft.train.run.Run`;
   then resume from a checkpoint (``resume``) and open the run directory and its log (``outputs``);
6. ``loop``: the optimizer steps, whose per-step hooks log JSONL metrics, evaluate (``evaluation``)
   and write atomic checkpoints (``resume``);
7. ``outputs``: the evaluation after training, the adapter and exports, the summary.

Under FSDP2 (see ``fsdp.py``) checkpoints and outputs stay adapter-only: the
adapter and its optimizer state are gathered and written by the main process,
and the exports merge into the base as training built it, loaded on the main
process's CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import transformers

from ..recipe import Recipe
from .build import (
    TASK_MODEL_CLASSES,
    build_model,
    build_model_and_adapter,
    check_tokenizer,
    load_checked_tokenizer,
    load_tokenizer,
    model_config,
)
from .evaluation import evaluate, evaluate_run, format_eval
from .launch import LaunchError, _check_fsdp, check_launch, make_accelerator
from .loaders import build_run_examples, read_data
from .loop import TrainingDiverged, loop
from .outputs import TrainResult, finish, format_summary, open_outputs
from .resume import BEST_ADAPTER_FILE, RESUME_MAY_CHANGE, keep_best_in_checkpoints, restore, resume_candidates
from .run import Run, prepare

__all__ = [
    "BEST_ADAPTER_FILE",
    "LaunchError",
    "RESUME_MAY_CHANGE",
    "TASK_MODEL_CLASSES",
    "TrainResult",
    "TrainingDiverged",
    "_check_fsdp",
    "build_model",
    "check_launch",
    "check_tokenizer",
    "evaluate",
    "format_eval",
    "format_summary",
    "load_tokenizer",
    "make_accelerator",
    "model_config",
    "train",
]


def train(recipe: Recipe, train_data: Any = None, eval_data: Any = None) -> TrainResult:
    """Train the adapter a recipe describes and write its outputs; call on every process.

    >>> result = train(load_recipe("recipes/quickstart.yaml"))  # doctest: +SKIP
    >>> result.adapter_dir  # doctest: +SKIP
    'runs/quickstart/adapter'

    ``train_data`` and ``eval_data`` (a ``datasets.Dataset``, or a list of dicts, one per example) give the rows
    from Python in place of the recipe's ``data.train`` and ``data.eval``, which the recipe must then leave out;
    a ``ClassLabel`` label column's names become the class names, and resuming on other rows is refused:

    >>> ds = datasets.load_dataset("imdb")  # doctest: +SKIP
    >>> recipe = load_recipe("recipes/quickstart.yaml", ["data.train=null", "data.eval=null"])  # doctest: +SKIP
    >>> train(recipe, train_data=ds["train"], eval_data=ds["test"])  # doctest: +SKIP
    """
    started = time.perf_counter()
    accelerator = make_accelerator(recipe)
    if not accelerator.is_main_process:
        transformers.logging.set_verbosity_error()
    recipe, data = read_data(recipe, train_data, eval_data)
    candidates = resume_candidates(recipe, data.made_from, accelerator)
    tokenizer = load_checked_tokenizer(recipe, data, accelerator)
    examples = build_run_examples(recipe, data, tokenizer, accelerator.num_processes)
    model = build_model_and_adapter(recipe, data, tokenizer, accelerator)
    run = prepare(recipe, accelerator, model, tokenizer, data, examples)
    _start(run, candidates)
    loop(run)
    return finish(run, started)


def _start(run: Run, candidates: list[Path]) -> None:
    """Resume from the newest loadable candidate, open the run directory and its log, evaluate before if asked."""
    accelerator, recipe = run.accelerator, run.recipe
    if recipe.output.best:
        keep_best_in_checkpoints(run)  # before restoring: the checkpoint's best adapter loads with it
    if candidates:
        restore(run, candidates)
    run.checked_step = run.state.step
    open_outputs(run)
    for note in run.notes:
        accelerator.print(note)
    accelerator.print(
        f"training {recipe.adapter.method} on {recipe.task}: {run.n_examples} examples, "
        f"{accelerator.num_processes} process(es){' sharded with FSDP2' if run.sharded else ''}, global batch "
        f"{recipe.train.batch_size * accelerator.num_processes * recipe.train.grad_accum}, {run.total_steps} steps; "
        f"trainable params {run.trainable:,} of {run.total:,} ({100 * run.trainable / run.total:.3f}%)"
    )
    if recipe.eval.before and run.state.step == 0:
        run.state.eval_before = evaluate_run(run, "before")
