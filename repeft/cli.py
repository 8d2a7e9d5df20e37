"""The ``repeft`` command: ``train``, ``export`` and ``info``.

    repeft train recipes/quickstart.yaml train.max_steps=50
    accelerate launch --num_processes 2 -m repeft train recipes/quickstart.yaml
    repeft export runs/quickstart --format merged --out runs/quickstart-merged
    repeft info runs/quickstart

Each command imports what it needs when it runs (``info`` needs no accelerate,
``--dry-run`` no model code).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__

EXAMPLES_TRAIN = """examples:
  repeft train recipes/quickstart.yaml
  repeft train recipes/quickstart.yaml train.max_steps=20 adapter.r=4 output.dir=runs/try
  repeft train recipes/quickstart.yaml --resume
  accelerate launch --num_processes 2 -m repeft train recipes/quickstart.yaml   # 2 GPUs
  accelerate launch --multi_gpu --num_processes 2 -m repeft train recipes/quickstart.yaml  # no GPU: 2 CPU processes
"""
EXAMPLES_INFO = """examples:
  repeft info runs/quickstart
  repeft info --kernels --shape 4096 4096 16 8192            # check one LoRA layer shape (bf16 inference)
  REPEFT_KERNEL_CACHE=kernels.json repeft info --kernels      # decisions saved by earlier runs
"""
EXAMPLES_EXPORT = """examples:
  repeft export runs/quickstart --out runs/quickstart-merged              # merged transformers model
  repeft export runs/quickstart --format peft --out runs/quickstart-peft  # PEFT LoRA adapter
  repeft export runs/quickstart/checkpoints/step-00000100 --out merged-100
  repeft export out/adapter --base path/to/base-model --out out/merged
