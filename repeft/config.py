"""Adapter configurations: plain dataclasses that round-trip through JSON.

Every method has one config class, registered under the name stored in the
``method`` field of ``adapter_config.json``. ``AdapterConfig.from_dict`` reads
that name back and builds the right class, rejecting unknown fields by name.
"""

from __future__ import annotations

import dataclasses
import json
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
        data = dict(data)
        if "method" not in data:
            raise ValueError("adapter config has no 'method' field (e.g. \"lora\", \"replora\")")
        cls = config_class(data.pop("method"))
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
        cls = _CONFIG_CLASSES.get(data.get("method"))  # from_dict explains a missing or unknown method
        return AdapterConfig.from_dict({**(cls.saved_before if cls else {}), **data})


@register_config
@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``h = W x + (alpha / r) * B A x`` with A random and B zero at init.

    ``target_modules`` is a list of module names or dotted suffixes
    (``["q_proj", "v_proj"]``), a regex string matched against full module
    names, ``"all-linear"``, or ``None`` for the architecture's default.

    >>> cfg = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    >>> cfg.scaling
    2.0
    """

    method: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    kernel: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.kernel not in KERNEL_BACKENDS:
            raise ValueError(f"kernel must be one of {KERNEL_BACKENDS}, got {self.kernel!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = _as_name_list("target_modules", self.target_modules)
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(
                "target_modules must be a list of names, a regex string, 'all-linear' or None, "
                f"got {type(self.target_modules).__name__}"
            )

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

    mlp_hidden: int = 32
    activation: str = "tanh"
    share_mlp: bool = False
    axis: str = "rank"
    form: str = "residual"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden <= 0:
            raise ValueError(f"mlp_hidden must be a positive integer, got {self.mlp_hidden!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.axis not in ("rank", "feature"):
            raise ValueError(f"axis must be 'rank' or 'feature', got {self.axis!r}")
        if self.form not in ("residual", "mlp"):
            raise ValueError(f"form must be 'residual' or 'mlp', got {self.form!r}")


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

    n_prefix: int = 16
    structure: str = "shared"
    embed_dim: int | None = None
    mlp_hidden: int = 48
    mlp_per_layer: bool = True
    norga: bool = False
    norga_alpha: float = 1.0
    norga_tau: float = 1.0
    norga_activation: str = "sigmoid"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("n_prefix", self.n_prefix)
        _check_positive_int("mlp_hidden", self.mlp_hidden)
        if self.embed_dim is not None:
            _check_positive_int("embed_dim", self.embed_dim)
        if self.structure not in ("shared", "independent"):
            raise ValueError(f"structure must be 'shared' or 'independent', got {self.structure!r}")
        if self.norga_activation not in NORGA_ACTIVATIONS:
            raise ValueError(f"norga_activation must be one of {NORGA_ACTIVATIONS}, got {self.norga_activation!r}")


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

    n_prompt: int = 10
    n_layers: int | None = None
    prompt_type: str = "linear"
    prompt_network: str = "hypermodel"
    code_dim: int = 64
    mlp_hidden: int = 64
    activation: str = "relu"
    gating: str = "zero_init"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("n_prompt", self.n_prompt)
        _check_positive_int("code_dim", self.code_dim)
        _check_positive_int("mlp_hidden", self.mlp_hidden)
        if self.n_layers is not None:
            _check_positive_int("n_layers", self.n_layers)
        if self.prompt_type not in ("linear", "nonlinear"):
            raise ValueError(f"prompt_type must be 'linear' or 'nonlinear', got {self.prompt_type!r}")
        if self.prompt_network not in ("hypermodel", "deepshare"):
            raise ValueError(f"prompt_network must be 'hypermodel' or 'deepshare', got {self.prompt_network!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.gating not in ("zero_init", "none"):
            raise ValueError(f"gating must be 'zero_init' or 'none', got {self.gating!r}")


def _check_positive_int(field_name: str, value: Any) -> None:
    # bool is an int subclass; True is no size.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field_name} must be a positive integer, got {value!r}")


def _as_name_list(field_name: str, value: Any, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        return [value]
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
    "register_config",
]
