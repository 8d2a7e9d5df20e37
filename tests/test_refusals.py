"""Misuses repeft refuses with one clear error instead of corrupting weights or files (issue 24).

Exports that would overwrite the base model they read, exports holding inf, tensors
loaded into a merged adapter, the reserved adapter name, and kernel choices that
cannot run here.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import repeft
from repeft import cli
from repeft.files import AdapterFileError


def trained_looking(model, std=0.2, seed=5):
    """Adapter weights away from their (zero-B) init, so a merge really changes the base."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=std)
    return model


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def run_cli(capsys, *argv):
    """(exit code, the last line on stderr); a traceback fails the test."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.rstrip("\n").rsplit("\n", 1)[-1]


@pytest.fixture
def base_and_adapter(tmp_path):
    """(base model directory, adapter directory saved on that base)."""
    import transformers

    tiny_model("llama").save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    trained_looking(repeft.wrap(base, repeft.LoRAConfig(r=4))).save_adapter(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


# -- item 3: an export never writes into the base model it reads ---------------------------------


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_cli_export_into_the_base_model_directory_is_refused(fmt, base_and_adapter, capsys):
    base_dir, adapter_dir = base_and_adapter
    before = digests(base_dir)
    code, err = run_cli(capsys, "export", adapter_dir, "--format", fmt, "--out", base_dir)
    assert code == 2 and err.startswith("repeft export: error: ") and "base model's own directory" in err, err
    assert digests(base_dir) == before


def test_cli_export_of_a_run_into_its_own_base_model_directory_is_refused(tmp_path, capsys):
    """The issue's case: `repeft export RUN --out <the run's model.path>`."""
    import transformers
    from test_train import TINY_BERT

    config = transformers.BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    code, err = cli_train(tmp_path, capsys, "model.config=null", f"model.path={tmp_path / 'base'}")
    assert code == 0, err
    before = digests(tmp_path / "base")
    for fmt in ("merged", "peft"):
        code, err = run_cli(capsys, "export", tmp_path / "run", "--format", fmt, "--out", tmp_path / "run" / ".." / "base")
        assert code == 2 and "base model's own directory" in err, err
    assert digests(tmp_path / "base") == before


def test_library_merged_exports_into_the_base_model_directory_are_refused(base_and_adapter):
    import transformers

    base_dir, adapter_dir = base_and_adapter
    before = digests(base_dir)
    model = repeft.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    for export in (model.save_merged, lambda out: repeft.export_merged(model, out)):
        with pytest.raises(AdapterFileError, match="base model's own directory"):
            export(base_dir)
    assert digests(base_dir) == before


# -- item 6: tensors cannot be loaded into a merged adapter -----------------------------------


def test_loading_tensors_into_a_merged_adapter_is_refused_and_unmerge_restores_the_base():
    model = trained_looking(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    other = {k: torch.randn_like(v) * 10 for k, v in model.adapter_state_dict().items()}
    model.merge()
    with pytest.raises(ValueError, match="is merged into the base weights; call unmerge"):
        model.load_adapter_tensors("default", other)
    model.unmerge()
    after = model.get_base_model().state_dict()
    for key, value in base_before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)
    model.load_adapter_tensors("default", other)  # unmerged: allowed
    torch.testing.assert_close(model.adapter_state_dict()["model.layers.0.self_attn.q_proj.lora_A"],
                               other["model.layers.0.self_attn.q_proj.lora_A"])


# -- item 8: merged exports never hold inf ------------------------------------------------------


def overflowing_in_half(model):
    """Adapter factors whose s*B@A exceeds float16's largest value (65504) but not float32's."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(40.0)  # s * B @ A = (64 / 4) * 4 * 40 * 40 = 102400 per entry with lora_alpha=64, r=4
    return model


def test_float16_merged_export_with_an_overflowing_weight_is_refused(tmp_path):
    model = overflowing_in_half(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4, lora_alpha=64)))
    with pytest.raises(ValueError, match=r"merged tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' holds inf"):
        repeft.export_merged(model, tmp_path / "half", dtype=torch.float16)
    assert not (tmp_path / "half").exists()
    repeft.export_merged(model, tmp_path / "full")  # float32 holds the same weights


def test_merging_into_a_float16_base_that_would_overflow_is_refused_and_keeps_the_base(tmp_path):
    model = overflowing_in_half(repeft.wrap(tiny_model("llama").half(), repeft.LoRAConfig(r=4, lora_alpha=64)))
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: merging adapter 'default' gives inf"):
        model.save_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and model.merged_adapter() is None
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- item 10: "__base__" is no adapter name ----------------------------------------------------


def test_the_base_adapter_name_is_reserved(tmp_path):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        model.add_adapter("__base__", repeft.LoRAConfig(r=4))
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4), adapter_name="__base__")
    model.save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        model.load_adapter(tmp_path / "adapter", adapter_name="__base__")
    assert sorted(model.configs) == ["default"]
    ids = torch.randint(0, VOCAB, (1, 5))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=["__base__"]).logits, base)


# -- item 16: a kernel choice that cannot run here is one line, before anything is built or written --


def cli_train(tmp_path, capsys, *overrides):
    import yaml
    from test_train import tiny_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "train.max_steps=2")))
    capsys.readouterr()
    return run_cli(capsys, "train", recipe, *overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on this machine")
def test_triton_kernel_without_a_gpu_is_refused_when_the_adapter_is_added(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest sets it for the kernel tests
    monkeypatch.delenv("REPEFT_KERNEL", raising=False)
    with pytest.raises(repeft.kernels.KernelError, match="kernel='triton' cannot run on this machine"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4, kernel="triton"))
    code, err = cli_train(tmp_path, capsys, "adapter.kernel=triton")
    assert code == 2 and err.startswith("repeft train: error: ") and "kernel='triton' cannot run" in err, err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("REPEFT_KERNEL", "triton")
    code, err = cli_train(tmp_path, capsys)
    assert code == 2 and "REPEFT_KERNEL=triton cannot run on this machine" in err, err


def test_an_unknown_REPEFT_KERNEL_is_refused_naming_the_valid_values(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REPEFT_KERNEL", "bogus")
    with pytest.raises(ValueError, match=r"unknown kernel backend 'bogus'; expected one of \('auto', 'triton', 'torch'\)"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))
    code, err = cli_train(tmp_path, capsys)
    assert code == 2 and err.startswith("repeft train: error: ") and "unknown kernel backend 'bogus'" in err, err
    code, err = run_cli(capsys, "info", "--kernels", "--shape", "24", "16", "4", "20", "--dtype", "float32")
    assert code == 2 and err.startswith("repeft info: error: unknown kernel backend 'bogus'"), err
