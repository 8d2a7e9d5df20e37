"""PEFT's names on LoRA layers (``LoraLayer``), for code that reads a layer as PEFT lays it out.

A PEFT LoRA layer holds ``lora_A``/``lora_B`` as ModuleDicts of ``nn.Linear``
keyed by adapter name (an embedding: ``lora_embedding_A``/``_B``, ParameterDicts),
and ``r``/``scaling`` as dicts; a repeft layer holds each adapter's factors in
``adapters[name]``. These views read the same tensors: ``layer.lora_A["default"].weight``
is the adapter's own parameter, so an in-place edit reaches the adapter.
RepLoRA computes its factors from seed matrices, so a view of them would
drop edits silently: its layers refuse these names and say where to look.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


class FactorView:
    """What PEFT's ``lora_A[name]`` (an ``nn.Linear``) gives the code that reads it: ``.weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


class PeftLoRANames:
    """``lora_A``, ``lora_B``, ``lora_embedding_A``/``_B``, ``r`` and ``scaling`` of a LoRA layer, by adapter name."""

    adapters: nn.ModuleDict

    def _free_factors(self, part: str) -> dict[str, nn.Module]:
        # PEFT's embedding layers have empty lora_A/lora_B and linear layers empty lora_embedding_A/_B.
        other = part.replace("lora_embedding_", "lora_") if "embedding" in part else part.replace("lora_", "lora_embedding_")
        present = {name: a for name, a in self.adapters.items() if not hasattr(a, other)}
        computed = [name for name, a in present.items() if not isinstance(getattr(a, part, None), nn.Parameter)]
        if computed:
            raise AttributeError(
                f"{type(self).__name__}.{part}: adapter(s) {computed} compute their factors (RepLoRA); read them with "
                "layer.adapters[name].factors() or layer.delta_weight(name)"
            )
        return present

    def _view(self, part: str, wrap: Any) -> Mapping[str, Any]:
        return AdapterMapping(lambda: {name: wrap(getattr(a, part)) for name, a in self._free_factors(part).items()})

    @property
    def lora_A(self) -> Mapping[str, FactorView]:
        return self._view("lora_A", FactorView)

    @property
    def lora_B(self) -> Mapping[str, FactorView]:
        return self._view("lora_B", FactorView)

    @property
    def lora_embedding_A(self) -> Mapping[str, nn.Parameter]:
        return self._view("lora_embedding_A", lambda p: p)

    @property
    def lora_embedding_B(self) -> Mapping[str, nn.Parameter]:
        return self._view("lora_embedding_B", lambda p: p)

    @property
    def r(self) -> Mapping[str, int]:
        return AdapterMapping(lambda: {name: a.factors()[0].shape[0] for name, a in self.adapters.items()})

    @property
    def scaling(self) -> Mapping[str, float]:
        return AdapterMapping(lambda: {name: a.scaling for name, a in self.adapters.items()})


class AdapterMapping(Mapping):
    """A read-only mapping by adapter name, read afresh from the layer at each access (as PEFT's live dicts)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def __getitem__(self, name: str) -> Any:
        return self._read()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return repr(self._read())
