"""Registry of adapter methods: config ``method`` name -> config class, how to inject it, what it promises.

A method is one module: its config class (an ``AdapterConfig`` subclass), its
layers and the function that injects them, decorated with ``register_method``.
That one declaration makes the config loadable from ``adapter_config.json``
and is the method's row in the support table: the model families it is
claimed for, what it promises there, and a small example config for tiny
models. An injector takes ``(model, adapter_name, config)`` where ``model`` is
the ``AdapterModel`` and attaches the adapter's ``AdapterLayer`` entries to it.
``tests/test_conformance.py`` runs PEFT's checklist on every (method, family)
pair the table claims, with each method's example config, checks that every
other pair of its model zoo is refused, and checks the support matrix in
``docs/support.md`` against the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .model import AdapterModel

Injector = Callable[["AdapterModel", str, "AdapterConfig"], None]


@dataclass(frozen=True)
class Method:
    """One row of the support table.

    ``config``: the method's config class; its ``method`` name is the row's
    ``name``. ``families``: the ``config.model_type`` values the method is
    claimed for, each tested; with its default options, adding it to any other
    model is refused with a message that names the model type (LoRA and
    RepLoRA still take explicit ``target_modules`` on any architecture). The
    promises hold with the method's default options:
    ``identity_at_init`` (a new adapter leaves the outputs unchanged),
    ``generates_with_cache`` (greedy ``generate()`` with KV cache equals it
    without, on families that generate), ``vision_only`` (it needs a ViT-family
    image encoder) and ``mergeable`` (it folds into the base weights; stated by
    the config class, which ``merge`` consults). ``example``: the options of a
    small config for the tiny test models, with the options that change the
    method's maths switched on (``example_config()`` builds it).

    >>> repeft.methods.method("zero_init").identity_at_init  # doctest: +SKIP
    True
    """

    config: type[AdapterConfig]
    inject: Injector
    families: tuple[str, ...]
    identity_at_init: bool
    generates_with_cache: bool
    vision_only: bool
    example: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.config.method

    @property
    def mergeable(self) -> bool:
        return self.config.mergeable

    def example_config(self) -> AdapterConfig:
        """A new config with the ``example`` options, small enough for the tiny test models.

        >>> repeft.methods.method("lora").example_config().r  # doctest: +SKIP
        4
        """
        return self.config(**self.example)


_METHODS: dict[str, Method] = {}


def register_method(
    config: type[AdapterConfig],
    *,
    families: Iterable[str],
    identity_at_init: bool,
    generates_with_cache: bool,
    vision_only: bool,
    example: Mapping[str, Any],
) -> Callable[[Injector], Injector]:
    """Decorator on the function that injects ``config``'s method: the method's one registration.

    The method is registered under ``config.method``, the name ``adapter_config.json``
    stores; the keywords are its row in the support table (see ``Method``).

    >>> @register_method(LoRAConfig, families=["llama"], identity_at_init=True, generates_with_cache=True,
    ...                  vision_only=False, example={"r": 4, "lora_alpha": 8})  # doctest: +SKIP
    ... def inject_lora(model, name, config): ...
    """
    name = config.method
    if not name or name in _METHODS:
        raise ValueError(
            f"{config.__name__}.method must name a new method, got {name!r}; registered: {', '.join(_METHODS)}"
        )
    example = dict(example)
    config(**example)  # a bad example fails here, at import, not in the conformance suite

    def decorator(fn: Injector) -> Injector:
        _METHODS[name] = Method(config, fn, tuple(families), identity_at_init, generates_with_cache, vision_only, example)
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
