"""Training checkpoints: ``accelerator.save_state`` written atomically, newest N kept.

A checkpoint is ``<output>/checkpoints/step-00000050/``. It is written under
``.tmp-step-00000050`` and renamed into place once every process has finished
writing, so a directory with the final name is always complete; a crash
mid-write leaves only a ``.tmp-`` directory, which resume ignores and the next
save replaces. Inside: accelerate's optimizer, scheduler, RNG and step state,
``adapter/`` (a normal adapter directory, so any checkpoint can be exported)
and ``trainer_state.json``. A sharded (FSDP) run's checkpoint holds the same
with its optimizer state gathered whole (``fsdp.GATHERED_OPTIMIZER_NAME``),
never the sharded base. A checkpoint found damaged when resuming is moved
aside to ``step-00000050.damaged`` (see :func:`set_aside`).

The run's own small files (``recipe.yaml``, ``summary.json``, a rewritten
``metrics.jsonl``) are replaced whole with ``repeft.files.write_text_atomic``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import write_text_atomic
from .fsdp import state_without_model

if TYPE_CHECKING:  # `repeft info` reads checkpoints without importing accelerate
    from accelerate import Accelerator

STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointError(ValueError):
    """A checkpoint, or a run's own file (``summary.json``), that is missing, damaged, or cannot be loaded."""


def read_json_file(path: Path) -> Any:
    """The JSON value in a file repeft wrote; ``CheckpointError`` if it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged: it is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path} is damaged: its JSON is nested too deeply") from None


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``: a JSON object with a ``step`` count (checked)."""
    path = Path(checkpoint) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a repeft checkpoint: it has no {STATE_NAME}")
    state = read_json_file(path)
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} is damaged: it must be a JSON object with a step count, got {state!r:.100}")
    return state


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the run's list, so resume and rotation skip it; return its new path."""
    aside = checkpoint.with_name(checkpoint.name + ".damaged")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(checkpoint, aside)
    return aside


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """Save the accelerator state plus ``state`` (must hold ``step``); call on every process."""
    final = checkpoints_dir(run_dir) / f"step-{state['step']:08d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with state_without_model(accelerator):  # under FSDP: the adapter and its optimizer state only
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / STATE_NAME, json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
