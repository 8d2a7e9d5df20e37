"""Training checkpoints: ``accelerator.save_state`` written atomically, newest N kept.

A checkpoint is ``<output>/checkpoints/step-00000050/``. It is written under
``.tmp-step-00000050`` and renamed into place once every process has finished
writing, so a directory with the final name is always complete; a crash
mid-write leaves only a ``.tmp-`` directory, which resume ignores and the next
save replaces. Inside: accelerate's optimizer, scheduler, RNG and step state,
``adapter/`` (a normal adapter directory, so any checkpoint can be exported)
and ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

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


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a repeft checkpoint: it has no {STATE_NAME}")
    return json.loads(path.read_text())


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """Save the accelerator state plus ``state`` (must hold ``step``); call on every process."""
    final = checkpoints_dir(run_dir) / f"step-{state['step']:08d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
