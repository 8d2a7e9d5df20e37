"""Recipe data: rows from files or builtin datasets, turned into padded batches per task.

Rows are plain dicts. JSONL, JSON and CSV are read with the standard library;
Parquet needs ``pyarrow`` (``pip install 'repeft[parquet]'``). Datasets here
are small enough to tokenize up front, which keeps batches and their order a
pure function of the seed (what exact resume relies on).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import instruct, registry
from .recipe import Recipe, RecipeError, parse_source

Example = dict[str, torch.Tensor]


def read_rows(source: str, default_split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a data source: ``builtin:<name>[:<split>]`` or a .jsonl/.json/.csv/.parquet file."""
    builtin = parse_source(source, default_split)
    if builtin is not None:
        name, split = builtin
        return registry.dataset(name).load(split, limit)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RecipeError(f"reading {path} needs pyarrow: pip install 'repeft[parquet]'") from None
        rows = pq.read_table(path).to_pylist()
    else:
        rows = _read_json(path)
    return rows[:limit] if limit is not None else rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RecipeError(f"{path}:{number} is not valid JSON ({exc})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise RecipeError(f"{path} must hold JSON objects, one per example")
    return rows


def label_names(recipe: Recipe, train_rows: list[dict[str, Any]]) -> list[str]:
    """Names of the classes, index = class id: from ``data.labels``, the builtin dataset, or the data."""
    if recipe.data.labels:
        return list(recipe.data.labels)
    builtin = parse_source(recipe.data.train, "train")
    if builtin is not None and registry.dataset(builtin[0]).labels:
        return list(registry.dataset(builtin[0]).labels)
    column = recipe.data.label_column
    values = [_column(row, column, "data.train") for row in train_rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    # CSV gives strings; integer-looking ones are ids, anything else a class name.
    if all(isinstance(v, str) and v.strip().isdigit() for v in values):
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted({str(v) for v in values})


def _column(row: dict[str, Any], column: str, source: str) -> Any:
    try:
        return row[column]
    except KeyError:
        raise RecipeError(f"{source}: an example has no column {column!r} (columns: {sorted(row)})") from None


def _label_id(value: Any, labels: list[str], source: str) -> int:
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(labels):
        raise RecipeError(f"{source}: label {value!r} is not one of the {len(labels)} classes {labels}")
    return index


def data_format(recipe: Recipe, rows: list[dict[str, Any]]) -> str:
    """``data.format``, or for ``auto`` what the first row's columns say (``text`` for classification)."""
    if recipe.data.format != "auto" or recipe.task != "causal_lm":
        return "text" if recipe.data.format == "auto" else recipe.data.format
    return instruct.detect_format(rows[0], _chat_columns(recipe)) if rows else "text"


def _chat_columns(recipe: Recipe) -> dict[str, str]:
    spec = recipe.data
    return {"prompt": spec.prompt_column, "response": spec.response_column, "messages": spec.messages_column}


def conversations(recipe: Recipe, rows: list[dict[str, Any]], source: str) -> list[list[instruct.Message]]:
    """The rows of prompt/response or messages data as conversations."""
    fmt = data_format(recipe, rows)
    return [instruct.conversation(row, fmt, _chat_columns(recipe), source) for row in rows]


def build_examples(
    recipe: Recipe,
    rows: list[dict[str, Any]],
    source: str,
    tokenizer: Any,
    labels: list[str],
    model_config: Any,
    notes: list[str] | None = None,
) -> list[Example]:
    """Turn rows into unpadded tensors the model takes (``input_ids``/``pixel_values`` and ``labels``).

    Prompt/response and chat rows have -100 labels outside the responses; what
    ``data.max_length`` cut or left out of them is described in ``notes``.
    """
    spec = recipe.data
    if not rows:
        raise RecipeError(f"{source} has no examples")
    if data_format(recipe, rows) != "text":
        return _chat_examples(recipe, rows, source, tokenizer, notes)
    if recipe.task == "image_classification":
        return [
            {
                "pixel_values": _image(_column(r, spec.image_column, source), model_config, source),
                "labels": torch.tensor(_label_id(_column(r, spec.label_column, source), labels, source)),
            }
            for r in rows
        ]
    texts = [str(_column(r, spec.text_column, source)) for r in rows]
    encoded = tokenizer(texts, truncation=True, max_length=spec.max_length)["input_ids"]
    examples = []
    for row, ids in zip(rows, encoded):
        ids = torch.tensor(ids, dtype=torch.long)
        if recipe.task == "causal_lm":
            examples.append({"input_ids": ids, "labels": ids})
        else:
            label = _label_id(_column(row, spec.label_column, source), labels, source)
            examples.append({"input_ids": ids, "labels": torch.tensor(label)})
    return examples


def _chat_examples(
    recipe: Recipe, rows: list[dict[str, Any]], source: str, tokenizer: Any, notes: list[str] | None
) -> list[Example]:
    if tokenizer.eos_token is None:
        raise RecipeError("prompt/response and chat data need a tokenizer with an end-of-sequence token to end responses")
    spec = recipe.data
    encoded = [instruct.encode_conversation(c, tokenizer, spec.chat_template) for c in conversations(recipe, rows, source)]
    kept, report = instruct.truncate(encoded, spec.max_length, spec.truncation, source)
    note = report.describe(source, spec.max_length, spec.truncation)
    if note is not None and notes is not None:
        notes.append(note)
    return [{k: torch.tensor(v, dtype=torch.long) for k, v in e.items()} for e in kept]


def _image(value: Any, config: Any, source: str) -> torch.Tensor:
    """A [0, 1] image (H x W or C x H x W) as the model's ``num_channels x image_size x image_size``, in [-1, 1]."""
    image = torch.as_tensor(value, dtype=torch.float32)
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise RecipeError(f"{source}: images must be H x W or C x H x W, got shape {tuple(image.shape)}")
    channels = getattr(config, "num_channels", 3)
    if image.shape[0] == 1 and channels != 1:
        image = image.expand(channels, -1, -1)
    if image.shape[0] != channels:
        raise RecipeError(f"{source}: images have {image.shape[0]} channels, the model takes {channels}")
    size = getattr(config, "image_size", image.shape[-1])
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)
    # ViT-family processors normalize with mean = std = 0.5.
    return (image - 0.5) / 0.5


def collator(task: str, pad_token_id: int) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """Batch examples, padding token sequences on the right; padded label positions are -100 (ignored).

    Packed rows (with ``position_ids``) get no attention mask: the model tells
    their examples apart by the restarting positions; the padding counts as
    one more example, after the real ones, so none of them attends to it. They
    also get ``use_cache=False``: with a cache transformers' masks ignore the
    restarting positions (``masking_utils``), and examples would see each other.
    """

    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        if task == "image_classification":
            return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        positions = torch.arange(length).repeat(len(examples), 1)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = e["input_ids"]
            attention_mask[i, :n] = 1
            if task == "causal_lm":
                labels[i, :n] = e["labels"]
            if "position_ids" in e:
                positions[i, :n] = e["position_ids"]
                positions[i, n:] = torch.arange(length - n)
        if task != "causal_lm":
            labels = torch.stack([e["labels"] for e in examples])
        if "position_ids" in examples[0]:
            return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "use_cache": False}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate
