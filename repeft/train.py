"""``repeft train``: run a recipe on 1 or N processes through ``accelerate``.

One entry point, :func:`train`, reads as its steps: read the data; build the
base model and the adapter; hand model, optimizer and loaders to an
``accelerate.Accelerator`` (DDP or FSDP2, mixed precision, gradient
accumulation) in a ``_Run``; resume; then the loop, whose per-step hooks
(``_Run._after_step``) log JSONL metrics, evaluate and write atomic
checkpoints; then the exports. Under FSDP2 (see ``fsdp.py``) checkpoints and
outputs stay adapter-only: the adapter and its optimizer state are gathered
and written by the main process, and the exports merge into the base as
training built it, loaded on the main process's CPU.

Exact resume rests on three things: the train loader shuffles with accelerate's
seedable sampler (order = f(seed, epoch), the same on every process count),
a resumed run skips the batches already seen with ``skip_first_batches``, and
each micro-batch reseeds torch's RNG from (seed, micro-batch, rank), so dropout
does not depend on what ran before.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import fsdp, instruct, registry
from .checkpoint import (
    STATE_NAME,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    save_checkpoint,
    set_aside,
    write_text_atomic,
)
from .dataio import (
    build_examples,
    check_rows,
    collator,
    conversations,
    data_format,
    label_names,
    read_rows,
    sample_texts,
)
from .export import export_merged
from .files import read_adapter_dir
from .layers import ModulesToSave
from .metrics import classification_scores, improves
from .model import AdapterModel, load_adapter, wrap
from .peft_interop import export_peft
from .quantization import float_module_names, prepare_quantized_model
from .recipe import Recipe, RecipeError
from .targeting import TargetError

TASK_MODEL_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}
# Recipe fields that may change between a run and its resumption without changing what is trained.
RESUME_MAY_CHANGE = ("checkpoint", "output", "eval", "train.log_every")
# The best evaluation's adapter, kept in each checkpoint when output.best is on.
BEST_ADAPTER_FILE = "best_adapter.safetensors"


@dataclass
class TrainResult:
    """What a finished run produced (the same object on every process)."""

    output_dir: str
    adapter_dir: str
    merged_dir: str | None
    peft_dir: str | None
    metrics_path: str
    steps: int
    trainable_params: int
    total_params: int
    wall_time_s: float
    metric: str
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    best: dict[str, Any] | None = None
    resumed_from: str | None = None
    best_dir: str | None = None
    stopped_early: bool = False
    data_notes: list[str] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss or the adapter became NaN or infinite; the run stopped before writing anything of it."""


@dataclass
class _State:
    """Saved in every checkpoint as trainer_state.json."""

    step: int = 0
    best: dict[str, Any] | None = None
    eval_before: dict[str, float] | None = None
    evals_without_improvement: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> _State:
        """The state saved in ``checkpoint``; ``CheckpointError`` if its file is damaged."""
        saved = read_state(checkpoint)
        best, before = saved.get("best"), saved.get("eval_before")
        waiting = saved.get("evals_without_improvement", 0)
        best_ok = best is None or (
            isinstance(best, dict) and _is_number(best.get("value")) and isinstance(best.get("step"), int)
        )
        before_ok = before is None or (isinstance(before, dict) and all(map(_is_number, before.values())))
        if not (best_ok and before_ok and isinstance(waiting, int)):
            raise CheckpointError(f"{checkpoint / STATE_NAME} is damaged: a best or evaluation entry is malformed")
        return cls(step=saved["step"], best=best, eval_before=before, evals_without_improvement=waiting)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def train(recipe: Recipe) -> TrainResult:
    """Train the adapter a recipe describes and write its outputs; call on every process.

    >>> result = train(load_recipe("recipes/quickstart.yaml"))  # doctest: +SKIP
    >>> result.adapter_dir  # doctest: +SKIP
    'runs/quickstart/adapter'
    """
    started = time.perf_counter()
    accelerator = make_accelerator(recipe)
    if not accelerator.is_main_process:
        transformers.logging.set_verbosity_error()
    recipe, data = _read_data(recipe)
    candidates = _resume_candidates(recipe, accelerator)
    tokenizer, model = _build_model_and_adapter(recipe, data, accelerator)
    run = _prepare(recipe, accelerator, model, tokenizer, data)
    run.start(candidates)
    run.loop()
    return run.finish(started)


# -- the steps of a run ----------------------------------------------------------------------


@dataclass
class _Data:
    """The rows a run trains and evaluates on, and the class names (empty for causal LM)."""

    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    labels: list[str]


