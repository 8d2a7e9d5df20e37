"""Evaluation: metrics over ``data.eval`` on every process, generated answers, and the best result so far.

:func:`evaluate` is the metric computation; :func:`evaluate_run` is the run's
evaluation before, during and after training: it logs the metrics and the
generations, keeps the best result (and its adapter, with ``output.best``) and
stops the run early after ``eval.patience`` evaluations without gain.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from .. import fsdp, instruct
from ..metrics import classification_scores, improves

if TYPE_CHECKING:
    from .run import Run


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    task: str,
    accelerator: Accelerator,
    class_names: list[str] | None = None,
) -> dict[str, float]:
    """Mean loss, plus perplexity (causal LM) or accuracy, precision, recall and F1 (classification), over all processes.

    ``class_names`` names the classes in per-class metrics (``f1/<name>``); default: their ids.
    """
    was_training = model.training
    model.eval()
    losses, counts, predictions, targets = [], [], [], []
    for batch in loader:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        if task == "causal_lm":
            targets = labels[:, 1:]
            per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
            loss, count = per_token.sum(1), (targets != -100).sum(1)
            loss, count = accelerator.gather_for_metrics((loss, count))
            counts.append(count)
        else:
            loss = F.cross_entropy(logits, labels, reduction="none")
            loss, prediction, target = accelerator.gather_for_metrics((loss, logits.argmax(-1), labels))
            predictions.append(prediction)
            targets.append(target)
        losses.append(loss)
    model.train(was_training)
    total_loss = torch.cat(losses).sum().item()
    if task == "causal_lm":
        tokens = torch.cat(counts).sum().item()
        return {"loss": total_loss / tokens, "perplexity": math.exp(min(total_loss / tokens, 50.0))}
    targets = torch.cat(targets)
    names = class_names or [str(i) for i in range(logits.shape[-1])]
    return {"loss": total_loss / len(targets), **classification_scores(torch.cat(predictions), targets, names)}


def format_eval(when: str, step: int, metrics: dict[str, float]) -> str:
    """The printed eval line: overall metrics, then per-class F1 (the rest of the per-class metrics are in the log)."""
    overall = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
    per_class = ", ".join(f"{k.removeprefix('f1/')} {v:.4f}" for k, v in metrics.items() if k.startswith("f1/"))
    return f"eval ({when}, step {step}): {overall}" + (f"; f1 per class: {per_class}" if per_class else "")


def evaluate_run(run: Run, when: str) -> dict[str, float]:
    """Evaluate on ``data.eval``, log it, and track the best result (``when``: before, during, after)."""
    recipe, state = run.recipe, run.state
    metrics = evaluate(run.ddp_model, run.eval_loader, recipe.task, run.accelerator, run.labels)
    metrics.update(_generate(run, when))
    run.log.write({"type": "eval", "step": state.step, "when": when, **metrics})
    run.say(format_eval(when, state.step, metrics))
    if when != "before":
        _track_best(run, metrics[recipe.metric], when)
    return metrics


def _track_best(run: Run, value: float, when: str) -> None:
    """Keep the best result (and its adapter, with output.best); stop early after eval.patience evals without gain."""
    recipe, state, metric = run.recipe, run.state, run.recipe.metric
    best = state.best["value"] if state.best is not None else None
    if improves(value, best, metric, recipe.eval.min_delta):
        state.evals_without_improvement = 0
    elif when == "during":
        state.evals_without_improvement += 1
    if improves(value, best, metric):
        state.best = {"metric": metric, "value": value, "step": state.step}
        if recipe.output.best:  # every process keeps the whole adapter (gathered when sharded)
            run.best_adapter = {
                k: fsdp.gathered(v).detach().to("cpu", copy=True) for k, v in run.model.adapter_state_dict().items()
            }
    patience = recipe.eval.patience
    if when == "during" and patience and state.evals_without_improvement >= patience:
        run.stopped_early = True
        run.say(
            f"early stop at step {state.step}: eval {metric} has not improved by more than {recipe.eval.min_delta} "
            f"in {patience} evaluation(s); best {state.best['value']:.4f} at step {state.best['step']}"
        )


def _generate(run: Run, when: str) -> dict[str, float]:
    """Greedy answers to eval prompts: the first ``eval.generate`` logged, exact match over all if asked."""
    spec, accelerator, tokenizer = run.recipe.eval, run.accelerator, run.tokenizer
    if not run.answers:
        return {}
    prompts = run.answers if spec.exact_match else run.answers[: spec.generate]
    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    inputs = [prompts[i][0] for i in mine]
    if run.sharded:
        # Each forward pass gathers weights from every process, so all must decode as many prompts
        # (the first one fills in; its answer is dropped below), each for as many steps (synced).
        inputs += [prompts[0][0]] * (math.ceil(len(prompts) / accelerator.num_processes) - len(mine))
    with accelerator.autocast():
        texts = instruct.generate_answers(
            run.model, tokenizer, inputs, spec.max_new_tokens, spec.batch_size, synced=run.sharded
        )
    answers = [text for _, text in sorted(gather_object(list(zip(mine, texts))))]
    for (prompt, expected), answer in list(zip(prompts, answers))[: spec.generate]:
        prompt_text = tokenizer.decode(prompt)
        record = {"type": "generation", "step": run.state.step, "when": when, "prompt": prompt_text,
                  "expected": expected, "answer": answer}
        run.log.write(record)
        run.say(f"generation (step {run.state.step}): {prompt_tail(prompt_text)} -> {answer!r} (expected {expected!r})")
    if not spec.exact_match:
        return {}
    return {"exact_match": instruct.exact_match(answers, [expected for _, expected in prompts])}


def prompt_tail(text: str, width: int = 80) -> str:
    """The end of a prompt for one log line: line breaks shown as ``⏎``, cut at a word with ``…`` if longer than ``width``.

    The end is where a prompt's question and its generation prompt are; a cut in mid-word or raw ``\\n``
    escapes made the old log hard to read.

    >>> prompt_tail("<|user|>\\nIs this spam?\\nWIN a free prize now\\n<|assistant|>\\n", width=46)
    '… spam? ⏎ WIN a free prize now ⏎ <|assistant|>'
    """
    flat = " ⏎ ".join(" ".join(line.split()) for line in text.strip().split("\n"))
    if len(flat) <= width:
        return flat
    tail = flat[-width:]
    return "… " + (tail.split(" ", 1)[1] if " " in tail else tail)
