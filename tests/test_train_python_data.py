"""`train(recipe, train_data=..., eval_data=...)`: a `datasets.Dataset` or a list of dicts from Python in place of
the recipe's data files (issue 27 item 4): ClassLabel names, resume safety, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_train import (  # noqa: F401  (the fixture is autouse in this module too)
    adapter_tensors,
    max_diff,
    one_thread_and_fresh_accelerate,
    tiny_recipe,
    train_records,
    write_text_data,
)

from repeft import cli
from repeft.recipe import RecipeError, apply_overrides, recipe_from_dict
from repeft.train import train

datasets = pytest.importorskip("datasets")

SMS = {"sms": ["see you at lunch", "WINNER! free prize", "call me later", "claim your cash now"] * 8,
       "label": [0, 1, 0, 1] * 8}
# Names in an order the data alone cannot give (ids would give "0", "1"; names sorted "ham", "spam").
CLASS_LABEL = datasets.ClassLabel(names=["spam", "ham"])
SHORT = ["train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=2"]


def python_data_recipe(tmp_path: Path, *overrides: str) -> dict:
    """The tiny test recipe without data.train/data.eval: its rows come from Python."""
    raw = tiny_recipe(tmp_path, *SHORT, *overrides)
    del raw["data"]["train"], raw["data"]["eval"]
    return raw


def sms_dataset(rows: dict = SMS) -> datasets.Dataset:
    features = datasets.Features({"sms": datasets.Value("string"), "label": CLASS_LABEL})
    return datasets.Dataset.from_dict(rows, features=features)


def word_rows(tmp_path: Path, n: int, seed: int) -> list[dict]:
    """``n`` rows of the tiny recipe's generated sentiment data, as a list of dicts."""
    path = Path(write_text_data(tmp_path / f"rows-{seed}.jsonl", n, seed))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_dataset_with_a_class_label_trains_and_keeps_its_names(tmp_path):
    recipe = recipe_from_dict(python_data_recipe(tmp_path, "data.text_column=sms", "eval.before=true"))
    dataset = sms_dataset()
    result = train(recipe, train_data=dataset, eval_data=dataset.select(range(8)))

    assert result.steps == 4 and result.eval_before is not None and result.eval_after is not None
    meta = json.loads(Path(result.adapter_dir, "adapter_config.json").read_text())
    assert meta["base_model"]["id2label"] == {"0": "spam", "1": "ham"}  # the ClassLabel's names, in its order
    saved = yaml.safe_load(Path(result.output_dir, "recipe.yaml").read_text())
    assert saved["data"]["labels"] == ["spam", "ham"] and saved["data"]["train"] is None


def test_train_limit_applies_to_a_dataset(tmp_path, capsys):
    recipe = recipe_from_dict(python_data_recipe(tmp_path, "data.text_column=sms", "data.train_limit=16"))
    train(recipe, train_data=sms_dataset())
    assert "16 examples" in capsys.readouterr().out


def test_a_list_of_dicts_trains_and_resumes_only_on_the_same_rows(tmp_path, capsys):
    rows, eval_rows = word_rows(tmp_path, 32, seed=0), word_rows(tmp_path, 8, seed=1)
    train(recipe_from_dict(python_data_recipe(tmp_path)), train_data=rows, eval_data=eval_rows)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["labels"] == ["neg", "pos"]
    uninterrupted, uninterrupted_log = adapter_tensors(run), train_records(run)

    # As if killed after the checkpoint of step 2.
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    resuming = recipe_from_dict(python_data_recipe(tmp_path, "checkpoint.resume=auto"))

    changed = [dict(row, text=row["text"] + " good") for row in rows]
    refused = "cannot resume from .*step-00000002: it was made with other contents of train_data"
    with pytest.raises(RecipeError, match=refused):
        train(resuming, train_data=changed, eval_data=eval_rows)
    with pytest.raises(RecipeError, match="made with other contents of eval_data"):
        train(resuming, train_data=rows, eval_data=eval_rows[:4])

    capsys.readouterr()
    train(resuming, train_data=[dict(row) for row in rows], eval_data=eval_rows)  # equal rows, other objects
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == str(run / "checkpoints" / "step-00000002")
    assert max_diff(adapter_tensors(run), uninterrupted) <= 1e-5
    assert [s for s, _ in train_records(run)] == [s for s, _ in uninterrupted_log] == [1, 2, 3, 4]


