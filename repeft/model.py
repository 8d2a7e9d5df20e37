"""``AdapterModel``: a Hugging Face model plus named adapters, still usable as the model.

The wrapper owns no adapter maths. Methods register an injector (see
``methods.py``) that places ``AdapterLayer`` modules in the model; this class
only walks those layers to switch, disable, merge, save, load and delete.
Adapter tensors are saved under the module path they sit at in the base
model, without the adapter name, e.g. ``model.layers.0.self_attn.q_proj.lora_A``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import AdapterConfig
from .files import CONFIG_NAME, FORMAT, FORMAT_VERSION, AdapterFileError, read_adapter_dir, staged_write, write_adapter_dir
from .fsdp import copy_whole_into, gathered, refuse_sharded
from .kernels import triton_unavailable_reason
from .layers import AdapterLayer, ModulesToSave
from .lora import LoRALinear
from .methods import method
from .quantization import keep_standard_layout
from .targeting import TargetError, find_modules, model_type

# In ``adapter_names``, the name of "no adapter" (as in PEFT).
BASE_ADAPTER_NAME = "__base__"
MIXED_BATCH_METHODS = ("lora", "replora")

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
# Heads that start untrained on task models, so they must train and be saved with the adapter.
TASK_HEAD_SUFFIXES = {
    "ForSequenceClassification": ["classifier", "score"],
    "ForTokenClassification": ["classifier", "score"],
    "ForImageClassification": ["classifier"],
    "ForQuestionAnswering": ["qa_outputs"],
    "ForMultipleChoice": ["classifier"],
    "ForAudioClassification": ["classifier", "projector"],
}


def default_modules_to_save(base: nn.Module) -> list[str] | None:
    """The task head an adapter trains in full when its ``modules_to_save`` is ``None`` (e.g. ``["classifier"]``)."""
    class_name = type(base).__name__
    for suffix, heads in TASK_HEAD_SUFFIXES.items():
        if class_name.endswith(suffix):
            found = [h for h in heads if find_modules(base, [h])]
            return found[:1] or None
    return None


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


class AdapterModel(nn.Module):
    """A transformers model with named adapters; attribute access falls through to the model.

    Build it with ``repeft.wrap``:

    >>> model = repeft.wrap(base, repeft.LoRAConfig(r=8))  # doctest: +SKIP
    >>> model.print_trainable_parameters()  # doctest: +SKIP
    >>> out = model(input_ids)  # doctest: +SKIP
    """

    def __new__(cls, base_model: nn.Module | None = None, *args: Any, **kwargs: Any) -> AdapterModel:
        # transformers' Trainer reads label names and dataset columns off the class's forward,
        # so each base class gets a subclass whose forward shows the base's signature.
        if cls is AdapterModel and isinstance(base_model, nn.Module) and not isinstance(base_model, AdapterModel):
            cls = _adapter_model_class(type(base_model))
        return super().__new__(cls)

    def __reduce__(self):
        # The subclass is made at run time, so pickle rebuilds it from the base model's class.
        return _empty_adapter_model, (type(self.base_model),), self.__getstate__()

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        if isinstance(base_model, AdapterModel):
            raise TypeError("model is already wrapped; use model.add_adapter(name, config) to add another adapter")
        self.base_model = base_model
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.architecture = architecture(base_model)
        # (config, tie_word_embeddings) as they were before a merge untied a shared weight.
        self._tie_flags: list[tuple[Any, bool]] = []
        base_model.requires_grad_(False)
        keep_standard_layout(base_model)

    # -- behaving like the wrapped model ------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or "_modules" not in self.__dict__:
                raise
            return getattr(self._modules["base_model"], name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward; ``adapter_names`` gives each row of the batch its own adapter.

        >>> out = model(input_ids, adapter_names=["math", "__base__", "code"])  # doctest: +SKIP
        """
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """``generate`` of the wrapped model; ``adapter_names`` as in ``forward``, one name per prompt."""
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)

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

    def get_base_model(self) -> nn.Module:
        """The transformers model, with adapter layers still in it."""
        return self.base_model

    @property
    def _hf_peft_config_loaded(self) -> bool:
        # transformers' Trainer refuses to train a quantized model that carries no adapter.
        return bool(self.configs)

    # -- adapters -----------------------------------------------------------------------

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
        prefix = "base_model."
        return [p.removeprefix(prefix) for p, layer in self.adapter_layers() if isinstance(layer, ModulesToSave)]

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Attach a new adapter and make it the active one.

        >>> model.add_adapter("math", repeft.LoRAConfig(r=4))  # doctest: +SKIP
        """
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be non-empty and contain no '.', got {adapter_name!r}")
        if self.merged_adapter() is not None:
            raise ValueError("cannot add an adapter while one is merged; call unmerge() first")
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
                    layer.train(self.base_model.training)
        except BaseException:
            self._remove_adapter_entries(adapter_name)
            raise
        self.configs[adapter_name] = config
        self.set_adapter(adapter_name)

    def _default_modules_to_save(self) -> list[str] | None:
        return default_modules_to_save(self.base_model)

    def _add_modules_to_save(self, adapter_name: str, patterns: list[str]) -> None:
        base = self.base_model
        for pattern in patterns:
            paths = find_modules(base, [pattern])
            if not paths:
                raise TargetError(f"modules_to_save entry {pattern!r} matches no module of {type(base).__name__}")
            for path in paths:
                if any(path.startswith(other + ".") for other in paths):
                    continue
                module = base.get_submodule(path)
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
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        self._remove_adapter_entries(adapter_name)
        del self.configs[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.configs)}")

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
            if merged is not None:
                self.merge(merged)

    def disable_adapter_layers(self) -> None:
        """Run the plain base model until ``enable_adapter_layers()``; a merged adapter is unmerged."""
        if self.merged_adapter() is not None:
            self.unmerge()
        for _, layer in self.adapter_layers():
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``: the active adapter runs again."""
        for _, layer in self.adapter_layers():
            layer.disabled = False

    # transformers' names for the same switch (``PreTrainedModel.disable_adapters``).
    disable_adapters = disable_adapter_layers
    enable_adapters = enable_adapter_layers

    @property
    def active_adapters(self) -> AdapterNames:
        """The active adapter as a list, read as PEFT's property or called as transformers' method.

        >>> model.active_adapters, model.active_adapters()  # doctest: +SKIP
        (['default'], ['default'])
        """
        return AdapterNames([] if self.active_adapter is None else [self.active_adapter])

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
        return self.base_model

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> AdapterModel:
        """PEFT's ``PeftModel.from_pretrained``: ``repeft.load_adapter`` under the name PEFT users know.

        >>> model = repeft.AdapterModel.from_pretrained(base, "out/adapter")  # doctest: +SKIP
        """
        return load_adapter(model, path, adapter_name, trainable=is_trainable)

    # -- merging ------------------------------------------------------------------------

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
        shared = shared_parameters(self.base_model)
        try:
            for _, layer in self.adapter_layers():
                if hasattr(layer, "merge") and adapter_name in layer.adapters:
                    untie = id(layer.weight) in shared
                    layer.merge(adapter_name, untie=untie)
                    if untie and not self._tie_flags:
                        # The merged weight is the layer's own now: the config must say so, or
                        # save_pretrained drops it as a duplicate and from_pretrained ties it again.
                        self._tie_flags = untie_word_embeddings(getattr(self.base_model, "config", None))
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

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain transformers model (this wrapper is spent)."""
        self._check_mergeable(self.active_adapter)
        if self.merged_adapter() is None:
            self.merge()
        for path, layer in list(self.adapter_layers()):
            self._replace(path, layer.unloaded())
        self.configs.clear()
        self._tie_flags = []  # merged weights stay untied
        return self.base_model

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict with the active adapter merged, in the plain model's key names."""
        with self._merged():
            layers = {p.removeprefix("base_model."): layer for p, layer in self.adapter_layers()}
            state = {
                k: v.detach().clone()
                for k, v in self.base_model.state_dict().items()
                if not any(k.startswith(p + ".") for p in layers)
            }
            for path, layer in layers.items():
                unloaded = layer.unloaded()
                if unloaded is not None:
                    state.update({f"{path}.{k}": v.detach().clone() for k, v in unloaded.state_dict().items()})
        return state

    def save_pretrained(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, is_main_process: bool = True
    ) -> None:
        """Save the adapter, as PEFT's ``save_pretrained`` does: the same as ``save_adapter``.

        ``repeft.load_adapter(base, save_directory)`` (or ``model.load_adapter``)
        reloads it; ``save_merged`` writes the merged full model instead.

        >>> model.save_pretrained("out/adapter")  # doctest: +SKIP
        """
        self.save_adapter(save_directory, adapter_name, is_main_process)

    def save_merged(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the base model with the active adapter merged, as a plain transformers checkpoint.

        ``AutoModel*.from_pretrained(save_directory)`` loads it without repeft.
        ``kwargs`` go to transformers' ``save_pretrained``. The files are written
        as ``save_adapter`` writes its own (see ``repeft.files``): other files in
        the directory are kept, except weight files of an earlier merged save.

        >>> model.save_merged("out/merged")  # doctest: +SKIP
        """
        with self._merged(), staged_write(save_directory) as tmp:
            self.base_model.save_pretrained(tmp, state_dict=self.merged_state_dict(), **kwargs)

    # -- parameters ---------------------------------------------------------------------

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, counting each shared tensor once."""
        seen: set[int] = set()
        trainable = total = 0
        for param in self.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            count = _numel(param)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for ``trainable_parameters()``."""
        return self.trainable_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- files --------------------------------------------------------------------------

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
                prefix = path.removeprefix("base_model.")
                for key, value in layer.adapters[adapter_name].state_dict().items():
                    state[f"{prefix}.{key}"] = value
        return state

    def save_adapter(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, is_main_process: bool = True
    ) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically).

        On several processes every one calls it and only the one with
        ``is_main_process=True`` writes, as with transformers' and PEFT's
        ``save_pretrained``. A sharded (FSDP) adapter is gathered whole first,
        a step every process must join.

        >>> model.save_adapter("out/adapter")  # doctest: +SKIP
        >>> model.save_adapter("out/adapter", is_main_process=accelerator.is_main_process)  # doctest: +SKIP
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        tensors = {k: gathered(v) for k, v in self.adapter_state_dict(adapter_name).items()}
        if not is_main_process:
            return
        config = self.configs[adapter_name]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "repeft_version": __version__,
            "method": config.method,
            "config": config.to_dict(),
            "base_model": self._base_model_record(),
            "adapted_modules": sorted({p.removeprefix("base_model.") for p, l in self.adapter_layers() if adapter_name in l.adapters}),
        }
        write_adapter_dir(save_directory, meta, tensors)

    def _base_model_record(self) -> dict[str, Any]:
        """What ``adapter_config.json`` says of the base: where it came from, its class, shapes and label names."""
        config = getattr(self.base_model, "config", None)
        record = {
            "name_or_path": getattr(config, "_name_or_path", None),
            "class": type(self.base_model).__name__,
            "architecture": self.architecture,
        }
        has_head = any(record["class"].endswith(suffix) for suffix in TASK_HEAD_SUFFIXES)
        if has_head and getattr(config, "id2label", None):
            record["id2label"] = {str(i): name for i, name in config.id2label.items()}
        return record

    def load_adapter(
        self, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
    ) -> None:
        """Add the adapter saved in ``path`` as ``adapter_name``; nothing changes if it does not fit."""
        meta, tensors = read_adapter_dir(path)
        self._check_architecture(path, meta.get("base_model", {}).get("architecture", {}))
        try:
            config = AdapterConfig.from_saved(meta["config"])
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"{os.path.join(path, CONFIG_NAME)}: bad adapter config: {exc}") from None
        config.inference_mode = not trainable
        _prefer_runnable_kernel(config, path)
        self.add_loaded_adapter(adapter_name, config, tensors, source=str(path))

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
        expected = self.adapter_state_dict(adapter_name)
        _check_tensors_fit(expected, tensors, source)
        with torch.no_grad():
            for key, value in expected.items():
                copy_whole_into(value, tensors[key])


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


class AdapterNames(list):
    """A list of adapter names that also answers a call, for code that calls ``active_adapters()``."""

    def __call__(self) -> list[str]:
        return list(self)


@functools.cache
def _adapter_model_class(base_class: type) -> type[AdapterModel]:
    """``AdapterModel`` whose ``forward`` shows ``base_class.forward``'s signature and docstring.

    transformers' Trainer takes the label names (``find_labels``) and the dataset
    columns it keeps from the model class's forward signature, as it takes
    them from the base model of a PEFT model. The name keeps the base class's
    (Trainer looks for "QuestionAnswering" in it).
    """

    def forward(self, *args, **kwargs):
        return AdapterModel.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(base_class.forward)
    forward.__doc__ = base_class.forward.__doc__
    name = f"AdapterModel[{base_class.__name__}]"
    return type(name, (AdapterModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def _empty_adapter_model(base_class: type) -> AdapterModel:
    return nn.Module.__new__(_adapter_model_class(base_class))


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the logical weight.
    shape = getattr(param, "quant_state", None)
    return shape.shape.numel() if shape is not None else param.numel()


def _some(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def wrap(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Freeze ``model`` and attach a new adapter; the result still behaves like ``model``.

    >>> model = repeft.wrap(AutoModelForCausalLM.from_pretrained(path), repeft.LoRAConfig(r=8))  # doctest: +SKIP
    """
    with _restore_grads_on_failure(model):
        wrapped = AdapterModel(model)
        wrapped.add_adapter(adapter_name, config)
    return wrapped


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """PEFT's name for ``wrap``, so a PEFT script changes only its import and config lines.

    >>> model = repeft.get_peft_model(base, repeft.LoRAConfig(r=8))  # doctest: +SKIP
    """
    return wrap(model, peft_config, adapter_name)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
) -> AdapterModel:
    """Rebuild the wrapper from a base model and a directory written by ``save_adapter``.

    >>> model = repeft.load_adapter(AutoModelForCausalLM.from_pretrained(path), "out/adapter")  # doctest: +SKIP
    """
    if isinstance(model, AdapterModel):
        model.load_adapter(path, adapter_name, trainable)
        return model
    with _restore_grads_on_failure(model):
        wrapped = AdapterModel(model)
        wrapped.load_adapter(path, adapter_name, trainable)
    return wrapped


@contextlib.contextmanager
def _restore_grads_on_failure(model: nn.Module) -> Iterator[None]:
    # Wrapping freezes the model; a failed wrap must hand it back as it came.
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    except BaseException:
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, p.requires_grad))
        raise
