"""Mixed-adapter batches for ``AdapterModel``: each row of a batch runs its own adapter.

``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``
(as in PEFT) hand LoRA-family layers one adapter index per row; see
``LoRALinear.row_adapters``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .config import AdapterConfig
from .lora import LoRALinear

# In ``adapter_names``, the name of "no adapter" (as in PEFT).
BASE_ADAPTER_NAME = "__base__"
MIXED_BATCH_METHODS = ("lora", "replora")


class MixedBatchMixin:
    """``AdapterModel``'s mixed-batch switch; mixed into ``AdapterModel`` (``repeft.model``).

    Reads the wrapper's ``configs`` and ``training``, and ``adapter_layers``/``merged_adapter``.
    """

    configs: dict[str, AdapterConfig]

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block row b of every batch runs adapter ``adapter_names[b]`` (``"__base__"``: none).

        LoRA-family layers get each row's adapter index; other adapter layers are
        switched off, since they cannot tell rows apart. Rows repeated by
        ``generate`` (beams, several return sequences) keep their prompt's adapter.
        """
        names = self._check_adapter_names(adapter_names)
        lora_layers, other_layers = [], []
        for _, layer in self.adapter_layers():
            if isinstance(layer, LoRALinear):
                lora_layers.append(layer)
            elif any(n in layer.adapters for n in names):
                raise ValueError(
                    f"adapter_names: {type(layer).__name__} layers cannot mix adapters in one batch; "
                    f"mixed batches work with {MIXED_BATCH_METHODS} adapters without modules_to_save"
                )
            elif not layer.disabled:
                other_layers.append(layer)
        used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
        per_layer: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in lora_layers:
            present = [n for n in used if n in layer.adapters]
            device = next(layer.base_layer.parameters()).device
            key = (tuple(present), device)
            if key not in per_layer:
                index = [present.index(n) if n in present else -1 for n in names]
                scaling = [layer.adapters[n].scaling for n in present]
                per_layer[key] = (torch.tensor(index, device=device), torch.tensor(scaling, device=device))
            layer.row_adapters = (present, *per_layer[key], {})
        for layer in other_layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in lora_layers:
                layer.row_adapters = None
            for layer in other_layers:
                layer.disabled = False

    def _check_adapter_names(self, adapter_names: list[str]) -> list[str]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        if self.training:
            raise ValueError("adapter_names is for inference: call model.eval() first (a mixed batch does not train)")
        if self.merged_adapter() is not None:
            raise ValueError(f"adapter {self.merged_adapter()!r} is merged; call unmerge() before using adapter_names")
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ADAPTER_NAME and n not in self.configs})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapter(s) {unknown}; adapters: {sorted(self.configs)} "
                f"(or {BASE_ADAPTER_NAME!r} for the base model)"
            )
        other = sorted({n for n in names if n in self.configs and self.configs[n].method not in MIXED_BATCH_METHODS})
        if other:
            raise ValueError(f"adapter_names works with {MIXED_BATCH_METHODS} adapters; {other} are not")
        return names
