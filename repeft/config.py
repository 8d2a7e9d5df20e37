"""Adapter configurations: plain dataclasses that round-trip through JSON.

Every method has one config class, registered under the name stored in the
``method`` field of ``adapter_config.json``. ``AdapterConfig.from_dict`` reads
that name back and builds the right class, rejecting unknown fields by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

_CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}

KERNEL_BACKENDS = ("auto", "triton", "torch")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
NORGA_ACTIVATIONS = ("sigmoid", "tanh", "gelu")


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``cls`` loadable from JSON under ``cls.method``."""
    _CONFIG_CLASSES[cls.method] = cls
    return cls


def option(default: Any, *, minimum: float | None = None, below: float | None = None, choices: tuple | None = None) -> Any:
    """A config field with bounds: ``minimum`` (inclusive), ``below`` (exclusive) or allowed ``choices``.

    Every field's value is also checked against its annotation (see ``AdapterConfig.__post_init__``).

    >>> @dataclass
    ... class Example(AdapterConfig):
    ...     r: int = option(8, minimum=1)
    """
    return dataclasses.field(default=default, metadata={"minimum": minimum, "below": below, "choices": choices})


def config_class(method: str) -> type[AdapterConfig]:
    try:
        return _CONFIG_CLASSES[method]
    except KeyError:
        known = ", ".join(sorted(_CONFIG_CLASSES))
        raise ValueError(f"unknown adapter method {method!r}; known methods: {known}") from None


