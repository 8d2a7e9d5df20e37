"""What a run writes into its ``output.dir``, and the checks that keep it from overwriting what it reads.

The recipe checks (:func:`check_output_dir`, :func:`check_inputs_not_written`)
run when a recipe loads; ``train.resume`` refuses a fresh start in a directory
that already holds another run's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import registry
from .datasource import parse_source
from .errors import RecipeError

if TYPE_CHECKING:
    from .recipe import Recipe

# What a run writes into output.dir: these files, and everything under these folders.
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "summary.json")
RUN_FOLDERS = ("adapter", "merged", "peft", "best", "checkpoints")


def check_output_dir(output_dir: str) -> None:
    """Refuse an ``output.dir`` that is, or lies under, something other than a directory."""
    path = Path(output_dir)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise RecipeError(f"output.dir {output_dir}: {existing} is a file, not a directory; choose another")
            return


def check_inputs_not_written(recipe: Recipe) -> None:
    """Refuse an input that is one of the files the run writes into ``output.dir``, or lies in one of its folders."""
    out = Path(recipe.output.dir).resolve()
    written = {out / name for name in RUN_FILES}
    folders = [out / name for name in RUN_FOLDERS]
    inputs = {"data.train": recipe.data.train, "data.eval": recipe.data.eval}
    for name, value in (("model.path", recipe.model.path), ("model.tokenizer", recipe.model.tokenizer)):
        if value is not None and not (registry.is_model(value) or registry.is_tokenizer(value)):
            inputs[name] = value
    for name, source in inputs.items():
        if source is None or parse_source(source, "train") is not None:
            continue
        path = Path(source).resolve()  # a symlink counts as the file it points to
        if path in written or any(folder == path or folder in path.parents for folder in folders):
            raise RecipeError(
                f"{name} {source} would be overwritten by this run, which writes {', '.join(RUN_FILES)} and "
                f"{'/, '.join(RUN_FOLDERS)}/ into output.dir {recipe.output.dir}; move it, or choose another output.dir"
            )


def refuse_earlier_outputs(run_dir: Path, resume: str) -> None:
    """Refuse to start in a directory holding another run's outputs, which the new run would replace.

    ``--resume`` without a checkpoint still restarts a run killed before its first complete one (it left only
    ``recipe.yaml``, ``metrics.jsonl`` and perhaps a ``checkpoints/`` folder with a half-written one).
    """
    restartable = ("recipe.yaml", "metrics.jsonl", "checkpoints") if resume == "auto" else ()
    present = [name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists() and name not in restartable]
    if present:
        raise RecipeError(
            f"output.dir {run_dir} already holds a run ({', '.join(present)}) and no checkpoint to resume from; "
            "a new run would replace it: choose another output.dir, or delete it"
        )
