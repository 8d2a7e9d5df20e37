"""Adapter management for ``AdapterModel``: add, switch, disable and delete named adapters.

Methods register an injector (see ``methods.py``) that places ``AdapterLayer``
modules in the model; this mixin walks those layers. Modules trained in full
beside an adapter (``modules_to_save``, e.g. a new classification head) are
wrapped in ``ModulesToSave`` layers here too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from .config import AdapterConfig
from .kernels import check_backend_runs_here
from .layers import AdapterLayer, ModulesToSave
from .methods import method
from .targeting import TargetError, find_modules
from .tuner import MODEL_PREFIX

def with_base_dtype(config: AdapterConfig, base: nn.Module) -> AdapterConfig:
    """``config`` with the base model's floating dtype as the adapter's (PEFT's ``autocast_adapter_dtype=False``)."""
    if not hasattr(config, "dtype"):
        return config
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
    return dataclasses.replace(config, dtype=str(dtype).removeprefix("torch."))


def default_modules_to_save(base: nn.Module) -> list[str] | None:
    """The task head an adapter trains in full when its ``modules_to_save`` is ``None`` (e.g. ``["classifier"]``)."""
    class_name = type(base).__name__
    for suffix, heads in TASK_HEAD_SUFFIXES.items():
        if class_name.endswith(suffix):
            found = [h for h in heads if find_modules(base, [h])]
            return found[:1] or None
    return None


class UnknownAdapterError(KeyError, ValueError):
    """No adapter of that name. PEFT raises ValueError here; earlier repeft KeyError, so both catch it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# In ``adapter_names``, the name of "no adapter" (as in PEFT); no adapter may take it.
BASE_ADAPTER_NAME = "__base__"

# Heads that start untrained on task models, so they must train and be saved with the adapter.
TASK_HEAD_SUFFIXES = {
    "ForSequenceClassification": ["classifier", "score"],
    "ForTokenClassification": ["classifier", "score"],
    "ForImageClassification": ["classifier"],
    "ForQuestionAnswering": ["qa_outputs"],
    "ForMultipleChoice": ["classifier"],
    "ForAudioClassification": ["classifier", "projector"],
}


class AdapterManagementMixin:
    """``AdapterModel``'s adapter bookkeeping; mixed into ``AdapterModel`` (``repeft.model``).

    Reads the wrapper's ``base_model``, ``configs`` and ``active_adapter``;
    ``merged_adapter``/``merge``/``unmerge`` come from ``MergeMixin``.
    """

    base_model: nn.Module
    configs: dict[str, AdapterConfig]
    active_adapter: str | None

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(path, layer) of every adapter layer, outermost only, paths relative to this wrapper."""
        inside: list[str] = []
        for path, module in self.named_modules():
            if any(path.startswith(p) for p in inside):
                continue
            if isinstance(module, AdapterLayer):
                inside.append(path + ".")
                yield path, module

    def modules_to_save_paths(self) -> list[str]:
        """Paths (relative to the base model) of modules trained in full, which adapters must not target."""
        return [p.removeprefix(MODEL_PREFIX) for p, layer in self.adapter_layers() if isinstance(layer, ModulesToSave)]

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: AdapterConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Attach a new adapter; as in PEFT it becomes active only if none was (``set_adapter`` switches).

        ``autocast_adapter_dtype=False`` (PEFT's argument) gives the adapter the
        base's floating dtype instead of the config's (float32 by default);
        ``low_cpu_mem_usage=True`` (adapter weights on the meta device, to be
        loaded later) is refused by name.

        >>> model.add_adapter("math", repeft.LoRAConfig(r=4))  # doctest: +SKIP
        >>> model.set_adapter("math")  # doctest: +SKIP
        """
        if low_cpu_mem_usage:
            raise ValueError("add_adapter(low_cpu_mem_usage=True) is not supported by repeft: adapters are built whole")
        config = peft_config if autocast_adapter_dtype else with_base_dtype(peft_config, self.get_base_model())
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be non-empty and contain no '.', got {adapter_name!r}")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(
                f"adapter name {BASE_ADAPTER_NAME!r} is reserved: in adapter_names it means 'no adapter'; pick another name"
            )
        if self.merged_adapter() is not None:
            raise ValueError("cannot add an adapter while one is merged; call unmerge() first")
        if getattr(config, "kernel", None) is not None:
            check_backend_runs_here(config.kernel)
        config = copy.deepcopy(config)
        if config.modules_to_save is None:
            config.modules_to_save = self._default_modules_to_save()
        try:
            self._add_modules_to_save(adapter_name, config.modules_to_save or [])
            method(config.method).inject(self, adapter_name, config)
            # New adapter modules take the base model's mode: one loaded for inference (eval) must
            # not run adapter dropout, nor RepLoRA skip its eval-mode factor cache.
            for _, layer in self.adapter_layers():
                if adapter_name in layer.adapters:
                    layer.train(self.get_base_model().training)
        except BaseException:
            self._remove_adapter_entries(adapter_name)
            raise
        self.configs[adapter_name] = config
        # set_adapter also freezes the new adapter when another one stays active.
        self.set_adapter(adapter_name if self.active_adapter is None else self.active_adapter)

    def _default_modules_to_save(self) -> list[str] | None:
        return default_modules_to_save(self.get_base_model())

    def _add_modules_to_save(self, adapter_name: str, patterns: list[str]) -> None:
        base = self.get_base_model()
        for pattern in patterns:
            paths = find_modules(base, [pattern])
            if not paths:
                raise TargetError(f"modules_to_save entry {pattern!r} matches no module of {type(base).__name__}")
            for path in paths:
                if any(path.startswith(other + ".") for other in paths):
                    continue
                module = base.get_submodule(path)
                if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
                    raise TargetError(
                        f"modules_to_save entry {pattern!r} names {path!r}, a {type(module).__name__}, which has no "
                        "forward of its own to train a copy of; name the modules inside it instead"
                    )
                if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSave):
                    raise TargetError(f"modules_to_save entry {pattern!r} names {path!r}, which an adapter already wraps")
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    base.set_submodule(path, module)
                module.add(adapter_name)

    def _remove_adapter_entries(self, adapter_name: str) -> None:
        for path, layer in list(self.adapter_layers()):
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
            if len(layer.adapters) == 0:
                self._replace(path, layer.unwrapped())

    def _replace(self, path: str, module: nn.Module | None) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if module is None:
            delattr(parent, child)
        else:
            setattr(parent, child, module)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the one that runs and trains; all others are frozen.

        A list of one name is accepted, as PEFT's and transformers' ``set_adapter`` take lists.
        """
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(
                    f"repeft runs one adapter at a time; set_adapter got {list(adapter_name)}: pass one name"
                )
            (adapter_name,) = adapter_name
        self._check_known(adapter_name)
        if self.merged_adapter() not in (None, adapter_name):
            raise ValueError(f"adapter {self.merged_adapter()!r} is merged; call unmerge() before switching")
        trainable = not self.configs[adapter_name].inference_mode
        for _, layer in self.adapter_layers():
            layer.active_adapter = adapter_name
            for name, module in layer.adapters.items():
                module.requires_grad_(trainable and name == adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with none go back to the plain modules."""
        self._check_known(adapter_name)
        if self.merged_adapter() == adapter_name:
            raise ValueError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. Please unmerge them first: "
                "model.unmerge()"
            )
        self._remove_adapter_entries(adapter_name)
        del self.configs[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            # PEFT's words first, for code that matches them.
            raise UnknownAdapterError(
                f"Adapter {adapter_name} does not exist: no adapter named {adapter_name!r}; adapters: {sorted(self.configs)}"
            )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block.

        >>> with model.disable_adapter():  # doctest: +SKIP
        ...     base_logits = model(input_ids).logits
        """
        merged = self.merged_adapter()
        layers = [layer for _, layer in self.adapter_layers()]
        before = [layer.disabled for layer in layers]
        self.disable_adapter_layers()
        try:
            yield
        finally:
            for layer, disabled in zip(layers, before):
                layer.disabled = disabled
            if self.active_adapter is not None:
                self.set_adapter(self.active_adapter)  # trainable again, as before the block
            if merged is not None:
                self.merge(merged)

    def disable_adapter_layers(self) -> None:
        """Run the plain base model until ``enable_adapter_layers()``; a merged adapter is unmerged.

        As in PEFT, the adapters are frozen meanwhile: an optimizer step cannot move what does not run.
        """
        if self.merged_adapter() is not None:
            self.unmerge()
        for _, layer in self.adapter_layers():
            layer.disabled = True
            layer.adapters.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``: the active adapter runs (and trains, unless loaded for inference) again."""
        for _, layer in self.adapter_layers():
            layer.disabled = False
        if self.active_adapter is not None:
            self.set_adapter(self.active_adapter)