@dataclass
class AdapterConfig:
    """Fields every adapter method shares.

    ``modules_to_save`` names modules (exact names or dotted suffixes) that are
    trained in full and saved with the adapter, e.g. a classification head.
    When left as ``None`` on a ``*ForSequenceClassification``-style model, the
    head is added automatically.

    Every field is checked on construction, so a config read from a file is
    as safe as one written in code: the value must have the annotated type
    (``bool`` fields take only ``True``/``False``, ``int`` fields no bools,
    ``float`` fields finite numbers) and lie within the field's ``option``
    bounds; a ``ValueError`` names the field otherwise.
    """

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    # Fields added after adapters were first saved, with the value those older files meant:
    # a saved config that lacks the field was written when this was the only behaviour.
    saved_before: ClassVar[dict[str, Any]] = {}

    modules_to_save: list[str] | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.modules_to_save is not None:
            # [] is allowed: it says "no head", turning off the automatic task-head choice.
            self.modules_to_save = _as_name_list("modules_to_save", self.modules_to_save, allow_empty=True)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name), hints[f.name], f.metadata)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Build the config class named by ``data["method"]``.

        >>> AdapterConfig.from_dict({"method": "lora", "r": 4}).r
        4
        """
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        if "method" not in data:
            raise ValueError("adapter config has no 'method' field (e.g. \"lora\", \"replora\")")
        method = data.pop("method")
        if not isinstance(method, str):
            raise ValueError(f"method must be a string such as \"lora\", got {method!r}")
        cls = config_class(method)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for {cls.__name__}; allowed fields: {sorted(allowed)}"
            )
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> AdapterConfig:
        return AdapterConfig.from_dict(json.loads(text))

    @staticmethod
    def from_saved(data: dict[str, Any]) -> AdapterConfig:
        """``from_dict`` for a config read back from an adapter file, old files included.

        A field the file predates takes the value it had when the file was written
        (``saved_before``), not today's default: a RepLoRA adapter saved before
        ``form`` existed loads as ``form="mlp"``, the only form there was.

        >>> AdapterConfig.from_saved({"method": "replora", "r": 4}).form
        'mlp'
        """
        method = data.get("method") if isinstance(data, dict) else None
        cls = _CONFIG_CLASSES.get(method) if isinstance(method, str) else None
        # Anything else (not a mapping, no or an unknown method) is from_dict's to explain.
        return AdapterConfig.from_dict({**cls.saved_before, **data} if cls else data)


@register_config
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
    kernel: str = option("auto", choices=KERNEL_BACKENDS)
    dtype: str = option("float32", choices=("float32", "float16", "bfloat16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = _as_name_list("target_modules", self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


@register_config
@dataclass
class RepLoRAConfig(LoRAConfig):
    """RepLoRA: A and B are produced by small MLPs from trainable seeds.

    ``A = g_A(A_seed)`` and ``B = g_B(B_seed)``, with g applied to every vector
    along ``axis``: ``"rank"`` (each column of A, each row of B is a length-r
    vector; cost independent of model width) or ``"feature"`` (each row of A /
    column of B is transformed; W1 is ``mlp_hidden x d``). ``form`` picks g:

    - ``"residual"`` (default): ``g(M) = M + (s_M / h) W2 act(W1 M / s_M)``, s_M the RMS
      of the seed M, h = ``mlp_hidden``, no biases, W2 = 0 and the seeds initialised
      as LoRA's A and B. It is exactly LoRA at init, gradients included, and trains
      at LoRA's rates.
    - ``"mlp"``: ``g(M) = W2 act(W1 M + b1) + b2`` with unit-normal seeds and g_B's
      output layer zero. Trains worse than LoRA (poorly conditioned under Adam);
      kept for adapters saved before ``form`` existed and for comparisons.

    ``share_mlp`` shares the hidden layer W1 (and b1) between g_A and g_B; each
    keeps its own output layer, the one that starts at zero.

    >>> RepLoRAConfig(r=8, mlp_hidden=32).form
    'residual'
    """

    method: ClassVar[str] = "replora"
    saved_before: ClassVar[dict[str, Any]] = {"form": "mlp"}

    mlp_hidden: int = option(32, minimum=1)
    activation: str = option("tanh", choices=ACTIVATIONS)
    share_mlp: bool = False
    axis: str = option("rank", choices=("rank", "feature"))
    form: str = option("residual", choices=("residual", "mlp"))


@register_config
@dataclass
class PrefixConfig(AdapterConfig):
    """Prefix tuning: ``n_prefix`` extra key/value vectors in every attention layer.

    ``structure="shared"`` (the shared-structure reparameterization) makes keys
    and values of layer l two halves of one MLP output,
    ``K_l, V_l = split(W2 tanh(W1 E_l + b1) + b2)``, from a learned embedding
    ``E_l`` (``n_prefix x embed_dim``, ``embed_dim=None``: the model's hidden
    size). ``mlp_per_layer=True`` (default) gives each layer its own MLP,
    ``mlp_hidden`` (48) wide, as the paper's code does; ``False`` is repeft's
    own variant, one MLP for all layers. ``structure="independent"`` learns K_l
    and V_l directly: the non-shared baseline, and the form
    ``repeft.fold_prefix`` exports. ``norga=True`` adds the NoRGa gate on prefix
    scores, ``s -> s + alpha * act(tau * s)`` with ``norga_activation`` sigmoid
    (default), tanh or gelu, and learnable per-layer alpha and tau starting at
    ``norga_alpha`` and ``norga_tau``.

    >>> PrefixConfig(n_prefix=8, norga=True).structure
    'shared'
    """

    method: ClassVar[str] = "prefix"

    n_prefix: int = option(16, minimum=1)
    structure: str = option("shared", choices=("shared", "independent"))
    embed_dim: int | None = option(None, minimum=1)
    mlp_hidden: int = option(48, minimum=1)
    mlp_per_layer: bool = True
    norga: bool = False
    norga_alpha: float = 1.0
    norga_tau: float = 1.0
    norga_activation: str = option("sigmoid", choices=NORGA_ACTIVATIONS)


@register_config
@dataclass
class ZeroInitConfig(AdapterConfig):
    """Zero-initialized attention (LLaMA-Adapter) with linear or non-linear prompts.

    In the top ``n_layers`` attention layers (``None``: all), ``n_prompt`` prompt
    vectors P_l are projected by the layer's frozen key/value projections (no
    rotary); each query attends to them with a separate softmax whose output is
    scaled by ``tanh(g_{l,h})`` per layer and head, ``g = 0`` at init, and added
    to the ordinary attention output. ``prompt_type="linear"``: P_l is a free
    parameter. ``"nonlinear"``: a network (``mlp_hidden`` wide, ``activation``)
    shared by all layers makes the prompts, as one of the paper's code's two
    variants (``prompt_network``):

    - ``"hypermodel"`` (default, the paper's non-linear script): one code e_l
      (``code_dim``) per layer, ``vec(P_l) = W2 act(W1 e_l + b1) + b2`` gives all
      n_prompt prompts at once; W2 starts tiny, so the prompts start near zero.
    - ``"deepshare"``: one code per prompt, ``P_l = W2 act(W1 E_l + b1) + b2`` row by
      row (E_l is ``n_prompt x code_dim``), W2 scaled so the prompts start at unit
      spread like linear prompts.

    ``gating="none"``: the baseline the paper calls vanilla attention, no gate
    and the prompts joined into the tokens' own softmax (not the base model at
    init).

    >>> ZeroInitConfig(n_prompt=10, n_layers=2, prompt_type="nonlinear").prompt_network
    'hypermodel'
    """

    method: ClassVar[str] = "zero_init"
    # Non-linear prompts saved before prompt_network existed were deepshare ones (GELU, 128 wide).
    saved_before: ClassVar[dict[str, Any]] = {"prompt_network": "deepshare"}

    n_prompt: int = option(10, minimum=1)
    n_layers: int | None = option(None, minimum=1)
    prompt_type: str = option("linear", choices=("linear", "nonlinear"))
    prompt_network: str = option("hypermodel", choices=("hypermodel", "deepshare"))
    code_dim: int = option(64, minimum=1)
    mlp_hidden: int = option(64, minimum=1)
    activation: str = option("relu", choices=ACTIVATIONS)
    gating: str = option("zero_init", choices=("zero_init", "none"))


def _check_field(name: str, value: Any, hint: Any, bounds: typing.Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``value`` has type ``hint`` and lies within ``bounds`` (an ``option``'s)."""
    if not (_has_type(value, hint) and _within(value, bounds)):
        raise ValueError(f"{name} must be {_expected(hint, bounds)}, got {value!r}")


