"""Merged export: the active adapter folded into its base, saved as a plain transformers checkpoint.

``export_merged`` works on float and on bitsandbytes bases: each quantized
weight is dequantized (``quantization.dequantize_weight``), the adapter's
``s * B @ A`` added in fp32, and the result saved as float weights, or
re-quantized with the error that adds measured on a probe batch and reported.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from .files import staged_write
from .layers import AdapterLayer
from .lora import LoRALinear
from .lora_bias import merged_bias
from .export_guards import base_model_dir, refuse_non_finite, refuse_overwriting_base
from .merging import shared_parameters, untie_word_embeddings
from .model import AdapterModel
from .quantization import QUANT_TYPES, dequantize_weight, keep_standard_layout, quant_type

# Default probe for re-quantized exports: this many random token sequences of this length.
PROBE_SHAPE = (2, 32)


@dataclass
class MergedExport:
    """What ``export_merged`` wrote and, when a probe batch ran, how far its logits are from the adapter model's."""

    path: Path
    weights: str
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    probe: str | None = None

    def __str__(self) -> str:
        text = f"export_merged: wrote {self.path} ({self.weights} weights)"
        if self.max_abs_diff is None:
            return text
        return (
            f"{text}; on the probe batch ({self.probe}) its outputs differ from the unmerged adapter "
            f"model by max |diff| {self.max_abs_diff:.3e}, mean |diff| {self.mean_abs_diff:.3e}"
        )


def export_merged(
    model: AdapterModel,
    out_dir: str | os.PathLike,
    requantize: str | BitsAndBytesConfig | None = None,
    probe_batch: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> MergedExport:
    """Merge the active adapter into the (possibly quantized) base and save a plain checkpoint.

    By default each quantized weight is dequantized, the adapter's ``s * B @ A``
    is added in fp32 and the result is saved as ``dtype`` weights with no
    quantization config: the directory loads with
    ``AutoModel*.from_pretrained(out_dir)`` alone, and in fp32 its outputs are
    those of the adapter model on the dequantized base up to float rounding.

    ``requantize="nf4"``, ``"fp4"`` or ``"int8"`` (or a ``BitsAndBytesConfig``)
    quantizes the merged float weights again and saves the quantized
    checkpoint (loading it needs bitsandbytes). Re-quantizing rounds
    ``W + s B A`` onto a new grid, so the outputs change: the max and mean
    absolute difference from the unmerged adapter model are measured on
    ``probe_batch`` (default: random token ids), printed and returned. A 4-bit
    config's compute dtype, double quantization and skipped modules are taken
    from the base's own quantization config when it has one.

    With a ``probe_batch`` the float export is measured and printed as well.
    The float model is built on the CPU. The files are written as ``save_adapter``
    writes its own (``repeft.files.staged_write``): other files in ``out_dir`` are kept.
    Nothing is written when a merged tensor is not finite in ``dtype`` (``ValueError``
    naming it) or when ``out_dir`` is the directory the base model was loaded from.

    >>> report = repeft.export_merged(model, "out/merged")  # doctest: +SKIP
    >>> report = repeft.export_merged(model, "out/merged-nf4", requantize="nf4",
    ...                               probe_batch=tokenizer(texts, return_tensors="pt"))  # doctest: +SKIP
    export_merged: wrote out/merged-nf4 (nf4 weights); on the probe batch (...) its outputs differ ...
    >>> report.max_abs_diff  # doctest: +SKIP
    0.031
    """
    if not isinstance(model, AdapterModel):
        raise TypeError(f"export_merged takes the model repeft.wrap returned, got {type(model).__name__}")
    if model.active_adapter is None:
        raise ValueError("the model has no active adapter to merge")
    model._check_mergeable(model.active_adapter)
    base = model.get_base_model()
    if not hasattr(base, "save_pretrained"):
        raise TypeError(f"export_merged writes a transformers checkpoint; {type(base).__name__} has no save_pretrained")
    refuse_overwriting_base(base_model_dir(base), out_dir)
    qconfig = None if requantize is None else _bnb_config(requantize, base.config)
    out_dir = Path(out_dir)
    plain = _merged_float_model(model, dtype)
    if qconfig is None:
        report = MergedExport(out_dir, str(dtype).removeprefix("torch."))
        if probe_batch is not None:
            _measure(report, model, plain, probe_batch)
        with staged_write(out_dir) as tmp:
            plain.save_pretrained(tmp)
        return report

    probe = probe_batch if probe_batch is not None else _default_probe(base)
    report = MergedExport(out_dir, _describe(qconfig))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.float-", dir=out_dir.parent) as float_dir:
        plain.save_pretrained(float_dir)
        del plain
        device = next(base.parameters()).device
        quantized = type(base).from_pretrained(float_dir, quantization_config=qconfig, device_map={"": device})
        # The probe runs in eval mode: on AVX512-BF16 CPUs bitsandbytes would repack the weights
        # for inference, and its save would then decode the repacked absmax wrongly.
        keep_standard_layout(quantized)
        _measure(report, model, quantized, probe, default_probe=probe_batch is None)
        with staged_write(out_dir) as tmp:
            quantized.save_pretrained(tmp)
    return report


def _bnb_config(requantize: str | BitsAndBytesConfig, base_config) -> BitsAndBytesConfig:
    if isinstance(requantize, BitsAndBytesConfig):
        return requantize
    if requantize not in QUANT_TYPES:
        raise ValueError(f"requantize must be None, one of {QUANT_TYPES} or a BitsAndBytesConfig, got {requantize!r}")
    import bitsandbytes  # noqa: F401  (a clear ImportError here rather than deep inside transformers)

    old = getattr(base_config, "quantization_config", None)
    old = old.to_dict() if hasattr(old, "to_dict") else dict(old or {})
    # Keep how the user quantized the base; only the format changes.
    kept = ("bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules")
    kwargs = {k: old[k] for k in kept if old.get(k) is not None}
    if requantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **kwargs)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=requantize, **kwargs)


