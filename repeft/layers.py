"""Modules that carry per-adapter state inside a wrapped model.

Every adapter parameter lives in the ``adapters`` ModuleDict of some
``AdapterLayer``, keyed by adapter name. Saving, loading, switching and
deleting adapters walk these layers; no method needs its own bookkeeping.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def place_beside(adapter: nn.Module, module: nn.Module) -> nn.Module:
    """Move a new adapter to the device of ``module``'s parameters.

    An adapter built on the meta device stays there: that is a load checking
    shapes before it allocates anything (``AdapterModel.add_loaded_adapter``).
    """
    if any(p.is_meta for p in adapter.parameters()):
        return adapter
    return adapter.to(next(module.parameters()).device)


class AdapterLayer(nn.Module):
    """Base for modules that hold named adapters and use the active one (PEFT's ``BaseTunerLayer``).

    >>> layers = [m for m in model.modules() if isinstance(m, repeft.AdapterLayer)]  # doctest: +SKIP
    >>> all(not layer.disable_adapters for layer in layers)  # doctest: +SKIP
    True
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    @property
    def active(self) -> nn.Module | None:
        """The active adapter's module, or None when disabled or not present here."""
        if self.disabled or self.active_adapter is None or self.active_adapter not in self.adapters:
            return None
        return self.adapters[self.active_adapter]

    # PEFT's names (``BaseTunerLayer``) for the state above, for code that reads layers as PEFT's.
    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def merged_adapters(self) -> list[str]:
        merged = getattr(self, "merged_adapter", None)
        return [] if merged is None else [merged]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unwrapped(self) -> nn.Module | None:
        """What takes this layer's place once it holds no adapter (None: remove it)."""
        return None

    def unloaded(self) -> nn.Module | None:
        """What takes this layer's place in ``merge_and_unload`` (None: remove it)."""
        raise ValueError(
            f"{type(self).__name__} changes activations, not weights: it cannot be merged into the "
            "model. Keep the adapter and load it with repeft.load_adapter instead."
        )


class ModulesToSave(AdapterLayer):
    """A module trained in full (e.g. a classification head), one copy per adapter.

    On a float16/bfloat16 model the copies are float32, as PEFT keeps its
    adapters (``autocast_adapter_dtype``): Adam's updates of a half-precision
    head underflow and overflow, and the loss turns NaN in a few steps. Inputs
    are cast to the copy's dtype and outputs back to the model's.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def add(self, name: str) -> None:
        trainable = copy.deepcopy(self.original)
        if _dtype(self.original) in HALF_DTYPES:
            trainable.float()
        trainable.requires_grad_(True)
        self.adapters[name] = trainable

    def current(self) -> nn.Module:
        return self.active if self.active is not None else self.original

    def forward(self, *args, **kwargs):
        module = self.current()
        dtype, model_dtype = _dtype(module), _dtype(self.original)
        if dtype == model_dtype:
            return module(*args, **kwargs)
        args = [_cast(a, dtype) for a in args]
        kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        return _cast(module(*args, **kwargs), model_dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads attributes of its head (e.g. ``classifier.out_features``);
            # dunder lookups (copy, pickle) must not recurse into a half-built object.
            if name.startswith("__") or "disabled" not in self.__dict__:
                raise
            return getattr(self.current(), name)

    def unwrapped(self) -> nn.Module:
        return self.original

    def unloaded(self) -> nn.Module:
        """The active copy in the model's dtype (a new module if it is kept in float32)."""
        module = self.current()
        if _dtype(module) == _dtype(self.original):
            return module
        plain = copy.deepcopy(self.original)
        plain.load_state_dict(module.state_dict())  # copy_ casts to the model's dtype
        return plain


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter (None if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
