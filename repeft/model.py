"""``AdapterModel``: a Hugging Face model plus named adapters, still usable as the model.

The wrapper owns no adapter maths. Methods register an injector (see
``methods.py``) that places ``AdapterLayer`` modules in the model; the wrapper
only walks those layers to switch, disable, merge, save, load and delete.
This module holds what makes it behave like the wrapped model (construction,
attribute fall-through, ``forward``/``generate``, parameter counts) and the
``wrap``/``get_peft_model``/``load_adapter`` functions; each other concern is a
mixin in its own module:

- ``adapters``: add, switch, disable and delete adapters, ``modules_to_save``
- ``saving``: adapter files (save, load, the checks a load makes)
- ``merging``: merge, unmerge and the merged export
- ``mixed``: mixed-adapter batches (``adapter_names=``)
- ``peft_names``: PEFT's and transformers' names for the members above
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import AdapterManagementMixin, with_base_dtype
from .config import AdapterConfig
from .merging import MergeMixin
from .mixed import MixedBatchMixin, batch_rows
from .peft_names import PeftNamesMixin
from .quantization import keep_standard_layout
from .saving import SaveLoadMixin, architecture
from .tuner import AdapterTuner


class AdapterModel(AdapterManagementMixin, SaveLoadMixin, MergeMixin, MixedBatchMixin, PeftNamesMixin, nn.Module):
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
        return _empty_adapter_model, (type(self.get_base_model()),), self.__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.base_model.link(self)

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        if isinstance(base_model, AdapterModel):
            raise TypeError("model is already wrapped; use model.add_adapter(name, config) to add another adapter")
        # PEFT's layout: ``base_model`` is the tuner, the transformers model is ``base_model.model``.
        self.base_model = AdapterTuner(base_model, self)
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
            # Straight to the transformers model: the tuner hands some names back to this wrapper.
            return getattr(self._modules["base_model"].model, name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward; ``adapter_names`` gives each row of the batch its own adapter.

        ``adapter_names`` must hold exactly one name per row (``"__base__"``: no adapter).

        >>> out = model(input_ids, adapter_names=["math", "__base__", "code"])  # doctest: +SKIP
        """
        if adapter_names is None:
            return self.base_model.model(*args, **kwargs)
        with self._mixed_batch(adapter_names, batch_rows(args, kwargs)):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """``generate`` of the wrapped model; ``adapter_names`` as in ``forward``, one name per prompt.

        The rows ``generate`` makes of each prompt (``num_beams``, ``num_return_sequences``)
        run that prompt's adapter.
        """
        if adapter_names is None:
            return self.base_model.model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names, batch_rows(args, kwargs), self._rows_per_prompt(kwargs)):
            return self.base_model.model.generate(*args, **kwargs)

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


def wrap(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Freeze ``model`` and attach a new adapter; the result still behaves like ``model``.

    >>> model = repeft.wrap(AutoModelForCausalLM.from_pretrained(path), repeft.LoRAConfig(r=8))  # doctest: +SKIP
    """
    with _restore_grads_on_failure(model):
        wrapped = AdapterModel(model)
        wrapped.add_adapter(adapter_name, config)
    return wrapped


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> AdapterModel:
    """PEFT's name for ``wrap``, so a PEFT script changes only its import and config lines.

    PEFT's ``autocast_adapter_dtype=True`` is repeft's default (adapter weights in
    float32 on a float16/bfloat16 base); ``False`` gives the adapter the base's dtype.
    ``mixed``, ``revision`` and ``low_cpu_mem_usage=True`` are refused by name.

    >>> model = repeft.get_peft_model(base, repeft.LoRAConfig(r=8))  # doctest: +SKIP
    """
    refused = {"mixed": mixed, "revision": revision is not None, "low_cpu_mem_usage": low_cpu_mem_usage}
    if any(refused.values()):
        raise ValueError(
            f"get_peft_model: {[k for k, v in refused.items() if v]} not supported by repeft (PEFT's mixed adapter "
            "types, Hub revisions of the base and meta-device adapters); leave them at their defaults"
        )
    return wrap(model, peft_config if autocast_adapter_dtype else with_base_dtype(peft_config, model), adapter_name)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
) -> AdapterModel:
    """Rebuild the wrapper from a base model and a directory written by ``save_adapter`` (or by PEFT's ``save_pretrained``).

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
