"""Quantized bases: bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) linear layers.

LoRA and RepLoRA wrap ``bnb.nn.Linear4bit`` and ``bnb.nn.Linear8bitLt`` like
any linear layer (they subclass ``nn.Linear``) and add the low-rank term to
their output. What is specific to quantized weights lives here:

- ``quant_type``: whether a layer is quantized, and how;
- ``dequantize_weight``: the fp32 matrix a quantized layer stands for, in
  whichever layout bitsandbytes holds it;
- ``keep_standard_layout``: stop bitsandbytes repacking 4-bit weights for
  its inference-only CPU kernel under a model that trains;
- ``float_module_names``: the modules to leave in float when loading a
  model quantized (``llm_int8_skip_modules``): the heads the adapter trains
  and the modules the checkpoint lacks;
- ``prepare_quantized_model``: the usual QLoRA training set-up.

Merged export from a quantized base is in ``export.py``; merging *in place*
into quantized weights is refused (see ``LoRALinear.merge``).

bitsandbytes takes seconds to import, so this module never imports it before
it is needed: a model can only hold bitsandbytes layers once something has
imported the package, so looking it up in ``sys.modules`` is enough to detect them.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4", "int8")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def quant_type(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a quantized bitsandbytes linear layer, else ``None``.

    >>> quant_type(torch.nn.Linear(4, 4)) is None
    True
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    weight = getattr(module, "weight", None)
    if isinstance(module, bnb.nn.Linear4bit) and getattr(weight, "quant_state", None) is not None:
        return weight.quant_state.quant_type
    if isinstance(module, bnb.nn.Linear8bitLt) and weight is not None and weight.dtype == torch.int8:
        return "int8"
    return None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """A fresh fp32 copy of a layer's weight; for a bitsandbytes layer, the matrix it quantizes.

    4-bit weights are decoded at fp32 whatever dtype they were quantized from
    (``code[q] * absmax`` per block, with double-quantized ``absmax`` decoded
    first), in either of bitsandbytes' layouts: the standard one, or the one
    it repacks weights into for its AVX512-BF16 CPU kernel (see
    ``keep_standard_layout``); the layer is never modified. 8-bit weights are
    ``CB * SCB / 127`` per row, as bitsandbytes' own matmul dequantizes them.
    The layout is the layer's own (``d_out x d_in`` for linear layers,
    ``d_in x d_out`` for GPT-2's ``Conv1D``).

    >>> import bitsandbytes as bnb  # doctest: +SKIP
    >>> layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")  # doctest: +SKIP
    >>> dequantize_weight(layer).shape  # doctest: +SKIP
    torch.Size([32, 64])
    """
    kind = quant_type(module)
    weight = module.weight
    if kind is None:
        return weight.detach().to(torch.float32, copy=True)
    functional = sys.modules["bitsandbytes"].functional
    if kind == "int8":
        scb = weight.SCB if weight.SCB is not None else module.state.SCB
        return functional.int8_vectorwise_dequant(weight.data, scb).to(torch.float32)
    if _cpu_packed(weight.quant_state):
        codes, absmax = _decode_cpu_packed(weight.data, weight.quant_state)
        return weight.quant_state.code.float()[codes] * absmax.repeat_interleave(weight.quant_state.blocksize, dim=1)
    state = copy.copy(weight.quant_state)
    state.dtype = torch.float32
    return functional.dequantize_4bit(weight.data, state)


def keep_standard_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout from now on.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in
    place the first time the layer runs in eval mode without gradients: a
    tiled layout with ``absmax`` rounded to bf16, used by a fused bf16 kernel
    that has no backward. A model that trains after an evaluation then has no
    gradient path through those layers, eval-mode outputs differ from
    training-mode ones, and bitsandbytes' own way back
    (``_convert_weight_packed_for_cpu_inverse``, used by its ``state_dict``)
    leaves a non-double-quantized ``absmax`` transposed, so a save decodes to
    the wrong matrix. ``repeft.wrap`` calls this on the base model: it turns
    the repacking off and brings back to the standard layout any weight
    already repacked (its ``absmax`` keeps the bf16 values the packed kernel
    used, stored in fp32, so the layer computes what it computed before).
    The cost: such CPUs do not use the fused bf16 kernel for an adapter
    model's inference; a merged export does not carry this setting.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight, "quant_state", None) is not None and _cpu_packed(weight.quant_state):
            weight.data, weight.quant_state = _standard_layout(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state


def _cpu_packed(state) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


# Tile width of bitsandbytes' CPU packing: rows in groups of 32, two 4-bit codes a byte.
_CPU_TILE_ROWS = 32


def _decode_cpu_packed(packed: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``N x K`` as int64, per-block absmax ``N x K/blocksize`` as fp32) of a CPU-packed 4-bit weight.

    The inverse of the weight shuffle in bitsandbytes' ``_convert_weight_packed_for_cpu``:
    bytes hold (low nibble, high nibble) = codes of rows i and i + 32 of a
    32-row tile, for each pair of adjacent columns; ``absmax`` is stored as
    ``K/blocksize x N`` in bf16, the double quantization already decoded.
    """
    rows, cols = state.shape
    nibbles = packed.view(torch.uint8).reshape(-1, _CPU_TILE_ROWS)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # [..., 64]: 32 low nibbles, then 32 high
    codes = codes.reshape(rows // _CPU_TILE_ROWS, cols // 2, _CPU_TILE_ROWS, 2).transpose(1, 2).reshape(rows, cols)
    return codes.long(), state.absmax.float().T.contiguous()


def _standard_layout(packed: torch.Tensor, state) -> tuple[torch.Tensor, Any]:
    """A CPU-packed 4-bit weight in bitsandbytes' standard layout (fp32 absmax, no double quantization)."""
    codes, absmax = _decode_cpu_packed(packed, state)
    flat = codes.reshape(-1).to(torch.uint8)
    data = ((flat[0::2] << 4) | flat[1::2]).reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    if storage is not None:
        data = data.view(storage)
    state = copy.copy(state)
    state.absmax = absmax.reshape(-1)
    state.nested, state.offset, state.state2 = False, None, None
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False
    return data, state


def float_module_names(
    model_class: type,
    path: str | Path,
    config: Any = None,
    modules_to_save: list[str] | None = None,
) -> list[str]:
    """Module paths to keep in float when ``model_class`` loads ``path`` quantized: ``llm_int8_skip_modules``.

    Three kinds of module must not become bitsandbytes layers:

    - the heads the adapter trains in full: ``modules_to_save``, or when it
      is ``None`` the task head ``repeft.wrap`` picks (``classifier``,
      ``score``, ...). A trained copy of a 4/8-bit layer has no float weight
      to train;
    - linear layers whose weight the checkpoint lacks (a new classification
      head, a pooler a checkpoint did not save): transformers initialises
      them in float inside a bitsandbytes layer that nothing ever quantizes,
      and its forward fails (NF4/FP4: an assertion on the missing
      quantization state; int8: no ``CB``). Found by comparing the
      checkpoint's safetensors keys with the model's modules, for a local
      directory; other checkpoints skip this check (``prepare_quantized_model``
      still turns such layers back into ``nn.Linear``);
    - what transformers keeps in float by default (output embeddings, tied
      weights), since an explicit ``llm_int8_skip_modules`` replaces its defaults.

    The model is built on the meta device to find them: no weights are read.

    >>> from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    >>> skip = float_module_names(AutoModelForSequenceClassification, path, config)  # doctest: +SKIP
    >>> skip  # doctest: +SKIP
    ['classifier']
    >>> qconfig = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip)  # doctest: +SKIP
    """
    import transformers
    from transformers.quantizers.base import get_keys_to_not_convert

    from .adapters import default_modules_to_save
    from .targeting import find_modules, is_linear_like

    if config is None:
        config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = getattr(model_class, "from_config", model_class)(config)
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(skeleton) or []
    modules = dict(skeleton.named_modules())
    # transformers' defaults are parameter names less ".weight"; a bias name there skips no module.
    names = {key for key in get_keys_to_not_convert(skeleton) if key in modules}
    names |= set(find_modules(skeleton, modules_to_save))
    saved = _checkpoint_keys(Path(path))
    if saved is not None:
        loaded = _loaded_names(skeleton, saved)
        names |= {name for name, module in modules.items() if is_linear_like(module) and f"{name}.weight" not in loaded}
    return sorted(names)


def _loaded_names(model: nn.Module, keys: set[str]) -> set[str]:
    """The parameter names of ``model`` that ``from_pretrained`` loads checkpoint ``keys`` into.

    transformers >= 5 renames checkpoint keys as it loads them (e.g. a ViT
    checkpoint's ``attention.attention.query`` is the model's ``attention.q_proj``)
    and adds or strips the base model prefix (``bert.``); its own renaming
    functions are used here, as PEFT uses them. Older versions only add or strip the prefix.
    """
    state = model.state_dict()
    prefix = model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {f"{prefix}.{key}" if f"{prefix}.{key}" in state else key.removeprefix(f"{prefix}.") for key in keys}
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    loaded = set()
    for key in keys:
        name, _ = rename_source_key(key, renamings, converters, prefix, state)
        if name not in state:  # as transformers does: then only the base model prefix is added or stripped
            name, _ = rename_source_key(key, [], [], prefix, state)
        loaded.add(name)
    return loaded


def _checkpoint_keys(path: Path) -> set[str] | None:
    """The tensor names of a local safetensors checkpoint (headers only); ``None`` for any other checkpoint."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys.update(f.keys())
    return keys


def float_unquantized_layers(model: nn.Module) -> list[str]:
    """Turn each bitsandbytes layer that holds a plain float weight back into ``nn.Linear``; return their paths.

    transformers makes every targeted linear layer a bitsandbytes one before
    loading, and quantizes the weights it loads; a layer whose weight the
    checkpoint lacks keeps the float weight it was initialised with, which no
    bitsandbytes layer can run. The ``nn.Linear`` takes the same parameters.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and type(module.weight) is nn.Parameter:
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            model.set_submodule(name, linear)
            restored.append(name)
    return restored


def prepare_quantized_model(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    checkpointing_kwargs: dict[str, Any] | None = None,
    upcast_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Set a quantized transformers model up for adapter training; call it before ``repeft.wrap``.

    The counterpart of PEFT's ``prepare_model_for_kbit_training``:

    - turns bitsandbytes layers that were never quantized (their weights were
      missing from the checkpoint, e.g. a new classifier) back into
      ``nn.Linear`` (``float_unquantized_layers``): they cannot run as they
      are. Pass ``float_module_names`` to ``llm_int8_skip_modules`` instead to
      keep them, and the heads you train, out of bitsandbytes from the start;
    - freezes every parameter (the adapter ``repeft.wrap`` adds is then the only
      thing that trains);
    - casts the parameters that are not quantized (norm layers, embeddings, the
      output head, biases) from fp16/bf16 to ``upcast_dtype``. Norm layers lose
      the small differences they normalise in half precision; the other float
      tensors follow so that the residual stream keeps one dtype (an fp32 norm
      feeding a bf16 head would fail). ``None`` leaves dtypes alone;
    - with ``gradient_checkpointing``, turns it on and makes the input
      embeddings' output require grad: with re-entrant checkpointing a block
      whose inputs carry no grad passes none to the adapters inside it.

    >>> from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    >>> qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    ...                              bnb_4bit_compute_dtype=torch.bfloat16)
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig)  # doctest: +SKIP
    >>> model = repeft.prepare_quantized_model(model)  # doctest: +SKIP
    >>> model = repeft.wrap(model, repeft.LoRAConfig(r=16, target_modules="all-linear"))  # doctest: +SKIP
    """
    from .model import AdapterModel

    if isinstance(model, AdapterModel):
        raise TypeError(
            "prepare_quantized_model freezes every parameter, the adapter's too: call it on the "
            "transformers model before repeft.wrap"
        )
    float_unquantized_layers(model)
    model.requires_grad_(False)
    if upcast_dtype is not None:
        for module in model.modules():
            quantized = quant_type(module) is not None
            for name, param in module.named_parameters(recurse=False):
                # A 4-bit weight may be stored in a float dtype (bnb_4bit_quant_storage); it is packed codes.
                if param.dtype in HALF_DTYPES and not (quantized and name == "weight"):
                    param.data = param.data.to(upcast_dtype)
    if gradient_checkpointing:
        # transformers >= 5.2 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(checkpointing_kwargs)
        model.enable_input_require_grads()
    return model
