"""What a PEFT user types works on repeft: PEFT's names, and a whole PEFT training script.

PEFT itself is the reference: the same calls on a PEFT model and on a repeft
model of the same base must agree (parameter counts, outputs with adapters
off, the base model ``unload`` returns).
"""

from __future__ import annotations

import pytest
import torch

import repeft
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")


def both(family="llama", **lora):
    """(PEFT model, repeft model) with the same LoRA config on two copies of one base."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    return (peft.get_peft_model(tiny_model(family), peft.LoraConfig(**kwargs)),
            repeft.get_peft_model(tiny_model(family), repeft.LoRAConfig(**kwargs)))


def trained(model):
    """Give every LoRA B a value, so adapters change the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "B_out" in name:
                param.normal_(std=0.5)
    return model


def test_peft_names_mean_what_they_mean_in_peft():
    theirs, ours = both()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default"]
    assert ours.active_adapters == theirs.active_adapters == ["default"]  # PEFT: a property
    assert ours.active_adapters() == ["default"]  # transformers: a method
    ours.set_adapter(["default"])  # the list form of PEFT's tuners and transformers

    batch = tiny_batch("llama")
    trained(ours)
    base = tiny_model("llama")(**batch).logits
    adapted = ours(**batch).logits
    assert (adapted - base).abs().max() > 1e-3
    for disable, enable in (("disable_adapter_layers", "enable_adapter_layers"), ("disable_adapters", "enable_adapters")):
        getattr(ours, disable)()
        torch.testing.assert_close(ours(**batch).logits, base, atol=1e-6, rtol=0)
        getattr(ours, enable)()
        torch.testing.assert_close(ours(**batch).logits, adapted, atol=1e-6, rtol=0)

    # Disabling while merged gives the base model too (the adapter is unmerged first).
    ours.merge()
    ours.disable_adapter_layers()
    torch.testing.assert_close(ours(**batch).logits, base, atol=1e-5, rtol=0)
    ours.enable_adapter_layers()

    plain = ours.unload()  # no merging: the original base model, as PEFT's unload gives
    assert type(plain) is type(tiny_model("llama")) and not any(p.requires_grad for p in plain.parameters())
    assert set(plain.state_dict()) == set(tiny_model("llama").state_dict())
    torch.testing.assert_close(plain(**batch).logits, base, atol=1e-6, rtol=0)
    theirs_plain = trained(theirs).unload()
    assert set(theirs_plain.state_dict()) == set(plain.state_dict())


def test_set_adapter_refuses_several_names_clearly():
    _, ours = both()
    ours.add_adapter("other", repeft.LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"one adapter at a time; set_adapter got \['default', 'other'\]"):
        ours.set_adapter(["default", "other"])


def test_from_pretrained_reloads_like_peft(tmp_path):
    _, ours = both()
    trained(ours).save_adapter(tmp_path / "adapter")
    reloaded = repeft.AdapterModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    batch = tiny_batch("llama")
    torch.testing.assert_close(reloaded(**batch).logits, ours(**batch).logits, atol=0, rtol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = repeft.AdapterModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert trainable.trainable_parameters()[0] == ours.trainable_parameters()[0]


def test_a_wrapped_model_pickles_and_deep_copies():
    import copy
    import pickle

    _, ours = both()
    batch = tiny_batch("llama")
    for clone in (pickle.loads(pickle.dumps(trained(ours))), copy.deepcopy(ours)):
        assert type(clone) is type(ours) and isinstance(clone, repeft.AdapterModel)
        torch.testing.assert_close(clone(**batch).logits, ours(**batch).logits, atol=0, rtol=0)


# -- a PEFT user's script, run as written for PEFT and with two lines changed for repeft ----------------

PEFT_SCRIPT = """
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
model = get_peft_model(make_base(), config)
model.print_trainable_parameters()
args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                         eval_strategy="steps", eval_steps=3, save_steps=3, load_best_model_at_end=True,
                         metric_for_best_model="accuracy", report_to=[], use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                  compute_metrics=compute_metrics)
trainer.train()
metrics = trainer.evaluate()
model.save_pretrained(out + "/adapter")
reloaded = PeftModel.from_pretrained(make_base(), out + "/adapter")
"""
FOR_REPEFT = {
    "from peft import LoraConfig, PeftModel, get_peft_model":
        "from repeft import AdapterModel as PeftModel, LoRAConfig as LoraConfig, get_peft_model",
    'config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")':
        'config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])',
}


def repeft_script() -> str:
    script = PEFT_SCRIPT
    for old, new in FOR_REPEFT.items():
        assert script.count(old) == 1
        script = script.replace(old, new)
    changed = [a for a, b in zip(PEFT_SCRIPT.splitlines(), script.splitlines()) if a != b]
    assert len(changed) == 2  # the import line and the config line, nothing else
    return script


def rows(n, seed):
    batch = tiny_batch("bert", batch=n, seq=8, seed=seed)
    return [{"input_ids": batch["input_ids"][i].tolist(), "attention_mask": batch["attention_mask"][i].tolist(),
             "label": int(batch["labels"][i]), "text": "a column the model does not take"} for i in range(n)]


def compute_metrics(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


@pytest.mark.parametrize("library", ["peft", "repeft"])
def test_a_peft_users_script_runs_with_only_the_import_and_config_lines_changed(tmp_path, library):
    script = PEFT_SCRIPT if library == "peft" else repeft_script()
    namespace = {"make_base": lambda: tiny_model("bert"), "out": str(tmp_path), "train_rows": rows(32, seed=1),
                 "eval_rows": rows(16, seed=2), "compute_metrics": compute_metrics}
    exec(compile(script, f"<{library} user script>", "exec"), namespace)
    metrics, model, reloaded = namespace["metrics"], namespace["model"], namespace["reloaded"]
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)
    batch = tiny_batch("bert", seed=3)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model.eval()(**batch).logits, atol=1e-6, rtol=0)