Files already in --out are kept, except those the export writes (and, for merged,
the weight files of an earlier merged export). --out may not be PATH, lie inside it,
or be the base model's directory.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``repeft`` script and of ``python -m repeft``."""
    parser = _parser()
    # Overrides may come after options (`train r.yaml --resume a.b=1`), which plain
    # argparse does not gather into one positional list.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    from .checkpoint import CheckpointError
    from .files import AdapterFileError
    from .kernels import KernelError
    from .recipe import RecipeError
    from .targeting import TargetError

    try:
        return args.run(args)
    except (RecipeError, AdapterFileError, TargetError, CheckpointError, KernelError, FileNotFoundError) as exc:
        print(f"repeft {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repeft", description="Train, export and inspect repeft adapters.", epilog="`repeft COMMAND --help` for more."
    )
    parser.add_argument("--version", action="version", version=f"repeft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train an adapter from a YAML recipe (1 process, or N under `accelerate launch`)",
        description="Train an adapter from a YAML recipe. The same command runs on N processes under "
        "`accelerate launch [--num_processes N] -m repeft train ...`. Recipe reference: docs/training.md.",
        epilog=EXAMPLES_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("recipe", help="the recipe YAML file")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe fields to change, e.g. optim.lr=1e-4")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output.dir (checkpoint.resume=auto)"
    )
    train.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory")
    train.add_argument("--dry-run", action="store_true", help="check the recipe, print it with all defaults, and stop")
    train.set_defaults(run=_train)

    export = commands.add_parser(
        "export",
        help="write a merged model or a PEFT adapter from a run, checkpoint or adapter directory",
        description="Export a trained adapter. PATH is a run directory (output.dir of `repeft train`), one of its "
        "checkpoints, or an adapter directory (then --base names the base model).",
        epilog=EXAMPLES_EXPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("path", help="run, checkpoint or adapter directory")
    export.add_argument("--out", required=True, help="directory to write the export's files into (not inside PATH)")
    export.add_argument(
        "--format",
        choices=("merged", "peft"),
        default="merged",
        help="merged: a plain transformers model in safetensors (default); peft: a PEFT LoRA adapter",
    )
    export.add_argument("--base", help="base model directory or registered name (for a bare adapter directory)")
    export.add_argument(
        "--model-class",
        help="transformers class to load --base with (default: the one the adapter was trained on, as recorded in it)",
    )
    export.set_defaults(run=_export)

    info = commands.add_parser(
        "info",
        help="describe an adapter, PEFT adapter, run or checkpoint directory, or the kernel choices",
        description="Describe an adapter directory (repeft or PEFT format), a training run, or a checkpoint. "
        "With --kernels: which LoRA kernel backend=auto uses, and why (docs/kernels.md).",
        epilog=EXAMPLES_INFO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("path", nargs="?", help="adapter, run or checkpoint directory")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--kernels", action="store_true", help="report backend=auto's kernel decisions")
    info.add_argument(
        "--shape", nargs=4, type=int, metavar=("IN", "OUT", "RANK", "TOKENS"),
        help="with --kernels: check this LoRA layer shape now (on the GPU if there is one)",
    )
    info.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16",
                      help="with --shape (default bfloat16)")
    info.add_argument("--train", action="store_true", help="with --shape: check forward+backward, not inference")
    info.set_defaults(run=_info)
    return parser


# -- train -------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from .memory_data import check_data_given
    from .recipe import RecipeError, load_recipe

    overrides = list(args.overrides)
    if args.resume and args.resume_from:
        raise RecipeError("use --resume or --resume-from, not both")
    if args.resume:
        overrides.append("checkpoint.resume=auto")
    if args.resume_from:
        overrides.append(f"checkpoint.resume={args.resume_from}")
    recipe = load_recipe(args.recipe, overrides)
    check_data_given(recipe)  # a recipe may leave data.train out only for data passed from Python
    if args.dry_run:
        print(recipe.to_yaml(), end="")
        return 0
    from .train import LaunchError, TrainingDiverged, train

    try:
        train(recipe)
    except LaunchError as exc:
        print(f"repeft train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # not a mistake in the input: exit 1, as for a failed run
        print(f"repeft train: error: {exc}", file=sys.stderr)
        return 1
    return 0


# -- export ------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from .files import AdapterFileError
    from .export_guards import refuse_overwriting_base
    from .model import load_adapter

    path = Path(args.path)
    out = Path(args.out)
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        raise AdapterFileError(f"--out {out} is {path} or inside it; export to a directory outside {path}")
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"--out {out} is a file; give a directory to write the export into")
    run_dir, adapter_dir = _locate(path)
    tokenizer = None
    if run_dir is not None:
        from . import registry
        from .recipe import load_recipe
        from .train import build_model, load_tokenizer

        recipe = load_recipe(run_dir / "recipe.yaml", ["checkpoint.resume=never"], check_data=False)
        if recipe.model.path:
            refuse_overwriting_base(registry.resolve_model(recipe.model.path), out)
        base = build_model(recipe, recipe.data.labels or [])
        if recipe.task != "image_classification":
            tokenizer = load_tokenizer(recipe)
    else:
        base_path = _recorded_base_path(adapter_dir, args.base)
        refuse_overwriting_base(base_path, out)
        base, tokenizer = _load_recorded_base(adapter_dir, base_path, args.model_class)
    model = load_adapter(base, adapter_dir)
    if args.format == "peft":
        from .peft_interop import export_peft

        export_peft(model, args.out)
    else:
        model.save_merged(args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
    print(f"wrote {args.format} export of {adapter_dir} to {args.out}")
    return 0


def _recorded_base(adapter_dir: Path) -> dict[str, Any]:
    """What a bare adapter directory's config records of its base model (PEFT's: only where it came from)."""
    from .files import CONFIG_NAME, check_meta, read_json

    meta = read_json(adapter_dir / CONFIG_NAME)
    check_meta(meta, adapter_dir / CONFIG_NAME)
    return meta.get("base_model", {"name_or_path": meta.get("base_model_name_or_path")})


def _recorded_base_path(adapter_dir: Path, base_path: str | None) -> str:
    """The base model directory (or hub name) to load a bare adapter onto: --base, else the one it records."""
    from . import registry

    base_path = base_path or _recorded_base(adapter_dir).get("name_or_path")
    if not base_path:
        raise FileNotFoundError(f"{adapter_dir} does not record a loadable base model; pass --base")
    return registry.resolve_model(base_path)


def _load_recorded_base(adapter_dir: Path, base_path: str, class_name: str | None) -> tuple[Any, Any]:
    """(base model, tokenizer or None) for a bare adapter directory: the class and label names it records."""
    import transformers
    from safetensors import SafetensorError

    from .recipe import is_model_class

    recorded = _recorded_base(adapter_dir)
    try:
        class_name = (
            class_name
            or recorded.get("class")
            or (transformers.AutoConfig.from_pretrained(base_path).architectures or [None])[0]
        )
    except OSError as exc:
        raise _unloadable(base_path, exc) from None
    if class_name is None or not hasattr(transformers, class_name):
        raise FileNotFoundError(f"cannot tell which transformers class loads {base_path}; pass --model-class")
    if not is_model_class(class_name):
        raise FileNotFoundError(f"{class_name} is not a transformers model class; pass --model-class")
    labels = {}
    if recorded.get("id2label"):
        id2label = {int(i): name for i, name in recorded["id2label"].items()}
        # As training built it: the head sized for these labels, whatever head the base checkpoint has.
        labels = {
            "id2label": id2label,
            "label2id": {name: i for i, name in id2label.items()},
            "num_labels": len(id2label),
            "ignore_mismatched_sizes": True,
        }
    try:
        base = getattr(transformers, class_name).from_pretrained(base_path, **labels)
    except (OSError, SafetensorError) as exc:  # missing, or truncated, weights
        raise _unloadable(base_path, exc) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError):
        tokenizer = None  # a base without a tokenizer (e.g. a vision model) exports without one
    return base, tokenizer


def _unloadable(base_path: str, exc: Exception) -> FileNotFoundError:
    return FileNotFoundError(f"cannot load the base model {base_path} ({exc}); pass --base with its directory")


def _locate(path: Path) -> tuple[Path | None, Path]:
    """(run directory or None, adapter directory) for a run, checkpoint or adapter path."""
    if (path / "recipe.yaml").is_file():
        return path, path / "adapter"
    if (path / "trainer_state.json").is_file():  # <run>/checkpoints/step-N
        run_dir = path.parent.parent
        return (run_dir if (run_dir / "recipe.yaml").is_file() else None), path / "adapter"
    if (path / "adapter_config.json").is_file():
        return None, path
    raise FileNotFoundError(f"{path} is not a run, checkpoint or adapter directory")


# -- info --------------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    if args.kernels:
        return _info_kernels(args)
    if args.path is None:
        raise SystemExit("repeft info: give an adapter, run or checkpoint directory, or --kernels")
    path = Path(args.path)
    info = describe(path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_as_text(info))
    return 0


def _info_kernels(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from . import kernels

    if args.shape:
        d_in, d_out, rank, tokens = args.shape
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, args.dtype)

        def rand(*shape):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(args.train)

        weight = torch.randn(d_out, d_in, device=device, dtype=dtype)
        kernels.resolve_backend("auto", rand(tokens, d_in), weight, None, rand(rank, d_in), rand(d_out, rank))
    decisions = kernels.kernel_report() + kernels.dispatch.saved_decisions()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in decisions], indent=2))
        return 0
    print(f"{kernels.ENV_VAR}={os.environ.get(kernels.ENV_VAR, 'auto')}  "
          f"{kernels.dispatch.CACHE_ENV_VAR}={os.environ.get(kernels.dispatch.CACHE_ENV_VAR, '(none)')}  "
          f"checked on: {', '.join(kernels.dispatch.AUTO_DEVICES)} (auto uses torch on other devices)")
    print(kernels.format_report(decisions))
    return 0


