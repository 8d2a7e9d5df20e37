"""Merging for ``AdapterModel``: fold an adapter into the base weights, and export the result.

``merge``/``unmerge`` switch in place; ``merge_and_unload``, ``merged_state_dict``
and ``save_merged`` give the plain transformers model, its weights or its
checkpoint. Merging a shared (tied) weight unties it, and the transformers
config is told so until ``unmerge``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .export_guards import base_model_dir, refuse_non_finite, refuse_overwriting_base
from .files import staged_write
from .fsdp import refuse_sharded
from .tuner import MODEL_PREFIX


class MergeMixin:
    """``AdapterModel``'s merge and merged export; mixed into ``AdapterModel`` (``repeft.model``).

    Reads the wrapper's ``base_model``, ``configs``, ``active_adapter`` and
    ``_tie_flags``, and the adapter management of ``AdapterManagementMixin``.
    """

    base_model: nn.Module
    configs: dict[str, AdapterConfig]
    active_adapter: str | None
    _tie_flags: list[tuple[Any, bool]]

    def merged_adapter(self) -> str | None:
        for _, layer in self.adapter_layers():
            merged = getattr(layer, "merged_adapter", None)
            if merged is not None:
                return merged
        return None

    def _check_mergeable(self, adapter_name: str) -> None:
        config = self.configs[adapter_name]
        if not config.mergeable:
            raise ValueError(
                f"adapter {adapter_name!r} ({config.method}) changes activations, not weights, so it cannot be "
                "merged; save it with save_adapter and load it with repeft.load_adapter"
            )
        refuse_sharded(self, "merging")

    def merge(self, adapter_name: str | None = None) -> None:
        """Fold the adapter into the base weights (faster inference; ``unmerge`` undoes it)."""
        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        self._check_mergeable(adapter_name)
        if self.merged_adapter() is not None:
            raise ValueError(f"adapter {self.merged_adapter()!r} is already merged; call unmerge() first")
        if adapter_name != self.active_adapter:
            self.set_adapter(adapter_name)
        shared = shared_parameters(self.get_base_model())
        try:
            for path, layer in self.adapter_layers():
                if hasattr(layer, "merge") and adapter_name in layer.adapters:
                    untie = id(layer.weight) in shared
                    try:
                        layer.merge(adapter_name, untie=untie)
                    except ValueError as exc:
                        raise type(exc)(f"{path.removeprefix(MODEL_PREFIX)}: {exc}") from None
                    if untie and not self._tie_flags:
                        # The merged weight is the layer's own now: the config must say so, or
                        # save_pretrained drops it as a duplicate and from_pretrained ties it again.
                        self._tie_flags = untie_word_embeddings(getattr(self.get_base_model(), "config", None))
        except BaseException:
            # A layer that refuses (e.g. a quantized base) must not leave the others merged.
            self.unmerge()
            raise

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            if hasattr(layer, "unmerge"):
                layer.unmerge()
        for config, tied in self._tie_flags:
            config.tie_word_embeddings = tied
        self._tie_flags = []

    @contextlib.contextmanager
    def _merged(self) -> Iterator[None]:
        """The active adapter merged inside the block; merged or not afterwards as it was before."""
        self._check_mergeable(self.active_adapter)
        was_merged = self.merged_adapter() is not None
        if not was_merged:
            self.merge()
        try:
            yield
        finally:
            if not was_merged:
                self.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active adapter (or the one ``adapter_names`` names) and return the plain transformers model.

        This wrapper is spent afterwards. PEFT's ``safe_merge`` is what every
        repeft merge does (merged weights are checked finite before they are
        written), and ``progressbar`` has nothing to show: both are accepted.
        """
        if adapter_names is not None:
            names = list(adapter_names)
            if len(names) != 1:
                raise ValueError(f"repeft merges one adapter; merge_and_unload(adapter_names={names}) needs one name")
            self._check_known(names[0])
            if self.merged_adapter() not in (None, names[0]):
                self.unmerge()
            self.set_adapter(names[0])
        self._check_mergeable(self.active_adapter)
        if self.merged_adapter() is None:
            self.merge()
        for path, layer in list(self.adapter_layers()):
            self._replace(path, layer.unloaded())
        self.configs.clear()
        self._tie_flags = []  # merged weights stay untied
        return self.get_base_model()

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict with the active adapter merged, in the plain model's key names."""
        with self._merged():
            layers = {p.removeprefix(MODEL_PREFIX): layer for p, layer in self.adapter_layers()}
            state = {
                k: v.detach().clone()
                for k, v in self.get_base_model().state_dict().items()
                if not any(k.startswith(p + ".") for p in layers)
            }
            for path, layer in layers.items():
                unloaded = layer.unloaded()
                if unloaded is not None:
                    state.update({f"{path}.{k}": v.detach().clone() for k, v in unloaded.state_dict().items()})
        return state

    def save_merged(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the base model with the active adapter merged, as a plain transformers checkpoint.

        ``AutoModel*.from_pretrained(save_directory)`` loads it without repeft.
        ``kwargs`` go to transformers' ``save_pretrained``. The files are written
        as ``save_adapter`` writes its own (see ``repeft.files``): other files in
        the directory are kept, except weight files of an earlier merged save.

        >>> model.save_merged("out/merged")  # doctest: +SKIP
        """
        refuse_overwriting_base(base_model_dir(self.get_base_model()), save_directory)
        with self._merged():
            state = self.merged_state_dict()
            refuse_non_finite(state)
            with staged_write(save_directory) as tmp:
                self.get_base_model().save_pretrained(tmp, state_dict=state, **kwargs)


def shared_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter that more than one module holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def untie_word_embeddings(config: Any) -> list[tuple[Any, bool]]:
    """Set ``tie_word_embeddings=False`` on a transformers config (and its text config); return what it was."""
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    before = []
    for c in {id(c): c for c in configs if c is not None}.values():
        if getattr(c, "tie_word_embeddings", False):
            before.append((c, c.tie_word_embeddings))
            c.tie_word_embeddings = False
    return before
