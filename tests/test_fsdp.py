"""Sharded training with FSDP2, on 2 CPU processes joined with gloo.

Two levels. repeft's adapters under torch's ``fully_shard`` directly
(``tests/fsdp_worker.py`` under torchrun): training against one process with
the same global batch, save, load, generate. And ``repeft train`` under
``accelerate launch --config_file recipes/accelerate/fsdp2.yaml``: accelerate
1.15 shards only on accelerators, so repeft switches its FSDP path on for CPU
processes (``fsdp.shard_cpu_processes``); everything after that switch is
accelerate's GPU code path, run on the CPU.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.distributed.fsdp import MixedPrecisionPolicy

import repeft
from repeft import cli, fsdp
from repeft.recipe import RecipeError, load_recipe, recipe_from_dict
from repeft.train import LaunchError, _check_fsdp, build_model, load_tokenizer, train
from test_train import (  # noqa: F401  (the fixture runs around every test here too)
    KILLER,
    ROOT,
    adapter_tensors,
    max_diff,
    one_thread_and_fresh_accelerate,
    subprocess_env,
    tiny_recipe,
    train_on_two_processes,
    train_records,
    write_text_data,
)

FSDP_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"
TINY_LLAMA = (
    "model.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 260, max_position_embeddings: 128}"
)
# Without --mixed_precision the shipped config's bf16 applies.
FLOAT32 = ("--config_file", str(FSDP_CONFIG), "--mixed_precision", "no")


# -- repeft's layers under fully_shard ---------------------------------------------------------


def test_adapters_train_save_load_and_generate_under_fully_shard(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)]
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    for case in ["lora", "replora", "prefix", "zero_init"]:
        got = report[case]
        assert got["sharded"], case  # frozen base and adapter alike
        # Per-process gradients reduced by FSDP = the whole batch's, and so is three AdamW steps' adapter.
        assert got["loss_diff"] <= 1e-5 and got["grad_diff"] <= 1e-5 and got["adapter_diff"] <= 1e-5, (case, got)
        # Written once, gathered whole; loaded back into a sharded model, it runs as the unsharded one.
        assert got["files"] == ["adapter_config.json", "adapter_model.safetensors"], (case, got["files"])
        assert got["saved_diff"] == got["adapter_diff"], case
        assert got["reload_logits_diff"] <= 1e-5 and got["generate_equal"], (case, got)
    for case in ["lora", "replora"]:
        assert report[case]["merge"].startswith("merging needs the whole weights on one process, but this model is sharded")
    # bf16 gathered weights and compute track the float32 run to bf16 rounding (8 bits of mantissa).
    bf16 = report["lora_bf16"]
    assert bf16["sharded"] and bf16["grad_diff"] <= 2e-2 and bf16["adapter_diff"] <= 2e-3, bf16
    assert report["llama_units_warning"] is None
    assert "FSDP unit (the root) holds 89% of the weights" in report["bert_units_warning"]
    assert "set fsdp_transformer_layer_cls_to_wrap" in report["bert_units_warning"]


# -- repeft train under accelerate's FSDP ------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_launch_matches_one_process_and_writes_adapter_only_outputs(tmp_path):
    # RepLoRA on a Llama classifier: the factors in each decoder layer's unit, the new head in the root unit.
    overrides = [TINY_LLAMA, "adapter={method: replora, r: 4, mlp_hidden: 8, target_modules: [q_proj, v_proj]}",
                 "train.batch_size=4", "train.epochs=1", "checkpoint.every=4", "checkpoint.keep=1",
                 "output.merged=true", "output.peft=true"]
    # One process: 2 micro-batches of 4 accumulated; two processes: one batch of 4 each. Global batch 8.
    train(recipe_from_dict(tiny_recipe(tmp_path, *overrides, "train.grad_accum=2", f"output.dir={tmp_path / 'one'}")))
    proc = train_on_two_processes(tiny_recipe(tmp_path, *overrides, f"output.dir={tmp_path / 'two'}"), tmp_path, FLOAT32)
    assert "2 process(es) sharded with FSDP2, global batch 8" in proc.stdout
    assert "warning: FSDP unit" not in proc.stderr

    one, two = tmp_path / "one", tmp_path / "two"
    assert [s for s, _ in train_records(one)] == [s for s, _ in train_records(two)] == list(range(1, 9))
    assert max(abs(a - b) for (_, a), (_, b) in zip(train_records(one), train_records(two))) <= 1e-5
    assert max_diff(adapter_tensors(one), adapter_tensors(two)) <= 1e-5

    # A checkpoint holds the adapter and its gathered optimizer state, never the sharded base.
    checkpoint = two / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter", "custom_checkpoint_0.pkl", "optimizer_gathered.bin", "random_states_0.pkl", "random_states_1.pkl",
        "trainer_state.json",
    ]
    assert max_diff(adapter_tensors(checkpoint), adapter_tensors(two)) == 0
    gathered = torch.load(checkpoint / "optimizer_gathered.bin", weights_only=True)["state"]
    assert sorted(gathered) == sorted(n for n, p in _trainable(two) if p.requires_grad)

    # Exports from the sharded run: merged and PEFT, each as the adapter on the unsharded base.
    from transformers import AutoModelForSequenceClassification

    saved = load_recipe(two / "recipe.yaml")

    def base():
        model = build_model(saved, saved.data.labels)
        model.config.pad_token_id = load_tokenizer(saved).pad_token_id  # as training set it
        return model

    model = repeft.load_adapter(base(), two / "adapter").eval()
    ids = torch.randint(3, 259, (3, 12))
    merged = AutoModelForSequenceClassification.from_pretrained(two / "merged").eval()
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-5
        peft_model = peft.PeftModel.from_pretrained(base(), two / "peft").eval()
        assert (peft_model(input_ids=ids).logits - expected).abs().max() < 1e-5


def _trainable(run: Path) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the run's model, named as under FSDP (the adapter model's own names)."""
    saved = load_recipe(run / "recipe.yaml")
    model = repeft.wrap(build_model(saved, saved.data.labels), saved.adapter)
    return list(model.named_parameters())


