"""Training recipes: a YAML file checked against a dataclass schema before anything runs.

>>> recipe = load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"])  # doctest: +SKIP

Every field has a type, a default (or is required) and, where it matters, a
set of allowed values or a lower bound. A wrong name or value raises
``RecipeError`` naming the dotted field and what it accepts, so a typo fails
in a second instead of after the model has loaded. ``docs/training.md`` is the
reference for every field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import registry
from .config import AdapterConfig
from .datasource import check_source
from .errors import RecipeError  # defined apart so the data modules need not import the schema
from .lora import LoRAConfig
from .recipe_yaml import parse_yaml
from .run_files import check_inputs_not_written, check_output_dir

TASKS = ("causal_lm", "sequence_classification", "image_classification")
# What "best" can mean; loss and perplexity are better lower, the others higher.
METRICS = ("auto", "accuracy", "loss", "f1_macro", "exact_match")
# accelerate's tracker names ("all": every one installed).
TRACKERS = ("all", "tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
# transformers.get_scheduler names that need nothing beyond warmup and total steps.
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
# Far above any useful rate, and below where AdamW's first step (lr / (1 - beta1)) overflows float32.
MAX_LR = 1e30


def _min(bound: float) -> dict[str, Any]:
    return {"min": bound}


def _range(low: float, high: float) -> dict[str, Any]:
    return {"min": low, "max": high}


@dataclass
class ModelSpec:
    """The base model: a local directory or registered name (``path``), or a config to build from."""

    path: str | None = None
    config: dict[str, Any] | None = None
    class_name: str | None = field(default=None, metadata={"key": "class"})
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"


@dataclass
class DataSpec:
    """Where examples come from and how they become tensors."""

    # None: the rows are passed from Python, train(recipe, train_data=...); a run checks that it has some.
    train: str | None = None
    eval: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "pixel_values"
    labels: list[str] | None = None
    format: Literal["auto", "text", "prompt_response", "messages"] = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    chat_template: str | None = None
    max_length: int = field(default=128, metadata=_min(1))
    truncation: Literal["cut", "drop", "error"] = "cut"
    packing: bool = False
    train_limit: int | None = field(default=None, metadata=_min(1))
    eval_limit: int | None = field(default=None, metadata=_min(1))


@dataclass
class OptimSpec:
    """AdamW settings."""

    lr: float = field(default=1e-3, metadata=_range(0.0, MAX_LR))
    # A new task head (modules_to_save) often wants a larger rate than the adapter; None: ``lr``.
    head_lr: float | None = field(default=None, metadata=_range(0.0, MAX_LR))
    weight_decay: float = field(default=0.0, metadata=_min(0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata=_min(0.0))
    max_grad_norm: float | None = field(default=1.0, metadata=_min(0.0))


@dataclass
class ScheduleSpec:
    """Learning-rate schedule (``transformers.get_scheduler``)."""

    name: Literal[SCHEDULES] = "linear"  # type: ignore[valid-type]
    warmup_steps: int = field(default=0, metadata=_min(0))
    warmup_ratio: float = field(default=0.0, metadata=_min(0.0))


@dataclass
class TrainSpec:
    """Length, batch sizes and precision. ``batch_size`` is per process."""

    epochs: int = field(default=1, metadata=_min(1))
    max_steps: int | None = field(default=None, metadata=_min(1))
    batch_size: int = field(default=8, metadata=_min(1))
    grad_accum: int = field(default=1, metadata=_min(1))
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))  # numpy's seed range
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    log_every: int = field(default=10, metadata=_min(1))


@dataclass
class EvalSpec:
    """When and how to evaluate on ``data.eval``."""

    every: int = field(default=0, metadata=_min(0))
    before: bool = False
    batch_size: int = field(default=32, metadata=_min(1))
    metric: Literal[METRICS] = "auto"  # type: ignore[valid-type]
    patience: int = field(default=0, metadata=_min(0))
    min_delta: float = field(default=0.0, metadata=_min(0.0))
    generate: int = field(default=0, metadata=_min(0))
    exact_match: bool = False
    max_new_tokens: int = field(default=32, metadata=_min(1))


@dataclass
class CheckpointSpec:
    """Resumable training state every ``every`` optimizer steps (0: none)."""

    every: int = field(default=0, metadata=_min(0))
    keep: int = field(default=2, metadata=_min(1))
    resume: str = "never"


@dataclass
class OutputSpec:
    """Where results go and which exports to write at the end."""

    dir: str = field(default="", metadata={"required": True})
    merged: bool = False
    peft: bool = False
    best: bool = False
    trackers: list[Literal[TRACKERS]] = field(default_factory=list)  # type: ignore[valid-type]


@dataclass
class Recipe:
    """A whole training run; build it with ``load_recipe`` or ``recipe_from_dict``."""

    task: Literal[TASKS] = field(default="causal_lm", metadata={"required": True})  # type: ignore[valid-type]
    model: ModelSpec = field(default_factory=ModelSpec, metadata={"required": True})
    data: DataSpec = field(default_factory=DataSpec, metadata={"required": True})
    adapter: AdapterConfig = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``recipe_from_dict`` turns back into an equal recipe."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def metric(self) -> str:
        """The eval metric that decides "best": accuracy for classification, loss for language modelling."""
        if self.eval.metric != "auto":
            return self.eval.metric
        return "loss" if self.task == "causal_lm" else "accuracy"

    @property
    def instruction_data(self) -> bool:
        """Whether the data are prompts and responses or conversations (known before reading only if set)."""
        return self.data.format in ("prompt_response", "messages")


# -- loading -----------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, check_data: bool = True) -> Recipe:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, and validate it.

    Relative file paths in ``data`` and ``model`` are taken relative to the
    current directory, as on the command line. ``check_data=False`` skips
    checking the files a run reads and writes: that the data sources exist,
    and that the run's outputs would not overwrite them (exporting a finished
    run needs neither).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe sections, found {type(raw).__name__}")
    return recipe_from_dict(apply_overrides(raw, overrides or []), check_data)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set; values are parsed as YAML.

    >>> apply_overrides({"train": {"epochs": 1}}, ["train.epochs=3", "adapter.target_modules=[q,v]"])
    {'train': {'epochs': 3}, 'adapter': {'target_modules': ['q', 'v']}}
    """
    raw = _normalize(_deepcopy(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like section.field=value")
        value = parse_yaml(text, f"override {item!r}") if text else None
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def recipe_from_dict(raw: dict[str, Any], check_data: bool = True) -> Recipe:
    """Validate plain data (as read from YAML) into a ``Recipe``."""
    recipe = _build(Recipe, _normalize(_deepcopy(raw)), "")
    _check(recipe, check_data)
    return recipe


def _normalize(raw: dict[str, Any]) -> dict[str, Any]:
    # `model: minilm` is short for `model: {path: minilm}`.
    if isinstance(raw.get("model"), str):
        raw["model"] = {"path": raw["model"]}
    return raw


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


# -- schema checking -----------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of fields, got {data!r}")
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown field {prefix}{key}{hint}; fields of {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields.items():
        name = f"{prefix}{key}"
        if key not in data:
            if f.metadata.get("required"):
                raise RecipeError(f"missing required field {name}")
            continue
        values[f.name] = _convert(data[key], hints[f.name], name)
        low, high, value = f.metadata.get("min"), f.metadata.get("max"), values[f.name]
        if low is not None and value is not None and value < low:
            raise RecipeError(f"{name} must be >= {low}, got {value!r}")
        if high is not None and value is not None and value > high:
            raise RecipeError(f"{name} must be <= {high}, got {value!r}")
    return cls(**values)


def _convert(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is AdapterConfig:
        return _adapter_config(value, name)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, name)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and (args[0] is str or typing.get_origin(args[0]) is Literal):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{name} must be a list, got {value!r}")
        return [_convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{name} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string, so numeric strings are accepted.
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise RecipeError(f"{name} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema: unsupported type {hint!r} for {name}")


def _adapter_config(value: Any, name: str) -> AdapterConfig:
    if not isinstance(value, dict):
        raise RecipeError(f"{name} must be a mapping with a 'method' field and its settings, got {value!r}")
    try:
        return AdapterConfig.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{name}: {exc}") from None


def _to_plain(value: Any) -> Any:
    if isinstance(value, AdapterConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.metadata.get("key", f.name): _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


# -- rules across fields ---------------------------------------------------------------------


def _check(recipe: Recipe, check_data: bool) -> None:
    _check_model(recipe)
    if check_data:
        check_output_dir(recipe.output.dir)
        check_inputs_not_written(recipe)
        train_kind = check_source("data.train", recipe.data.train) if recipe.data.train is not None else None
        if recipe.data.eval is not None:
            check_source("data.eval", recipe.data.eval)
        expected_kind = "image" if recipe.task == "image_classification" else "text"
        if train_kind not in (None, expected_kind):
            raise RecipeError(f"data.train is a {train_kind} dataset but task {recipe.task} needs {expected_kind} data")
    if len(recipe.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in recipe.optim.betas):
        raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {recipe.optim.betas!r}")
    if recipe.schedule.warmup_steps and recipe.schedule.warmup_ratio:
        raise RecipeError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
    if recipe.schedule.warmup_ratio >= 1.0:
        raise RecipeError(f"schedule.warmup_ratio must be below 1, got {recipe.schedule.warmup_ratio}")
    if recipe.task == "causal_lm" and recipe.eval.metric in ("accuracy", "f1_macro"):
        raise RecipeError(
            f"eval.metric: {recipe.eval.metric} needs a classification task; for causal_lm use loss, exact_match or auto"
        )
    if recipe.task != "causal_lm" and recipe.eval.metric == "exact_match":
        raise RecipeError("eval.metric: exact_match needs task causal_lm with prompt/response or messages data")
    if recipe.eval.metric == "exact_match" and not recipe.eval.exact_match:
        raise RecipeError("eval.metric: exact_match needs eval.exact_match=true")
    if recipe.task != "causal_lm" and (recipe.instruction_data or recipe.data.packing):
        raise RecipeError(f"data.format {recipe.data.format} and data.packing need task causal_lm, not {recipe.task}")
    if recipe.task != "causal_lm" and (recipe.eval.generate or recipe.eval.exact_match):
        raise RecipeError("eval.generate / eval.exact_match need task causal_lm")
    if recipe.data.train is not None:  # else the data come from Python: train() checks them
        check_eval_data_given(recipe, recipe.data.eval is not None, "data.eval")
    if recipe.eval.patience and not recipe.eval.every:
        raise RecipeError("eval.patience counts evaluations during training: set eval.every too")
    if recipe.model.quantization != "none" and recipe.model.path is None:
        raise RecipeError(
            "model.quantization needs model.path: bitsandbytes quantizes a model as from_pretrained loads it"
        )
    resume = recipe.checkpoint.resume
    if resume not in ("never", "auto") and not Path(resume).is_dir():
        raise RecipeError(f"checkpoint.resume must be never, auto or a checkpoint directory; {resume!r} is none of these")
    if recipe.output.peft and not isinstance(recipe.adapter, LoRAConfig):
        raise RecipeError(f"output.peft needs a LoRA-family adapter (lora, replora); adapter.method is {recipe.adapter.method}")
    if recipe.output.merged and not recipe.adapter.mergeable:
        raise RecipeError(f"output.merged: a {recipe.adapter.method} adapter cannot be merged into the weights")


def check_eval_data_given(recipe: Recipe, has_eval: bool, eval_name: str) -> None:
    """Refuse settings that evaluate when a run has no eval data (``eval_name``: data.eval, or eval_data)."""
    asked = {"eval.every": recipe.eval.every, "eval.before": recipe.eval.before, "eval.patience": recipe.eval.patience,
             "eval.generate": recipe.eval.generate, "eval.exact_match": recipe.eval.exact_match,
             "output.best": recipe.output.best}
    needing_eval = [name for name, value in asked.items() if value]
    if needing_eval and not has_eval:
        raise RecipeError(f"{needing_eval[0]} needs {eval_name}")


def _check_model(recipe: Recipe) -> None:
    spec = recipe.model
    if (spec.path is None) == (spec.config is None):
        raise RecipeError("model needs exactly one of model.path (a directory or a registered name) and model.config")
    if spec.path is not None and not registry.is_model(spec.path) and not Path(spec.path).is_dir():
        raise RecipeError(
            f"model.path {spec.path!r} is neither a directory nor a registered model; "
            f"registered models: {', '.join(registry.model_names())}"
        )
    if spec.config is not None:
        _check_model_config(spec.config)
    if spec.class_name is not None:
        import transformers

        suffixes = {
            "causal_lm": ("ForCausalLM", "LMHeadModel"),
            "sequence_classification": ("ForSequenceClassification",),
            "image_classification": ("ForImageClassification",),
        }[recipe.task]
        if not hasattr(transformers, spec.class_name):
            close = difflib.get_close_matches(spec.class_name, dir(transformers), n=3)
            raise RecipeError(f"model.class {spec.class_name!r} is not a transformers class; close names: {close}")
        if not is_model_class(spec.class_name):
            raise RecipeError(f"model.class {spec.class_name} is not a model class (a *PreTrainedModel or AutoModel*)")
        if not spec.class_name.endswith(suffixes) and not spec.class_name.startswith("Auto"):
            raise RecipeError(f"model.class {spec.class_name} does not fit task {recipe.task}: use a *{suffixes[0]} class")
    if recipe.task != "image_classification" and spec.tokenizer is None and spec.path is None:
        raise RecipeError(
            "model.tokenizer is needed when the model is built from model.config: a tokenizer directory, "
            f"a registered model, or one of {registry.tokenizer_names()}"
        )
    tok = spec.tokenizer
    if tok is not None and not (registry.is_tokenizer(tok) or registry.is_model(tok) or Path(tok).is_dir()):
        raise RecipeError(
            f"model.tokenizer {tok!r} is not a directory, a registered model or a builtin tokenizer "
            f"({', '.join(registry.tokenizer_names())})"
        )


def _check_model_config(config: dict[str, Any]) -> None:
    """Build the transformers config (no weights), so a wrong model_type or field fails here."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "model_type" not in config:
        raise RecipeError("model.config needs a model_type (e.g. llama, bert, vit) to pick the config class")
    model_type = config["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise RecipeError(f"model.config.model_type {model_type!r} is not a transformers model type{hint}")
    try:
        transformers.AutoConfig.for_model(**config)
    except (TypeError, ValueError, StrictDataclassError) as exc:  # transformers checks field types
        raise RecipeError(f"model.config: {' '.join(str(exc).split())}") from None


def is_model_class(name: str) -> bool:
    """Whether ``transformers.<name>`` is a model class (not a config, tokenizer or other class)."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    cls = getattr(transformers, name, None)
    return isinstance(cls, type) and issubclass(cls, (transformers.PreTrainedModel, _BaseAutoModelClass))
