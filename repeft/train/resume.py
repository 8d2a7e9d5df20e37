"""Checkpoints and resume: what a checkpoint holds, where a run resumes from, and the refusals that keep it exact.

A checkpoint is ``accelerate``'s saved state made adapter-only (the adapter,
not the frozen base), the optimizer, the schedule and ``trainer_state.json``
(:class:`State`); with ``output.best`` also the best evaluation's adapter.
Resuming loads the newest checkpoint that loads on every process, setting
damaged newer ones aside. Each checkpoint records what it was made from (the
recipe, and a digest of each data file): resuming refuses a checkpoint made
from another recipe or other data, and a fresh start refuses a directory that
holds another run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .. import fsdp
from ..checkpoint import STATE_NAME, CheckpointError, list_checkpoints, read_state, save_checkpoint, set_aside
from ..datasource import parse_source
from ..model import AdapterModel
from ..recipe import Recipe, RecipeError
from ..recipe_yaml import parse_yaml
from ..run_files import refuse_earlier_outputs
from .launch import LaunchError

if TYPE_CHECKING:
    from .run import Run

# Recipe fields that may change between a run and its resumption without changing what is trained.
RESUME_MAY_CHANGE = ("checkpoint", "output", "eval", "train.log_every")
# The best evaluation's adapter, kept in each checkpoint when output.best is on.
BEST_ADAPTER_FILE = "best_adapter.safetensors"


@dataclass
class State:
    """Saved in every checkpoint as trainer_state.json."""

    step: int = 0
    best: dict[str, Any] | None = None
    eval_before: dict[str, float] | None = None
    evals_without_improvement: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> State:
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


# -- before the model loads: where to resume from ---------------------------------------------


def record_made_from(recipe: Recipe, passed_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it: the whole recipe (base model, adapter, data sources,
    seed, optimizer, ...) and a SHA-256 of each data file, so that a changed file under the same name shows;
    ``passed_sha256``: those of the rows passed from Python (``train_data``, ``eval_data``), which have no file."""
    files = dict(passed_sha256 or {})
    for name, source in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if source is not None and parse_source(source, "train") is None:
            files[name] = _sha256(Path(source))
    # As trainer_state.json gives it back (lists for tuples, string keys), so that equal compares equal.
    return json.loads(json.dumps({"recipe": recipe.to_dict(), "data_sha256": files}))


def _sha256(path: Path) -> str:
    """A data file's SHA-256; a folder's (datasets' save_to_disk) covers every file's name and bytes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resume_candidates(recipe: Recipe, made_from: dict[str, Any], accelerator: Accelerator) -> list[Path]:
    """Checkpoints to resume from, newest first (none: a fresh start); refuses to mix a new run into an old one,
    or to continue a checkpoint made from another recipe or other data (``made_from``: what this run is made from)."""
    resume, run_dir = recipe.checkpoint.resume, Path(recipe.output.dir)
    found = list_checkpoints(run_dir)
    if resume == "never" and found:
        raise RecipeError(
            f"output.dir {run_dir} already holds checkpoints (latest {found[-1].name}): continue that run with "
            "--resume (checkpoint.resume=auto), or choose another output.dir, or delete it"
        )
    if resume == "never":
        candidates = []
    elif resume == "auto":
        candidates = found[::-1]
    else:
        read_state(resume)  # fails early on a directory that is not a checkpoint
        candidates = [Path(resume)]
    if not any(c.resolve().parent.parent == run_dir.resolve() for c in candidates):
        refuse_earlier_outputs(run_dir, resume)  # a fresh start, or another run's checkpoint continued here
    unrecorded = [c for c in candidates if not _check_made_from(c, made_from)]
    if unrecorded:  # written by an older repeft: compare with the recipe the run directory holds
        _check_unchanged(recipe, run_dir, accelerator)
    return candidates


def _check_made_from(checkpoint: Path, made_from: dict[str, Any]) -> bool:
    """Refuse to resume from a checkpoint made from another recipe or other data; False if it records nothing.

    A damaged checkpoint counts as checked: loading it fails, and resume moves on to an older one.
    """
    try:
        recorded = read_state(checkpoint).get("made_from")
    except CheckpointError:
        return True
    if not isinstance(recorded, dict) or not isinstance(recorded.get("recipe"), dict):
        return False
    changed = _changed_fields(recorded["recipe"], made_from["recipe"])
    digests = recorded.get("data_sha256") if isinstance(recorded.get("data_sha256"), dict) else {}
    contents = [
        name for name, digest in digests.items() if name not in changed and made_from["data_sha256"].get(name) != digest
    ]
    differ = ([f"another {', '.join(changed)}"] if changed else []) + (
        [f"other contents of {', '.join(contents)}"] if contents else []
    )
    if differ:
        raise RecipeError(
            f"cannot resume from {checkpoint}: it was made with {' and '.join(differ)} "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change); train afresh in a new output.dir"
        )
    return True


def _check_unchanged(recipe: Recipe, run_dir: Path, accelerator: Accelerator) -> None:
    """Refuse to resume with a recipe that changes what is trained; a damaged saved recipe only warns."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return
    text = saved.read_text(errors="replace")
    try:
        # repeft ends the file with a newline; one cut short mid-line may still parse, to wrong values.
        old = parse_yaml(text, str(saved)) if text.endswith("\n") else None
    except RecipeError:
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


