"""Exchange LoRA adapters with the ``peft`` library's on-disk format.

PEFT stores ``base_model.model.<module>.lora_A.weight`` (r x d_in) and
``lora_B.weight`` (d_out x r) plus an ``adapter_config.json`` with
``peft_type: LORA``; a DoRA adapter adds ``<module>.lora_magnitude_vector``
(d_out) and ``use_dora: true``; ``lora_bias: true`` adds ``<module>.lora_B.bias``
(d_out); an embedding's factors are ``<module>.lora_embedding_A``
(r x num_embeddings) and ``lora_embedding_B`` (embedding_dim x r); a
convolution's ``lora_A.weight``/``lora_B.weight`` are conv weights (r x in x
kernel, out x r/groups x 1 ...), as repeft holds them. RepLoRA exports its materialised A and B, so any
PEFT-compatible loader or server can use it. No ``peft`` import is needed.

``save_adapter`` writes a LoRA adapter in this layout (``peft_files``), and
``load_adapter`` reads PEFT's directories (``peft_lora_adapter``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, write_adapter_dir
from .fsdp import gathered, refuse_sharded
from .layers import ModulesToSave
from .dora import MAGNITUDE, magnitude
from .lora import LoRAConfig, LoRALinear
from .lora_bias import LORA_BIAS, lora_bias
from .lora_embedding import LoRAEmbedding
from .model import AdapterModel, load_adapter
from .targeting import find_modules
from .tuner import MODEL_PREFIX

PEFT_PREFIX = "base_model.model."
# PEFT LoRA features repeft has no equivalent for; importing them would change the model's maths.
UNSUPPORTED = {
    "bias": ("none", None),
    "use_qalora": (False, None),
    "target_parameters": (None, []),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
}


def _peft_tensors(model: AdapterModel, adapter_name: str, caller: str | None) -> tuple[dict[str, torch.Tensor], list[str], set[bool], list[str]]:
    """The adapter's tensors under PEFT's names, its target paths, their fan_in_fan_out flags and the heads it trains."""
    model._check_known(adapter_name)
    config = model.configs[adapter_name]
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"only LoRA-family adapters export to PEFT; {adapter_name!r} is {config.method}")
    if caller is not None:  # None: save_adapter, which gathers a sharded adapter's tensors itself
        refuse_sharded(model, caller)
    tensors: dict[str, torch.Tensor] = {}
    targets, fan_in_fan_out, saved = [], set(), []
    for path, layer in model.adapter_layers():
        if adapter_name not in layer.adapters:
            continue
        path = path.removeprefix(MODEL_PREFIX)
        if isinstance(layer, LoRAEmbedding):
            # PEFT's names for an embedding's factors are repeft's own (ParameterDict entries: no ".weight").
            for key, value in layer.adapters[adapter_name].state_dict().items():
                tensors[f"{PEFT_PREFIX}{path}.{key}"] = value
            targets.append(path)
        elif isinstance(layer, LoRALinear):
            with torch.no_grad():
                lora_A, lora_B = layer.adapters[adapter_name].factors()
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_A
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_B
            if lora_bias(layer.adapters[adapter_name]) is not None:
                tensors[f"{PEFT_PREFIX}{path}.lora_B.bias"] = lora_bias(layer.adapters[adapter_name])
            if magnitude(layer.adapters[adapter_name]) is not None:
                tensors[f"{PEFT_PREFIX}{path}.{MAGNITUDE}"] = magnitude(layer.adapters[adapter_name])
            targets.append(path)
            fan_in_fan_out.add(layer.fan_in_fan_out)
        elif isinstance(layer, ModulesToSave):
            saved.append(path)
            for key, value in layer.adapters[adapter_name].state_dict().items():
                tensors[f"{PEFT_PREFIX}{path}.{key}"] = value
    return tensors, targets, fan_in_fan_out, saved


def get_peft_model_state_dict(
    model: AdapterModel, state_dict: dict | None = None, adapter_name: str = "default", **kwargs: Any
) -> dict[str, torch.Tensor]:
    """PEFT's ``get_peft_model_state_dict``: the adapter's tensors under PEFT's names
    (``base_model.model.<module>.lora_A.weight``); RepLoRA gives its materialised A and B.

    >>> tensors = repeft.get_peft_model_state_dict(model)  # doctest: +SKIP
    """
    if state_dict is not None or kwargs:
        raise TypeError(
            f"get_peft_model_state_dict: {['state_dict'] * (state_dict is not None) + sorted(kwargs)} are not "
            "supported by repeft; it reads the adapter from the model"
        )
    return _peft_tensors(model, adapter_name, "get_peft_model_state_dict")[0]


def set_peft_model_state_dict(
    model: AdapterModel, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default", **kwargs: Any
) -> nn.modules.module._IncompatibleKeys:
    """PEFT's ``set_peft_model_state_dict``: load tensors under PEFT's names into a LoRA adapter.

    Names and shapes are checked as a load checks them (nothing is missing or left over, so the
    returned ``missing_keys``/``unexpected_keys`` are empty).

    >>> repeft.set_peft_model_state_dict(model, tensors)  # doctest: +SKIP
    """
    if kwargs:
        raise TypeError(f"set_peft_model_state_dict: {sorted(kwargs)} are not supported by repeft")
    model._check_known(adapter_name)
    if model.configs[adapter_name].method != "lora":
        raise ValueError(
            f"adapter {adapter_name!r} is {model.configs[adapter_name].method}: its parameters are not PEFT's lora_A "
            "and lora_B (those are computed), so a PEFT state dict loads into a LoRA adapter only"
        )
    renamed, targets = _repeft_names(peft_model_state_dict, "peft_model_state_dict")
    _drop_saved_embeddings(model, renamed, targets, "peft_model_state_dict")
    model.load_adapter_tensors(adapter_name, renamed, source="peft_model_state_dict")
    return nn.modules.module._IncompatibleKeys([], [])


def _repeft_names(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's tensor names turned into repeft's, and the LoRA target paths found."""
    renamed, targets = {}, []
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFileError(f"{source}: unexpected tensor name {key!r} (PEFT LoRA names start with {PEFT_PREFIX!r})")
        key = key.removeprefix(PEFT_PREFIX)
        # PEFT's files name DoRA's magnitude ``<module>.lora_magnitude_vector``, its modules ``...vector.weight``.
        if key.endswith(f".{MAGNITUDE}") or key.endswith(f".{MAGNITUDE}.weight"):
            renamed[key.removesuffix(".weight")] = value
            continue
        for part, suffix in (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"), (LORA_BIAS, ".lora_B.bias"),
                             ("lora_embedding_A", ".lora_embedding_A"), ("lora_embedding_B", ".lora_embedding_B")):
            if key.endswith(suffix):
                path = key.removesuffix(suffix)
                renamed[f"{path}.{part}"] = value
                if part.endswith("A"):
                    targets.append(path)
                break
        else:
            renamed[key] = value
    return renamed, targets


