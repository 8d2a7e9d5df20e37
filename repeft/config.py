"""What every adapter config shares: plain dataclasses that round-trip through JSON.

Every method has one config class, an ``AdapterConfig`` subclass in the
method's own module, registered with the method (``repeft.methods.register_method``)
under the name stored in the ``method`` field of ``adapter_config.json``.
``AdapterConfig.from_dict`` reads that name back and builds the right class,
rejecting unknown fields by name. Fields declare their bounds with ``option``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .methods import methods


def option(
    default: Any,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """A config field with bounds: ``minimum`` (inclusive), ``above`` and ``below`` (exclusive) or ``choices``.

    Every field's value is also checked against its annotation (see ``AdapterConfig.__post_init__``).

    >>> @dataclass
    ... class Example(AdapterConfig):
    ...     r: int = option(8, minimum=1)
    """
    return dataclasses.field(
        default=default, metadata={"minimum": minimum, "above": above, "below": below, "choices": choices}
    )


def config_class(method: str) -> type[AdapterConfig]:
    """The config class of the registered method ``method``.

    >>> config_class("lora").__name__
    'LoRAConfig'
    """
    registered = methods()
    if method not in registered:
        raise ValueError(f"unknown adapter method {method!r}; known methods: {', '.join(sorted(registered))}")
    return registered[method].config


@dataclass
class AdapterConfig:
    """Fields every adapter method shares.

    ``modules_to_save`` names modules (exact names or dotted suffixes) that are
    trained in full and saved with the adapter, e.g. a classification head.
    When left as ``None`` on a ``*ForSequenceClassification``-style model, the
    head is added automatically.

    Every field is checked on construction, so a config read from a file is
    as safe as one written in code: the value must have the annotated type
    (``bool`` fields take only ``True``/``False``, ``int`` fields no bools,
    ``float`` fields finite numbers) and lie within the field's ``option``
    bounds; a ``ValueError`` names the field otherwise.
    """

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None  # PEFT's name for the method, where PEFT has it
    # Fields added after adapters were first saved, with the value those older files meant:
    # a saved config that lacks the field was written when this was the only behaviour.
    saved_before: ClassVar[dict[str, Any]] = {}

    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    # What PEFT's configs record of the base model (PeftConfig): kept, not used.
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> AdapterConfig:
        # A bare "unexpected keyword argument" from the dataclass __init__ would not say what to do instead.
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(_unknown_options(cls, unknown))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.modules_to_save is not None:
            # [] is allowed: it says "no head", turning off the automatic task-head choice.
            self.modules_to_save = as_name_list("modules_to_save", self.modules_to_save, allow_empty=True)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name), hints[f.name], f.metadata)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Build the config class named by ``data["method"]``.

        >>> AdapterConfig.from_dict({"method": "lora", "r": 4}).r
        4
        """
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        if "method" not in data:
            raise ValueError("adapter config has no 'method' field (e.g. \"lora\", \"replora\")")
        method = data.pop("method")
        if not isinstance(method, str):
            raise ValueError(f"method must be a string such as \"lora\", got {method!r}")
        cls = config_class(method)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for {cls.__name__}; allowed fields: {sorted(allowed)}"
            )
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> AdapterConfig:
        return AdapterConfig.from_dict(json.loads(text))

    @staticmethod
    def from_saved(data: dict[str, Any]) -> AdapterConfig:
        """``from_dict`` for a config read back from an adapter file, old files included.

        A field the file predates takes the value it had when the file was written
        (``saved_before``), not today's default: a RepLoRA adapter saved before
        ``form`` existed loads as ``form="mlp"``, the only form there was.

        >>> AdapterConfig.from_saved({"method": "replora", "r": 4}).form
        'mlp'
        """
        method = data.get("method") if isinstance(data, dict) else None
        spec = methods().get(method) if isinstance(method, str) else None
        # Anything else (not a mapping, no or an unknown method) is from_dict's to explain.
        return AdapterConfig.from_dict({**spec.config.saved_before, **data} if spec else data)


def _unknown_options(cls: type, unknown: list[str]) -> str:
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    hints = [f"{name!r}: did you mean {match[0]!r}?" for name in unknown
             if (match := difflib.get_close_matches(name, allowed, n=1, cutoff=0.8))]
    return (
        f"{cls.__name__} has no option {unknown}: a PEFT option repeft does not support (docs/api.md, PEFT's names) "
        f"or a typo{' (' + '; '.join(hints) + ')' if hints else ''}. {cls.__name__} takes {allowed}"
    )


def _check_field(name: str, value: Any, hint: Any, bounds: typing.Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``value`` has type ``hint`` and lies within ``bounds`` (an ``option``'s)."""
    if not (_has_type(value, hint) and _within(value, bounds)):
        raise ValueError(f"{name} must be {_expected(hint, bounds)}, got {value!r}")


def _within(value: Any, bounds: typing.Mapping[str, Any]) -> bool:
    if value is None:
        return True
    choices, minimum, above, below = (bounds.get(k) for k in ("choices", "minimum", "above", "below"))
    return (
        (choices is None or value in choices)
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (below is None or value < below)
    )


def _expected(hint: Any, bounds: typing.Mapping[str, Any]) -> str:
    """What a field takes, in words: ``"a positive integer or null"``, ``"'rank' or 'feature'"``."""
    choices, minimum, above, below = (bounds.get(k) for k in ("choices", "minimum", "above", "below"))
    if choices is not None:
        return " or ".join(map(repr, choices)) if len(choices) == 2 else f"one of {choices}"
    words = _describe(hint)
    if minimum == 1 and below is None and "an integer" in words:
        return words.replace("an integer", "a positive integer")
    if minimum is not None or above is not None or below is not None:
        low = f"({above:g}" if above is not None else "(-inf" if minimum is None else f"[{minimum:g}"
        high = "inf)" if below is None else f"{below:g})"
        return words.replace("a finite number", f"a number in {low}, {high}")
    return words


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_has_type(k, key) and _has_type(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        # bool is an int subclass; True is no size.
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    if origin is dict:
        key, item = (_describe(a).split(" ", 1)[1] for a in typing.get_args(hint))
        return f"a mapping of {key}s to {item}s"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def as_name_list(field_name: str, value: Any, allow_empty: bool = False) -> list[str]:
    """A field's module names as a list (one name may be a string); ``ValueError`` for anything else.

    >>> as_name_list("target_modules", "q_proj")
    ['q_proj']
    """
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field_name} must be a list of module names, got {value!r}")
    names = list(value)
    if (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field_name} must be a non-empty list of module names, got {value!r}")
    return names


__all__ = ["AdapterConfig", "as_name_list", "config_class", "option"]
