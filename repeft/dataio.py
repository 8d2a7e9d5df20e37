"""Recipe data after reading: validate the rows, encode them as tensors, collate them into padded batches.

The data path runs one way: ``datasource`` reads a source into plain dict rows;
here they are validated (:func:`label_names`, :func:`check_rows`, before any
model loads), encoded (:func:`build_examples`, then :func:`pack_examples`
and :func:`encode_answer_prompts`), and collated (:func:`collator`); chat rows
are rendered and encoded by ``instruct``. Datasets here are small enough to
tokenize up front, which keeps batches and their order a pure function of the
seed (what exact resume relies on).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import instruct
from .datasource import declared_label_names
from .errors import RecipeError

if TYPE_CHECKING:
    from .recipe import Recipe

Example = dict[str, torch.Tensor]


def label_names(recipe: Recipe, train_rows: list[dict[str, Any]], source: str = "data.train") -> list[str]:
    """Names of the classes, index = class id: from ``data.labels``, the builtin dataset, or the data.

    From the data: integer ids (ints, whole floats, digit strings) give the
    classes ``0..max``, of which at least half must occur, so a stray large id
    cannot build a huge head; otherwise the labels are class names, sorted.
    ``source`` names the rows in errors (``train_data`` for rows passed from Python).
    """
    if recipe.data.labels:
        return list(recipe.data.labels)
    declared = declared_label_names(recipe.data.train, recipe.data.label_column)
    if declared is not None:
        return declared
    column = recipe.data.label_column
    values = [_column(row, column, source, number, "data.label_column") for number, row in enumerate(train_rows, 1)]
    ids = [_as_id(v) for v in values]
    if values and all(i is not None for i in ids):
        return _id_labels(ids, column, source)
    for number, (value, index) in enumerate(zip(values, ids), 1):
        if index is None and not isinstance(value, str):
            raise RecipeError(
                f"{source}: example {number} has {column} {value!r}; labels are integer ids (0, 1, ...) "
                "or class names (strings)"
            )
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    number, value = next((n, v) for n, v in enumerate(values, 1) if not isinstance(v, str))
    name = next(v for v in values if isinstance(v, str) and _as_id(v) is None)
    raise RecipeError(
        f"{source}: example {number} has the {column} id {value!r} while others have class names "
        f"(e.g. {name!r}); use one kind for all"
    )


def _id_labels(ids: list[int], column: str, source: str) -> list[str]:
    """``["0", ..., str(max)]`` for integer labels; refuses negative ids, and ids most of whose range is unused."""
    if min(ids) < 0:
        raise RecipeError(f"{source}: {column} {min(ids)} is negative; class ids run 0, 1, 2, ...")
    present = set(ids)
    count = max(ids) + 1
    # A few classes missing from a small training set is normal; most of 0..max missing is a stray id
    # (100000 would build a 100,001-class head).
    if 2 * len(present) < count:
        raise RecipeError(
            f"{source}: the {column} ids run up to {count - 1}, but only {len(present)} distinct ids occur "
            f"(the largest: {sorted(present)[-3:]}); the head gets one output per id, so renumber the labels "
            f"0..{len(present) - 1} or name every class in data.labels"
        )
    return [str(i) for i in range(count)]


def _as_id(value: Any) -> int | None:
    """An integer class id from an int, a whole float or a string of digits; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def check_rows(recipe: Recipe, rows: list[dict[str, Any]], source: str, labels: list[str]) -> None:
    """Check rows before any model loads: some examples, their columns present and usable, labels among ``labels``."""
    if not rows:
        raise RecipeError(f"{source} has no examples")
    if data_format(recipe, rows) != "text":
        conversations(recipe, rows, source)  # refuses missing columns and malformed conversations
        return
    spec = recipe.data
    images = recipe.task == "image_classification"
    column = spec.image_column if images else spec.text_column
    empty = []
    for number, row in enumerate(rows, 1):
        value = _column(row, column, source, number, "data.image_column" if images else "data.text_column")
        if value is None or not images and not isinstance(value, str):
            wanted = "an image" if images else "a string"
            raise RecipeError(f"{source}: example {number} has {column} {value!r}; it must be {wanted}")
        if not images and not value.strip():
            empty.append(number)
        if labels:
            label = _column(row, spec.label_column, source, number, "data.label_column")
            _label_id(label, labels, f"{source}: example {number}")
    if len(empty) == len(rows):
        raise RecipeError(f"{source}: every example has an empty {column}; is data.text_column the right column?")
    if empty:
        warnings.warn(f"{source}: {len(empty)} of {len(rows)} examples have an empty {column} (the first: example {empty[0]})")