# -- what a checkpoint holds --------------------------------------------------------------------


def checkpoint_adapter_only(accelerator: Accelerator, model: AdapterModel) -> None:
    """Make ``save_state``/``load_state`` store the adapter, not the whole frozen base model."""

    def save(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        model.save_adapter(Path(output_dir) / "adapter", is_main_process=accelerator.is_main_process)

    def load(models: list, input_dir: str) -> None:
        models.clear()
        _, tensors = model.read_adapter(Path(input_dir) / "adapter")
        model.load_adapter_tensors(model.active_adapter, tensors, source=input_dir)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def keep_best_in_checkpoints(run: Run) -> None:
    """Save the best adapter in each checkpoint and restore it on resume, so output.best survives a restart."""

    def save(models: list, weights: list, output_dir: str) -> None:
        if run.accelerator.is_main_process and run.best_adapter is not None:
            save_file(run.best_adapter, str(Path(output_dir) / BEST_ADAPTER_FILE))

    def load(models: list, input_dir: str) -> None:
        path = Path(input_dir) / BEST_ADAPTER_FILE
        if path.is_file():
            run.best_adapter = load_file(str(path))

    run.accelerator.register_save_state_pre_hook(save)
    run.accelerator.register_load_state_pre_hook(load)


def save(run: Run) -> None:
    """Write the checkpoint of the current step (keeping the newest ``checkpoint.keep``)."""
    state = {**asdict(run.state), "sharded": run.sharded, "made_from": run.made_from}
    save_checkpoint(run.accelerator, run.run_dir, state, run.recipe.checkpoint.keep)


# -- resuming -----------------------------------------------------------------------------------


def restore(run: Run, candidates: list[Path]) -> None:
    """Load the newest candidate that loads; newer damaged ones are set aside, each with a message."""
    accelerator, failures = run.accelerator, []
    for checkpoint in candidates:
        _check_sharding(run, checkpoint)
        error = _load(run, checkpoint)
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
    run.resumed_from = checkpoint
    # A run that stopped early and was killed before writing its outputs stays stopped.
    patience = run.recipe.eval.patience
    run.stopped_early = bool(patience) and run.state.evals_without_improvement >= patience
    accelerator.print(f"resumed from {checkpoint} at step {run.state.step}")


def _check_sharding(run: Run, checkpoint: Path) -> None:
    """Refuse a checkpoint of a run sharded otherwise (FSDP or not): the two keep the optimizer in other files."""
    try:
        sharded = read_state(checkpoint).get("sharded", False)
    except CheckpointError:
        return  # damaged: _load says so
    if sharded != run.sharded:
        how = "under FSDP (accelerate launch --config_file <an FSDP config>)" if sharded else "without FSDP"
        raise LaunchError(
            f"{checkpoint} was written by a run {'sharded with' if sharded else 'not sharded with'} FSDP; "
            f"resume it as it was launched, {how}: the two keep the optimizer state in different files"
        )


def _load(run: Run, checkpoint: Path) -> str | None:
    """Load ``checkpoint`` on every process; None if all succeeded, else what went wrong."""
    error = None
    run.best_adapter = None  # not one from a newer checkpoint that failed half-way
    try:
        state = State.read(checkpoint)
        with fsdp.state_without_model(run.accelerator):
            run.accelerator.load_state(str(checkpoint))
    except Exception as exc:  # a damaged file fails in many ways (JSON, pickle, torch, safetensors)
        error = f"{type(exc).__name__}: {exc}"
    failed = torch.tensor(float(error is not None), device=run.accelerator.device)
    if run.accelerator.reduce(failed, "sum").item():  # the processes must agree on what they resume from
        return error or "it failed to load on another process"
    run.state = state
    return None
