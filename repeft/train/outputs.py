"""What a run writes: its directory and metrics log, the adapter and exports at the end, and the summary.

Under FSDP2 (see ``fsdp.py``) outputs stay adapter-only: the adapter is
gathered and written by the main process, and the exports merge into the base
as training built it, loaded on the main process's CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from .. import fsdp
from ..files import write_text_atomic
from ..export import export_merged
from ..model import AdapterModel, load_adapter
from ..peft_interop import export_peft
from ..recipe import Recipe
from .build import base_model
from .evaluation import evaluate_run

if TYPE_CHECKING:
    from .run import Run


@dataclass
class TrainResult:
    """What a finished run produced (the same object on every process)."""

    output_dir: str
    adapter_dir: str
    merged_dir: str | None
    peft_dir: str | None
    metrics_path: str
    steps: int
    trainable_params: int
    total_params: int
    wall_time_s: float
    metric: str
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    best: dict[str, Any] | None = None
    resumed_from: str | None = None
    best_dir: str | None = None
    stopped_early: bool = False
    data_notes: list[str] = field(default_factory=list)


class MetricsLog:
    """JSON lines, one per log step or eval, written by the main process only."""

    def __init__(
        self, path: Path, enabled: bool, keep_until: int | None, trackers: Callable[..., None] | None = None
    ) -> None:
        # ``trackers`` (accelerate's ``Accelerator.log``) also gets each record's numbers, as "<type>/<name>".
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _records_until(path, keep_until) if keep_until is not None and path.is_file() else []
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.trackers is not None:
            numbers = {
                f"{record['type']}/{k}": v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if numbers:
                self.trackers(numbers, step=record["step"])
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({**record, "time": time.time()}) + "\n")


def _records_until(path: Path, step: int) -> list[str]:
    """The lines of a metrics log written before the checkpoint of ``step`` (a resumed run redoes the later ones).

    At the checkpoint's own step the final evaluation (``"when": "after"``) and its generations came after it:
    a run killed after them redoes them too. Unreadable lines (a kill while appending tears the last one)
    are dropped.
    """
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            if record["step"] < step or record["step"] == step and record.get("when") != "after":
                kept.append(line)
        except (json.JSONDecodeError, TypeError, KeyError, RecursionError):
            continue
    return kept


def open_outputs(run: Run) -> None:
    """Create the run directory with its recipe, start the trackers, and open the metrics log (``run.log``).

    A resumed run keeps the log's records up to the step it resumed at.
    """
    accelerator, recipe = run.accelerator, run.recipe
    if accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.run_dir / "recipe.yaml", recipe.to_yaml())
    if recipe.output.trackers:
        accelerator.init_trackers(run.run_dir.name, config=_flat(recipe.to_dict()))
    run.log = MetricsLog(
        run.run_dir / "metrics.jsonl",
        accelerator.is_main_process,
        keep_until=run.state.step if run.resumed_from else None,
        trackers=accelerator.log if recipe.output.trackers else None,
    )


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as ``{"section.field": value}`` of the scalar types trackers store (others as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def finish(run: Run, started: float) -> TrainResult:
    """Evaluate after training, write the adapter, exports and summary; return what was produced."""
    accelerator, recipe = run.accelerator, run.recipe
    eval_after = evaluate_run(run, "after") if run.eval_loader is not None else None
    adapter_dir, merged_dir, peft_dir = _write_outputs(recipe, accelerator, run.model, run.tokenizer, run.run_dir)
    best_dir = None
    if recipe.output.best and run.best_adapter is not None:
        # The last adapter is written; the model now takes the best one's tensors for its outputs.
        run.model.load_adapter_tensors(run.model.active_adapter, run.best_adapter, source="the best evaluation")
        best_dir = str(run.run_dir / "best")
        _write_outputs(recipe, accelerator, run.model, run.tokenizer, Path(best_dir))
    result = TrainResult(
        output_dir=str(run.run_dir),
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        peft_dir=peft_dir,
        metrics_path=str(run.log.path),
        steps=run.state.step,
        trainable_params=run.trainable,
        total_params=run.total,
        wall_time_s=time.perf_counter() - started,
        metric=recipe.metric,
        eval_before=run.state.eval_before,
        eval_after=eval_after,
        best=run.state.best,
        resumed_from=str(run.resumed_from) if run.resumed_from else None,
        best_dir=best_dir,
        stopped_early=run.stopped_early,
        data_notes=run.notes,
    )
    if accelerator.is_main_process:
        write_text_atomic(run.run_dir / "summary.json", json.dumps(asdict(result), indent=2) + "\n")
        print(format_summary(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _write_outputs(
    recipe: Recipe, accelerator: Accelerator, model: AdapterModel, tokenizer: Any, run_dir: Path
) -> tuple[str, str | None, str | None]:
    """Write the adapter and the exports the recipe asks for; return their directories."""
    adapter_dir = run_dir / "adapter"
    merged_dir = run_dir / "merged" if recipe.output.merged else None
    peft_dir = run_dir / "peft" if recipe.output.peft else None
    accelerator.wait_for_everyone()
    model.save_adapter(adapter_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process and (peft_dir or merged_dir):
        if fsdp.is_sharded_model(model):
            # The sharded base is never gathered whole: the exports merge into the base as
            # training built it (its weights are frozen), loaded on this process's CPU.
            model = load_adapter(base_model(recipe, recipe.data.labels or [], tokenizer), adapter_dir)
        if peft_dir is not None:
            export_peft(model, peft_dir)
        if merged_dir is not None:
            if recipe.model.quantization != "none":
                export_merged(model, merged_dir)  # dequantized, merged in fp32: merging into 4/8-bit is refused
            else:
                model.save_merged(merged_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(merged_dir)
    accelerator.wait_for_everyone()
    return str(adapter_dir), merged_dir and str(merged_dir), peft_dir and str(peft_dir)


def format_summary(result: TrainResult) -> str:
    """The lines printed at the end of a run."""
    minutes, seconds = divmod(result.wall_time_s, 60)
    share = 100 * result.trainable_params / result.total_params
    lines = [
        f"done: {result.steps} steps in {int(minutes)}m{seconds:04.1f}s; "
        + f"trainable params {result.trainable_params:,} of {result.total_params:,} ({share:.3f}%)"
    ]
    if result.eval_after is not None:
        before = f"{result.eval_before[result.metric]:.4f} before -> " if result.eval_before else ""
        best = f" (best {result.best['value']:.4f} at step {result.best['step']})" if result.best else ""
        lines.append(f"eval {result.metric}: {before}{result.eval_after[result.metric]:.4f} after{best}")
    if result.stopped_early:
        lines.append(f"stopped early at step {result.steps} (eval.patience)")
    lines.append(f"adapter: {result.adapter_dir}")
    if result.merged_dir:
        lines.append(f"merged:  {result.merged_dir}")
    if result.peft_dir:
        lines.append(f"peft:    {result.peft_dir}")
    if result.best_dir:
        lines.append(f"best:    {result.best_dir} (step {result.best['step']})")
    lines.append(f"metrics: {result.metrics_path}")
    return "\n".join(lines)