def _rank(renamed: dict[str, torch.Tensor], path: str) -> int:
    """The rank of the factors imported for the module at ``path`` (a linear layer's or an embedding's)."""
    lora_A = renamed.get(f"{path}.lora_A", renamed.get(f"{path}.lora_embedding_A"))
    return lora_A.shape[0]


def _drop_saved_embeddings(model: nn.Module, renamed: dict[str, torch.Tensor], targets: list[str], source: str) -> None:
    """Drop the base embedding weights PEFT saves beside an embedding's adapter (``save_embedding_layers``).

    PEFT would load them into the base model; where they equal the model's own they change nothing, and where
    they differ (a resized or retrained vocabulary) the adapter is refused by name.
    """
    base = model.get_base_model() if isinstance(model, AdapterModel) else model
    for path in targets:
        key = f"{path}.base_layer.weight"
        if key not in renamed:
            continue
        saved = renamed.pop(key)
        own = base.get_submodule(path)
        own = getattr(own, "base_layer", own).weight
        if saved.shape != own.shape or not torch.equal(saved.to(own.dtype).cpu(), own.detach().cpu()):
            raise AdapterFileError(
                f"{source}: the adapter carries its own base weights for {path} (PEFT's save_embedding_layers: a "
                "resized or retrained vocabulary) that differ from this model's; repeft does not replace base "
                "weights: load the model those weights belong to, or merge with peft and wrap the merged model"
            )


