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
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import AdapterConfig
from .files import FORMAT, FORMAT_VERSION, AdapterFileError, atomic_directory, read_adapter_dir, write_adapter_dir
from .layers import AdapterLayer, ModulesToSave
from .methods import injector
from .quantization import keep_standard_layout
from .targeting import TargetError, find_modules, model_type

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

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        if isinstance(base_model, AdapterModel):
            raise TypeError("model is already wrapped; use model.add_adapter(name, config) to add another adapter")
        self.base_model = base_model
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.architecture = architecture(base_model)
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

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The transformers model, with adapter layers still in it."""
        return self.base_model

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
            injector(config.method)(self, adapter_name, config)
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
        class_name = type(self.base_model).__name__
        for suffix, heads in TASK_HEAD_SUFFIXES.items():
            if class_name.endswith(suffix):
                found = [h for h in heads if find_modules(self.base_model, [h])]
                return found[:1] or None
        return None

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

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one that runs and trains; all others are frozen."""
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
        if merged is not None:
            self.unmerge()
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            if merged is not None:
                self.merge(merged)

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

    def merge(self, adapter_name: str | None = None) -> None:
        """Fold the adapter into the base weights (faster inference; ``unmerge`` undoes it)."""
        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        self._check_mergeable(adapter_name)
        if self.merged_adapter() is not None:
            raise ValueError(f"adapter {self.merged_adapter()!r} is already merged; call unmerge() first")
        if adapter_name != self.active_adapter:
            self.set_adapter(adapter_name)
        try:
            for _, layer in self.adapter_layers():
                if hasattr(layer, "merge") and adapter_name in layer.adapters:
                    layer.merge(adapter_name)
        except BaseException:
            # A layer that refuses (e.g. a quantized base) must not leave the others merged.
            self.unmerge()
            raise

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            if hasattr(layer, "unmerge"):
                layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain transformers model (this wrapper is spent)."""
        self._check_mergeable(self.active_adapter)
        if self.merged_adapter() is None:
            self.merge()
        for path, layer in list(self.adapter_layers()):
            self._replace(path, layer.unloaded())
        self.configs.clear()
        return self.base_model

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict with the active adapter merged, in the plain model's key names."""
        self._check_mergeable(self.active_adapter)
        was_merged = self.merged_adapter() is not None
        if not was_merged:
            self.merge()
        try:
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
        finally:
            if not was_merged:
                self.unmerge()
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the merged model as a plain transformers checkpoint (atomically).

        ``AutoModel*.from_pretrained(save_directory)`` loads it without repeft.
        """
        state = self.merged_state_dict()
        with atomic_directory(save_directory) as tmp:
            self.base_model.save_pretrained(tmp, state_dict=state, **kwargs)

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

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- files --------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed by base-model module path, without the adapter name."""
        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        state = {}
        for path, layer in self.adapter_layers():
            if adapter_name in layer.adapters:
                prefix = path.removeprefix("base_model.")
                for key, value in layer.adapters[adapter_name].state_dict().items():
                    state[f"{prefix}.{key}"] = value
        return state

    def save_adapter(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically).

        >>> model.save_adapter("out/adapter")  # doctest: +SKIP
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_known(adapter_name)
        config = self.configs[adapter_name]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "repeft_version": __version__,
            "method": config.method,
            "config": config.to_dict(),
            "base_model": {
                "name_or_path": getattr(getattr(self.base_model, "config", None), "_name_or_path", None),
                "architecture": self.architecture,
            },
            "adapted_modules": sorted({p.removeprefix("base_model.") for p, l in self.adapter_layers() if adapter_name in l.adapters}),
        }
        write_adapter_dir(save_directory, meta, self.adapter_state_dict(adapter_name))

    def load_adapter(
        self, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
    ) -> None:
        """Add the adapter saved in ``path`` as ``adapter_name``; nothing changes if it does not fit."""
        meta, tensors = read_adapter_dir(path)
        self._check_architecture(path, meta.get("base_model", {}).get("architecture", {}))
        try:
            config = AdapterConfig.from_saved(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFileError(f"{path}: bad adapter config: {exc}") from None
        config.inference_mode = not trainable
        self.add_loaded_adapter(adapter_name, config, tensors, source=str(path))

    def add_loaded_adapter(
        self, adapter_name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str = "tensors"
    ) -> None:
        """``add_adapter`` then fill it from ``tensors``; if they do not fit, the model is left as it was."""
        previous = self.active_adapter
        self.add_adapter(adapter_name, config)
        try:
            self.load_adapter_tensors(adapter_name, tensors, source=source)
        except BaseException:
            self.delete_adapter(adapter_name)
            if previous is not None:
                self.set_adapter(previous)
            raise

    def _check_architecture(self, path, saved: dict[str, Any]) -> None:
        differ = {k: (v, self.architecture.get(k)) for k, v in saved.items() if self.architecture.get(k) != v}
        if differ:
            details = ", ".join(f"{k}={old!r} (this model: {new!r})" for k, (old, new) in differ.items())
            raise AdapterFileError(f"{path} was made for another base model: {details}")

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        """Copy ``tensors`` into the adapter's parameters after checking names and shapes."""
        expected = self.adapter_state_dict(adapter_name)
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
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(tensors[key])


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