def sample_texts(recipe: Recipe, rows: list[dict[str, Any]], n: int = 200) -> list[str]:
    """The text of the first ``n`` rows checked by ``check_rows`` (of chat data: every message), to try a tokenizer on."""
    rows = rows[:n]
    if data_format(recipe, rows) == "text":
        return [row[recipe.data.text_column] for row in rows]
    return [message["content"] for messages in conversations(recipe, rows, "data.train") for message in messages]


def _column(row: dict[str, Any], column: str, source: str, number: int, field: str) -> Any:
    """``row[column]``, or a ``RecipeError`` naming the recipe ``field`` that chose the column."""
    try:
        return row[column]
    except KeyError:
        raise RecipeError(
            f"{source}: example {number} has no column {column!r} (columns: {sorted(row)}); "
            f"set {field} to the column that holds it"
        ) from None


def _label_id(value: Any, labels: list[str], where: str) -> int:
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    index = _as_id(value)
    if index is None or not 0 <= index < len(labels):
        shown = labels if len(labels) <= 20 else [*labels[:20], "..."]
        raise RecipeError(f"{where}: label {value!r} is not one of the {len(labels)} classes {shown}")
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
    """Turn rows checked by ``check_rows`` into unpadded tensors the model takes (``input_ids``/``pixel_values``, ``labels``).

    Prompt/response and chat rows have -100 labels outside the responses; what
    ``data.max_length`` cut or left out of them is described in ``notes``.
    """
    spec = recipe.data
    if data_format(recipe, rows) != "text":
        return _chat_examples(recipe, rows, source, tokenizer, notes)
    if recipe.task == "image_classification":
        return [
            {
                "pixel_values": _image(r[spec.image_column], model_config, source),
                "labels": torch.tensor(_label_id(r[spec.label_column], labels, source)),
            }
            for r in rows
        ]
    encoded = tokenizer([r[spec.text_column] for r in rows], truncation=True, max_length=spec.max_length)["input_ids"]
    examples = []
    for row, ids in zip(rows, encoded):
        ids = torch.tensor(ids, dtype=torch.long)
        if recipe.task == "causal_lm":
            examples.append({"input_ids": ids, "labels": ids})
        else:
            label = _label_id(row[spec.label_column], labels, source)
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


def pack_examples(recipe: Recipe, examples: list[Example], notes: list[str]) -> list[Example]:
    """``data.packing``: the examples packed into rows of up to ``data.max_length`` tokens; what packing did is
    added to ``notes``. Packing builds no model: once one loads, ``instruct.check_packing`` checks that it keeps
    packed examples apart."""
    packed = instruct.pack(examples, recipe.data.max_length)
    notes.append(f"data.train: {len(examples)} examples packed into {len(packed)} rows of up to "
                 f"{recipe.data.max_length} tokens")
    return packed


def encode_answer_prompts(recipe: Recipe, rows: list[dict[str, Any]], tokenizer: Any) -> list[tuple[list[int], str]]:
    """(tokenized prompt, expected answer) of each prompt/response or chat row, for evaluation by generation."""
    return instruct.answer_prompts(
        conversations(recipe, rows, "data.eval"), tokenizer, recipe.data.chat_template, recipe.data.max_length
    )


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
