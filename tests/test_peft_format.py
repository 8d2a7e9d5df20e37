"""One file format: a LoRA adapter saved by repeft is a PEFT adapter directory, and repeft loads PEFT's directories.

``peft.PeftModel.from_pretrained`` loads what ``save_pretrained`` writes, with no
conversion step; repeft's own fields ride along in ``adapter_config.json``.
Methods PEFT cannot represent keep repeft's layout (and ``export_peft``).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import repeft
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")

# The fields repeft adds to PEFT's adapter_config.json; PEFT 0.21 ignores them, with a warning that names them.
REPEFT_FIELDS = {"adapted_modules", "base_model", "config", "format", "format_version", "method", "repeft_version"}

LORA_CONFIGS = {
    "lora": ("llama", lambda: repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora": ("llama", lambda: repeft.LoRAConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])),
    "embedding": ("llama", lambda: repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "rank_pattern and a trained head": ("llama", lambda: repeft.LoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])),
    "gpt2 Conv1D": ("gpt2", lambda: repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"])),
    "bert classifier": ("bert", lambda: repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=["query", "value"])),
}


def randomized(model, seed=3):
    """Every adapter tensor off its init (B starts at zero), so the adapter changes the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def logits(model, family):
    with torch.no_grad():
        return model(**tiny_batch(family)).logits


def config_with(config, **changes):
    return repeft.AdapterConfig.from_dict({**config.to_dict(), **changes})


