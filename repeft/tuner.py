"""``AdapterTuner``: what ``AdapterModel.base_model`` is, laid out as PEFT lays out its tuner.

In PEFT, ``peft_model.base_model`` is a tuner (``LoraModel``) whose ``.model``
is the transformers model, so parameter names read
``base_model.model.<module>...`` and PEFT users' code reaches a layer as
``model.base_model.model.<module>``. repeft keeps that layout: the tuner holds
the transformers model and adds no parameters of its own.

Two readers give ``base_model`` different meanings, and the tuner serves both:

- PEFT's (attributes): ``.model``, the adapter bookkeeping (``set_adapter``,
  ``peft_config``, ``prefix``, ...), answered by the wrapper that owns the
  tuner; any other attribute falls through to the transformers model.
- transformers' (calls): ``PreTrainedModel.base_model`` is the backbone without
  the task head, and trainers call it for hidden states (TRL's fused LM head
  computes the loss from ``model.base_model(...).last_hidden_state``). So calling
  the tuner runs the transformers model's backbone; the wrapper's own forward
  runs the whole model.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .model import AdapterModel

# Where the transformers model's modules sit in the wrapper's module names (PEFT's ``base_model.model.``).
MODEL_PREFIX = "base_model.model."

# PEFT's tuner members that the wrapper answers (``model.base_model.set_adapter(...)`` in PEFT's docs and tests).
OWNER_MEMBERS = frozenset(
    {
        "prefix",
        "peft_config",
        "active_adapter",
        "active_adapters",
        "set_adapter",
        "delete_adapter",
        "disable_adapter_layers",
        "enable_adapter_layers",
        "merge_adapter",
        "unmerge_adapter",
        "merge_and_unload",
        "unload",
        "add_weighted_adapter",
        "targeted_module_names",
    }
)


class AdapterTuner(nn.Module):
    """The transformers model (``.model``) inside an ``AdapterModel``, under PEFT's ``base_model.model`` names.

    >>> wrapped.base_model.model is wrapped.get_base_model()  # doctest: +SKIP
    True
    """

    def __init__(self, model: nn.Module, owner: AdapterModel) -> None:
        super().__init__()
        self.model = model
        # A weak reference: the owner holds the tuner, and a module cycle would loop named_modules().
        self.link(owner)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "_modules" not in self.__dict__:
                raise
            owner = self.__dict__.get("_owner", lambda: None)()
            if name in OWNER_MEMBERS and owner is not None:
                return getattr(owner, name)
            return getattr(self._modules["model"], name)

    def __getstate__(self) -> dict[str, Any]:
        # Pickling and deepcopy rebuild the owner first; it links its new tuner back (AdapterModel.__setstate__).
        return {k: v for k, v in self.__dict__.items() if k != "_owner"}

    def link(self, owner: AdapterModel) -> None:
        object.__setattr__(self, "_owner", weakref.ref(owner))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The transformers backbone's forward (``PreTrainedModel.base_model``); the model's own if it has none."""
        return backbone(self.model)(*args, **kwargs)


def backbone(model: nn.Module) -> nn.Module:
    """transformers' ``base_model``: the model without its task head (the model itself when it has none)."""
    return getattr(model, "base_model", model) if hasattr(type(model), "base_model_prefix") else model
