"""What `repeft train` refuses (issue 24): overwriting a finished run or its own inputs, resuming another run's
checkpoint, non-string chat fields, YAML aliases, data errors found late, and hostile inputs that used to end
in a traceback instead of one line and exit code 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from repeft import cli, instruct
from repeft.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict
from repeft.train import train
from test_train import (  # noqa: F401  (the fixture applies here too)
    TINY_BERT,
    adapter_tensors,
    max_diff,
    one_thread_and_fresh_accelerate,
    tiny_recipe,
    train_error,
    write_text_data,
)
from test_train_loop import instruct_recipe


def no_model(monkeypatch) -> None:
    monkeypatch.setattr("repeft.train.build.build_model", lambda *a: pytest.fail("the model loaded before the data was checked"))


# -- what a run refuses to overwrite -------------------------------------------------------------------


def test_a_fresh_run_refuses_a_directory_holding_a_finished_run_without_checkpoints(tmp_path):
    raw = tiny_recipe(tmp_path, "train.epochs=1")
    train(recipe_from_dict(raw))
    run = tmp_path / "run"
    finished = {p.name: p.read_bytes() for p in [*run.iterdir(), *(run / "adapter").iterdir()] if p.is_file()}
    with pytest.raises(RecipeError, match=r"already holds a run \(recipe.yaml, metrics.jsonl, summary.json, adapter\)"):
        train(recipe_from_dict(apply_overrides(raw, ["optim.lr=0.1"])))
    with pytest.raises(RecipeError, match=r"already holds a run \(summary.json, adapter\) and no checkpoint"):
        train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto"])))  # --resume finds no checkpoint
    assert {p.name: p.read_bytes() for p in [*run.iterdir(), *(run / "adapter").iterdir()] if p.is_file()} == finished
    # A run killed while writing its first checkpoint left recipe.yaml, metrics.jsonl and a half-written
    # checkpoint: --resume restarts it.
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    (run / "checkpoints" / ".tmp-step-00000004").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"already holds a run \(recipe.yaml, metrics.jsonl, checkpoints\)"):
        train(recipe_from_dict(raw))
    assert train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto"]))).steps == 8


def inputs_in_the_output(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "adapter").mkdir()
    for name in ("metrics.jsonl", "summary.json", "checkpoints/step-00000004/rows.jsonl"):
        shutil.copy(tmp_path / "train.jsonl", run / name)
    (tmp_path / "link.jsonl").symlink_to(run / "metrics.jsonl")
    return {
        "train is the metrics log": ([f"data.train={run / 'metrics.jsonl'}"], "data.train"),
        "eval is the summary": ([f"data.eval={run / 'summary.json'}"], "data.eval"),
        "train in a checkpoint": ([f"data.train={run / 'checkpoints/step-00000004/rows.jsonl'}"], "data.train"),
        "a link to the log": ([f"data.train={tmp_path / 'link.jsonl'}"], "data.train"),
        "tokenizer in adapter/": ([f"model.tokenizer={run / 'adapter'}"], "model.tokenizer"),
    }


@pytest.mark.parametrize("case", ["train is the metrics log", "eval is the summary", "train in a checkpoint",
                                  "a link to the log", "tokenizer in adapter/"])
def test_inputs_the_run_would_overwrite_are_refused(tmp_path, case):
    raw = tiny_recipe(tmp_path)
    overrides, field = inputs_in_the_output(tmp_path)[case]
    with pytest.raises(RecipeError, match=rf"^{re.escape(field)} .* would be overwritten by this run"):
        recipe_from_dict(apply_overrides(raw, overrides))


def test_other_files_inside_the_output_directory_are_accepted_as_inputs(tmp_path):
    raw = tiny_recipe(tmp_path)
    (tmp_path / "run").mkdir()
    own = shutil.copy(tmp_path / "train.jsonl", tmp_path / "run" / "train.jsonl")
    assert recipe_from_dict(apply_overrides(raw, [f"data.train={own}"])).data.train == str(own)


# -- what resume compares -----------------------------------------------------------------------------


def test_resume_refuses_a_checkpoint_made_from_another_recipe_or_other_data(tmp_path):
    raw = tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")
    train(recipe_from_dict(raw))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    other = tmp_path / "other.jsonl"
    write_text_data(other, 64, seed=5)
    # Another run (its own output.dir) continuing this run's checkpoint with another seed, data and rate.
    changed = [f"output.dir={tmp_path / 'run2'}", "train.seed=7", "optim.lr=0.1", f"data.train={other}",
               "model.config.hidden_size=64", f"checkpoint.resume={checkpoint}"]
    with pytest.raises(RecipeError, match=r"step-00000004: it was made with another data.train, model.config.hidden_size, "
                                          r"optim.lr, train.seed \(only checkpoint, output, eval, train.log_every may change\)"):
        train(recipe_from_dict(apply_overrides(raw, changed)))
    # The comparison does not depend on the run's recipe.yaml.
    (tmp_path / "run" / "recipe.yaml").unlink()
    with pytest.raises(RecipeError, match="made with another optim.lr"):
        train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto", "optim.lr=0.1"])))
    # The same data file name with other contents.
    shutil.copy(other, tmp_path / "train.jsonl")
    with pytest.raises(RecipeError, match=r"made with other contents of data.train \("):
        train(recipe_from_dict(apply_overrides(raw, [f"checkpoint.resume={checkpoint}", f"output.dir={tmp_path / 'run3'}"])))


def test_a_checkpoint_without_a_record_is_compared_with_the_runs_recipe(tmp_path):
    # As an older repeft wrote it: trainer_state.json without made_from.
    raw = tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")
    train(recipe_from_dict(raw))
    for state_file in (tmp_path / "run" / "checkpoints").glob("*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        del state["made_from"]
        state_file.write_text(json.dumps(state))
    with pytest.raises(RecipeError, match="the recipe changed in optim.lr"):
        train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto", "optim.lr=0.1"])))


def test_a_kill_after_the_final_evaluation_does_not_log_it_twice(tmp_path):
    raw = tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")
    train(recipe_from_dict(raw))
    run = tmp_path / "run"
    # Killed while writing the outputs: the final evaluation is logged, the adapter and summary are not written.
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto"])))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["when"]) for r in records if r["type"] == "eval"] == [(8, "after")]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 9))


def test_a_run_killed_after_stopping_early_stays_stopped_when_resumed(tmp_path):
    # min_delta 10: no evaluation after the first improves enough, so patience 1 stops the run at step 2.
    raw = tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=1", "checkpoint.keep=8", "eval.every=1",
                      "eval.patience=1", "eval.min_delta=10")
    first = train(recipe_from_dict(raw))
    assert (first.steps, first.stopped_early) == (2, True)
    run = tmp_path / "run"
    stopped = adapter_tensors(run)
    shutil.rmtree(run / "adapter")  # killed while writing its outputs
    (run / "summary.json").unlink()
    resumed = train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto"])))
    assert (resumed.steps, resumed.stopped_early) == (2, True)
    assert max_diff(adapter_tensors(run), stopped) == 0.0


# -- data -----------------------------------------------------------------------------------------------

NOT_STRINGS = {
    "prompt and response null": ({"prompt": None, "response": None}, "prompt_response", "has prompt None"),
    "response a list": ({"prompt": "2+2?", "response": ["4"]}, "prompt_response", "has response ['4']"),
    "prompt a dict": ({"prompt": {"q": 1}, "response": "4"}, "prompt_response", "has prompt {'q': 1}"),
    "content null": ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "4"}]},
                     "messages", "content None"),
    "role a list": ({"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "4"}]},
                    "messages", "role ['user']"),
}


@pytest.mark.parametrize("case", list(NOT_STRINGS))
def test_chat_fields_that_are_not_strings_are_refused(case):
    row, fmt, expected = NOT_STRINGS[case]
    columns = {"prompt": "prompt", "response": "response", "messages": "messages"}
    where = "an example" if fmt == "prompt_response" else "a message"
    with pytest.raises(RecipeError, match=f"^data.train: {where} .*{re.escape(expected)}.* must be a? ?strings?$"):
        instruct.conversation(row, fmt, columns, "data.train")


# (recipe overrides, what truncation and batching must refuse before the model loads)
LATE_DATA_ERRORS = {
    "truncation error": (["data.max_length=12", "data.truncation=error"], "examples are longer than data.max_length=12"),
    "no response token": (["data.max_length=8"], "no example keeps a response token within data.max_length=8"),
    "one global batch": (["train.batch_size=128"], "examples, fewer than one global batch (train.batch_size 128 x 1"),
    "generation without answers": (["data.eval=builtin:sms_spam", "data.eval_limit=4"],
                                   "eval.generate / eval.exact_match need prompt/response or messages eval data"),
}


@pytest.mark.parametrize("case", list(LATE_DATA_ERRORS))
def test_data_errors_of_tokenized_examples_are_found_before_the_model_loads(tmp_path, monkeypatch, case):
    overrides, expected = LATE_DATA_ERRORS[case]
    no_model(monkeypatch)
    with pytest.raises(RecipeError, match=re.escape(expected)):
        train(recipe_from_dict(instruct_recipe(tmp_path, *overrides)))


# -- recipes --------------------------------------------------------------------------------------------


def test_yaml_aliases_are_refused_before_anything_is_copied(tmp_path):
    raw = tiny_recipe(tmp_path)
    text = yaml.safe_dump(raw).replace("- query\n  - value", "- &target query\n  - value\n  modules_to_save: [*target]")
    (tmp_path / "alias.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"alias.yaml: line \d+: YAML aliases \(\*target\) are not accepted"):
        load_recipe(tmp_path / "alias.yaml")
    # 527 bytes that expand to 10**9 values when copied.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(RecipeError, match="YAML aliases"):
        load_recipe(tmp_path / "bomb.yaml")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"override 'train.seed=\[&a 1, \*a\]': line 1: YAML aliases"):
        load_recipe(tmp_path / "plain.yaml", ["train.seed=[&a 1, *a]"])


# -- one line and exit code 2, not a traceback ------------------------------------------------------------


def hostile_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (command line after `repeft`, with {recipe}, what the error line says)."""
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café", "label": 0}\n'.encode("latin-1"))
    (tmp_path / "latin1.csv").write_bytes("text,label\ncafé,0\n".encode("latin-1"))
    (tmp_path / "torn.json").write_text('[{"text": "good", "label": 0}, {"text": ')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "content-null.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "4"}]}) + "\n")
    (tmp_path / "a-file").write_text("x")
    deep = tmp_path / "deep-checkpoint"
    deep.mkdir()
    (deep / "trainer_state.json").write_text('{"step": 1, "best": ' + "[" * 100_000 + "]" * 100_000 + "}")
    base = tmp_path / "base"
    import transformers as tf

    tf.BertForSequenceClassification(tf.BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"})
                                     ).save_pretrained(base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    causal = ["task=causal_lm", "model.config.model_type=llama", "model.config.num_key_value_heads=2", "data.eval=null"]
    return {
        "non-UTF-8 JSONL": ([f"data.train={tmp_path / 'latin1.jsonl'}"], "latin1.jsonl is not UTF-8 text"),
        "non-UTF-8 CSV": ([f"data.train={tmp_path / 'latin1.csv'}"], "latin1.csv is not UTF-8 text"),
        "torn JSON array": ([f"data.train={tmp_path / 'torn.json'}"], "torn.json is not valid JSON"),
        "corrupt parquet": ([f"data.train={tmp_path / 'bad.parquet'}"], "bad.parquet is not a readable Parquet file"),
        "deeply nested JSON": ([f"data.train={tmp_path / 'deep.jsonl'}"], "deep.jsonl is not usable JSON: it is nested too deeply"),
        "seed -1": (["train.seed=-1"], "train.seed must be >= 0, got -1"),
        "seed 2**32": (["train.seed=4294967296"], "train.seed must be <= 4294967295, got 4294967296"),
        "lr 3e38": (["optim.lr=3e38"], "optim.lr must be <= 1e+30, got 3e+38"),
        "output.dir a file": ([f"output.dir={tmp_path / 'a-file' / 'run'}"], "a-file is a file, not a directory"),
        "class not a model": (["model.class=AutoTokenizer"], "model.class AutoTokenizer is not a model class"),
        "content null": ([*causal, f"data.train={tmp_path / 'content-null.jsonl'}"], "a message has role 'user' and content None"),
        "truncated base weights": (["model.config=null", f"model.path={base}"], "cannot load its weights"),
        "nested trainer_state.json": ([f"--resume-from={deep}"], "trainer_state.json is damaged: its JSON is nested too deeply"),
    }


@pytest.mark.parametrize("case", ["non-UTF-8 JSONL", "non-UTF-8 CSV", "torn JSON array", "corrupt parquet",
                                  "deeply nested JSON", "seed -1", "seed 2**32", "lr 3e38", "output.dir a file", "class not a model",
                                  "content null", "truncated base weights", "nested trainer_state.json"])
def test_hostile_inputs_to_train_are_one_line_and_exit_2(tmp_path, capsys, case):
    arguments, expected = hostile_inputs(tmp_path)[case]
    assert expected in train_error(tmp_path, capsys, arguments)


def test_a_torn_summary_and_an_export_into_a_file_are_one_line_and_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    (run / "summary.json").write_text('{"steps": 8, "wall_')
    assert cli.main(["info", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"repeft info: error: {run / 'summary.json'} is damaged: it is not valid JSON "
        "(Unterminated string starting at: line 1 column 14 (char 13))"
    )
    (run / "summary.json").write_text('{"steps": 8}')
    assert cli.main(["info", str(run)]) == 2
    assert "summary.json is damaged: it lacks the fields of a run summary" in capsys.readouterr().err
    (tmp_path / "out").write_text("x")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("is a file; give a directory to write the export into")
    assert (tmp_path / "out").read_text() == "x"


def test_exporting_onto_a_truncated_base_or_with_a_non_model_class_is_one_line_and_exit_2(tmp_path, capsys):
    train(recipe_from_dict(tiny_recipe(tmp_path, "train.max_steps=1")))
    base = tmp_path / "base"
    import transformers as tf

    tf.BertForSequenceClassification(tf.BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"})
                                     ).save_pretrained(base)
    export = ["export", str(tmp_path / "run" / "adapter"), "--base", str(base), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert cli.main([*export, "--model-class", "AutoTokenizer"]) == 2
    assert capsys.readouterr().err.strip() == (
        "repeft export: error: AutoTokenizer is not a transformers model class; pass --model-class")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli.main(export) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"repeft export: error: cannot load the base model {base}")
    assert not (tmp_path / "out").exists()
