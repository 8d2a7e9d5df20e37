"""`repeft train` features of the loop: instruction tuning with generation in evaluation, classification
metrics, the best adapter, early stopping, trackers and log lines, gradient checkpointing, QLoRA.

Runs in-process on tiny models (see test_train.py for the helpers).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import repeft
from repeft import instruct
from repeft.metrics import classification_scores
from repeft.recipe import apply_overrides, load_recipe, recipe_from_dict
from repeft.train import build, build_model, evaluation, load_tokenizer, train
from test_train import (  # noqa: F401  (the fixture applies here too)
    ROOT,
    adapter_tensors,
    max_diff,
    one_thread_and_fresh_accelerate,
    tiny_recipe,
    train_on_two_processes,
    train_records,
)

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 256,
}


def checkpointing(model) -> bool:
    # transformers >= 5.2 renamed is_gradient_checkpointing (now deprecated) to is_activation_checkpointing.
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return getattr(model, name)


def write_instructions(path: Path, n: int, seed: int) -> str:
    """Prompt/response rows: "no" for words starting with a, else "ok" (the mostly-"ok" bias is learnt in a few steps)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            word = "".join(rng.choice("abcd") for _ in range(rng.randint(2, 22)))
            fh.write(json.dumps({"prompt": f"does {word} start with a?", "response": "no" if word[0] == "a" else "ok"}) + "\n")
    return str(path)


def instruct_recipe(tmp_path: Path, *overrides: str) -> dict:
    raw = {
        "task": "causal_lm",
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "bytes"},
        "data": {"train": write_instructions(tmp_path / "train.jsonl", 64, seed=0),
                 "eval": write_instructions(tmp_path / "eval.jsonl", 12, seed=1), "max_length": 64},
        "adapter": {"method": "lora", "r": 4, "target_modules": "all-linear"},
        "optim": {"lr": 2e-2},
        "train": {"epochs": 3, "batch_size": 8, "log_every": 1},
        "eval": {"every": 4, "generate": 2, "exact_match": True, "max_new_tokens": 4, "metric": "exact_match"},
        "output": {"dir": str(tmp_path / "run")},
    }
    return apply_overrides(raw, list(overrides))


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_instruction_tuning_with_packing_generation_and_exact_match(tmp_path):
    recipe = recipe_from_dict(instruct_recipe(tmp_path, "data.packing=true"))
    result = train(recipe)
    run = Path(result.output_dir)
    # Words up to 22 letters make some examples longer than 64 tokens: cut and counted, never silently.
    assert any("longer than data.max_length=64 tokens" in note for note in result.data_notes)
    assert any("examples packed into" in note for note in result.data_notes)

    generations = records(run, "generation")
    assert len(generations) == 2 * len(records(run, "eval"))  # eval.generate=2 at every evaluation
    assert {"prompt", "expected", "answer", "step", "when"} <= set(generations[0])
    assert generations[0]["prompt"].endswith("<|assistant|>\n")

    # The reported exact match, recomputed here with transformers' generate on the saved adapter.
    saved = load_recipe(run / "recipe.yaml")
    model = repeft.load_adapter(build_model(saved, []), result.adapter_dir).eval()
    tokenizer = load_tokenizer(saved)
    rows = [json.loads(line) for line in Path(saved.data.eval).read_text().splitlines()]
    hits = 0
    for row in rows:
        prompt = instruct.render([{"role": "user", "content": row["prompt"]}], tokenizer, generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=1, pad_token_id=0)
        hits += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["response"]
    assert 0 < hits < len(rows)  # learnt something, not everything: the comparison can tell
    assert result.eval_after["exact_match"] == pytest.approx(hits / len(rows))


def test_chat_messages_train_on_assistant_turns(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "answer in one word"},
                          {"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["yes", "no", "maybe", "never"] * 8]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = instruct_recipe(tmp_path, f"data.train={data}", f"data.eval={data}", "data.eval_limit=4", "train.epochs=1",
                         "data.max_length=96")
    result = train(recipe_from_dict(raw))
    assert result.steps == 4 and 0.0 <= result.eval_after["exact_match"] <= 1.0


