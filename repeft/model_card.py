"""The model card (``README.md``) that ``save_pretrained`` writes beside an adapter, as PEFT writes one.

The Hub reads its metadata: ``library_name: peft`` marks a directory that
``peft.PeftModel.from_pretrained`` loads (a LoRA adapter saved in PEFT's
layout), ``base_model`` links the base, and the ``lora`` tag turns on the
Hub's LoRA support. An adapter kept in repeft's own layout (RepLoRA, prefix,
...) is marked ``library_name: repeft`` instead, so no tool takes it for PEFT's.
An existing card keeps its text; only these metadata fields are updated.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from . import __version__
from .files import write_text_atomic

CARD_NAME = "README.md"


def write_model_card(directory: str | os.PathLike, base: nn.Module, method: str, peft_layout: bool) -> None:
    """Create or update ``directory/README.md`` for an adapter of ``method`` on ``base``.

    >>> write_model_card("out/adapter", model.get_base_model(), "lora", peft_layout=True)  # doctest: +SKIP
    """
    path = Path(directory) / CARD_NAME
    # A link is replaced, never read: a downloaded directory's README.md -> ~/.ssh/... must not leak into the card.
    existing = path.is_file() and not path.is_symlink()
    card = ModelCard(path.read_text(encoding="utf-8")) if existing else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft" if peft_layout else "repeft"
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    tags = set(card.data.get("tags") or []) | set(getattr(base, "model_tags", None) or [])
    tags |= {"repeft", method} | ({"lora"} if peft_layout else set())
    if name:
        card.data["base_model"] = name
        tags.add(f"base_model:adapter:{name}")
    if type(base).__name__.endswith("ForCausalLM") and not card.data.get("pipeline_tag"):
        card.data["pipeline_tag"] = "text-generation"
    card.data["tags"] = sorted(tags)
    versions = f"- repeft {__version__}"
    text = str(card) if versions in str(card) else f"{card}\n\n### Framework versions\n\n{versions}\n"
    write_text_atomic(path, text)
