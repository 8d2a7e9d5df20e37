"""The data of a run, one way: read and validate the rows, encode them (both before any model loads), batch them.

Each stage is one call into the data modules, in order: ``datasource.read_rows``;
``dataio.label_names`` and ``dataio.check_rows``; ``dataio.build_examples``
(and ``dataio.pack_examples``); ``dataio.collator`` in the loaders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from .. import instruct
from ..dataio import (
    Example,
    build_examples,
    check_rows,
    collator,
    data_format,
    encode_answer_prompts,
    label_names,
    pack_examples,
)
from ..datasource import read_rows
from ..memory_data import PASSED_NAMES, check_data_given, check_same_class_names, passed_rows, rows_sha256
from ..model import AdapterModel
from ..recipe import Recipe, RecipeError, check_eval_data_given
from .build import model_config
from .resume import record_made_from


@dataclass
class RunData:
    """The rows a run trains and evaluates on, the class names (empty for causal LM), and what the run is made
    from (``resume.record_made_from``: recorded in each checkpoint, compared on resume)."""

    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    labels: list[str]
    made_from: dict[str, Any]


@dataclass
class RunExamples:
    """The tokenized (or image) examples, built and checked before the model loads; what truncation and packing did."""

    train: list[Example]
    eval: list[Example] | None
    notes: list[str]
    answers: list[tuple[list[int], str]]  # (prompt, expected answer) per eval example, when evaluation generates


def read_data(recipe: Recipe, train_data: Any = None, eval_data: Any = None) -> tuple[Recipe, RunData]:
    """Read and check the rows, before any model loads; return the recipe with its label names filled in.

    ``train_data``/``eval_data``: rows passed from Python (``memory_data``) in place of data.train/data.eval.
    """
    check_data_given(recipe, train_data, eval_data)
    if train_data is None:
        names = ("data.train", "data.eval")
        train_rows = read_rows(recipe.data.train, "train", recipe.data.train_limit)
        eval_rows = read_rows(recipe.data.eval, "test", recipe.data.eval_limit) if recipe.data.eval else None
    else:
        names = PASSED_NAMES
        recipe, train_rows, eval_rows = _passed_data(recipe, train_data, eval_data)
    labels = label_names(recipe, train_rows, names[0]) if recipe.task != "causal_lm" else []
    check_rows(recipe, train_rows, names[0], labels)
    if eval_rows is not None:
        check_rows(recipe, eval_rows, names[1], labels)
    passed_sha256 = {}
    if train_data is not None:  # rows passed from Python have no file to digest: checkpoints record the rows'
        passed_sha256 = {name: rows_sha256(rows) for name, rows in zip(names, (train_rows, eval_rows)) if rows}
    # The run directory records the label order, so exports can rebuild the same head.
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, labels=labels or None))
    return recipe, RunData(train_rows, eval_rows, labels, record_made_from(recipe, passed_sha256))


def _passed_data(
    recipe: Recipe, train_data: Any, eval_data: Any
) -> tuple[Recipe, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The rows passed from Python, and the recipe with the class names of a ``ClassLabel`` label column (as for a
    ``datasets`` folder; ``data.labels`` set in the recipe wins)."""
    spec = recipe.data
    train_rows, class_names = passed_rows(train_data, "train_data", spec.label_column, spec.train_limit)
    eval_rows = None
    if eval_data is not None:
        eval_rows, eval_names = passed_rows(eval_data, "eval_data", spec.label_column, spec.eval_limit)
        check_same_class_names(class_names, eval_names, spec.label_column)
    check_eval_data_given(recipe, eval_rows is not None, "eval_data")
    if class_names and not spec.labels and recipe.task != "causal_lm":
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(spec, labels=class_names))
    return recipe, train_rows, eval_rows


def build_run_examples(recipe: Recipe, data: RunData, tokenizer: Any, processes: int) -> RunExamples:
    """Tokenize (or convert) the rows, truncate and pack them, and check there are enough, before the model loads."""
    notes: list[str] = []
    config = model_config(recipe, data.labels)
    train = build_examples(recipe, data.train_rows, "data.train", tokenizer, data.labels, config, notes)
    evaluation = (
        build_examples(recipe, data.eval_rows, "data.eval", tokenizer, data.labels, config, notes)
        if data.eval_rows
        else None
    )
    if recipe.data.packing:
        train = pack_examples(recipe, train, notes)
    # The train loader drops the last incomplete global batch, so it must hold one whole.
    global_batch = recipe.train.batch_size * processes
    if len(train) < global_batch:
        rows = "packed rows" if recipe.data.packing else "examples"
        raise RecipeError(
            f"data.train has {len(train)} {rows}, fewer than one global batch "
            f"(train.batch_size {recipe.train.batch_size} x {processes} processes = {global_batch})"
        )
    return RunExamples(train, evaluation, notes, _answer_prompts(recipe, tokenizer, data))


def make_loaders(
    recipe: Recipe, model: AdapterModel, tokenizer: Any, examples: RunExamples
) -> tuple[DataLoader, DataLoader | None]:
    """The examples in a shuffled train loader and an eval loader (None without eval data).

    Packed rows are first checked on the model: it must keep packed examples apart.
    """
    if recipe.data.packing:
        instruct.check_packing(model, examples.train)
    eval_examples = examples.eval
    if tokenizer is not None and eval_examples:
        # Order does not change the metrics; batches of similar length waste less compute on padding.
        eval_examples.sort(key=lambda e: len(e["input_ids"]))
    collate = collator(recipe.task, tokenizer.pad_token_id if tokenizer is not None else 0)
    train_loader = DataLoader(
        examples.train, batch_size=recipe.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate
    )
    eval_loader = (
        DataLoader(eval_examples, batch_size=recipe.eval.batch_size, collate_fn=collate) if eval_examples else None
    )
    return train_loader, eval_loader


def _answer_prompts(recipe: Recipe, tokenizer: Any, data: RunData) -> list[tuple[list[int], str]]:
    """(prompt, expected answer) of each eval example, when evaluation generates answers."""
    if not (recipe.eval.generate or recipe.eval.exact_match):
        return []
    if not data.eval_rows or data_format(recipe, data.eval_rows) == "text":
        raise RecipeError(
            "eval.generate / eval.exact_match need prompt/response or messages eval data (data.format), "
            "so that each eval example has a prompt and an answer"
        )
    return encode_answer_prompts(recipe, data.eval_rows, tokenizer)