def test_precision_recall_f1_per_class_and_macro():
    # true: 0 0 0 1 1 2 ; predicted: 0 0 1 1 0 1 -> class 2 is never predicted.
    scores = classification_scores(torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 1, 2]), ["a", "b", "c"])
    # By hand: a: P 2/3, R 2/3; b: P 1/3, R 1/2; c: P 0 (never predicted), R 0.
    f1_b = 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)
    expected = {"accuracy": 3 / 6, "precision/a": 2 / 3, "recall/a": 2 / 3, "f1/a": 2 / 3, "precision/b": 1 / 3,
                "recall/b": 1 / 2, "f1/b": f1_b, "precision/c": 0.0, "recall/c": 0.0, "f1/c": 0.0,
                "precision_macro": 1 / 3, "recall_macro": (2 / 3 + 1 / 2) / 3, "f1_macro": (2 / 3 + f1_b) / 3}
    assert scores == pytest.approx(expected)


def scripted_accuracy(monkeypatch, values):
    """Make evaluation report ``values`` as accuracy, in order (the rest of its metrics are real)."""
    real, sequence = evaluation.evaluate, iter(values)

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "accuracy": next(sequence)}

    monkeypatch.setattr(evaluation, "evaluate", evaluate)


def test_best_adapter_is_written_with_its_exports(tmp_path, monkeypatch):
    scripted_accuracy(monkeypatch, [0.5, 0.9, 0.6, 0.7, 0.8])  # during at steps 2, 4, 6; after at 8 (and spare)
    raw = tiny_recipe(tmp_path, "train.epochs=1", "eval.every=2", "checkpoint.every=2", "checkpoint.keep=10",
                      "output.best=true", "output.merged=true")
    result = train(recipe_from_dict(raw))
    run = Path(result.output_dir)
    assert result.best == {"metric": "accuracy", "value": 0.9, "step": 4}
    assert result.best_dir == str(run / "best")
    best = load_file(str(run / "best" / "adapter" / "adapter_model.safetensors"))
    assert max_diff(best, adapter_tensors(run / "checkpoints" / "step-00000004")) == 0.0
    assert max_diff(adapter_tensors(run), adapter_tensors(run / "checkpoints" / "step-00000008")) == 0.0
    assert max_diff(best, adapter_tensors(run)) > 0  # the best is not the last
    assert (run / "best" / "merged" / "model.safetensors").is_file()
    eval_record = records(run, "eval")[-1]
    assert {"precision_macro", "recall_macro", "f1_macro", "f1/neg", "f1/pos", "precision/pos", "recall/neg"} <= set(eval_record)


