"""LoRA: ``h = W x + s * B A x`` on a frozen linear layer.

``LoRALinear`` replaces a targeted layer in place and keeps it as
``base_layer``. Each adapter in it is a *factors* module exposing
``factors() -> (A, B)``: plain LoRA returns its parameters, RepLoRA computes
them with small MLPs. Everything downstream (the fused matmul, merging,
PEFT export) only sees A and B. With ``use_dora`` the factors module also
holds DoRA's magnitude vector (``repeft.dora``), for either method.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import dora
from .config import AdapterConfig, as_name_list, option
from .kernels import BACKENDS, add_lora, add_lora_mixed, lora_linear
from .layers import AdapterLayer, place_beside
from .lora_bias import (
    add_lora_bias, add_row_biases, check_config as check_lora_bias, lora_bias, merged_bias, unmerge_bias,
    warn_about_unbiased_layers,
)
from .lora_views import PeftLoRANames
from .methods import register_method
from .targeting import DEFAULT_TARGET_MODULES, TargetError, matches_name, resolve_targets
from .weight_tying import check_weight_tying

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# PEFT's initialisations that repeft has: True (A kaiming-uniform, B zero), "gaussian" (A normal(0, 1/r), B zero),
# False (both as nn.Linear initialises them: the adapter changes the output from the start, for tests).
INITIALISATIONS = (True, False, "gaussian")
# Where PEFT finds a layer index in a module name when layers_pattern is not given.
LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


class PeftType(str, enum.Enum):
    """PEFT's method names, for ``config.peft_type``; repeft's LoRA is PEFT's LORA."""

    LORA = "LORA"


