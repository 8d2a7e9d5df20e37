"""Modules that carry per-adapter state inside a wrapped model.

Every adapter parameter lives in the ``adapters`` ModuleDict of some
``AdapterLayer``, keyed by adapter name. Saving, loading, switching and
deleting adapters walk these layers; no method needs its own bookkeeping.
"""

from __future__ import annotations

import copy

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
    """Base for modules that hold named adapters and use the active one."""

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
    """A module trained in full (e.g. a classification head), one copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def add(self, name: str) -> None:
        trainable = copy.deepcopy(self.original)
        trainable.requires_grad_(True)
        self.adapters[name] = trainable

    def current(self) -> nn.Module:
        return self.active if self.active is not None else self.original

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

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
        return self.current()