def _describe(qconfig: BitsAndBytesConfig) -> str:
    return qconfig.bnb_4bit_quant_type if qconfig.load_in_4bit else "int8"


def _merged_float_model(model: AdapterModel, dtype: torch.dtype) -> nn.Module:
    """A plain transformers model (same class, no quantization config) holding the merged float weights."""
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    shared = shared_parameters(base)
    if any(id(layer.weight) in shared for _, layer in model.adapter_layers() if isinstance(layer, LoRALinear)):
        untie_word_embeddings(config)  # the merged head is no longer the input embedding
    # Built on the meta device and filled with the merged tensors: no second set of weights is allocated.
    with torch.device("meta"):
        plain = type(base)(config)
    state, unsaved = _merged_state(model, plain, dtype)
    refuse_non_finite(state)  # a merged weight past the range of dtype (65504 in float16) became inf
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    for key, tensor in unsaved.items():
        owner, _, name = key.rpartition(".")
        setattr(plain.get_submodule(owner), name, tensor)
    empty = [n for n, t in itertools.chain(plain.named_parameters(), plain.named_buffers()) if t.is_meta]
    if missing or unexpected or empty:
        raise RuntimeError(
            f"could not rebuild a plain {type(base).__name__} from the merged weights: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, never filled {empty[:3]}"
        )
    return plain.eval()


def _merged_state(model: AdapterModel, plain: nn.Module, dtype: torch.dtype):
    """(state dict, non-persistent buffers) of the merged model on the CPU, keyed like ``plain``."""
    adapter = model.active_adapter
    state: dict[str, torch.Tensor] = {}
    unsaved: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor, into=state) -> None:
        tensor = tensor.detach().to("cpu")
        # Non-persistent buffers (rotary frequencies) are never saved: they keep their dtype for the probe.
        into[key] = tensor.to(dtype) if tensor.is_floating_point() and into is state else tensor

    def put_weight(path: str, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # bitsandbytes replaces GPT-2's Conv1D (d_in x d_out) by a d_out x d_in linear layer.
        if isinstance(plain.get_submodule(path), Conv1D) and not isinstance(layer, Conv1D):
            weight = weight.T
        put(f"{path}.weight", weight.contiguous())
        if bias is not None:  # an embedding has none
            put(f"{path}.bias", bias)

    def visit(module: nn.Module, path: str) -> None:
        prefix = f"{path}." if path else ""
        if isinstance(module, LoRALinear):
            weight, bias = dequantize_weight(module.base_layer), getattr(module.base_layer, "bias", None)
            if module.merged_adapter is None and adapter in module.adapters:
                weight = module.merged_weight(adapter, weight)[0]
                bias = merged_bias(module.adapters[adapter], bias)  # lora_bias's s * b folded in
            put_weight(path, module.base_layer, weight, bias)
            return
        if isinstance(module, AdapterLayer):
            replacement = module.unloaded()
            if replacement is not None:
                visit(replacement, path)
            return
        if quant_type(module) is not None:
            put_weight(path, module, dequantize_weight(module), getattr(module, "bias", None))
            return
        for name, param in module._parameters.items():
            if param is not None:
                put(prefix + name, param)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                put(prefix + name, buffer, unsaved if name in module._non_persistent_buffers_set else state)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, prefix + name)

    visit(model.get_base_model(), "")
    return state, unsaved


def _default_probe(base: nn.Module) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    if getattr(base, "main_input_name", None) != "input_ids" or not vocab:
        raise ValueError(
            "re-quantizing needs probe_batch= (a dict of model inputs) to measure the error it adds; "
            f"no default can be made for a model whose input is {getattr(base, 'main_input_name', '?')!r}"
        )
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, PROBE_SHAPE, generator=generator)}


def _measure(report: MergedExport, reference: nn.Module, candidate: nn.Module, batch, default_probe=False) -> None:
    diff = (_probe_output(candidate, batch) - _probe_output(reference, batch)).abs()
    report.max_abs_diff, report.mean_abs_diff = diff.max().item(), diff.mean().item()
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
    report.probe = f"random token ids {shapes}; pass probe_batch= for real data" if default_probe else shapes
    print(report)


def _probe_output(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's logits (or first output) on ``batch`` in eval mode, as fp32 on the CPU."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out[0]).float().cpu()
