"""Adapters written by an older repeft (tests/data, see make_saved_adapters.py) load and compute as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_images, tiny_model, tiny_vision_model

import repeft

DATA = Path(__file__).resolve().parent / "data"

# directory: (base model, batch, what the fields added since then must read)
SAVED = {
    "replora_form_mlp": (lambda: tiny_model("llama"), lambda: tiny_batch("llama"), {"form": "mlp"}),
    # Saved by repeft 44042e5 (issue 15's residual form, then the default), before reparam and shared seeds.
    "replora_form_residual": (lambda: tiny_model("llama"), lambda: tiny_batch("llama"),
                              {"form": "residual", "reparam": "mlp"}),
    "prefix_one_mlp": (lambda: tiny_model("llama"), lambda: tiny_batch("llama"),
                       {"mlp_per_layer": False, "mlp_hidden": 8, "norga_activation": "sigmoid",
                        "init": "normal", "prefix_dropout": 0.0, "norga_layers": None}),
    "zero_init_deepshare": (lambda: tiny_model("llama"), lambda: tiny_batch("llama"),
                            {"prompt_network": "deepshare", "activation": "gelu"}),
    # Saved by repeft b076ab3 in format version 1: repeft's tensor names, before a LoRA adapter was saved in PEFT's layout.
    "lora_format_v1": (lambda: tiny_model("llama"), lambda: tiny_batch("llama"), {"use_dora": False}),
    "dora_format_v1": (lambda: tiny_model("llama"), lambda: tiny_batch("llama"),
                       {"use_dora": True, "modules_to_save": ["lm_head"]}),
    "vapt": (lambda: tiny_vision_model("vit"), tiny_images, {"mlp_dropout": 0.0, "norm_eps": None}),
}


@pytest.mark.parametrize("name", list(SAVED))
def test_adapter_saved_by_an_older_repeft_loads_as_before(name, tmp_path):
    make_base, make_batch, fields = SAVED[name]
    expected = load_file(str(DATA / name / "expected_logits.safetensors"))["logits"]
    model = repeft.load_adapter(make_base(), DATA / name)
    config = model.configs["default"]
    assert {k: getattr(config, k) for k in fields} == fields
    with torch.no_grad():
        torch.testing.assert_close(model(**make_batch()).logits, expected, atol=1e-5, rtol=0)
    # Saved again by this version, it keeps what it is (the fields are now written out).
    model.save_adapter(tmp_path / "again")
    again = repeft.load_adapter(make_base(), tmp_path / "again", trainable=True).eval()
    assert again.configs["default"] == repeft.AdapterConfig.from_dict({**config.to_dict(), "inference_mode": False})
    with torch.no_grad():
        torch.testing.assert_close(again(**make_batch()).logits, expected, atol=1e-5, rtol=0)


def test_a_field_missing_from_a_config_means_the_default_everywhere_but_in_old_files():
    assert repeft.AdapterConfig.from_dict({"method": "replora"}).form == "shared"  # recipes, code
    assert repeft.AdapterConfig.from_saved({"method": "replora"}).form == "mlp"  # files that predate it
    assert repeft.AdapterConfig.from_saved({"method": "replora", "form": "residual"}).form == "residual"
    assert repeft.AdapterConfig.from_saved({"method": "lora", "r": 2}).r == 2
    with pytest.raises(ValueError, match="no 'method' field"):
        repeft.AdapterConfig.from_saved({"r": 2})