def export_peft(model: AdapterModel, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write the adapter as a PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it).

    >>> repeft.export_peft(model, "out/peft_adapter")  # doctest: +SKIP
    """
    adapter_name = adapter_name or model.active_adapter
    tensors, targets, fan_in_fan_out, saved = _peft_tensors(model, adapter_name, "export_peft")
    write_adapter_dir(save_directory, peft_config(model, adapter_name, targets, fan_in_fan_out, saved), tensors)


def peft_config(
    model: AdapterModel, adapter_name: str, targets: list[str], fan_in_fan_out: set[bool], saved: list[str]
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` fields for the adapter (``_peft_tensors`` gives the other arguments)."""
    config = model.configs[adapter_name]
    if len(fan_in_fan_out) > 1:
        raise ValueError("PEFT stores one fan_in_fan_out flag per adapter; this adapter mixes Conv1D and Linear layers")
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        # A model that is not a transformers one (PEFT's custom models) has no config.
        "base_model_name_or_path": getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "rank_pattern": config.rank_pattern or {},
        "alpha_pattern": config.alpha_pattern or {},
        "target_modules": targets,
        "modules_to_save": saved or None,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def peft_files(model: AdapterModel, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """PEFT's ``adapter_config.json`` fields and the adapter's tensors under PEFT's names, gathered whole, for
    ``save_adapter``; ``None`` where PEFT has no layout for the adapter (RepLoRA and the other methods that are not
    PEFT's LoRA, and a LoRA adapter on both Conv1D and Linear layers).

    On a sharded (FSDP) model every process must call it: the tensors are gathered.
    """
    config = model.configs[adapter_name]
    if getattr(config, "peft_type", None) != "LORA":
        return None
    tensors, targets, fan_in_fan_out, saved = _peft_tensors(model, adapter_name, None)
    if len(fan_in_fan_out) > 1:
        return None
    tensors = {k: gathered(v) for k, v in tensors.items()}
    return peft_config(model, adapter_name, targets, fan_in_fan_out, saved), tensors


def _check_peft_meta(root: Path, meta: dict) -> None:
    """Refuse a config that is not a PEFT LoRA adapter repeft can import."""
    if meta.get("peft_type") != "LORA":
        raise AdapterFileError(f"{root}: only PEFT LoRA adapters can be imported, this one is {meta.get('peft_type')!r}")
    missing = [field for field in ("r", "lora_alpha") if field not in meta]
    if missing:
        raise AdapterFileError(f"{root / CONFIG_NAME} has no {' or '.join(map(repr, missing))} field; the file is damaged")
    for field, allowed in UNSUPPORTED.items():
        if meta.get(field, allowed[0]) not in allowed:
            raise AdapterFileError(
                f"{root}: PEFT option {field}={meta[field]!r} is not supported by repeft's LoRA; "
                "merge it with peft (merge_and_unload) and wrap the merged model instead"
            )


def _present(model: nn.Module, names: list) -> list:
    """PEFT's ``modules_to_save`` entries that name a module of ``model``; PEFT itself skips the others.

    PEFT's task types write generic lists (``SEQ_CLS``: ``["classifier", "score"]``) whatever the family.
    """
    base = model.get_base_model() if isinstance(model, AdapterModel) else model
    return [name for name in names if not isinstance(name, str) or find_modules(base, [name])]


def peft_lora_adapter(
    model: AdapterModel, meta: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_dir: str | os.PathLike
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The config and tensors (under repeft's names) of the PEFT LoRA adapter whose files ``load_adapter`` read."""
    root = Path(adapter_dir)
    _check_peft_meta(root, meta)
    renamed, targets = _repeft_names(tensors, str(root))
    if not targets:
        raise AdapterFileError(f"{root}: no lora_A tensors found in {WEIGHTS_NAME}")
    _drop_saved_embeddings(model, renamed, targets, str(root))
    try:
        config = LoRAConfig(
            r=meta["r"],
            lora_alpha=meta["lora_alpha"],
            lora_dropout=meta.get("lora_dropout", 0.0),
            use_rslora=meta.get("use_rslora", False),
            use_dora=meta.get("use_dora", False),
            lora_bias=meta.get("lora_bias", False),
            rank_pattern=meta.get("rank_pattern") or None,
            alpha_pattern=meta.get("alpha_pattern") or None,
            # A regex of the exact paths: the adapter attaches where PEFT's did, nowhere else.
            target_modules="|".join(re.escape(t) for t in targets),
            modules_to_save=_present(model, meta.get("modules_to_save") or []),
        )
    except ValueError as exc:
        raise AdapterFileError(f"{root / CONFIG_NAME}: {exc}") from None
    ranks = [(t, config.for_module(t).r, _rank(renamed, t)) for t in targets]
    wrong = [(path, said, found) for path, said, found in ranks if said != found]
    if wrong:
        path, said, found = wrong[0]
        raise AdapterFileError(f"{root}: config says r={said!r} for {path} but its tensors have rank {found}")
    return config, renamed


def from_peft(
    model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
) -> AdapterModel:
    """Load a PEFT LoRA adapter directory onto ``model`` (a base model or an ``AdapterModel``).

    The same as ``repeft.load_adapter``, which reads PEFT's directories as well as repeft's.

    >>> model = repeft.from_peft(base, "some/peft_lora_adapter")  # doctest: +SKIP
    """
    return load_adapter(model, adapter_dir, adapter_name, trainable)