class TaskType(str, enum.Enum):
    """PEFT's task types; repeft finds a task model's head from its class, so the type is recorded only."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``h = W x + (alpha / r) * B A x`` with A random and B zero at init.

    ``target_modules`` is a list of module names or dotted suffixes
    (``["q_proj", "v_proj"]``), a regex string matched against full module
    names, ``"all-linear"``, or ``None`` for the architecture's default.
    ``kernel`` is a preference: an adapter saved with ``"triton"`` loads with
    ``"torch"`` (and a warning) where Triton cannot run.

    >>> cfg = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    >>> cfg.scaling
    2.0
    """

    method: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[PeftType | None] = PeftType.LORA

    r: int = option(8, minimum=1)
    # Positive, and small enough that s * B A x cannot overflow float32 (1e308 would load, then every forward is inf).
    lora_alpha: float = option(8.0, above=0.0, below=1e6)  # PEFT's default
    lora_dropout: float = option(0.0, minimum=0.0, below=1.0)
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False  # DoRA's magnitude vector on top of the factors (repeft.dora)
    kernel: str = option("auto", choices=BACKENDS)
    dtype: str = option("float32", choices=tuple(DTYPES))
    # PEFT's LoraConfig fields, same meaning (https://huggingface.co/docs/peft, LoraConfig).
    task_type: str | None = option(None, choices=(None, *(t.value for t in TaskType)))
    bias: str = "none"
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False  # read off each layer (GPT-2's Conv1D); kept for PEFT configs
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    exclude_modules: list[str] | str | None = None
    # Per-module r and lora_alpha: {pattern: value}, a pattern matching a module name or its dotted end (regex).
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    # PEFT's lora_bias: lora_B carries a trainable bias, so the adapter adds s * (B A x + b) (repeft.lora_bias).
    lora_bias: bool = False
    # PEFT ties the adapters of an embedding and the lm_head sharing its weight; repeft refuses that by name
    # and warns as PEFT does where nothing tied is adapted (repeft.weight_tying).
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = as_name_list("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = as_name_list("exclude_modules", self.exclude_modules)
        if self.bias != "none":
            raise ValueError(
                f"bias={self.bias!r}: repeft's LoRA trains no biases; use bias='none', and list a layer in "
                "modules_to_save to train it (bias included) in full"
            )
        check_lora_bias(self)  # before the initialisation check: PEFT names lora_bias first for an init it refuses beside it
        if self.init_lora_weights not in INITIALISATIONS or isinstance(self.init_lora_weights, int) and not isinstance(
            self.init_lora_weights, bool
        ):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by repeft (PiSSA, OLoRA, LoftQ, EVA "
                f"and CorDA initialisations are not implemented); use one of {INITIALISATIONS}"
            )
        if self.method != "lora" and self.init_lora_weights is not True:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is a LoRA option; {type(self).__name__} initialises "
                "its own parameters (see its docs)"
            )
        if self.use_dora and self.kernel == "triton" and self.lora_dropout > 0:
            raise ValueError(
                "kernel='triton' with use_dora=True and lora_dropout > 0: DoRA with dropout needs the base output of "
                "the dropped-out input beside the plain one, which the fused kernel does not compute; use "
                "kernel='auto' (fused where it can be) or lora_dropout=0"
            )
        if self.method != "lora" and (self.rank_pattern or self.alpha_pattern):
            raise ValueError(
                f"rank_pattern / alpha_pattern are LoRA options; {type(self).__name__} needs one r for the projections "
                "that share its parameters"
            )
        bad = {k: v for k, v in (self.rank_pattern or {}).items() if v < 1}
        bad.update({k: v for k, v in (self.alpha_pattern or {}).items() if not 0 < v < 1e6})
        if bad:
            raise ValueError(f"rank_pattern ranks must be >= 1 and alpha_pattern values in (0, 1e6), got {bad}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only says where layers_to_transform finds layer indices; set layers_to_transform too")

    def select(self, paths: list[str]) -> list[str]:
        """``paths`` (targeted module names) less ``exclude_modules`` and layers outside ``layers_to_transform``."""
        kept = [p for p in paths if not _excluded(p, self.exclude_modules)]
        if self.layers_to_transform is not None:
            wanted = {self.layers_to_transform} if isinstance(self.layers_to_transform, int) else set(self.layers_to_transform)
            patterns = self.layers_pattern or LAYERS_PATTERNS
            patterns = [patterns] if isinstance(patterns, str) else patterns
            kept = [p for p in kept if _layer_index(p, patterns) in wanted]
        if not kept:
            raise TargetError(
                f"target_modules select {len(paths)} module(s), but exclude_modules={self.exclude_modules!r} / "
                f"layers_to_transform={self.layers_to_transform!r} leave none"
            )
        return kept

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def for_module(self, path: str) -> LoRAConfig:
        """This config with ``r`` and ``lora_alpha`` as ``rank_pattern`` / ``alpha_pattern`` give them for ``path``.

        As in PEFT, the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", path)`` wins.

        >>> LoRAConfig(r=8, rank_pattern={"v_proj": 2}).for_module("model.layers.0.self_attn.v_proj").r
        2
        """
        changes = {}
        for field_name, patterns in (("r", self.rank_pattern), ("lora_alpha", self.alpha_pattern)):
            key = next((p for p in patterns or {} if re.match(rf"(.*\.)?({p})$", path)), None)
            if key is not None:
                changes[field_name] = patterns[key]
        return dataclasses.replace(self, **changes) if changes else self


def init_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, config: LoRAConfig) -> None:
    """Initialise a zero B and an empty A (linear or conv weights) as PEFT does for ``config.init_lora_weights``."""
    # nn.Linear's (and nn.Conv's) own init, as in the LoRA paper's reference code and PEFT.
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    if config.init_lora_weights == "gaussian":
        nn.init.normal_(lora_A, std=1 / config.r)
    elif config.init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))