def test_the_best_adapter_survives_a_resume(tmp_path, monkeypatch):
    # The best evaluation (step 2) comes before the checkpoint the run resumes from (step 4).
    scripted_accuracy(monkeypatch, [0.9, 0.5, 0.5, 0.5, 0.5] + [0.5, 0.5, 0.5])
    raw = tiny_recipe(tmp_path, "train.epochs=1", "eval.every=2", "checkpoint.every=4", "checkpoint.keep=5",
                      "output.best=true")
    first = train(recipe_from_dict(raw))
    run = Path(first.output_dir)
    best = load_file(str(run / "best" / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(run / "best")  # only the checkpoint can give it back
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = train(recipe_from_dict(apply_overrides(raw, [f"checkpoint.resume={run / 'checkpoints' / 'step-00000004'}"])))
    assert resumed.best == first.best and resumed.best["step"] == 2 and resumed.best_dir == str(run / "best")
    assert max_diff(load_file(str(run / "best" / "adapter" / "adapter_model.safetensors")), best) == 0.0


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, monkeypatch, capsys):
    scripted_accuracy(monkeypatch, [0.5, 0.6, 0.6, 0.55, 0.55])  # the last: the evaluation after training
    raw = tiny_recipe(tmp_path, "train.epochs=2", "eval.every=1", "eval.patience=2")
    result = train(recipe_from_dict(raw))
    # Best 0.6 at step 2; steps 3 and 4 do not beat it: stop at step 4 of 16.
    assert result.stopped_early and result.steps == 4
    assert [r["step"] for r in records(Path(result.output_dir), "train")] == [1, 2, 3, 4]
    assert result.best["step"] == 2
    assert "early stop at step 4" in capsys.readouterr().out


def test_trackers_get_the_metrics_and_eval_lines_stand_on_their_own_in_a_redirected_log(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = io.StringIO()  # stdout and stderr into one file, as `repeft train ... > log 2>&1`
    monkeypatch.setattr("sys.stdout", log)
    monkeypatch.setattr("sys.stderr", log)
    raw = tiny_recipe(tmp_path, "train.epochs=1", "eval.every=3", "output.trackers=[tensorboard]")
    result = train(recipe_from_dict(raw))
    lines = log.getvalue().split("\n")
    evals = [line for line in lines if "eval (" in line]
    assert len(evals) == 3 and all(line.startswith("eval (") for line in evals), evals

    events = list(Path(result.output_dir).rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/f1_macro", "eval/f1/pos"} <= tags
    losses = [json.loads(line)["loss"] for line in Path(result.metrics_path).read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx(losses)


def test_gradient_checkpointing_is_on_and_changes_nothing(tmp_path, monkeypatch):
    wrapped = []
    real_wrap = build.wrap
    monkeypatch.setattr(build, "wrap", lambda base, config: wrapped.append(real_wrap(base, config)) or wrapped[-1])
    plain = train(recipe_from_dict(tiny_recipe(tmp_path, "train.epochs=1", f"output.dir={tmp_path / 'plain'}")))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    checkpointed = train(recipe_from_dict(tiny_recipe(tmp_path, "train.epochs=1", "train.gradient_checkpointing=true",
                                                      f"output.dir={tmp_path / 'ckpt'}")))
    assert not checkpointing(wrapped[0].get_base_model()) and checkpointing(wrapped[1].get_base_model())
    assert max_diff(adapter_tensors(Path(plain.output_dir)), adapter_tensors(Path(checkpointed.output_dir))) <= 1e-6


def test_qlora_from_a_recipe(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Sizes bitsandbytes' 4-bit CPU path takes (see test_quantization.py).
    config = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).save_pretrained(
        tmp_path / "base")
    raw = instruct_recipe(tmp_path, "model.config=null", f"model.path={tmp_path / 'base'}", "model.tokenizer=bytes",
                          "model.quantization=nf4", "train.gradient_checkpointing=true", "train.epochs=1",
                          "output.merged=true", "eval.generate=0", "eval.exact_match=false", "eval.metric=auto")
    wrapped = []
    real_wrap = build.wrap
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "wrap", lambda base, cfg: wrapped.append(real_wrap(base, cfg)) or wrapped[-1])
        result = train(recipe_from_dict(raw))
    model = wrapped[0]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert checkpointing(model.get_base_model()) and result.eval_after["loss"] < 10
    # The merged export is dequantized, merged in fp32 and loads with transformers alone.
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    ids = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_the_shipped_instruction_recipe_reads_sms_as_prompts_and_answers():
    recipe = load_recipe(ROOT / "recipes" / "instruct-tiny-llama.yaml")
    from repeft.datasource import read_rows

    rows = read_rows(recipe.data.train, "train", limit=3)
    assert set(rows[0]) == {"prompt", "response"} and rows[0]["prompt"].startswith("Is this SMS message spam or ham?")
    assert {r["response"] for r in read_rows("builtin:sms_spam_instruct", "train", limit=200)} == {"spam", "ham"}


@pytest.mark.slow
def test_two_processes_generate_and_score_like_one(tmp_path):
    # max_steps within the first epoch: 1 x 2 micro-batches and 2 x 1 take the same examples each step.
    common = ["data.packing=true", "train.batch_size=4", "train.max_steps=4", "eval.every=0"]
    one = train(recipe_from_dict(instruct_recipe(tmp_path, *common, "train.grad_accum=2",
                                                 f"output.dir={tmp_path / 'one'}")))
    train_on_two_processes(instruct_recipe(tmp_path, *common, f"output.dir={tmp_path / 'two'}"), tmp_path)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["eval_after"]["exact_match"] == one.eval_after["exact_match"]
    fields = ("step", "prompt", "expected", "answer")
    generated = [[{k: r[k] for k in fields} for r in records(run, "generation")] for run in (tmp_path / "one", tmp_path / "two")]
    assert generated[0] == generated[1] and len(generated[0]) == 2
    assert max_diff(adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")) <= 1e-5
    assert [s for s, _ in train_records(tmp_path / "one")] == [s for s, _ in train_records(tmp_path / "two")]
