"""PEFT's and transformers' names for ``AdapterModel``'s own members.

A PEFT script changes only its import and config lines (``docs/api.md``,
"Coming from PEFT"); transformers' ``Trainer`` and ``PreTrainedModel`` also
look for some of these names on the model they are given.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import AdapterManagementMixin
from .config import AdapterConfig
from .layers import ModulesToSave
from .tuner import MODEL_PREFIX

if TYPE_CHECKING:
    from .model import AdapterModel


class AdapterNames(list):
    """A list of adapter names that also answers a call, for code that calls ``active_adapters()``."""

    def __call__(self) -> list[str]:
        return list(self)


class PeftNamesMixin:
    """PEFT's names on ``AdapterModel``; mixed into ``AdapterModel`` (``repeft.model``).

    Reads the wrapper's ``base_model``, ``configs`` and ``active_adapter``, and its own methods.
    """

    base_model: nn.Module
    configs: dict[str, AdapterConfig]
    active_adapter: str | None

    def get_base_model(self) -> nn.Module:
        """The transformers model, with adapter layers still in it (PEFT's ``base_model.model``)."""
        return self.base_model.model

    @property
    def prefix(self) -> str:
        """PEFT's marker of adapter parameters: every adapter tensor's name contains it.

        ``"lora_"`` while every adapter is LoRA-family (LoRA, DoRA, RepLoRA), as in
        PEFT; otherwise ``"adapters."``, which names every repeft adapter tensor.

        >>> [name for name, _ in model.named_parameters() if model.prefix in name]  # doctest: +SKIP
        """
        lora_family = {"lora", "replora"}
        return "lora_" if self.configs and {c.method for c in self.configs.values()} <= lora_family else "adapters."

    @property
    def targeted_module_names(self) -> list[str]:
        """Module paths (in the transformers model) that an adapter wraps, as PEFT lists them."""
        return sorted(
            {path.removeprefix(MODEL_PREFIX) for path, layer in self.adapter_layers() if not isinstance(layer, ModulesToSave)}
        )

    @property
    def _hf_peft_config_loaded(self) -> bool:
        # transformers' Trainer refuses to train a quantized model that carries no adapter.
        return bool(self.configs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for ``trainable_parameters()``."""
        return self.trainable_parameters()

    # transformers' names for the on/off switch (``PreTrainedModel.disable_adapters``).
    disable_adapters = AdapterManagementMixin.disable_adapter_layers
    enable_adapters = AdapterManagementMixin.enable_adapter_layers

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's name for ``merge``; ``adapter_names`` holds the one adapter to merge.

        Every repeft merge is a safe merge (merged weights are checked finite before they are written).
        As in PEFT, merging the adapter that is already merged warns and does nothing.
        """
        names = [None] if adapter_names is None else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"repeft merges one adapter; merge_adapter(adapter_names={names}) needs one name")
        merged = self.merged_adapter()  # walks every layer: once
        if merged is not None and merged == (names[0] or self.active_adapter):
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        self.merge(names[0])

    def unmerge_adapter(self) -> None:
        """PEFT's name for ``unmerge``."""
        self.unmerge()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's weighted combination of adapters: not in repeft, refused by name."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported by repeft: it runs one adapter at a time; merge_and_unload one "
            "adapter, wrap the merged model and add the next, or combine with PEFT"
        )

    @property
    def active_adapters(self) -> AdapterNames:
        """The active adapter as a list, read as PEFT's property or called as transformers' method.

        >>> model.active_adapters, model.active_adapters()  # doctest: +SKIP
        (['default'], ['default'])
        """
        return AdapterNames([] if self.active_adapter is None else [self.active_adapter])

    @property
    def active_peft_config(self) -> AdapterConfig:
        """PEFT's name for the active adapter's config."""
        self._check_known(self.active_adapter)
        return self.configs[self.active_adapter]

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """PEFT's name for ``configs``: adapter name -> config."""
        return self.configs

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model (this wrapper is spent).

        >>> base = model.unload()  # doctest: +SKIP
        """
        self.unmerge()
        for adapter_name in list(self.configs):
            self.delete_adapter(adapter_name)
        return self.get_base_model()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        subfolder: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> AdapterModel:
        """PEFT's ``PeftModel.from_pretrained``: ``repeft.load_adapter`` under the name PEFT users know.

        As in PEFT, the model comes back in eval mode (dropout off) unless
        ``is_trainable=True``; ``config`` replaces the saved config (same method,
        same shapes) and, as in PEFT, becomes the adapter's config (its
        ``inference_mode`` set to ``not is_trainable``); ``subfolder`` is a folder inside ``path``. PEFT's
        ``autocast_adapter_dtype=True`` is repeft's default (adapters in
        float32; ``False``: in the base's dtype, as ``load_adapter`` says);
        ``low_cpu_mem_usage`` is what a load does anyway (the adapter
        is checked on the meta device before anything is allocated);
        ``torch_device``/``device_map`` must name the base model's device, where
        the adapter goes. Hub options are refused by name: repeft reads local directories.

        >>> model = repeft.AdapterModel.from_pretrained(base, "out/adapter")  # doctest: +SKIP
        """
        from .model import AdapterModel, _restore_grads_on_failure  # model.py builds AdapterModel from this mixin

        _check_base_device(model, kwargs.pop("torch_device", None), kwargs.pop("device_map", None))
        _refuse_hub_options("from_pretrained", kwargs)
        if subfolder:
            path = os.path.join(path, subfolder)
        wrapped = model if isinstance(model, AdapterModel) else None
        with _restore_grads_on_failure(model):
            wrapped = wrapped or AdapterModel(model)
            wrapped.load_adapter(
                path, adapter_name, trainable=is_trainable, config=config, autocast_adapter_dtype=autocast_adapter_dtype
            )
        if config is not None:
            # As in PEFT, the config passed becomes the adapter's (inference_mode set to match); it is given the
            # values of the checked copy the adapter was built from, so it says what the adapter is.
            checked = wrapped.configs[adapter_name]
            for field in dataclasses.fields(checked):
                setattr(config, field.name, getattr(checked, field.name))
            wrapped.configs[adapter_name] = config
        return wrapped if is_trainable else wrapped.eval()

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload adapter",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Upload the adapters (``save_pretrained``'s files), not the base model, as PEFT's ``push_to_hub`` does.

        >>> model.push_to_hub("me/llama-lora")  # doctest: +SKIP
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="repeft-push-") as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, create_pr=create_pr
            )


def _check_base_device(model: nn.Module, torch_device: Any, device_map: Any) -> None:
    """PEFT's ``torch_device``/``device_map`` name where the adapter goes; repeft puts it beside the base weights."""
    base = next((p.device for p in model.parameters()), torch.device("cpu"))
    asked = [("torch_device", torch_device)] if torch_device is not None else []
    if device_map is not None:
        asked += [("device_map", d) for d in (device_map.values() if isinstance(device_map, dict) else [device_map])]
    for option, device in asked:
        try:
            device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        except (RuntimeError, TypeError, ValueError):
            device = None  # "auto", "balanced", ...: a placement plan, which repeft does not make
        if device is None or device.type != base.type or (device.index or 0) != (base.index or 0):
            raise ValueError(
                f"from_pretrained({option}={(device_map if option == 'device_map' else torch_device)!r}): repeft "
                f"loads the adapter onto the base model's device ({base}); move the base model there first"
            )


def _refuse_hub_options(caller: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(
            f"{caller}: {sorted(options)} are PEFT Hub or device options repeft does not take; it reads a local "
            "directory (download one with huggingface_hub.snapshot_download) and loads onto the base model's device"
        )
