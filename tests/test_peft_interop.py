"""Our PEFT export loads in the ``peft`` library with the same logits, and PEFT adapters import."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import repeft
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": lambda: repeft.LoRAConfig(r=4, lora_alpha=8),
    "replora": lambda: repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=8),
    "rslora": lambda: repeft.LoRAConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
}


def randomize(model):
    torch.manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_peft_loads_our_export(family, method, tmp_path):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = repeft.wrap(base, CONFIGS[method]())
    randomize(model)
    batch = tiny_batch(family)
    with torch.no_grad():
        expected = model(**batch).logits
        base_logits = reference(**batch).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter really changes the output
    repeft.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_peft_adapter_imports(family, tmp_path):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    head = ["classifier"] if family == "bert" else None
    targets = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "dense"]}[family]
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, modules_to_save=head, fan_in_fan_out=family == "gpt2")
    )
    randomize(peft_model)
    batch = tiny_batch(family)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "peft")
    model = repeft.from_peft(reference, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)


def test_a_peft_sequence_classification_adapter_imports(tmp_path):
    # PEFT's SEQ_CLS task writes modules_to_save ["classifier", "score"] whatever the family: a BERT has no
    # `score`. PEFT ignores entries that match nothing, and so must the import.
    base = tiny_model("bert")
    reference = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]
    assert "score" in saved and "classifier" in saved
    batch = tiny_batch("bert")
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
    model = repeft.from_peft(reference, tmp_path / "peft")
    assert model.modules_to_save_paths() == ["classifier"]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)


def test_unsupported_peft_options_are_refused(tmp_path):
    base = tiny_model("llama")
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_qalora=True))
    peft_model.save_pretrained(tmp_path / "qalora")
    fresh = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match="use_qalora=True is not supported"):
        repeft.from_peft(fresh, tmp_path / "qalora")
    assert all(p.requires_grad for p in fresh.parameters())


@pytest.mark.parametrize("field,value,match", [
    ("r", None, "has no 'r' field"),
    ("lora_alpha", float("nan"), r"lora_alpha must be a number in \(0, 1e\+06\), got nan"),
    ("use_rslora", "no", "use_rslora must be true or false"),
])
def test_broken_peft_config_values_are_refused_by_name(field, value, match, tmp_path):
    peft_model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    meta = json.loads(path.read_text())
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(repeft.AdapterFileError, match=match):
        repeft.from_peft(tiny_model("llama"), tmp_path / "peft")