def _read_data(recipe: Recipe) -> tuple[Recipe, _Data]:
    """Read and check the rows, before any model loads; return the recipe with its label names filled in."""
    train_rows = read_rows(recipe.data.train, "train", recipe.data.train_limit)
    eval_rows = read_rows(recipe.data.eval, "test", recipe.data.eval_limit) if recipe.data.eval else None
    labels = label_names(recipe, train_rows) if recipe.task != "causal_lm" else []
    check_rows(recipe, train_rows, "data.train", labels)
    if eval_rows is not None:
        check_rows(recipe, eval_rows, "data.eval", labels)
    # The run directory records the label order, so exports can rebuild the same head.
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, labels=labels or None))
    return recipe, _Data(train_rows, eval_rows, labels)


def _build_model_and_adapter(recipe: Recipe, data: _Data, accelerator: Accelerator) -> tuple[Any, AdapterModel]:
    """The tokenizer (None for images), checked against the data, and the base model wrapped with the adapter."""
    text = recipe.task != "image_classification"
    with accelerator.main_process_first():  # the first process unpacks packaged models for the others
        tokenizer = load_tokenizer(recipe) if text else None
        if tokenizer is not None:
            check_tokenizer(recipe, tokenizer, sample_texts(recipe, data.train_rows))
        base = _base_model(recipe, data.labels, tokenizer)
    _prepare_base(recipe, base)
    try:
        return tokenizer, wrap(base, recipe.adapter)
    except (TargetError, ValueError) as exc:  # the adapter does not fit this model (targets, architecture)
        raise RecipeError(f"adapter: {exc}") from None


def _base_model(recipe: Recipe, labels: list[str], tokenizer: Any) -> transformers.PreTrainedModel:
    """``build_model``, with the tokenizer's padding id where the model's config has none."""
    base = build_model(recipe, labels)
    if tokenizer is not None and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id  # classifiers of decoder models find the last token by it
    return base


def _prepare_base(recipe: Recipe, base: transformers.PreTrainedModel) -> None:
    """QLoRA's set-up for a quantized base; gradient checkpointing if asked."""
    # Non-reentrant checkpointing needs no grad on the inputs and works under DDP.
    checkpointing = {"use_reentrant": False}
    if recipe.model.quantization != "none":
        prepare_quantized_model(base, recipe.train.gradient_checkpointing, checkpointing)
    elif recipe.train.gradient_checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable(checkpointing)


def _loaders(
    recipe: Recipe, model: AdapterModel, tokenizer: Any, data: _Data, notes: list[str]
) -> tuple[DataLoader, DataLoader | None]:
    """Tokenized (or image) examples in a shuffled train loader and an eval loader (None without eval data).

    What truncation and packing did is added to ``notes``.
    """
    config = model.base_model.config
    train_examples = build_examples(recipe, data.train_rows, "data.train", tokenizer, data.labels, config, notes)
    eval_examples = (
        build_examples(recipe, data.eval_rows, "data.eval", tokenizer, data.labels, config, notes)
        if data.eval_rows
        else None
    )
    if recipe.data.packing:
        packed = instruct.pack(train_examples, recipe.data.max_length)
        instruct.check_packing(model, packed)
        notes.append(f"data.train: {len(train_examples)} examples packed into {len(packed)} rows of up to "
                     f"{recipe.data.max_length} tokens")
        train_examples = packed
    if tokenizer is not None and eval_examples:
        # Order does not change the metrics; batches of similar length waste less compute on padding.
        eval_examples.sort(key=lambda e: len(e["input_ids"]))
    collate = collator(recipe.task, tokenizer.pad_token_id if tokenizer is not None else 0)
    train_loader = DataLoader(
        train_examples, batch_size=recipe.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate
    )
    eval_loader = (
        DataLoader(eval_examples, batch_size=recipe.eval.batch_size, collate_fn=collate) if eval_examples else None
    )
    return train_loader, eval_loader


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


