"""Data passed from Python: ``train(recipe, train_data=..., eval_data=...)`` with a ``datasets.Dataset`` or a list
of row dicts in place of the recipe's ``data.train`` / ``data.eval`` sources.

Each split comes from one place: a recipe that names a data source takes no data from Python, and the data passed
replaces both sources. The rows then go through the same checks as rows read from a file (``dataio.check_rows``),
and a checkpoint records a SHA-256 of them (:func:`rows_sha256`) where it records a file's, so resuming on other
rows is refused as it is for a changed file.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from .errors import RecipeError

if TYPE_CHECKING:
    from .recipe import Recipe

# What a checkpoint calls the data passed from Python (in ``made_from["data_sha256"]``).
PASSED_NAMES = ("train_data", "eval_data")


def check_data_given(recipe: Recipe, train_data: Any = None, eval_data: Any = None) -> None:
    """Refuse a run with no training data, or with data both named in the recipe and passed from Python."""
    passed = [name for name, data in zip(PASSED_NAMES, (train_data, eval_data)) if data is not None]
    named = [name for name, source in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)) if source]
    if passed and named:
        raise RecipeError(
            f"the recipe names {named[0]} and {passed[0]} was passed to train(): take the data from one place, "
            "either drop data.train and data.eval from the recipe or pass no train_data/eval_data"
        )
    if eval_data is not None and train_data is None:
        raise RecipeError("eval_data was passed to train() without train_data: pass the training rows too")
    if recipe.data.train is None and train_data is None:
        raise RecipeError(
            "data.train is missing: name the training data in the recipe (a .jsonl/.json/.csv/.parquet/.arrow file, "
            "a datasets save_to_disk folder, or builtin:<name>), or pass train_data= to repeft.train.train()"
        )


def passed_rows(
    data: Any, name: str, label_column: str, limit: int | None
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The first ``limit`` rows of a ``datasets.Dataset`` or a list of dicts passed as ``name``, and the class names
    of its ``label_column`` when that is a ``datasets.ClassLabel``; any other type is refused with what to pass."""
    if isinstance(data, list):
        wrong = next((i for i, row in enumerate(data, 1) if not isinstance(row, dict)), None)
        if wrong is not None:
            raise RecipeError(
                f"{name}: item {wrong} is a {type(data[wrong - 1]).__name__}, not a dict; pass one dict per example, "
                "e.g. [{'text': ..., 'label': ...}, ...]"
            )
        return data[:limit] if limit is not None else list(data), None
    datasets = _datasets_module(data)
    if datasets is not None and isinstance(data, datasets.Dataset):
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        names = getattr(data.features.get(label_column), "names", None)  # datasets.ClassLabel
        return data.to_list(), list(names) if names else None
    raise RecipeError(f"{name} is {_what_it_is(data, datasets)}; pass {_instead(data, name, datasets)}")


def check_same_class_names(train_names: list[str] | None, eval_names: list[str] | None, label_column: str) -> None:
    """Refuse eval rows whose ``ClassLabel`` numbers the classes otherwise than the training rows' does."""
    if train_names and eval_names and eval_names != train_names:
        mapping = {name: i for i, name in enumerate(train_names)}
        raise RecipeError(
            f"eval_data's {label_column} ClassLabel names {eval_names} differ from train_data's {train_names}, so "
            f"its ids mean other classes; pass eval_data.align_labels_with_mapping({mapping}, {label_column!r})"
        )


def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """A SHA-256 of rows as canonical JSON (sorted keys; arrays and tensors as lists, bytes as hex, any other value
    as its ``str``: a date's is stable; an object shown by its address reads as changed, so resume refuses it)."""
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    return f"{type(value).__name__}:{value}"


def _datasets_module(data: Any) -> Any:
    """The ``datasets`` module when ``data`` is one of its objects (imported only then)."""
    if not type(data).__module__.startswith("datasets"):
        return None
    import datasets

    return datasets


def _what_it_is(data: Any, datasets: Any) -> str:
    if datasets is not None and isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return f"a {type(data).__name__} with the splits {sorted(data)}"
    module = type(data).__module__.split(".")[0]
    return f"a {type(data).__name__}" if module == "builtins" else f"a {module}.{type(data).__name__}"


def _instead(data: Any, name: str, datasets: Any) -> str:
    """What to pass in place of ``data``."""
    if datasets is not None and isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        preferred = ("train",) if name == "train_data" else ("validation", "test")
        split = next((s for s in preferred if s in data), sorted(data)[0] if data else preferred[0])
        return f"one split, e.g. {name}=ds[{split!r}]"
    if datasets is not None and isinstance(data, datasets.IterableDataset):
        return "a datasets.Dataset (load it without streaming=True) or a list of dicts, one per example"
    if type(data).__module__.startswith("pandas") and type(data).__name__ == "DataFrame":
        return "datasets.Dataset.from_pandas(df) or df.to_dict('records')"
    if isinstance(data, dict):
        return "a list of dicts, one per example, or datasets.Dataset.from_dict(columns)"
    return "a datasets.Dataset or a list of dicts, one per example"