def describe(path: Path) -> dict[str, Any]:
    """What ``repeft info`` reports about a directory, as plain data."""
    from .checkpoint import list_checkpoints, read_state
    from .recipe import RecipeError, load_recipe

    if (path / "recipe.yaml").is_file():
        try:
            recipe = load_recipe(path / "recipe.yaml", check_data=False)
        except RecipeError as exc:
            raise RecipeError(f"{path} looks like a run, but its recipe.yaml is damaged: {exc}") from None
        info: dict[str, Any] = {
            "kind": "run",
            "path": str(path),
            "task": recipe.task,
            "model": recipe.model.path or f"built from config ({(recipe.model.config or {}).get('model_type')})",
            "method": recipe.adapter.method,
            "checkpoints": [p.name for p in list_checkpoints(path)],
        }
        if (path / "summary.json").is_file():
            summary = _read_summary(path / "summary.json")
            info["summary"] = {k: summary[k] for k in ("steps", "wall_time_s", "eval_before", "eval_after", "best")}
            info["outputs"] = {k: summary[k] for k in ("adapter_dir", "merged_dir", "peft_dir", "metrics_path") if summary[k]}
        if (path / "adapter").is_dir():
            info["adapter"] = describe(path / "adapter")
        return info
    if (path / "trainer_state.json").is_file():
        return {"kind": "checkpoint", "path": str(path), "state": read_state(path), "adapter": describe(path / "adapter")}
    return _describe_adapter(path)


SUMMARY_FIELDS = ("steps", "wall_time_s", "eval_before", "eval_after", "best", "adapter_dir", "merged_dir", "peft_dir",
                  "metrics_path")


def _read_summary(path: Path) -> dict[str, Any]:
    """A run's ``summary.json``, with the fields ``info`` shows; ``CheckpointError`` if it is damaged."""
    from .checkpoint import CheckpointError, read_json_file

    summary = read_json_file(path)
    if not isinstance(summary, dict) or not set(SUMMARY_FIELDS) <= set(summary):
        raise CheckpointError(f"{path} is damaged: it lacks the fields of a run summary ({', '.join(SUMMARY_FIELDS)})")
    return summary


def _describe_adapter(path: Path) -> dict[str, Any]:
    from .files import CONFIG_NAME, WEIGHTS_NAME, read_header, read_json, reading

    with reading(path) as files:
        meta = read_json(files[CONFIG_NAME])
        weights = files[WEIGHTS_NAME]
        shapes = {key: shape for key, (shape, _) in read_header(weights).items()}
        size = weights.stat().st_size
    params = sum(math.prod(shape) for shape in shapes.values())
    info = {"path": str(path), "tensors": len(shapes), "parameters": params, "bytes": size}
    if "format" not in meta and "peft_type" in meta:  # PEFT's own; repeft's LoRA saves carry PEFT's fields too
        keys = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "base_model_name_or_path")
        return {"kind": "peft adapter", **{k: meta.get(k) for k in keys}, **info}
    return {
        "kind": "adapter",
        "method": meta.get("method"),
        "config": meta.get("config"),
        "base_model": meta.get("base_model"),
        "adapted_modules": len(meta.get("adapted_modules", [])),
        "repeft_version": meta.get("repeft_version"),
        "format_version": meta.get("format_version"),
        **info,
    }


def _as_text(info: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.append(_as_text(value, indent + "  "))
        elif isinstance(value, list) and len(value) > 8:
            lines.append(f"{indent}{key}: {', '.join(map(str, value[:8]))}, ... ({len(value)} in all)")
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)