def _prepare(recipe: Recipe, accelerator: Accelerator, model: AdapterModel, tokenizer: Any, data: _Data) -> _Run:
    """Loaders, optimizer and schedule, handed to ``accelerate``; the run's length in optimizer steps."""
    trainable, total = model.trainable_parameters()
    notes: list[str] = []
    train_loader, eval_loader = _loaders(recipe, model, tokenizer, data, notes)
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

    # Length: optimizer steps, counted after the loader is sharded across processes.
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        global_batch = recipe.train.batch_size * accelerator.num_processes
        raise RecipeError(
            f"data.train has {n_examples} examples, fewer than one global batch "
            f"(train.batch_size {recipe.train.batch_size} x {accelerator.num_processes} processes = {global_batch})"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / recipe.train.grad_accum)
    total_steps = recipe.train.max_steps or recipe.train.epochs * steps_per_epoch
    warmup = recipe.schedule.warmup_steps or int(recipe.schedule.warmup_ratio * total_steps)
    # Not passed to prepare(): accelerate would step it once per process per step, but
    # total_steps already counts steps of the global batch.
    scheduler = transformers.get_scheduler(recipe.schedule.name, optimizer, warmup, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    _checkpoint_adapter_only(accelerator, model)
    if fsdp.uses_fsdp(accelerator):
        fsdp.checkpoint_optimizer(accelerator, ddp_model, optimizer)
        fsdp.register_generate(model)
        warning = fsdp.coarse_unit_warning(model)
        if warning:
            accelerator.print(f"warning: {warning}", file=sys.stderr)
    return _Run(
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
        answers=_answer_prompts(recipe, tokenizer, data),
        notes=notes,
    )


def _answer_prompts(recipe: Recipe, tokenizer: Any, data: _Data) -> list[tuple[list[int], str]]:
    """(prompt, expected answer) of each eval example, when evaluation generates answers."""
    if not (recipe.eval.generate or recipe.eval.exact_match):
        return []
    if not data.eval_rows or data_format(recipe, data.eval_rows) == "text":
        raise RecipeError(
            "eval.generate / eval.exact_match need prompt/response or messages eval data (data.format), "
            "so that each eval example has a prompt and an answer"
        )
    return instruct.answer_prompts(
        conversations(recipe, data.eval_rows, "data.eval"), tokenizer, recipe.data.chat_template, recipe.data.max_length
    )


@dataclass
class _Run:
    """A prepared run: the objects the loop uses and its progress (``state``).

    The loop calls ``_after_step`` once per optimizer step; logging, evaluation
    and checkpointing are its hooks, each a method of its own.
    """

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
    state: _State = field(default_factory=_State)
    resumed_from: Path | None = None
    checked_step: int = 0  # the last step at which the loss and the adapter were checked finite
    best_adapter: dict[str, torch.Tensor] | None = None  # with output.best: the best evaluation's adapter (on CPU)
    stopped_early: bool = False
    log: _MetricsLog = field(init=False)
    # Set by loop(): the epoch, the progress bar, and the log window (loss sum, micro-batches,
    # samples, tokens since the last log) with its start time.
    epoch: int = field(init=False)
    bar: tqdm = field(init=False)
    window: torch.Tensor = field(init=False)
    window_started: float = field(init=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output.dir)

    @property
    def text(self) -> bool:
        return self.recipe.task != "image_classification"

    @property
    def sharded(self) -> bool:
        return fsdp.uses_fsdp(self.accelerator)

    def start(self, candidates: list[Path]) -> None:
        """Resume from the newest loadable candidate, open the run directory and its log, evaluate before if asked."""
        accelerator, recipe = self.accelerator, self.recipe
        if recipe.output.best:
            self._keep_best_in_checkpoints()
        if candidates:
            self._restore(candidates)
        self.checked_step = self.state.step
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "recipe.yaml", recipe.to_yaml())
        if recipe.output.trackers:
            accelerator.init_trackers(self.run_dir.name, config=_flat(recipe.to_dict()))
        self.log = _MetricsLog(
            self.run_dir / "metrics.jsonl",
            accelerator.is_main_process,
            keep_until=self.state.step if self.resumed_from else None,
            trackers=accelerator.log if recipe.output.trackers else None,
        )
        for note in self.notes:
            accelerator.print(note)
        accelerator.print(
            f"training {recipe.adapter.method} on {recipe.task}: {self.n_examples} examples, "
            f"{accelerator.num_processes} process(es){' sharded with FSDP2' if self.sharded else ''}, global batch "
            f"{recipe.train.batch_size * accelerator.num_processes * recipe.train.grad_accum}, {self.total_steps} steps; "
            f"trainable params {self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.3f}%)"
        )
        if recipe.eval.before and self.state.step == 0:
            self.state.eval_before = self.evaluate("before")

    def _restore(self, candidates: list[Path]) -> None:
        """Load the newest candidate that loads; newer damaged ones are set aside, each with a message."""
        accelerator, failures = self.accelerator, []
        for checkpoint in candidates:
            self._check_sharding(checkpoint)
            error = self._load(checkpoint)
            if error is None:
                break
            failures.append(f"{checkpoint}: {error}")
            accelerator.print(f"checkpoint {checkpoint} cannot be loaded ({error})", file=sys.stderr)
        else:
            raise CheckpointError(f"cannot resume: no checkpoint loads ({'; '.join(failures)})")
        if accelerator.is_main_process:
            for damaged in candidates[: len(failures)]:
                print(f"set aside the damaged {damaged.name} as {set_aside(damaged).name}", file=sys.stderr)
        accelerator.wait_for_everyone()
        self.resumed_from = checkpoint
        accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")

    def _check_sharding(self, checkpoint: Path) -> None:
        """Refuse a checkpoint of a run sharded otherwise (FSDP or not): the two keep the optimizer in other files."""
        try:
            sharded = read_state(checkpoint).get("sharded", False)
        except CheckpointError:
            return  # damaged: _load says so
        if sharded != self.sharded:
            how = "under FSDP (accelerate launch --config_file <an FSDP config>)" if sharded else "without FSDP"
            raise LaunchError(
                f"{checkpoint} was written by a run {'sharded with' if sharded else 'not sharded with'} FSDP; "
                f"resume it as it was launched, {how}: the two keep the optimizer state in different files"
            )

    def _load(self, checkpoint: Path) -> str | None:
        """Load ``checkpoint`` on every process; None if all succeeded, else what went wrong."""
        error = None
        self.best_adapter = None  # not one from a newer checkpoint that failed half-way
        try:
            state = _State.read(checkpoint)
            with fsdp.state_without_model(self.accelerator):
                self.accelerator.load_state(str(checkpoint))
        except Exception as exc:  # a damaged file fails in many ways (JSON, pickle, torch, safetensors)
            error = f"{type(exc).__name__}: {exc}"
        failed = torch.tensor(float(error is not None), device=self.accelerator.device)
        if self.accelerator.reduce(failed, "sum").item():  # the processes must agree on what they resume from
            return error or "it failed to load on another process"
        self.state = state
        return None

    def loop(self) -> None:
        """Optimizer steps until ``total_steps``, resuming mid-epoch where the checkpoint left off."""
        recipe, accelerator, state = self.recipe, self.accelerator, self.state
        seed, ga, process = recipe.train.seed, recipe.train.grad_accum, accelerator.process_index
        self.epoch, done_in_epoch = divmod(state.step, self.steps_per_epoch)
        skip = done_in_epoch * ga  # batches of this epoch that the checkpoint already trained on
        micro = self.epoch * self.batches_per_epoch + skip
        self.window = torch.zeros(4, device=accelerator.device)
        self.window_started = time.perf_counter()
        self.bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not accelerator.is_main_process,
            file=_LineTrackingStream(sys.stderr),
        )
        self.ddp_model.train()
        with self.bar:
            while state.step < self.total_steps and not self.stopped_early:
                self.train_loader.set_epoch(self.epoch)
                batches = accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                skip = 0
                for batch in batches:
                    torch.manual_seed(_micro_seed(seed, micro, process))
                    micro += 1
                    self._micro_step(batch)
                    if not accelerator.sync_gradients:
                        continue
                    if not accelerator.optimizer_step_was_skipped:
                        self.scheduler.step()
                    state.step += 1
                    self.bar.update(1)
                    self._after_step()
                    if state.step >= self.total_steps or self.stopped_early:
                        break
                self.epoch += 1

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward and backward one micro-batch; the optimizer steps on the last of each accumulation."""
        accelerator, max_norm = self.accelerator, self.recipe.optim.max_grad_norm
        with accelerator.accumulate(self.ddp_model):
            loss = self.ddp_model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_norm:
                accelerator.clip_grad_norm_(self.params, max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.window[0] += loss.detach().float()
        self.window[1] += 1
        self.window[2] += len(batch["labels"])
        if "attention_mask" in batch:
            self.window[3] += batch["attention_mask"].sum()
        elif "position_ids" in batch:  # packed rows: every position holds a token (the little padding counts)
            self.window[3] += batch["input_ids"].numel()

    def _after_step(self) -> None:
        """The hooks that run after each optimizer step; whatever they write is checked finite first."""
        recipe, step = self.recipe, self.state.step
        log = step % recipe.train.log_every == 0 or step == self.total_steps
        evaluate = recipe.eval.every and step % recipe.eval.every == 0 and step < self.total_steps
        checkpoint = recipe.checkpoint.every and step % recipe.checkpoint.every == 0
        if log or evaluate or checkpoint:
            self._check_finite()
        if log:
            self._log_train()
        if evaluate:
            self.evaluate("during")
        if checkpoint:
            state = {**asdict(self.state), "sharded": self.sharded}
            save_checkpoint(self.accelerator, self.run_dir, state, recipe.checkpoint.keep)

    def _check_finite(self) -> None:
        """Stop with ``TrainingDiverged`` if a loss since the last log, or a trainable parameter, is NaN or infinite.

        Runs before anything is logged, evaluated or saved (the last step always
        logs), so no checkpoint, log record or output holds a diverged adapter.
        """
        # Each process checks its own slice of a sharded parameter; the sum below covers them all.
        flags = [~torch.isfinite(self.window[0])] + [~torch.isfinite(fsdp.local(p)).all() for p in self.params]
        diverged = self.accelerator.reduce(torch.stack(flags).any().float(), "sum").item()
        if diverged:
            latest = latest_checkpoint(self.run_dir)
            kept = f"the newest checkpoint, {latest}, is from before" if latest else "no checkpoint was written"
            first, last = self.checked_step + 1, self.state.step
            when = f"at step {last}" if first == last else f"between steps {first} and {last}"
            raise TrainingDiverged(
                f"training diverged: the loss or the adapter became NaN or infinite {when}; "
                f"the run stopped there and {kept}. "
                "Lower optim.lr, keep optim.max_grad_norm set, or use model.dtype bfloat16 or float32 "
                "rather than float16, and train again in a fresh output.dir"
            )
        self.checked_step = self.state.step

    def _log_train(self) -> None:
        """Write the mean loss and throughput since the last log, over all processes."""
        loss_sum, micro_batches, samples, n_tokens = self.accelerator.reduce(self.window, "sum").tolist()
        elapsed = time.perf_counter() - self.window_started
        record = {
            "type": "train",
            "step": self.state.step,
            "epoch": self.epoch,
            "loss": loss_sum / micro_batches,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": samples / elapsed,
        }
        if self.text:
            record["tokens_per_s"] = n_tokens / elapsed
        self.log.write(record)
        rate = f"{record['tokens_per_s']:.0f} tok/s" if self.text else f"{record['samples_per_s']:.1f} samples/s"
        self.bar.set_postfix_str(f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, {rate}", refresh=True)
        self.window.zero_()
        self.window_started = time.perf_counter()

    def evaluate(self, when: str) -> dict[str, float]:
        """Evaluate on ``data.eval``, log it, and track the best result (``when``: before, during, after)."""
        recipe, state = self.recipe, self.state
        metrics = evaluate(self.ddp_model, self.eval_loader, recipe.task, self.accelerator, self.labels)
        metrics.update(self._generate(when))
        self.log.write({"type": "eval", "step": state.step, "when": when, **metrics})
        self._say(format_eval(when, state.step, metrics))
        if when != "before":
            self._track_best(metrics[recipe.metric], when)
        return metrics

    def _track_best(self, value: float, when: str) -> None:
        """Keep the best result (and its adapter, with output.best); stop early after eval.patience evals without gain."""
        recipe, state, metric = self.recipe, self.state, self.recipe.metric
        best = state.best["value"] if state.best is not None else None
        if improves(value, best, metric, recipe.eval.min_delta):
            state.evals_without_improvement = 0
        elif when == "during":
            state.evals_without_improvement += 1
        if improves(value, best, metric):
            state.best = {"metric": metric, "value": value, "step": state.step}
            if recipe.output.best:  # every process keeps the whole adapter (gathered when sharded)
                self.best_adapter = {
                    k: fsdp.gathered(v).detach().to("cpu", copy=True) for k, v in self.model.adapter_state_dict().items()
                }
        patience = recipe.eval.patience
        if when == "during" and patience and state.evals_without_improvement >= patience:
            self.stopped_early = True
            self._say(
                f"early stop at step {state.step}: eval {metric} has not improved by more than {recipe.eval.min_delta} "
                f"in {patience} evaluation(s); best {state.best['value']:.4f} at step {state.best['step']}"
            )

    def _generate(self, when: str) -> dict[str, float]:
        """Greedy answers to eval prompts: the first ``eval.generate`` logged, exact match over all if asked."""
        spec, accelerator, tokenizer = self.recipe.eval, self.accelerator, self.tokenizer
        if not self.answers:
            return {}
        prompts = self.answers if spec.exact_match else self.answers[: spec.generate]
        mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
        inputs = [prompts[i][0] for i in mine]
        if self.sharded:
            # Each forward pass gathers weights from every process, so all must decode as many prompts
            # (the first one fills in; its answer is dropped below), each for as many steps (synced).
            inputs += [prompts[0][0]] * (math.ceil(len(prompts) / accelerator.num_processes) - len(mine))
        with accelerator.autocast():
            texts = instruct.generate_answers(
                self.model, tokenizer, inputs, spec.max_new_tokens, spec.batch_size, synced=self.sharded
            )
        answers = [text for _, text in sorted(gather_object(list(zip(mine, texts))))]
        for (prompt, expected), answer in list(zip(prompts, answers))[: spec.generate]:
            prompt_text = tokenizer.decode(prompt)
            record = {"type": "generation", "step": self.state.step, "when": when, "prompt": prompt_text,
                      "expected": expected, "answer": answer}
            self.log.write(record)
            self._say(f"generation (step {self.state.step}): {prompt_text[-60:]!r} -> {answer!r} (expected {expected!r})")
        if not spec.exact_match:
            return {}
        return {"exact_match": instruct.exact_match(answers, [expected for _, expected in prompts])}

    def _keep_best_in_checkpoints(self) -> None:
        """Save the best adapter in each checkpoint and restore it on resume, so output.best survives a restart."""

        def save(models: list, weights: list, output_dir: str) -> None:
            if self.accelerator.is_main_process and self.best_adapter is not None:
                save_file(self.best_adapter, str(Path(output_dir) / BEST_ADAPTER_FILE))

        def load(models: list, input_dir: str) -> None:
            path = Path(input_dir) / BEST_ADAPTER_FILE
            if path.is_file():
                self.best_adapter = load_file(str(path))

        self.accelerator.register_save_state_pre_hook(save)
        self.accelerator.register_load_state_pre_hook(load)

    def _say(self, line: str) -> None:
        """Print a line of its own on the main process, never glued to the progress bar.

        On a terminal tqdm clears the bar and redraws it under the line; in a
        redirected log the bar's last state ends its line first.
        """
        if not self.accelerator.is_main_process:
            return
        bar = getattr(self, "bar", None)
        if bar is not None and not bar.disable:
            if bar.fp.isatty():
                bar.write(line)
                return
            if not bar.fp.at_line_start:  # the bar drew since the last line: end its line
                bar.fp.write("\n")
                bar.fp.flush()
        print(line, flush=True)

    def finish(self, started: float) -> TrainResult:
        """Evaluate after training, write the adapter, exports and summary; return what was produced."""
        accelerator, recipe = self.accelerator, self.recipe
        eval_after = self.evaluate("after") if self.eval_loader is not None else None
        adapter_dir, merged_dir, peft_dir = _write_outputs(recipe, accelerator, self.model, self.tokenizer, self.run_dir)
        best_dir = None
        if recipe.output.best and self.best_adapter is not None:
            # The last adapter is written; the model now takes the best one's tensors for its outputs.
            self.model.load_adapter_tensors(self.model.active_adapter, self.best_adapter, source="the best evaluation")
            best_dir = str(self.run_dir / "best")
            _write_outputs(recipe, accelerator, self.model, self.tokenizer, Path(best_dir))
        result = TrainResult(
            output_dir=str(self.run_dir),
            adapter_dir=adapter_dir,
            merged_dir=merged_dir,
            peft_dir=peft_dir,
            metrics_path=str(self.log.path),
            steps=self.state.step,
            trainable_params=self.trainable,
            total_params=self.total,
            wall_time_s=time.perf_counter() - started,
            metric=recipe.metric,
            eval_before=self.state.eval_before,
            eval_after=eval_after,
            best=self.state.best,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            best_dir=best_dir,
            stopped_early=self.stopped_early,
            data_notes=self.notes,
        )
        if accelerator.is_main_process:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(asdict(result), indent=2) + "\n")
            print(format_summary(result))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result


# -- setup ---------------------------------------------------------------------------------


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


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as ``{"section.field": value}`` of the scalar types trackers store (others as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def load_tokenizer(recipe: Recipe) -> Any:
    """The recipe's tokenizer (``model.tokenizer``, else the model's own), with a padding token."""
    name = recipe.model.tokenizer or recipe.model.path
    if registry.is_tokenizer(name):
        tokenizer = registry.build_tokenizer(name)
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(registry.resolve_model(name))
        except (OSError, ValueError) as exc:
            raise RecipeError(
                f"model.tokenizer: cannot load a tokenizer from {name!r} ({_one_line(exc)}); set model.tokenizer to a "
                f"tokenizer directory, a registered model or one of {registry.tokenizer_names()}"
            ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError(f"model.tokenizer {name!r} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of attention and loss
    return tokenizer


def check_tokenizer(recipe: Recipe, tokenizer: Any, texts: list[str], sample: int = 200) -> None:
    """Refuse a tokenizer that does not fit the model's vocabulary or cannot read the data, before the model loads.

    A model directory without tokenizer files still loads a tokenizer, one
    that knows no words (every word becomes the unknown token, or nothing): a
    real tokenizer gives at least one known token per word.
    """
    name = recipe.model.tokenizer or recipe.model.path
    vocab = getattr(model_config(recipe).get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise RecipeError(
            f"model.tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
            "raise vocab_size in model.config or use a matching model.tokenizer"
        )
    texts = [t for t in texts[:sample] if t.strip()]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    known = sum(1 for ids in encoded for i in ids if i != tokenizer.unk_token_id)
    words = sum(len(t.split()) for t in texts)
    if 2 * known < words:
        raise RecipeError(
            f"model.tokenizer {name!r} knows almost none of the text in data.train ({known} known tokens for "
            f"{words} words in its first {len(texts)} examples); a model directory without tokenizer files gives "
            "such an empty tokenizer: set model.tokenizer to the tokenizer the model was trained with"
        )


def model_config(recipe: Recipe, labels: list[str] | None = None) -> transformers.PretrainedConfig:
    """The base model's config, read from ``model.path`` or built from ``model.config``, without any weights."""
    spec = recipe.model
    label_kwargs = {}
    if labels:
        label_kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    if spec.config is not None:
        return transformers.AutoConfig.for_model(**{**spec.config, **label_kwargs})
    try:
        return transformers.AutoConfig.from_pretrained(registry.resolve_model(spec.path), **label_kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.path {spec.path!r}: cannot read its config ({_one_line(exc)})") from None


def build_model(recipe: Recipe, labels: list[str]) -> transformers.PreTrainedModel:
    """The base model: loaded from ``model.path`` or built from ``model.config``, seeded by ``train.seed``."""
    set_seed(recipe.train.seed)  # the same new weights (heads, or all of a built model) on every process and rerun
    spec = recipe.model
    cls = getattr(transformers, spec.class_name or TASK_MODEL_CLASSES[recipe.task])
    dtype = getattr(torch, spec.dtype)
    config = model_config(recipe, labels)
    if spec.config is not None:
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        return model.to(dtype)
    # ignore_mismatched_sizes: a checkpoint's head for other classes is replaced, as for the label count.
    extra = {"ignore_mismatched_sizes": True} if labels else {}
    path = registry.resolve_model(spec.path)
    if spec.quantization != "none":
        # The heads the adapter trains and the modules the checkpoint lacks stay in float.
        skip = float_module_names(cls, path, config, recipe.adapter.modules_to_save)
        extra["quantization_config"] = _bnb_config(spec.quantization, dtype, skip)
    return cls.from_pretrained(path, config=config, dtype=dtype, **extra)


def _bnb_config(quantization: str, compute_dtype: torch.dtype, skip: list[str]) -> transformers.BitsAndBytesConfig:
    """bitsandbytes settings of ``model.quantization``: QLoRA's NF4 (or FP4) with double quantization, or LLM.int8.

    ``skip``: the modules left in float (``llm_int8_skip_modules``, read by the 4-bit loader too).
    """
    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
    )


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _resume_candidates(recipe: Recipe, accelerator: Accelerator) -> list[Path]:
    """Checkpoints to resume from, newest first (none: a fresh start); refuses to mix a new run into an old one."""
    resume, run_dir = recipe.checkpoint.resume, Path(recipe.output.dir)
    found = list_checkpoints(run_dir)
    if resume == "never":
        if found:
            raise RecipeError(
                f"output.dir {run_dir} already holds checkpoints (latest {found[-1].name}): continue that run with "
                "--resume (checkpoint.resume=auto), or choose another output.dir, or delete it"
            )
        return []
    if resume == "auto":
        candidates = found[::-1]
    else:
        read_state(resume)  # fails early on a directory that is not a checkpoint
        candidates = [Path(resume)]
    if candidates:
        _check_unchanged(recipe, run_dir, accelerator)
    return candidates


