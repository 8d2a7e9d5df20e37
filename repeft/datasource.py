"""Where a recipe's examples come from: ``builtin:<name>[:<split>]``, a .jsonl/.json/.csv/.parquet file,
or a Hugging Face ``datasets`` one (a ``save_to_disk`` folder or an ``.arrow`` file).

The first step of the data path (read -> validate in ``dataio`` -> encode ->
collate): a source is checked when the recipe loads (:func:`check_source`,
so a typo fails before anything runs) and read into plain dict rows when a run
starts (:func:`read_rows`). JSONL, JSON and CSV are read with the standard
library; Parquet needs ``pyarrow`` (``pip install 'repeft[parquet]'``) and
``datasets`` folders the ``datasets`` library (``pip install 'repeft[datasets]'``),
which also gives the names of a ``ClassLabel`` column.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from . import registry
from .errors import RecipeError, one_line

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
BUILTIN_PREFIX = "builtin:"
# What datasets' save_to_disk writes: a Dataset folder holds state.json, a DatasetDict folder dataset_dict.json.
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json")
FORMATS_IN_WORDS = (
    f"a file ending in {', '.join(FILE_FORMATS)}, a folder written by datasets' save_to_disk, or builtin:<name>"
)


def parse_source(source: str, default_split: str) -> tuple[str, str] | None:
    """``"builtin:name[:split]"`` -> ``(name, split)``; ``None`` for a file path."""
    if not source.startswith(BUILTIN_PREFIX):
        return None
    name, _, split = source[len(BUILTIN_PREFIX) :].partition(":")
    return name, split or default_split


def check_source(name: str, source: str) -> str | None:
    """Check that the source of recipe field ``name`` exists; return its kind ("text"/"image") when known."""
    default_split = "train" if name == "data.train" else "test"
    builtin = parse_source(source, default_split)
    if builtin is not None:
        ds_name, split = builtin
        if ds_name not in registry.dataset_names():
            raise RecipeError(f"{name}: unknown builtin dataset {ds_name!r}; builtin datasets: {registry.dataset_names()}")
        ds = registry.dataset(ds_name)
        if split not in ds.splits:
            raise RecipeError(f"{name}: builtin:{ds_name} has splits {list(ds.splits)}, not {split!r}")
        return ds.kind
    path = Path(source)
    if path.is_dir():
        if not any((path / marker).is_file() for marker in DATASET_FOLDER_FILES):
            raise RecipeError(f"{name}: folder {source} was not written by datasets' save_to_disk; use {FORMATS_IN_WORDS}")
        return None
    if path.suffix.lower() not in FILE_FORMATS:
        raise RecipeError(f"{name} {source!r}: use {FORMATS_IN_WORDS} (builtin datasets: {registry.dataset_names()})")
    if not path.is_file():
        raise RecipeError(f"{name}: file {source} does not exist; use {FORMATS_IN_WORDS}")
    return None


def declared_label_names(source: str | None, label_column: str) -> list[str] | None:
    """The class names a source declares: a builtin's, or a ``datasets`` ``ClassLabel`` column's; else None
    (also for no source: data passed from Python, whose names ``memory_data.passed_rows`` gives)."""
    if source is None:
        return None
    builtin = parse_source(source, "train")
    if builtin is not None:
        labels = registry.dataset(builtin[0]).labels
        return list(labels) if labels else None
    if not _is_datasets_source(Path(source)):
        return None
    feature = _hf_dataset(Path(source), "train").features.get(label_column)
    names = getattr(feature, "names", None)  # datasets.ClassLabel
    return list(names) if names else None


def read_rows(source: str, default_split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a data source: ``builtin:<name>[:<split>]`` or a .jsonl/.json/.csv/.parquet file.

    A file that cannot be read as its format (not UTF-8, torn, nested too deeply) is a ``RecipeError``.
    """
    builtin = parse_source(source, default_split)
    if builtin is not None:
        name, split = builtin
        return registry.dataset(name).load(split, limit)
    path = Path(source)
    if _is_datasets_source(path):
        dataset = _hf_dataset(path, default_split)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        return dataset.to_list()
    try:
        rows = _read_file(path)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise RecipeError(f"{path} is not a readable CSV file ({exc})") from None
    return rows[:limit] if limit is not None else rows


def _is_datasets_source(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() == ".arrow"


def _hf_dataset(path: Path, split: str) -> Any:
    """The ``datasets.Dataset`` at ``path``; a DatasetDict folder gives its ``split``."""
    try:
        import datasets
    except ImportError:
        raise RecipeError(f"reading {path} needs the datasets library: pip install 'repeft[datasets]'") from None
    try:
        loaded = datasets.Dataset.from_file(str(path)) if path.is_file() else datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path} is not a readable datasets folder or Arrow file ({one_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise RecipeError(f"{path} holds the splits {sorted(loaded)}, not {split!r}; point at {path / sorted(loaded)[0]}")
        return loaded[split]
    return loaded


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise RecipeError(f"reading {path} needs pyarrow: pip install 'repeft[parquet]'") from None
        try:
            return pq.read_table(path).to_pylist()
        except pyarrow.ArrowException as exc:
            raise RecipeError(f"{path} is not a readable Parquet file ({one_line(exc)})") from None
    return _read_json(path)


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = _parse_json(text, str(path))
    else:
        rows = [_parse_json(line, f"{path}:{number}") for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise RecipeError(f"{path} must hold JSON objects, one per example")
    return rows


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{where} is not valid JSON ({exc})") from None
    except RecursionError:
        raise RecipeError(f"{where} is not usable JSON: it is nested too deeply") from None
