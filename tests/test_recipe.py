"""Recipe schema, overrides and data reading: every mistake fails before training, naming the field."""

from __future__ import annotations

import json

import pytest
import yaml

from repeft import registry
from repeft.dataio import collator, label_names
from repeft.datasource import read_rows
from repeft.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict


def base_recipe(tmp_path) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"example {i}", "label": i % 2}) + "\n" for i in range(8)))
    return {
        "task": "sequence_classification",
        "model": {"config": {"model_type": "bert", "vocab_size": 260}, "tokenizer": "bytes"},
        "data": {"train": str(train)},
        "adapter": {"method": "lora", "r": 4},
        "output": {"dir": str(tmp_path / "out")},
    }


def error_for(tmp_path, **changes) -> str:
    raw = base_recipe(tmp_path)
    for key, value in changes.items():
        raw = apply_overrides(raw, [f"{key.replace('__', '.')}={value}"])
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    return str(info.value)


def test_defaults_fill_in_and_round_trip(tmp_path):
    recipe = recipe_from_dict(base_recipe(tmp_path))
    assert recipe.train.batch_size == 8 and recipe.schedule.name == "linear" and recipe.metric == "accuracy"
    assert recipe.adapter.r == 4 and recipe.adapter.method == "lora"
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_yaml_file_overrides_and_shorthand(tmp_path):
    raw = base_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path, ["optim.lr=1e-4", "adapter.target_modules=[query,value]", "train.max_steps=3"])
    # YAML 1.1 reads 1e-4 as a string; the schema turns it into a float.
    assert recipe.optim.lr == 1e-4
    assert recipe.adapter.target_modules == ["query", "value"]
    assert recipe.train.max_steps == 3
    assert apply_overrides({"model": "minilm"}, [])["model"] == {"path": "minilm"}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"task": "translation"}, "task must be one of causal_lm, sequence_classification, image_classification"),
        ({"train__batchsize": 4}, "unknown field train.batchsize (did you mean 'batch_size'?)"),
        ({"train__batch_size": 0}, "train.batch_size must be >= 1, got 0"),
        ({"train__batch_size": "big"}, "train.batch_size must be an integer"),
        ({"train__mixed_precision": "fp8"}, "train.mixed_precision must be one of auto, no, fp16, bf16"),
        ({"schedule__name": "cosin"}, "schedule.name must be one of linear, cosine"),
        ({"optim__lr": "fast"}, "optim.lr must be a number"),
        ({"eval__before": "yes please"}, "eval.before must be true or false"),
        ({"adapter__rank": 4}, "adapter: unknown field(s) ['rank'] for LoRAConfig; allowed fields:"),
        ({"adapter__method": "dora"}, "adapter: unknown adapter method 'dora'; known methods:"),
        ({"adapter__r": -1}, "adapter: r must be a positive integer"),
        ({"data__train": "missing.jsonl"}, "data.train: file missing.jsonl does not exist"),
        ({"data__train": "train.txt"}, "data.train 'train.txt': use a file ending in .jsonl, .json, .csv, .parquet, .arrow, a folder written by datasets' save_to_disk"),
        ({"data__train": "builtin:imdb"}, "data.train: unknown builtin dataset 'imdb'; builtin datasets:"),
        ({"data__train": "builtin:sms_spam:dev"}, "builtin:sms_spam has splits ['train', 'test'], not 'dev'"),
        ({"data__train": "builtin:digits"}, "data.train is a image dataset but task sequence_classification needs text"),
        ({"model__config": "null", "model__path": "no/such/dir"}, "model.path 'no/such/dir' is neither a directory nor a registered model"),
        ({"model__class": "BertForMaskedLM"}, "does not fit task sequence_classification"),
        ({"model__class": "BertForSequenceClasification"}, "is not a transformers class; close names"),
        ({"model__tokenizer": "null"}, "model.tokenizer is needed when the model is built from model.config"),
        ({"eval__every": 5}, "eval.every needs data.eval"),
        ({"output__best": "true"}, "output.best needs data.eval"),
        ({"eval__patience": 2, "data__eval": "train.jsonl"}, "eval.patience counts evaluations during training: set eval.every"),
        ({"eval__metric": "f1_maro"}, "eval.metric must be one of auto, accuracy, loss, f1_macro, exact_match"),
        ({"eval__metric": "exact_match"}, "eval.metric: exact_match needs task causal_lm"),
        ({"data__format": "messages"}, "data.format messages and data.packing need task causal_lm"),
        ({"data__truncation": "left"}, "data.truncation must be one of cut, drop, error"),
        ({"output__trackers": "[tensorbord]"}, "output.trackers[0] must be one of all, tensorboard, wandb"),
        ({"model__quantization": "nf4"}, "model.quantization needs model.path"),
        ({"checkpoint__resume": "sometimes"}, "checkpoint.resume must be never, auto or a checkpoint directory"),
        ({"schedule__warmup_ratio": 1.5}, "schedule.warmup_ratio must be below 1"),
        ({"optim__betas": "[0.9]"}, "optim.betas must be two numbers"),
    ],
)
def test_bad_fields_name_the_field_and_the_allowed_values(tmp_path, monkeypatch, changes, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("x")
    assert expected in error_for(tmp_path, **changes)


def test_missing_required_fields(tmp_path):
    raw = base_recipe(tmp_path)
    del raw["adapter"]
    with pytest.raises(RecipeError, match="missing required field adapter"):
        recipe_from_dict(raw)
    raw = base_recipe(tmp_path)
    del raw["output"]["dir"]
    with pytest.raises(RecipeError, match="missing required field output.dir"):
        recipe_from_dict(raw)


def test_override_syntax_errors():
    with pytest.raises(RecipeError, match="must look like section.field=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(RecipeError, match="train.epochs is a value, not a section"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=2"])


