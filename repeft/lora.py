"""LoRA: ``h = W x + s * B A x`` on a frozen linear layer.

``LoRALinear`` replaces a targeted layer in place and keeps it as
``base_layer``. Each adapter in it is a *factors* module exposing
``factors() -> (A, B)``: plain LoRA returns its parameters, RepLoRA computes
them with small MLPs. Everything downstream (the fused matmul, merging,
PEFT export) only sees A and B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import AdapterConfig, as_name_list, option
from .kernels import BACKENDS, add_lora, add_lora_mixed, lora_linear
from .layers import AdapterLayer, place_beside
from .methods import register_method
from .targeting import DEFAULT_TARGET_MODULES, resolve_targets

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    r: int = option(8, minimum=1)
    lora_alpha: float = 16.0
    lora_dropout: float = option(0.0, minimum=0.0, below=1.0)
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    kernel: str = option("auto", choices=BACKENDS)
    dtype: str = option("float32", choices=tuple(DTYPES))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = as_name_list("target_modules", self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


class LoRAFactors(nn.Module):
    """Free low-rank factors: A (r x d_in) kaiming-uniform, B (d_out x r) zero."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None) -> None:
        super().__init__()
        dtype = DTYPES[config.dtype]
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, device=device, dtype=dtype))
        # nn.Linear's own init, as in the LoRA paper's reference code and PEFT.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = config.kernel

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B


class LoRALinear(AdapterLayer):
    """A linear layer (nn.Linear, GPT-2 Conv1D, bitsandbytes) plus named low-rank adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Conv1D stores its weight as (d_in, d_out): "fan_in_fan_out" in PEFT's words.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.merged_adapter: str | None = None
        # Set by AdapterModel for a mixed-adapter batch: this layer's adapters used in the batch,
        # each row's index into them (-1: none) and their scalings, both on the layer's device,
        # and a cache for their stacked factors that lives as long as the mixed call.
        self.row_adapters: tuple[list[str], torch.Tensor, torch.Tensor, dict] | None = None
        # The shared weight a merge replaced by a merged copy (see ``merge``), put back by ``unmerge``.
        self._tied_weight: list[nn.Parameter] = []

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
        lora_A, lora_B = (f.to(x.dtype) for f in adapter.factors())
        lora_args = (lora_A, lora_B, adapter.scaling, adapter.dropout_p, self.training)
        if type(self.base_layer) is nn.Linear:
            base = self.base_layer
            return lora_linear(x, base.weight, base.bias, *lora_args, backend=adapter.kernel)
        out = self.base_layer(x, *args, **kwargs)
        if out._is_view() and not self.fan_in_fan_out:
            # bitsandbytes' 8-bit matmul returns a view made inside its autograd Function,
            # which autograd forbids updating in place (Conv1D's view of an addmm is fine).
            out = out.clone()
        return add_lora(out, x, *lora_args)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of the batch with its own adapter (index -1: the base layer alone)."""
        names, index, scaling, stacked = self.row_adapters
        out = self.base_layer(x, *args, **kwargs)
        if not names:
            return out
        if x.shape[0] != index.shape[0]:
            # generate() repeats each row for beams / return sequences (repeat_interleave).
            if x.shape[0] % index.shape[0]:
                raise ValueError(f"adapter_names has {index.shape[0]} entries but the batch has {x.shape[0]} rows")
            index = index.repeat_interleave(x.shape[0] // index.shape[0])
        adapters = [self.adapters[n] for n in names]
        lora_A, lora_B = self._stacked_factors(adapters, x, stacked)
        backend = "torch" if any(a.kernel == "torch" for a in adapters) else adapters[0].kernel
        if out._is_view() and not self.fan_in_fan_out:
            out = out.clone()  # as in forward (bitsandbytes' 8-bit output)
        return add_lora_mixed(out, x, lora_A, lora_B, scaling, index, backend=backend)

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

    def merge(self, name: str, untie: bool = False) -> None:
        """Add ``s * B @ A`` to the base weight.

        ``untie=True`` for a weight shared with another module (GPT-2's ``lm_head``
        is its input embedding): the merged weight becomes this layer's own
        copy, so the other module keeps the base weight.
        """
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged into {type(self).__name__}")
        weight = self._float_weight()
        if untie:
            self._tied_weight.append(weight)
            weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            self.base_layer.weight = weight
        weight.data += self.delta_weight(name).to(weight.dtype)
        self.merged_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        if self._tied_weight:
            self.base_layer.weight = self._tied_weight.pop()
        else:
            weight = self._float_weight()
            weight.data -= self.delta_weight(self.merged_adapter).to(weight.dtype)
        self.merged_adapter = None

    def unwrapped(self) -> nn.Module:
        return self.base_layer

    def unloaded(self) -> nn.Module:
        return self.base_layer


def inject_low_rank(model, name: str, config: LoRAConfig, make_factors) -> None:
    """Wrap every targeted layer in a ``LoRALinear`` and add the factors ``make_factors`` builds for it.

    ``make_factors`` takes ``{path: LoRALinear}`` of all targeted layers (model
    order) and returns ``{path: factors module}``: a method whose layers share
    parameters (RepLoRA's shared seeds) sees the whole set at once.
    """
    base = model.base_model
    layers = {}
    for path in resolve_targets(base, config.target_modules, exclude=model.modules_to_save_paths()):
        layer = base.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            base.set_submodule(path, layer)
        layers[path] = layer
    for path, factors in make_factors(layers).items():
        layers[path].adapters[name] = place_beside(factors, layers[path].base_layer)


@register_method(
    LoRAConfig, families=DEFAULT_TARGET_MODULES, identity_at_init=True, generates_with_cache=True, vision_only=False,
    example={"r": 4, "lora_alpha": 8},
)
def inject_lora(model, name: str, config: LoRAConfig) -> None:
    inject_low_rank(
        model, name, config,
        lambda layers: {path: LoRAFactors(layer.in_features, layer.out_features, config) for path, layer in layers.items()},
    )