def peft_load(base, path, **kwargs):
    """``peft.PeftModel.from_pretrained``, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, path, **kwargs).eval()
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(LORA_CONFIGS))
def test_peft_loads_what_save_pretrained_writes_without_conversion(name, tmp_path):
    family, make_config = LORA_CONFIGS[name]
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = randomized(repeft.wrap(base, make_config()))
    expected = logits(model, family)
    assert not torch.allclose(expected, logits(reference, family), atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")

    theirs, said = peft_load(copy.deepcopy(reference), tmp_path / "adapter")
    torch.testing.assert_close(logits(theirs, family), expected, atol=1e-6, rtol=0)
    # Every PEFT field is one PEFT knows: the only unknown ones it reports are repeft's own.
    unexpected = [m for m in said if m.startswith("Unexpected keyword arguments")]
    assert len(unexpected) == 1 and all(f"'{field}'" in unexpected[0] for field in REPEFT_FIELDS), said
    assert unexpected[0].split("]")[0].count("'") == 2 * len(REPEFT_FIELDS)
    # And repeft reads it back as it was.
    back = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "adapter")
    assert back.configs["default"] == config_with(model.configs["default"], inference_mode=True)
    torch.testing.assert_close(logits(back, family), expected, atol=0, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["conv2d", "conv3d", "grouped"])
def test_peft_loads_a_convolution_s_adapter_from_save_pretrained(kind, use_dora, tmp_path):
    from test_lora_conv import ConvNet, inputs

    base = ConvNet(kind)
    reference = copy.deepcopy(base)
    model = randomized(repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["conv", "head"], use_dora=use_dora)))
    model.save_pretrained(tmp_path / "adapter")
    theirs, _ = peft_load(reference, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(theirs(inputs(kind)), model(inputs(kind)), atol=1e-6, rtol=0)


def test_the_saved_files_are_peft_s_with_repeft_s_fields_beside(tmp_path):
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4, use_dora=True, task_type="CAUSAL_LM")))
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, use_dora=True, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft")
    ours_meta, their_meta = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("adapter", "peft"))
    ours_tensors, their_tensors = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "peft"))
    assert set(ours_tensors) == set(their_tensors)
    assert all(ours_tensors[k].shape == their_tensors[k].shape for k in ours_tensors)
    assert set(ours_meta) - set(their_meta) == REPEFT_FIELDS
    for field in ("peft_type", "task_type", "r", "lora_alpha", "use_dora", "use_rslora", "bias", "fan_in_fan_out"):
        assert ours_meta[field] == their_meta[field], field
    assert ours_meta["format"] == "repeft" and ours_meta["format_version"] == 2 and ours_meta["config"]["use_dora"]


@pytest.mark.parametrize("config", [
    repeft.RepLoRAConfig(r=4, mlp_hidden=8),
    repeft.RepLoRAConfig(r=4, mlp_hidden=8, form="residual"),
    repeft.PrefixConfig(n_prefix=3),
    repeft.ZeroInitConfig(n_prompt=3),
], ids=["replora shared", "replora residual", "prefix", "zero_init"])
def test_methods_peft_cannot_represent_keep_repeft_s_format(config, tmp_path):
    model = randomized(repeft.wrap(tiny_model("llama"), config))
    model.save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "peft_type" not in meta and meta["format_version"] == 1  # an older repeft reads it too
    assert not any(k.startswith("base_model.model.") for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    back = repeft.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    torch.testing.assert_close(logits(back, "llama"), logits(model, "llama"), atol=0, rtol=0)


def test_a_lora_adapter_on_conv1d_and_linear_layers_keeps_repeft_s_format(tmp_path):
    # PEFT's config holds one fan_in_fan_out flag (export_peft refuses the mix); the save stays repeft's.
    model = randomized(repeft.wrap(tiny_model("gpt2"), repeft.LoRAConfig(r=2, target_modules=["c_attn", "lm_head"])))
    model.save_adapter(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "peft_type" not in meta and meta["format_version"] == 1
    back = repeft.load_adapter(tiny_model("gpt2"), tmp_path / "adapter")
    torch.testing.assert_close(logits(back, "gpt2"), logits(model, "gpt2"), atol=0, rtol=0)


def test_several_adapters_saved_with_save_pretrained_load_in_peft(tmp_path):
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    model = repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", repeft.LoRAConfig(r=2, use_dora=True, target_modules=["v_proj", "o_proj"]))
    randomized(model)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model, "llama")
    model.save_pretrained(tmp_path / "adapters")

    theirs, _ = peft_load(reference, tmp_path / "adapters")
    theirs.load_adapter(tmp_path / "adapters" / "other", "other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs, "llama"), expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,targets", [
    ("llama", ["q_proj", "down_proj", "embed_tokens"]), ("gpt2", ["c_attn", "c_fc"]), ("bert", ["query", "dense"]),
])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_peft_saved_lora_loads_with_load_adapter_and_from_pretrained(family, targets, use_dora, tmp_path):
    if use_dora and "embed_tokens" in targets:
        targets = targets[:-1]  # DoRA on embeddings is not repeft's yet
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, use_dora=use_dora, fan_in_fan_out=family == "gpt2",
        modules_to_save=["classifier"] if family == "bert" else None))
    randomized(theirs)
    expected = logits(theirs, family)
    theirs.save_pretrained(tmp_path / "peft")

    loaded = repeft.load_adapter(copy.deepcopy(reference), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded.eval(), family), expected, atol=1e-6, rtol=0)
    from_pretrained = repeft.AdapterModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft")
    assert not from_pretrained.training
    torch.testing.assert_close(logits(from_pretrained, family), expected, atol=1e-6, rtol=0)
    # Saved again by repeft, PEFT loads it back to the same logits.
    loaded.save_pretrained(tmp_path / "again")
    again, _ = peft_load(copy.deepcopy(reference), tmp_path / "again")
    torch.testing.assert_close(logits(again, family), expected, atol=1e-6, rtol=0)


def test_from_peft_is_load_adapter(tmp_path):
    # It reads either format: a repeft save of a method PEFT has no name for loads too.
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, mlp_hidden=8)))
    model.save_adapter(tmp_path / "adapter")
    back = repeft.from_peft(tiny_model("llama"), tmp_path / "adapter")
    assert back.configs["default"].method == "replora"
    torch.testing.assert_close(logits(back, "llama"), logits(model, "llama"), atol=0, rtol=0)


def test_a_trainer_checkpoint_in_peft_s_layout_resumes(tmp_path):
    # Checkpoints are adapter saves; resuming reads their tensors back under repeft's names.
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    model.save_adapter(tmp_path / "checkpoint")
    fresh = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)).eval()
    _, tensors = fresh.read_adapter(tmp_path / "checkpoint")
    fresh.load_adapter_tensors("default", tensors)
    torch.testing.assert_close(logits(fresh, "llama"), logits(model, "llama"), atol=0, rtol=0)


def test_the_cli_reads_both_formats(tmp_path, capsys):
    from repeft import cli

    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    model.save_adapter(tmp_path / "ours")
    assert cli.main(["info", str(tmp_path / "ours"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["method"] == "lora" and info["format_version"] == 2
    # A PEFT directory exports merged onto the base it records (base_model_name_or_path).
    tiny_model("llama").save_pretrained(tmp_path / "base")
    theirs = randomized(peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"])))
    theirs.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(tmp_path / "base")}))
    assert cli.main(["export", str(tmp_path / "peft"), "--out", str(tmp_path / "merged")]) == 0
    merged = type(tiny_model("llama")).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, "llama"), logits(theirs, "llama"), atol=1e-5, rtol=0)


def test_save_pretrained_writes_peft_s_model_card_and_keeps_a_user_s_text(tmp_path):
    import yaml
    from huggingface_hub import ModelCard

    base = tiny_model("llama")
    base.config._name_or_path = "me/tiny-llama"
    model = repeft.get_peft_model(base, repeft.LoraConfig(r=4))
    model.add_adapter("shared", repeft.RepLoRAConfig(r=4))
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nTrained on my data.\n")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "me/tiny-llama" and "lora" in meta["tags"]
    assert meta["license"] == "mit" and "Trained on my data." in card
    assert meta["pipeline_tag"] == "text-generation"
    other = ModelCard.load(tmp_path / "shared" / "README.md").data  # RepLoRA: repeft's layout, not PEFT's
    assert other.library_name == "repeft" and "lora" not in other.tags


def test_a_model_card_link_is_replaced_not_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token=hf_secret")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").symlink_to(secret)
    repeft.get_peft_model(tiny_model("llama"), repeft.LoraConfig(r=4)).save_pretrained(out)
    assert not (out / "README.md").is_symlink() and "hf_secret" not in (out / "README.md").read_text()
    assert secret.read_text() == "token=hf_secret"