REFUSED = {
    "a DatasetDict": (lambda: datasets.DatasetDict({"train": sms_dataset(), "test": sms_dataset()}), None,
                      r"train_data is a DatasetDict with the splits \['test', 'train'\]; pass one split, "
                      r"e.g. train_data=ds\['train'\]"),
    "a DatasetDict for eval": (sms_dataset, lambda: datasets.DatasetDict({"validation": sms_dataset()}),
                               r"eval_data is a DatasetDict .* e.g. eval_data=ds\['validation'\]"),
    "a pandas DataFrame": (lambda: sms_dataset().to_pandas(), None,
                           r"train_data is a pandas.DataFrame; pass datasets.Dataset.from_pandas\(df\) "
                           r"or df.to_dict\('records'\)"),
    "a dict of columns": (lambda: dict(SMS), None, r"train_data is a dict; pass a list of dicts, one per example, "
                          r"or datasets.Dataset.from_dict\(columns\)"),
    "eval classes numbered otherwise": (
        sms_dataset, lambda: sms_dataset().cast_column("label", datasets.ClassLabel(names=["ham", "spam"])),
        r"eval_data's label ClassLabel names \['ham', 'spam'\] differ from train_data's \['spam', 'ham'\].*"
        r"align_labels_with_mapping\(\{'spam': 0, 'ham': 1\}, 'label'\)"),
    "a list of strings": (lambda: SMS["sms"], None, "train_data: item 1 is a str, not a dict"),
    "eval without train": (None, sms_dataset, "eval_data was passed to train.. without train_data"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_wrong_type_is_refused_by_name_with_what_to_pass(tmp_path, case):
    make_train, make_eval, message = REFUSED[case]
    recipe = recipe_from_dict(python_data_recipe(tmp_path, "data.text_column=sms"))
    with pytest.raises(RecipeError, match=message):
        train(recipe, train_data=make_train and make_train(), eval_data=make_eval and make_eval())


def test_data_named_in_the_recipe_and_passed_from_python_is_refused(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path))
    with pytest.raises(RecipeError, match="the recipe names data.train and train_data was passed to train.*: "
                                          "take the data from one place, either drop data.train and data.eval"):
        train(recipe, train_data=sms_dataset())
    eval_only = python_data_recipe(tmp_path)
    eval_only["data"]["eval"] = tiny_recipe(tmp_path)["data"]["eval"]
    with pytest.raises(RecipeError, match="the recipe names data.eval and train_data was passed"):
        train(recipe_from_dict(eval_only), train_data=sms_dataset())


def test_evaluating_without_eval_data_is_refused_before_training(tmp_path):
    recipe = recipe_from_dict(python_data_recipe(tmp_path, "data.text_column=sms", "eval.every=2"))
    with pytest.raises(RecipeError, match="eval.every needs eval_data"):
        train(recipe, train_data=sms_dataset())


def test_a_recipe_without_data_train_is_refused_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(python_data_recipe(tmp_path)))
    assert cli.main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.train is missing: name the training data in the recipe" in err and "train_data=" in err
    with pytest.raises(RecipeError, match="data.train is missing"):
        train(recipe_from_dict(apply_overrides(python_data_recipe(tmp_path), [])))


def test_the_rows_digest_sees_values_beyond_json():
    import datetime

    import numpy as np

    from repeft.memory_data import rows_sha256

    def rows(pixel: float, day: int) -> list[dict]:
        return [{"pixel_values": np.full((2, 2), pixel), "raw": b"\x00\x01", "when": datetime.date(2026, 1, day)}]

    assert rows_sha256(rows(0.5, 1)) == rows_sha256(rows(0.5, 1))
    assert len({rows_sha256(rows(0.5, 1)), rows_sha256(rows(0.25, 1)), rows_sha256(rows(0.5, 2))}) == 3


def test_a_bad_label_in_rows_from_python_names_them_as_passed(tmp_path):
    recipe = recipe_from_dict(python_data_recipe(tmp_path, "data.text_column=sms"))
    rows = [{"sms": "hi", "label": 0}, {"sms": "win", "label": [1]}]
    with pytest.raises(RecipeError, match=r"^train_data: example 2 has label \[1\]; labels are integer ids"):
        train(recipe, train_data=rows)