class LoRAFactors(nn.Module):
    """Free low-rank factors: A (r x d_in) kaiming-uniform, B (d_out x r) zero, and with ``lora_bias`` B's bias."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None) -> None:
        super().__init__()
        dtype = DTYPES[config.dtype]
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, device=device, dtype=dtype))
        init_factors(self.lora_A, self.lora_B, config)
        if config.lora_bias:
            add_lora_bias(self, out_features, config.r, config.init_lora_weights, device, dtype)
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = config.kernel

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B


class LoRALinear(PeftLoRANames, AdapterLayer):
    """A linear layer (nn.Linear, GPT-2 Conv1D, bitsandbytes) plus named low-rank adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Conv1D stores its weight as (d_in, d_out): "fan_in_fan_out" in PEFT's words; so does an
        # embedding, a linear map of one-hot tokens (repeft.lora_embedding).
        self.fan_in_fan_out = isinstance(base_layer, (Conv1D, nn.Embedding))
        self.in_features, self.out_features = self.feature_sizes(base_layer)
        self.merged_adapter: str | None = None
        # DoRA's gain m / ||W + s B A||_row at merge time: unmerge divides it out (None for plain LoRA).
        self._merged_gain: torch.Tensor | None = None
        # Set by AdapterModel for a mixed-adapter batch: this layer's adapters used in the batch,
        # each row's index into them (-1: none) and their scalings, both on the layer's device,
        # a cache for their stacked factors that lives as long as the mixed call, and how many
        # rows ``generate`` makes of each one (beams, return sequences).
        self.row_adapters: tuple[list[str], torch.Tensor, torch.Tensor, dict, int] | None = None
        # The shared weight a merge replaced by a merged copy (see ``merge``), put back by ``unmerge``.
        self._tied_weight: list[nn.Parameter] = []

    def feature_sizes(self, base_layer: nn.Module) -> tuple[int, int]:
        """The base layer's (input, output) sizes, which its adapters' factors map between."""
        if self.fan_in_fan_out:
            return tuple(base_layer.weight.shape)
        return base_layer.in_features, base_layer.out_features

    # Model code reads its layers' weights (T5: ``wo.weight.dtype``); PEFT's layers pass them through too.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        adapter = self.active
        if adapter is None or self.merged_adapter is not None:
            return self.base_layer(x, *args, **kwargs)
        if dora.magnitude(adapter) is not None:
            return dora.dora_forward(self, adapter, x, *args, **kwargs)
        lora_A, lora_B = (f.to(x.dtype) for f in adapter.factors())
        lora_args = (lora_A, lora_B, adapter.scaling, adapter.dropout_p, self.training)
        if type(self.base_layer) is nn.Linear:
            base = self.base_layer
            out = lora_linear(x, base.weight, base.bias, *lora_args, backend=adapter.kernel)
        else:
            out = add_lora(self.base_out(x, *args, **kwargs), x, *lora_args)
        bias = lora_bias(adapter)
        # PEFT's lora_B(lora_A(x)) * s with a biased lora_B: s * b is added to every output (not dropped out).
        return out if bias is None else out + adapter.scaling * bias.to(out.dtype)

    def new_factors(self, config: LoRAConfig) -> LoRAFactors:
        """The free factors of a new LoRA adapter on this layer."""
        return LoRAFactors(self.in_features, self.out_features, config)

    def add_magnitude(self, adapter: nn.Module, dtype: torch.dtype) -> None:
        """Give ``adapter`` DoRA's magnitude vector (``repeft.dora``)."""
        dora.add_magnitude(self, adapter, dtype)

    def base_out(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output, as a tensor the low-rank term may be added to in place."""
        out = self.base_layer(x, *args, **kwargs)
        if out._is_view() and not self.fan_in_fan_out:
            # bitsandbytes' 8-bit matmul returns a view made inside its autograd Function,
            # which autograd forbids updating in place (Conv1D's view of an addmm is fine).
            out = out.clone()
        return out

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of the batch with its own adapter (index -1: the base layer alone)."""
        names, index = self._row_index(x)
        scaling, stacked = self.row_adapters[2:4]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        adapters = [self.adapters[n] for n in names]
        lora_A, lora_B = self._stacked_factors(adapters, x, stacked)
        backend = "torch" if any(a.kernel == "torch" for a in adapters) else adapters[0].kernel
        out = add_lora_mixed(self.base_out(x, *args, **kwargs), x, lora_A, lora_B, scaling, index, backend=backend)
        return add_row_biases(out, adapters, index)

    def _row_index(self, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The mixed batch's adapter names here and each row of ``x``'s index into them (-1: none)."""
        names, index, _, _, rows_per_name = self.row_adapters
        if x.shape[0] != index.shape[0]:
            # generate() repeats each prompt's row for beams / return sequences (repeat_interleave).
            if x.shape[0] != index.shape[0] * rows_per_name:
                raise ValueError(
                    f"adapter_names has {index.shape[0]} entries but the batch reaching {type(self).__name__} "
                    f"has {x.shape[0]} rows: give exactly one adapter name per row"
                )
            index = index.repeat_interleave(rows_per_name)
        return names, index

    def _stacked_factors(self, adapters: list, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' A and B stacked, lower ranks padded with zeros (they add nothing).

        Without autograd the weights cannot change during one mixed call, so the
        stack is built once per call, not once per ``generate`` step.
        """
        key = (x.dtype, x.device)
        if key in cache:
            return cache[key]
        factors = [a.factors() for a in adapters]
        rank = max(A.shape[0] for A, _ in factors)
        lora_A = x.new_zeros(len(adapters), rank, self.in_features)
        lora_B = x.new_zeros(len(adapters), self.out_features, rank)
        for i, (A, B) in enumerate(factors):
            lora_A[i, : A.shape[0]] = A
            lora_B[i, :, : B.shape[1]] = B
        if not torch.is_grad_enabled():
            cache[key] = (lora_A, lora_B)
        return lora_A, lora_B

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` in fp32, laid out like the base layer's weight."""
        adapter = self.adapters[name]
        with torch.no_grad():
            lora_A, lora_B = adapter.factors()
            delta = (lora_B.float() @ lora_A.float()) * adapter.scaling
        return delta.T if self.fan_in_fan_out else delta

    def _float_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point or type(weight) is not nn.Parameter:
            raise ValueError(
                f"cannot merge into a {type(self.base_layer).__name__} weight of dtype {weight.dtype}: "
                "W + s*B@A would have to be rounded back onto the quantization grid, an error about "
                "one quantization step per weight, usually larger than the adapter's update. "
                "Use repeft.export_merged(model, out_dir), which dequantizes W, merges in fp32 and "
                "saves float weights (exact), or export_merged(..., requantize='nf4'|'fp4'|'int8'), "
                "which re-quantizes and reports the error it measures."
            )
        return weight

    def merged_weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weight`` (laid out like the base layer's) with adapter ``name`` folded in, and DoRA's gain (or None).

        LoRA: ``W + s B A`` in ``weight``'s dtype. DoRA: ``m / ||W + s B A||_row * (W + s B A)``, computed in fp32.
        """
        delta = self.delta_weight(name).to(weight.device)
        adapter = self.adapters[name]
        if dora.magnitude(adapter) is None:
            return weight + delta.to(weight.dtype), None
        gain = dora.merge_gain(self, adapter, weight, delta)
        return (gain * (weight.float() + delta)).to(weight.dtype), gain

    def merge(self, name: str, untie: bool = False) -> None:
        """Fold the adapter into the base weight: add ``s * B @ A`` (DoRA: and rescale each output row).

        ``untie=True`` for a weight shared with another module (GPT-2's ``lm_head``
        is its input embedding): the merged weight becomes this layer's own
        copy, so the other module keeps the base weight.
        """
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged into {type(self).__name__}")
        weight = self._float_weight()
        merged, gain = self.merged_weight(name, weight.detach())
        adapter = self.adapters[name]
        bias = None if lora_bias(adapter) is None else merged_bias(adapter, self.bias)
        if not (torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias).all())):
            # Checked before writing: an overflowed weight could not be unmerged back to the base.
            raise ValueError(
                f"merging adapter {name!r} gives inf or NaN in this {weight.dtype} weight (largest finite value "
                f"{torch.finfo(weight.dtype).max:.6g}); merge into float32 or bfloat16 weights, e.g. "
                "repeft.export_merged(model, out_dir, dtype=torch.bfloat16)"
            )
        if untie:
            self._tied_weight.append(weight)
            weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            self.base_layer.weight = weight
        weight.data.copy_(merged)
        if bias is not None:
            self.base_layer.bias.data.copy_(bias)
        self.merged_adapter = name
        self._merged_gain = gain

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        if self._tied_weight:
            self.base_layer.weight = self._tied_weight.pop()
        else:
            weight = self._float_weight()
            delta = self.delta_weight(self.merged_adapter)
            if self._merged_gain is None:
                weight.data -= delta.to(weight.dtype)
            else:
                weight.data.copy_(weight.float() / self._merged_gain - delta)
        unmerge_bias(self.adapters[self.merged_adapter], self.bias)
        self.merged_adapter = None
        self._merged_gain = None

    def unwrapped(self) -> nn.Module:
        return self.base_layer

    def unloaded(self) -> nn.Module:
        return self.base_layer


def _excluded(path: str, exclude: list[str] | str | None) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return any(matches_name(path, pattern) for pattern in exclude)


def _layer_index(path: str, patterns: list[str]) -> int | None:
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def inject_low_rank(model, name: str, config: LoRAConfig, make_factors) -> None:
    """Wrap every targeted layer in a ``LoRALinear`` and add the factors ``make_factors`` builds for it.

    ``make_factors`` takes ``{path: LoRALinear}`` of all targeted layers (model
    order) and returns ``{path: factors module}``: a method whose layers share
    parameters (RepLoRA's shared seeds) sees the whole set at once.
    """
    from .lora_conv import CONV_LAYERS, LoRAConv, refuse_convs  # they subclass LoRALinear
    from .lora_embedding import LoRAEmbedding, refuse_embeddings, warn_about_shared_embeddings

    base = model.get_base_model()
    paths = config.select(resolve_targets(base, config.target_modules, exclude=model.modules_to_save_paths()))
    if config.ensure_weight_tying:
        # This adapter's modules_to_save copies were added before its layers (AdapterModel.add_adapter).
        saved = [p for p in model.modules_to_save_paths() if name in base.get_submodule(p).adapters]
        check_weight_tying(base, paths + saved)
    embeddings = [p for p in paths if isinstance(_unwrapped(base.get_submodule(p)), nn.Embedding)]
    refuse_embeddings(config, embeddings)
    warn_about_shared_embeddings(base, embeddings)
    refuse_convs(config, {p: _unwrapped(base.get_submodule(p)) for p in paths})
    layers = {}
    for path in paths:
        layer = base.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            if isinstance(layer, nn.Embedding):
                layer = LoRAEmbedding(layer)
            else:
                layer = LoRAConv(layer) if isinstance(layer, CONV_LAYERS) else LoRALinear(layer)
            base.set_submodule(path, layer)
        layers[path] = layer
    if config.lora_bias:
        warn_about_unbiased_layers(layers)
    for path, factors in make_factors(layers).items():
        layers[path].adapters[name] = factors = place_beside(factors, layers[path].base_layer)
        if config.use_dora:
            layers[path].add_magnitude(factors, DTYPES[config.dtype])


def _unwrapped(layer: nn.Module) -> nn.Module:
    return layer.base_layer if isinstance(layer, LoRALinear) else layer


@register_method(
    LoRAConfig, families=DEFAULT_TARGET_MODULES, identity_at_init=True, generates_with_cache=True, vision_only=False,
    example={"r": 4, "lora_alpha": 8},
)
def inject_lora(model, name: str, config: LoRAConfig) -> None:
    inject_low_rank(
        model, name, config,
        lambda layers: {
            path: layer.new_factors(config.for_module(path)) for path, layer in layers.items()
        },
    )
