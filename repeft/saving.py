"""Saving and loading for ``AdapterModel``: one adapter per directory, checked before it is used.

A LoRA adapter (DoRA and embeddings included) is saved as PEFT saves it, so
``peft.PeftModel.from_pretrained``, vLLM and the Hub read the directory:
PEFT's ``adapter_config.json`` fields and tensor names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), with
repeft's own fields beside PEFT's (format version 2). Other methods, which
PEFT cannot represent, keep repeft's names: the module path in the base
model, without the adapter name (``model.layers.0.self_attn.q_proj.lora_A``;
format version 1). A load reads both versions and PEFT's own directories.
``adapter_config.json`` records the base model's architecture, and a load
refuses an adapter made for another one, or tensors that do not fit, leaving
the model as it was. The files themselves are written and read by ``repeft.files``.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from . import __version__
from .adapters import TASK_HEAD_SUFFIXES, with_base_dtype
from .config import AdapterConfig
from .files import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    REPEFT_NAMES_VERSION,
    AdapterFileError,
    read_adapter_dir,
    write_adapter_dir,
)
from .fsdp import copy_whole_into, gathered
from .kernels import triton_unavailable_reason
from .model_card import write_model_card
from .tuner import MODEL_PREFIX

# Config fields that pin down the shapes an adapter was trained for.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "d_model",
    "num_layers",
    "n_embd",
    "n_layer",
    "n_head",
)


def architecture(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
    else:
        text = config
    arch = {f: getattr(text, f) for f in ARCHITECTURE_FIELDS if isinstance(getattr(text, f, None), (int, str))}
    arch["model_type"] = getattr(config, "model_type", None)
    return arch


class SaveLoadMixin:
    """``AdapterModel``'s adapter files; mixed into ``AdapterModel`` (``repeft.model``).

    Reads the wrapper's ``base_model``, ``configs``, ``active_adapter`` and
    ``architecture``, and the adapter management of ``AdapterManagementMixin``.
    """

    base_model: nn.Module
    configs: dict[str, AdapterConfig]
    active_adapter: str | None
    architecture: dict[str, Any]

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed by base-model module path, without the adapter name.

        They are the parameters themselves: on a sharded (FSDP) model each is a
        ``DTensor`` holding this process's slice (``save_adapter`` gathers them).
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        state = {}
        for path, layer in self.adapter_layers():
            if adapter_name in layer.adapters:
                prefix = path.removeprefix(MODEL_PREFIX)
                for key, value in layer.adapters[adapter_name].state_dict().items():
                    state[f"{prefix}.{key}"] = value
        return state

    def save_adapter(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, is_main_process: bool = True
    ) -> bool:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically); True if in PEFT's layout.

        A LoRA adapter is written in PEFT's layout (``peft.PeftModel.from_pretrained``
        loads the directory), any other in repeft's (see this module's docstring).
        On several processes every one calls it and only the one with
        ``is_main_process=True`` writes, as with transformers' and PEFT's
        ``save_pretrained``. A sharded (FSDP) adapter is gathered whole first,
        a step every process must join.

        >>> model.save_adapter("out/adapter")  # doctest: +SKIP
        >>> model.save_adapter("out/adapter", is_main_process=accelerator.is_main_process)  # doctest: +SKIP
        """
        from .peft_interop import peft_files  # peft_interop builds on AdapterModel, whose module imports this one

        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        in_peft_layout = peft_files(self, adapter_name)
        if in_peft_layout is None:
            peft_fields, tensors = {}, {k: gathered(v) for k, v in self.adapter_state_dict(adapter_name).items()}
        else:
            peft_fields, tensors = in_peft_layout
        if not is_main_process:
            return bool(peft_fields)
        config = self.configs[adapter_name]
        meta = {
            **peft_fields,  # PEFT ignores the fields below (peft 0.21 warns that it does)
            "format": FORMAT,
            "format_version": FORMAT_VERSION if peft_fields else REPEFT_NAMES_VERSION,
            "repeft_version": __version__,
            "method": config.method,
            "config": config.to_dict(),
            "base_model": self._base_model_record(),
            "adapted_modules": sorted({p.removeprefix(MODEL_PREFIX) for p, l in self.adapter_layers() if adapter_name in l.adapters}),
        }
        write_adapter_dir(save_directory, meta, tensors)
        return bool(peft_fields)

    def _base_model_record(self) -> dict[str, Any]:
        """What ``adapter_config.json`` says of the base: where it came from, its class, shapes and label names."""
        config = getattr(self.get_base_model(), "config", None)
        record = {
            "name_or_path": getattr(config, "_name_or_path", None),
            "class": type(self.get_base_model()).__name__,
            "architecture": self.architecture,
        }
        has_head = any(record["class"].endswith(suffix) for suffix in TASK_HEAD_SUFFIXES)
        if has_head and getattr(config, "id2label", None):
            record["id2label"] = {str(i): name for i, name in config.id2label.items()}
        return record

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Save every adapter (or ``selected_adapters``) as PEFT does: ``"default"`` in
        ``save_directory`` itself, any other in the sub-folder of its name, each as ``save_adapter`` writes it.

        ``repeft.load_adapter(base, save_directory)`` reloads the default one,
        ``model.load_adapter(f"{save_directory}/NAME", "NAME")`` another;
        ``save_merged`` writes the merged full model instead.

        >>> model.save_pretrained("out/adapter")  # doctest: +SKIP
        >>> model.save_pretrained("out/adapter", selected_adapters=["math"])  # doctest: +SKIP
        """
        if not safe_serialization:
            raise ValueError(
                "save_pretrained(safe_serialization=False): repeft writes safetensors only (pickle files run code "
                "when loaded); drop the argument"
            )
        if kwargs:
            raise TypeError(
                f"save_pretrained: PEFT option(s) {sorted(kwargs)} are not supported by repeft; it takes "
                "save_directory, safe_serialization, selected_adapters and is_main_process"
            )
        names = list(self.configs) if selected_adapters is None else list(selected_adapters)
        unknown = sorted(set(names) - set(self.configs))
        if unknown:
            raise ValueError(f"selected_adapters names unknown adapter(s) {unknown}; adapters: {sorted(self.configs)}")
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            peft_layout = self.save_adapter(out, name, is_main_process)
            if is_main_process:
                write_model_card(out, self.get_base_model(), self.configs[name].method, peft_layout)

    def load_adapter(
        self,
        path: str | os.PathLike,
        adapter_name: str = "default",
        trainable: bool = False,
        *,
        is_trainable: bool | None = None,
        config: AdapterConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> LoadResult:
        """Add the adapter saved in ``path`` (by repeft, or a LoRA adapter by PEFT) as ``adapter_name``;
        nothing changes if it does not fit.

        ``is_trainable`` is PEFT's name for ``trainable``. ``config`` replaces the
        saved config; it must be of the same method (the tensors are checked against it).
        As in PEFT, ``autocast_adapter_dtype=False`` gives the adapter the base
        model's floating dtype (the saved tensors are cast to it); ``True`` keeps
        the config's (float32 unless it says otherwise). ``low_cpu_mem_usage`` is
        what every load does (the adapter is checked on the meta device first).
        """
        trainable = trainable if is_trainable is None else is_trainable
        saved, tensors = self.read_adapter(path)
        if config is not None and config.method != saved.method:
            raise ValueError(f"config is {config.method} but {path} holds a {saved.method} adapter")
        config = copy.deepcopy(config) if config is not None else saved
        if not autocast_adapter_dtype:
            config = with_base_dtype(config, self.get_base_model())
        config.inference_mode = not trainable
        _prefer_runnable_kernel(config, path)
        self.add_loaded_adapter(adapter_name, config, tensors, source=str(path))
        return LoadResult([], [])

    def read_adapter(self, path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        """The config and tensors (under repeft's names) saved in ``path``: by repeft, in either format
        version, or by PEFT. Checked against this model's architecture where the file records it; nothing is loaded.

        >>> config, tensors = model.read_adapter("out/adapter")  # doctest: +SKIP
        """
        from .peft_interop import _repeft_names, peft_lora_adapter  # they build on AdapterModel

        meta, tensors = read_adapter_dir(path)
        if meta.get("format") != FORMAT:  # PEFT's own directory (read_adapter_dir lets no other through)
            return peft_lora_adapter(self, meta, tensors, path)
        self._check_architecture(path, meta.get("base_model", {}).get("architecture", {}))
        try:
            saved = AdapterConfig.from_saved(meta["config"])
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"{os.path.join(path, CONFIG_NAME)}: bad adapter config: {exc}") from None
        if "peft_type" in meta:  # format version 2: a LoRA adapter's tensors under PEFT's names
            tensors = _repeft_names(tensors, str(path))[0]
        return saved, tensors

    def add_loaded_adapter(
        self, adapter_name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str = "tensors"
    ) -> None:
        """``add_adapter`` then fill it from ``tensors``; if they do not fit, the model is left as it was.

        The adapter is first built on the meta device and compared with ``tensors``,
        so a config that disagrees with its tensors (``r: 4194304`` beside rank-4
        tensors) fails before anything is allocated.
        """
        previous = self.active_adapter
        with torch.device("meta"):
            self.add_adapter(adapter_name, config)
        try:
            _check_tensors_fit(self.adapter_state_dict(adapter_name), tensors, source)
        finally:
            self._undo_add(adapter_name, previous)
        self.add_adapter(adapter_name, config)
        try:
            self.load_adapter_tensors(adapter_name, tensors, source=source)
        except BaseException:
            self._undo_add(adapter_name, previous)
            raise

    def _undo_add(self, adapter_name: str, previous: str | None) -> None:
        self.delete_adapter(adapter_name)
        if previous is not None:
            self.set_adapter(previous)

    def _check_architecture(self, path, saved: dict[str, Any]) -> None:
        differ = {k: (v, self.architecture.get(k)) for k, v in saved.items() if self.architecture.get(k) != v}
        if differ:
            details = ", ".join(f"{k}={old!r} (this model: {new!r})" for k, (old, new) in differ.items())
            raise AdapterFileError(f"{path} was made for another base model: {details}")

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        """Copy ``tensors`` into the adapter's parameters after checking names, shapes and dtypes.

        On a sharded (FSDP) model every process passes the whole tensors and keeps its slice.
        """
        if self.merged_adapter() == adapter_name:
            # unmerge() subtracts the tensors the adapter holds: new ones would leave the base weights off.
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weights; call unmerge() before loading tensors into it"
            )
        expected = self.adapter_state_dict(adapter_name)
        _check_tensors_fit(expected, tensors, source)
        with torch.no_grad():
            for key, value in expected.items():
                copy_whole_into(value, tensors[key])


class LoadResult(NamedTuple):
    """What a load returns, as PEFT's and torch's ``load_state_dict`` do; both lists stay empty, since a
    load with a missing or unexpected tensor is refused before anything changes."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _check_tensors_fit(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``AdapterFileError`` unless ``tensors`` has exactly the names, shapes and kinds of dtype of ``expected``."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{source} does not fit this model: missing {_some(missing)}; unexpected {_some(unexpected)}. "
            "Was it saved from another model or with other target_modules?"
        )
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise AdapterFileError(
            f"{source}: {len(wrong)} tensor(s) have the wrong shape, e.g. {key}: file {got}, model {want}"
        )
    for key, value in expected.items():
        # Float tensors may be stored at another precision; an integer or bool tensor is no adapter weight.
        if _dtype_kind(tensors[key].dtype) != _dtype_kind(value.dtype):
            raise AdapterFileError(
                f"{source}: tensor {key!r} is {tensors[key].dtype} but the model's is {value.dtype}; "
                "the file was not written by repeft or PEFT, or was altered"
            )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating point"
    return "bool" if dtype == torch.bool else "complex" if dtype.is_complex else "integer"


def _prefer_runnable_kernel(config: AdapterConfig, path: str | os.PathLike) -> None:
    # A saved kernel choice is a preference: the adapter must run on a machine without a GPU.
    if getattr(config, "kernel", None) != "triton":
        return
    reason = triton_unavailable_reason()
    if reason is not None:
        warnings.warn(
            f"{path} was saved with kernel='triton', which cannot run here ({reason}); using kernel='torch'",
            stacklevel=3,
        )
        config.kernel = "torch"


def _some(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
