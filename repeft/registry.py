"""Names a recipe can use instead of paths: offline models, tokenizers and datasets.

A recipe says ``model: {path: minilm}`` or ``data: {train: builtin:sms_spam}``;
those names resolve here. Each entry is one ``register_*`` call, so hooking up
another offline package or shipped dataset is one line at the bottom of this
file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import data

_MODELS: dict[str, Callable[[], str]] = {}
_TOKENIZERS: dict[str, Callable[[], Any]] = {}
_DATASETS: dict[str, BuiltinDataset] = {}


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset shipped with an installed package.

    ``load(split, limit)`` returns rows as dicts: ``{"text", "label"}`` for text,
    ``{"pixel_values", "label"}`` (a float tensor in [0, 1]) for images.
    ``labels`` names the integer labels in order.
    """

    load: Callable[[str, int | None], list[dict[str, Any]]]
    kind: str  # "text" or "image"
    splits: tuple[str, ...]
    labels: tuple[str, ...] | None = None


def register_model(name: str, resolve: Callable[[], str]) -> None:
    """Make ``name`` usable as ``model.path``; ``resolve()`` returns a local directory."""
    _MODELS[name.lower()] = resolve


def register_tokenizer(name: str, build: Callable[[], Any]) -> None:
    """Make ``name`` usable as ``model.tokenizer``; ``build()`` returns a tokenizer."""
    _TOKENIZERS[name.lower()] = build


def register_dataset(name: str, dataset: BuiltinDataset) -> None:
    """Make ``builtin:<name>`` usable as a data source."""
    _DATASETS[name] = dataset


def model_names() -> list[str]:
    return sorted(_MODELS)


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def tokenizer_names() -> list[str]:
    return sorted(_TOKENIZERS)


def is_model(name: str) -> bool:
    return name.lower() in _MODELS


def is_tokenizer(name: str) -> bool:
    return name.lower() in _TOKENIZERS


def resolve_model(name_or_path: str) -> str:
    """A registered model name becomes its local directory; anything else is returned unchanged."""
    resolve = _MODELS.get(name_or_path.lower())
    return resolve() if resolve is not None else name_or_path


def build_tokenizer(name: str) -> Any:
    return _TOKENIZERS[name.lower()]()


def dataset(name: str) -> BuiltinDataset:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown builtin dataset {name!r}; builtin datasets: {dataset_names()}") from None


def _byte_tokenizer() -> Any:
    # Needs no files, so recipes for models built from a config can still read text.
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


#: The instruction that turns an SMS message into a prompt of ``sms_spam_instruct``.
SMS_PROMPT = "Is this SMS message spam or ham?\n{text}"


def _sms_instructions(split: str, limit: int | None) -> list[dict[str, Any]]:
    """``sms_spam`` as prompt/response rows: the message in :data:`SMS_PROMPT`, answered "spam" or "ham"."""
    names = data.TEXT_DATASETS["sms_spam"]
    rows = data.load_text_dataset("sms_spam", split, limit)
    return [{"prompt": SMS_PROMPT.format(text=r["text"]), "response": names[r["label"]]} for r in rows]


def _image_rows(name: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    images, labels = data.load_image_dataset(name, split)
    n = len(labels) if limit is None else min(limit, len(labels))
    return [{"pixel_values": images[i], "label": int(labels[i])} for i in range(n)]


# -- what ships with repeft ------------------------------------------------------------

for _alias in data.MINILM_ALIASES:
    register_model(_alias, data.minilm_path)
register_tokenizer("bytes", _byte_tokenizer)
for _name, _labels in data.TEXT_DATASETS.items():
    register_dataset(_name, BuiltinDataset(partial(data.load_text_dataset, _name), "text", data.SPLITS, _labels))
register_dataset("sms_spam_instruct", BuiltinDataset(_sms_instructions, "text", data.SPLITS))
for _name, _labels in data.IMAGE_DATASETS.items():
    register_dataset(_name, BuiltinDataset(partial(_image_rows, _name), "image", data.SPLITS, _labels))