def test_files_of_every_format_give_the_same_rows(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "free prize, call now", "label": "spam"}, {"text": "see you at 6", "label": "ham"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text,label\n\"free prize, call now\",spam\nsee you at 6,ham\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert read_rows(str(tmp_path / f"d.{suffix}"), "train") == rows, suffix
    assert read_rows(str(tmp_path / "d.jsonl"), "train", limit=1) == rows[:1]


def test_label_names_from_data_builtin_and_recipe(tmp_path):
    raw = base_recipe(tmp_path)
    recipe = recipe_from_dict(raw)
    assert label_names(recipe, [{"label": 2}, {"label": 0}]) == ["0", "1", "2"]
    assert label_names(recipe, [{"label": "spam"}, {"label": "ham"}]) == ["ham", "spam"]
    assert label_names(recipe, [{"label": "1"}, {"label": "0"}]) == ["0", "1"]  # integer ids read from CSV
    explicit = recipe_from_dict(apply_overrides(raw, ["data.labels=[neg,pos]"]))
    assert label_names(explicit, [{"label": "pos"}]) == ["neg", "pos"]
    builtin = recipe_from_dict(apply_overrides(raw, ["data.train=builtin:sms_spam"]))
    assert label_names(builtin, []) == ["ham", "spam"]


def test_builtin_registry_hooks():
    assert "minilm" in registry.model_names() and "bytes" in registry.tokenizer_names()
    assert {"sms_spam", "wordnet_supersenses", "digits", "mnist_5k"} <= set(registry.dataset_names())
    rows = read_rows("builtin:sms_spam:test", "train", limit=3)
    assert len(rows) == 3 and set(rows[0]) == {"text", "label"}
    wordnet = registry.dataset("wordnet_supersenses")
    assert wordnet.kind == "text" and len(wordnet.labels) == 40 and wordnet.labels[1] == "noun.animal"
    assert len(read_rows("builtin:wordnet_supersenses", "test")) == 2292
    images = read_rows("builtin:digits", "train", limit=2)
    assert images[0]["pixel_values"].shape == (1, 8, 8)
    assert registry.resolve_model("some/local/dir") == "some/local/dir"


def test_collator_pads_right_and_masks_labels():
    import torch

    examples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])},
                {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    batch = collator("causal_lm", pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