def _check_unchanged(recipe: Recipe, run_dir: Path, accelerator: Accelerator) -> None:
    """Refuse to resume with a recipe that changes what is trained; a damaged saved recipe only warns."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return
    text = saved.read_text(errors="replace")
    try:
        # repeft ends the file with a newline; one cut short mid-line may still parse, to wrong values.
        old = yaml.safe_load(text) if text.endswith("\n") else None
    except yaml.YAMLError:
        old = None
    if not isinstance(old, dict):
        accelerator.print(
            f"warning: {saved} is empty or damaged, so resuming cannot check that the recipe is unchanged; "
            "it is written again",
            file=sys.stderr,
        )
        return
    changed = _changed_fields(old, recipe.to_dict())
    if changed:
        raise RecipeError(
            f"cannot resume {run_dir}: the recipe changed in {', '.join(changed)} since the run started "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change)"
        )


def _changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Fields of ``old`` whose value differs in ``new``; fields ``old`` lacks (cut off, or added to repeft
    since it was written) are not compared."""
    changed = []
    for key in sorted(old, key=str):
        name = f"{prefix}{key}"
        if name in RESUME_MAY_CHANGE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_fields(a, b, name + ".")
        elif a != b:
            changed.append(name)
    return changed


def _checkpoint_adapter_only(accelerator: Accelerator, model: AdapterModel) -> None:
    """Make ``save_state``/``load_state`` store the adapter, not the whole frozen base model."""

    def save(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        model.save_adapter(Path(output_dir) / "adapter", is_main_process=accelerator.is_main_process)

    def load(models: list, input_dir: str) -> None:
        models.clear()
        _, tensors = read_adapter_dir(Path(input_dir) / "adapter")
        model.load_adapter_tensors(model.active_adapter, tensors, source=input_dir)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _micro_seed(seed: int, micro_batch: int, process: int) -> int:
    # Distinct for every (seed, process, micro-batch < 2**32); plain arithmetic, stable across Python versions.
    return ((seed * 1_000_003 + process) * 2**32 + micro_batch) % 2**63


# -- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    task: str,
    accelerator: Accelerator,
    class_names: list[str] | None = None,
) -> dict[str, float]:
    """Mean loss, plus perplexity (causal LM) or accuracy, precision, recall and F1 (classification), over all processes.

    ``class_names`` names the classes in per-class metrics (``f1/<name>``); default: their ids.
    """
    was_training = model.training
    model.eval()
    losses, counts, predictions, targets = [], [], [], []
    for batch in loader:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        if task == "causal_lm":
            targets = labels[:, 1:]
            per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
            loss, count = per_token.sum(1), (targets != -100).sum(1)
            loss, count = accelerator.gather_for_metrics((loss, count))
            counts.append(count)
        else:
            loss = F.cross_entropy(logits, labels, reduction="none")
            loss, prediction, target = accelerator.gather_for_metrics((loss, logits.argmax(-1), labels))
            predictions.append(prediction)
            targets.append(target)
        losses.append(loss)
    model.train(was_training)
    total_loss = torch.cat(losses).sum().item()
    if task == "causal_lm":
        tokens = torch.cat(counts).sum().item()
        return {"loss": total_loss / tokens, "perplexity": math.exp(min(total_loss / tokens, 50.0))}
    targets = torch.cat(targets)
    names = class_names or [str(i) for i in range(logits.shape[-1])]
    return {"loss": total_loss / len(targets), **classification_scores(torch.cat(predictions), targets, names)}


