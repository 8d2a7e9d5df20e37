"""Mixed-adapter batches for ``AdapterModel``: each row of a batch runs its own adapter.

``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``
(as in PEFT) hand LoRA-family layers one adapter index per row; see
``LoRALinear.row_adapters``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .adapters import BASE_ADAPTER_NAME
from .config import AdapterConfig
from .lora import LoRALinear

MIXED_BATCH_METHODS = ("lora", "replora")


class MixedBatchMixin:
    """``AdapterModel``'s mixed-batch switch; mixed into ``AdapterModel`` (``repeft.model``).

    Reads the wrapper's ``configs`` and ``training``, and ``adapter_layers``/``merged_adapter``.
    """

    configs: dict[str, AdapterConfig]

    def _rows_per_prompt(self, generate_kwargs: dict[str, Any]) -> int:
        """How many rows ``generate`` makes of each prompt: max(num_beams, num_return_sequences), as transformers."""
        config = generate_kwargs.get("generation_config") or getattr(self.get_base_model(), "generation_config", None)

        def setting(name: str) -> int:
            value = generate_kwargs.get(name)
            return value if value is not None else getattr(config, name, None) or 1

        return max(setting("num_beams"), setting("num_return_sequences"))

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str], rows: int | None, rows_per_name: int = 1) -> Iterator[None]:
        """Inside the block row b of every batch runs adapter ``adapter_names[b]`` (``"__base__"``: none).

        LoRA-family layers get each row's adapter index; other adapter layers are
        switched off, since they cannot tell rows apart. Disabled layers
        (``disable_adapter``) stay disabled: they run the base layer for every row.
        ``rows_per_name`` > 1 (``generate``'s beams and return sequences) lets a
        layer also see each name's row repeated that many times in a row.
        """
        names = self._check_adapter_names(adapter_names)
        if rows is not None and rows != len(names):
            raise ValueError(_wrong_length(len(names), rows))
        lora_layers, other_layers = [], []
        for _, layer in self.adapter_layers():
            if isinstance(layer, LoRALinear):
                if not layer.disabled:
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
            layer.row_adapters = (present, *per_layer[key], {}, rows_per_name)
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
        with_dora = sorted({n for n in names if getattr(self.configs.get(n), "use_dora", False)})
        if with_dora:
            # As in PEFT: each row would need its own adapter's magnitude and weight norm.
            raise ValueError(
                f"adapter_names: DoRA adapters {with_dora} cannot share a batch with other adapters; run them in "
                "batches of their own (set_adapter), or merge one with merge()"
            )
        return names


# Inputs whose first dimension is the batch, in the order a forward's main input is looked for.
BATCH_INPUTS = ("input_ids", "inputs", "inputs_embeds", "pixel_values", "input_features", "input_values")


def batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Rows in the batch of a forward or generate call (its main input's first dimension), or None if unknown."""
    candidates = [*args[:1], *(kwargs.get(name) for name in BATCH_INPUTS)]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _wrong_length(names: int, rows: int) -> str:
    return (
        f"adapter_names has {names} entries but the batch has {rows} rows: give exactly one adapter name per row "
        f"({BASE_ADAPTER_NAME!r} for a row without adapter)"
    )
