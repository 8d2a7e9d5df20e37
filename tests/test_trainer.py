"""transformers' Trainer trains a wrapped model, checkpoints only the adapter, and resumes."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

import repeft
from tiny_models import tiny_batch, tiny_model


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