def format_eval(when: str, step: int, metrics: dict[str, float]) -> str:
    """The printed eval line: overall metrics, then per-class F1 (the rest of the per-class metrics are in the log)."""
    overall = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
    per_class = ", ".join(f"{k.removeprefix('f1/')} {v:.4f}" for k, v in metrics.items() if k.startswith("f1/"))
    return f"eval ({when}, step {step}): {overall}" + (f"; f1 per class: {per_class}" if per_class else "")


# -- outputs -----------------------------------------------------------------------------------


class _LineTrackingStream:
    """A text stream that remembers whether its output ends a line (tqdm redraws with ``\\r``, no newline)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _MetricsLog:
    """JSON lines, one per log step or eval, written by the main process only."""

    def __init__(
        self, path: Path, enabled: bool, keep_until: int | None, trackers: Callable[..., None] | None = None
    ) -> None:
        # ``trackers`` (accelerate's ``Accelerator.log``) also gets each record's numbers, as "<type>/<name>".
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _records_until(path, keep_until) if keep_until is not None and path.is_file() else []
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.trackers is not None:
            numbers = {
                f"{record['type']}/{k}": v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if numbers:
                self.trackers(numbers, step=record["step"])
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({**record, "time": time.time()}) + "\n")


def _records_until(path: Path, step: int) -> list[str]:
    """The lines of a metrics log up to ``step`` (a resumed run redoes the later ones); unreadable lines are dropped.

    A kill while appending leaves a torn last line.
    """
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
    return kept


def _write_outputs(
    recipe: Recipe, accelerator: Accelerator, model: AdapterModel, tokenizer: Any, run_dir: Path
) -> tuple[str, str | None, str | None]:
    """Write the adapter and the exports the recipe asks for; return their directories."""
    adapter_dir = run_dir / "adapter"
    merged_dir = run_dir / "merged" if recipe.output.merged else None
    peft_dir = run_dir / "peft" if recipe.output.peft else None
    accelerator.wait_for_everyone()
    model.save_adapter(adapter_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process and (peft_dir or merged_dir):
        if fsdp.is_sharded_model(model):
            # The sharded base is never gathered whole: the exports merge into the base as
            # training built it (its weights are frozen), loaded on this process's CPU.
            model = load_adapter(_base_model(recipe, recipe.data.labels or [], tokenizer), adapter_dir)
        if peft_dir is not None:
            export_peft(model, peft_dir)
        if merged_dir is not None:
            if recipe.model.quantization != "none":
                export_merged(model, merged_dir)  # dequantized, merged in fp32: merging into 4/8-bit is refused
            else:
                model.save_merged(merged_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(merged_dir)
    accelerator.wait_for_everyone()
    return str(adapter_dir), merged_dir and str(merged_dir), peft_dir and str(peft_dir)


def format_summary(result: TrainResult) -> str:
    """The lines printed at the end of a run."""
    minutes, seconds = divmod(result.wall_time_s, 60)
    share = 100 * result.trainable_params / result.total_params
    lines = [
        f"done: {result.steps} steps in {int(minutes)}m{seconds:04.1f}s; "
        + f"trainable params {result.trainable_params:,} of {result.total_params:,} ({share:.3f}%)"
    ]
    if result.eval_after is not None:
        before = f"{result.eval_before[result.metric]:.4f} before -> " if result.eval_before else ""
        best = f" (best {result.best['value']:.4f} at step {result.best['step']})" if result.best else ""
        lines.append(f"eval {result.metric}: {before}{result.eval_after[result.metric]:.4f} after{best}")
    if result.stopped_early:
        lines.append(f"stopped early at step {result.steps} (eval.patience)")
    lines.append(f"adapter: {result.adapter_dir}")
    if result.merged_dir:
        lines.append(f"merged:  {result.merged_dir}")
    if result.peft_dir:
        lines.append(f"peft:    {result.peft_dir}")
    if result.best_dir:
        lines.append(f"best:    {result.best_dir} (step {result.best['step']})")
    lines.append(f"metrics: {result.metrics_path}")
    return "\n".join(lines)