def write_questions(path: Path, n: int, seed: int) -> str:
    """Prompt/response rows: a few words, answered by their sentiment."""
    return write_text_data(path, n, seed, words=(1, 3), columns=("prompt", "response"))


@pytest.mark.slow
def test_fsdp_resume_after_kill_is_exact(tmp_path):
    # The shipped config as it is (bf16), dropout on, accumulation, evaluation with generation (3 prompts
    # for 2 processes, one per batch: a process decodes a filler) and the best adapter kept.
    # 64 examples / (2 processes x batch 4) = 8 batches = 4 steps per epoch; checkpoints at 3, 6, (9 killed).
    overrides = [TINY_LLAMA, "task=causal_lm", "adapter={method: lora, r: 4, lora_dropout: 0.1, target_modules: all-linear}",
                 f"data.train={write_questions(tmp_path / 'qa_train.jsonl', 64, seed=0)}",
                 f"data.eval={write_questions(tmp_path / 'qa_eval.jsonl', 3, seed=1)}",
                 "eval={every: 5, exact_match: true, generate: 3, batch_size: 1, max_new_tokens: 4}",
                 "data.max_length=64", "train.batch_size=4", "train.grad_accum=2", "train.epochs=3",
                 "output.best=true", "checkpoint.every=3", "checkpoint.keep=2"]
    shipped = ("--config_file", str(FSDP_CONFIG))
    reference = train_on_two_processes(tiny_recipe(tmp_path, *overrides, f"output.dir={tmp_path / 'reference'}"),
                                       tmp_path, shipped)
    assert "sharded with FSDP2" in reference.stdout

    raw = tiny_recipe(tmp_path, *overrides, f"output.dir={tmp_path / 'run'}")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(step=9))
    killed = train_on_two_processes(raw, tmp_path, shipped, program=(str(killer),), check=False)
    assert killed.returncode != 0 and f"Signal {signal.SIGKILL.value}" in killed.stderr, killed.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step-00000009", "step-00000003", "step-00000006"]

    resumed = train_on_two_processes(raw, tmp_path, shipped, args=("--resume",))
    assert f"resumed from {run / 'checkpoints' / 'step-00000006'} at step 6" in resumed.stdout
    assert max_diff(adapter_tensors(run), adapter_tensors(tmp_path / "reference")) <= 1e-5
    assert max_diff(adapter_tensors(run / "best"), adapter_tensors(tmp_path / "reference" / "best")) <= 1e-5
    ours, theirs = train_records(run), train_records(tmp_path / "reference")
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, 13))
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) <= 1e-5
    ours, theirs = generations(run), generations(tmp_path / "reference")
    assert [r["step"] for r in ours] == [5] * 3 + [10] * 3 + [12] * 3 and ours == theirs


def generations(run: Path) -> list[dict]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [{k: r[k] for k in ("step", "prompt", "answer")} for r in records if r["type"] == "generation"]


# -- what repeft refuses -------------------------------------------------------------------------------


def test_a_checkpoint_is_resumed_only_as_it_was_sharded(tmp_path, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "train.epochs=1", "checkpoint.every=4")))
    assert cli.main(["train", str(recipe_path)]) == 0
    state_file = tmp_path / "run" / "checkpoints" / "step-00000008" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["sharded"] is False
    state_file.write_text(json.dumps({**state, "sharded": True}))  # as an FSDP run writes it

    assert cli.main(["train", str(recipe_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{state_file.parent} was written by a run sharded with FSDP; resume it as it was launched" in err
    assert state_file.parent.is_dir()  # refused, not set aside as damaged


def test_a_deepspeed_launch_is_refused_with_the_fsdp_command(tmp_path, capsys, monkeypatch):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cli.main(["train", str(recipe_path)]) == 2
    err = capsys.readouterr().err
    assert "repeft train: error: repeft train does not run under DeepSpeed" in err
    assert "accelerate launch --config_file recipes/accelerate/fsdp2.yaml" in err


def fsdp_accelerator(version: int = 2, policy: MixedPrecisionPolicy | None = None) -> SimpleNamespace:
    """What the checks read of an FSDP ``Accelerator``: its state's plugin."""
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version, mixed_precision_policy=policy)))


def test_fsdp1_and_quantized_bases_are_refused(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path))
    with pytest.raises(LaunchError, match="shards with FSDP2 only; the accelerate config asks for fsdp_version 1"):
        _check_fsdp(recipe, fsdp_accelerator(version=1))
    recipe.model.quantization = "nf4"
    with pytest.raises(RecipeError, match="model.quantization nf4 under FSDP is not supported"):
        _check_fsdp(recipe, fsdp_accelerator())


def test_half_precision_fsdp_reduces_gradients_in_float32():
    # accelerate's bf16 policy reduces in bf16 as well.
    accelerator = fsdp_accelerator(policy=MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16, torch.bfloat16))
    fsdp.reduce_in_float32(accelerator)
    assert accelerator.state.fsdp_plugin.mixed_precision_policy == MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16
    )
    full = fsdp_accelerator()
    fsdp.reduce_in_float32(full)
    assert full.state.fsdp_plugin.mixed_precision_policy is None