def _within(value: Any, bounds: typing.Mapping[str, Any]) -> bool:
    if value is None:
        return True
    choices, minimum, below = bounds.get("choices"), bounds.get("minimum"), bounds.get("below")
    return (
        (choices is None or value in choices)
        and (minimum is None or value >= minimum)
        and (below is None or value < below)
    )


def _expected(hint: Any, bounds: typing.Mapping[str, Any]) -> str:
    """What a field takes, in words: ``"a positive integer or null"``, ``"'rank' or 'feature'"``."""
    choices, minimum, below = bounds.get("choices"), bounds.get("minimum"), bounds.get("below")
    if choices is not None:
        return " or ".join(map(repr, choices)) if len(choices) == 2 else f"one of {choices}"
    words = _describe(hint)
    if minimum == 1 and below is None and "an integer" in words:
        return words.replace("an integer", "a positive integer")
    if minimum is not None or below is not None:
        low = "(-inf" if minimum is None else f"[{minimum:g}"
        high = "inf)" if below is None else f"{below:g})"
        return words.replace("a finite number", f"a number in {low}, {high}")
    return words


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        # bool is an int subclass; True is no size.
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _as_name_list(field_name: str, value: Any, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field_name} must be a list of module names, got {value!r}")
    names = list(value)
    if (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field_name} must be a non-empty list of module names, got {value!r}")
    return names


__all__ = [
    "AdapterConfig",
    "LoRAConfig",
    "PrefixConfig",
    "RepLoRAConfig",
    "ZeroInitConfig",
    "config_class",
    "option",
    "register_config",
]
