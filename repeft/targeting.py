"""Which modules of a model an adapter attaches to.

A target spec is a list of module names or dotted suffixes, a regex string
(``re.fullmatch`` against full module names), ``"all-linear"``, or ``None``
for the architecture's default. A spec that selects nothing is an error that
names the closest module names, never a silent no-op.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import AdapterLayer

# Attention projections that LoRA targets by default: PEFT's choices
# (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), which follow the LoRA
# paper: query and value, or the fused layer that makes both. Where PEFT has
# no entry (qwen2_moe, olmo2, phi3, the ViT family under transformers 5's
# q_proj/k_proj/v_proj names) the same choice is made by hand.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "dinov2_with_registers": ["q_proj", "v_proj"],
}

# Output heads are never picked by "all-linear": adapting the vocabulary
# projection or a freshly initialised classifier is what modules_to_save is for.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


# Layers PEFT's LoRA adapts that repeft's does not: a spec selecting one is refused by name, never skipped.
UNSUPPORTED_LAYERS = (nn.MultiheadAttention,)


class TargetError(ValueError):
    """A target spec that selects nothing, or selects a module that cannot be adapted."""


def is_linear_like(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, (nn.Linear, Conv1D))


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRA adapts when a target spec names it: linear-like, an embedding or a convolution.

    (``repeft.lora_embedding``, ``repeft.lora_conv``; ``"all-linear"`` picks linear-like layers only.)
    """
    return is_linear_like(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_target_modules(model: nn.Module) -> list[str]:
    kind = model_type(model)
    if kind in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[kind]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear_like(m)})
    raise TargetError(
        f"no default target_modules for model_type {kind!r} (defaults exist for "
        f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}); pass target_modules=[...] "
        f"or 'all-linear'. Linear layers in this model: {', '.join(linear)}"
    )


def matches_name(name: str, pattern: str) -> bool:
    """True if ``pattern`` is ``name`` itself or a dotted suffix of it."""
    return name == pattern or name.endswith("." + pattern)


def find_modules(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Full names of modules matching any exact name / dotted suffix in ``patterns``."""
    patterns = list(patterns)
    return [name for name, _ in model.named_modules() if name and any(matches_name(name, p) for p in patterns)]


def resolve_targets(
    model: nn.Module, spec: list[str] | str | None, exclude: Iterable[str] = ()
) -> list[str]:
    """Full names of the linear-like modules ``spec`` selects, in model order.

    Modules at or under a name in ``exclude`` (e.g. modules_to_save) are skipped.

    >>> resolve_targets(model, ["q_proj", "v_proj"])  # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', ...]
    """
    modules = adaptable_modules(model, exclude)
    if spec is None:
        spec = default_target_modules(model)

    if spec == "all-linear":
        found = [n for n, m in modules if is_linear_like(m) and n.rsplit(".", 1)[-1] not in HEAD_NAMES]
        if not found:
            raise TargetError(f"'all-linear' found no nn.Linear or Conv1D layer in {type(model).__name__}")
        return found

    if isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as exc:
            raise TargetError(f"target_modules regex {spec!r} does not compile: {exc}") from None
        _refuse_unsupported(spec, [(n, m) for n, m in modules if regex.fullmatch(n)])
        found = [n for n, m in modules if regex.fullmatch(n) and is_adaptable(m)]
        if not found:
            raise TargetError(
                f"target_modules regex {spec!r} matches no linear layer of {type(model).__name__}"
                f" (it is matched with re.fullmatch against full names); "
                f"{_closest(spec, modules)}"
            )
        return found

    # As in PEFT, a list is a menu (e.g. one list for several families): an entry may match nothing, the list may not.
    found: list[str] = []
    unmatched: list[str] = []
    for pattern in spec:
        hits = [(n, m) for n, m in modules if matches_name(n, pattern)]
        if not hits:
            unmatched.append(pattern)
            continue
        _refuse_unsupported(pattern, hits)
        wrong = [(n, m) for n, m in hits if not is_adaptable(m)]
        if wrong:
            name, module = wrong[0]
            raise TargetError(
                f"target_modules entry {pattern!r} matches {name!r}, a {type(module).__name__}; "
                "LoRA adapters attach to nn.Linear, GPT-2 Conv1D, bitsandbytes Linear4bit/"
                "Linear8bitLt, nn.Embedding and nn.Conv1d/2d/3d layers. Name the linear layers inside it instead."
            )
        found.extend(n for n, _ in hits)
    if not found:
        raise TargetError(
            f"target_modules {list(spec)} match no module of {type(model).__name__}; {_closest(spec[0], modules)}"
        )
    if unmatched:
        warnings.warn(
            f"target_modules entries {unmatched} match no module of {type(model).__name__} and are ignored "
            f"({_closest(unmatched[0], modules)})",
            stacklevel=4,
        )
    order = {name: i for i, (name, _) in enumerate(modules)}
    return sorted(set(found), key=order.__getitem__)


def _refuse_unsupported(pattern: str, hits: list[tuple[str, nn.Module]]) -> None:
    for name, module in hits:
        if isinstance(module, UNSUPPORTED_LAYERS):
            raise TargetError(
                f"target_modules {pattern!r} selects {name!r}, a {type(module).__name__}; repeft's LoRA adapts "
                "linear layers, embeddings and convolutions (PEFT's also adapts it). Leave it out of target_modules "
                "(train it in full with modules_to_save instead, if it must learn)"
            )


def adaptable_modules(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs a target spec may select.

    A layer repeft already wrapped counts as the layer it wraps, and nothing
    inside an adapter layer (base layers, adapter MLPs, head copies) is a candidate.
    """
    skip = [e + "." for e in exclude]
    candidates = []
    for name, module in model.named_modules():
        if not name or name + "." in skip or any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, AdapterLayer):
            skip.append(name + ".")
            module = getattr(module, "base_layer", None)
            if module is None:
                continue
        candidates.append((name, module))
    return candidates


def _closest(pattern: str, modules: list[tuple[str, nn.Module]]) -> str:
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in modules if is_linear_like(m)})
    suffix = pattern.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(suffix, leaf_names, n=5, cutoff=0.4)
    if close:
        return f"closest linear layer names: {', '.join(close)}"
    return f"linear layer names in this model: {', '.join(leaf_names[:20])}"
