"""transformers' Trainer on wrapped models: training, evaluation with metrics, best-model reload, resume.

The datasets are plain lists of dicts carrying an extra text column, as a
user's would: Trainer keeps only the columns the model's forward takes, which
it reads off the wrapper's forward signature, and finds the label names there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

import repeft
from tiny_models import tiny_batch, tiny_model

FAMILIES = {"causal_lm": "llama", "sequence_classification": "bert", "image_classification": "vit"}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        batch = tiny_batch("bert", batch=n, seq=8)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make_trainer(out, max_steps):
    model = repeft.wrap(tiny_model("bert"), repeft.RepLoRAConfig(r=4, mlp_hidden=8))
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return model, repeft.AdapterTrainer(model=model, args=args, train_dataset=Rows())


def test_trainer_trains_saves_and_resumes(tmp_path):
    model, trainer = make_trainer(tmp_path / "full", max_steps=4)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer.train()
    after = model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").exists() and (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is never copied
    trainer.save_model()  # into output_dir, beside the checkpoints, which it must keep
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in (tmp_path / "full").iterdir()}
    reloaded = repeft.load_adapter(tiny_model("bert"), tmp_path / "full")
    assert all(torch.equal(reloaded.adapter_state_dict()[k], v) for k, v in after.items())

    resumed_model, resumed = make_trainer(tmp_path / "full", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in resumed_model.adapter_state_dict().items():
        torch.testing.assert_close(value, after[key], atol=1e-5, rtol=0)


# -- evaluate, compute_metrics and load_best_model_at_end, per task --------------------------------


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    """Plain rows (lists and numbers, not tensors) plus a text column the model does not take."""
    family = FAMILIES[task]
    batch = tiny_batch(family, batch=n, seq=8, seed=seed)
    if task == "causal_lm":
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return [{**{k: v[i].tolist() for k, v in batch.items()}, "note": f"row {i}"} for i in range(n)]


def reference_eval(model, rows: list[dict], task: str) -> tuple[float, float]:
    """(mean loss, accuracy) computed here from the logits, not by the model or Trainer."""
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0] if k != "note"}
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    if task == "causal_lm":  # token i predicts token i + 1
        logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


def accuracy(task: str):
    def compute_metrics(prediction):
        logits, labels = torch.tensor(prediction.predictions), torch.tensor(prediction.label_ids)
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return {"accuracy": (logits.argmax(-1) == labels).float().mean().item()}

    return compute_metrics


class Snapshots(TrainerCallback):
    """The adapter's tensors at each checkpoint save, by step."""

    def __init__(self, model):
        self.model, self.saved = model, {}

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = {k: v.clone() for k, v in self.model.adapter_state_dict().items()}


@pytest.mark.parametrize("trainer_class", [Trainer, repeft.AdapterTrainer], ids=["Trainer", "AdapterTrainer"])
@pytest.mark.parametrize("task", list(FAMILIES))
def test_evaluate_reports_loss_and_metrics_and_the_best_model_comes_back(tmp_path, task, trainer_class):
    torch.manual_seed(0)
    base = tiny_model(FAMILIES[task])
    model = repeft.wrap(base, repeft.LoRAConfig(r=4))  # the architecture's default targets
    train_rows, eval_rows = task_rows(task, 16, seed=1), task_rows(task, 8, seed=2)
    scores = iter([3.0, 2.0, 1.0, 0.0])  # the first evaluation is the best, so the best is not the last

    def metrics(prediction):
        return {**accuracy(task)(prediction), "score": next(scores)}

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=5e-2, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="score", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    snapshots = Snapshots(model)
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, compute_metrics=metrics,
        callbacks=[snapshots],
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    # load_best_model_at_end brought back the adapter of step 1, which training had moved on from.
    best = snapshots.saved[1]
    assert all(torch.equal(model.adapter_state_dict()[k], v) for k, v in best.items())
    assert any(not torch.equal(snapshots.saved[3][k], v) for k, v in best.items())

    result = trainer.evaluate()
    loss, acc = reference_eval(model, eval_rows, task)
    assert result["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert result["eval_accuracy"] == pytest.approx(acc, abs=1e-6)
