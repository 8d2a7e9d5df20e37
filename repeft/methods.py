"""Registry of adapter methods: config ``method`` name -> how to inject it and what it promises.

An injector takes ``(model, adapter_name, config)`` where ``model`` is the
``AdapterModel`` and attaches the adapter's ``AdapterLayer`` entries to it.
Its registration is the method's row in the support table: the model families
it is claimed for and what it promises there. ``tests/test_conformance.py``
runs PEFT's checklist on every (method, family) pair the table claims, checks
that every other pair of its model zoo is refused, and checks the support
matrix in ``docs/support.md`` against the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import config_class

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .model import AdapterModel

Injector = Callable[["AdapterModel", str, "AdapterConfig"], None]


@dataclass(frozen=True)
class Method:
    """One row of the support table.

    ``families``: the ``config.model_type`` values the method is claimed for,
    each tested; with its default options, adding it to any other model is
    refused with a message that names the model type (LoRA and RepLoRA still
    take explicit ``target_modules`` on any architecture). The promises hold
    with the method's default options:
    ``identity_at_init`` (a new adapter leaves the outputs unchanged),
    ``generates_with_cache`` (greedy ``generate()`` with KV cache equals it
    without, on families that generate), ``vision_only`` (it needs a ViT-family
    image encoder) and ``mergeable`` (it folds into the base weights; stated by
    the config class, which ``merge`` consults).

    >>> repeft.methods.method("zero_init").identity_at_init  # doctest: +SKIP
    True
    """

    name: str
    inject: Injector
    families: tuple[str, ...]
    identity_at_init: bool
    generates_with_cache: bool
    vision_only: bool

    @property
    def mergeable(self) -> bool:
        return config_class(self.name).mergeable


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, families: Iterable[str], identity_at_init: bool, generates_with_cache: bool, vision_only: bool
) -> Callable[[Injector], Injector]:
    """Decorator on the function that injects method ``name``; its keywords are the method's support row.

    >>> @register_method("lora", families=["llama"], identity_at_init=True,
    ...                  generates_with_cache=True, vision_only=False)  # doctest: +SKIP
    ... def inject_lora(model, name, config): ...
    """

    def decorator(fn: Injector) -> Injector:
        _METHODS[name] = Method(name, fn, tuple(families), identity_at_init, generates_with_cache, vision_only)
        return fn

    return decorator


def method(name: str) -> Method:
    """The registered method ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"no adapter method {name!r} is registered; registered: {', '.join(sorted(_METHODS))}") from None


def methods() -> dict[str, Method]:
    """Every registered method by name, in registration order: the support table."""
    return dict(_METHODS)
