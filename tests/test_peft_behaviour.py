"""Where repeft and PEFT share a feature, repeft behaves as PEFT does (issue 26, section 2).

PEFT itself is the reference: each test runs the same calls on a PEFT model
and a repeft model of the same base and compares what they do.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import repeft
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")


def adapted_paths(model):
    """Paths (under the base model) of the linear layers an adapter wraps, for PEFT and repeft alike."""
    if isinstance(model, repeft.AdapterModel):
        return sorted(p.removeprefix("base_model.model.") for p, layer in model.adapter_layers()
                      if not isinstance(layer, repeft.layers.ModulesToSave))
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


# -- target_modules --------------------------------------------------------------------------------


def test_a_target_list_needs_one_match_like_peft_and_warns_about_the_rest():
    targets = ["q_proj", "v_proj", "query", "value", "c_attn"]  # one list for llama, bert and gpt2
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=targets))
    with pytest.warns(UserWarning, match=r"\['query', 'value', 'c_attn'\] match no module of LlamaForCausalLM"):
        ours = repeft.get_peft_model(tiny_model("llama"), repeft.LoRAConfig(r=4, target_modules=targets))
    assert adapted_paths(ours) == adapted_paths(theirs) and len(adapted_paths(ours)) == 4


def test_a_target_list_matching_nothing_at_all_is_still_an_error():
    with pytest.raises(repeft.TargetError, match=r"\['query', 'value'\] match no module of LlamaForCausalLM"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=["query", "value"]))


@pytest.mark.parametrize("spec", [r".*(embed_tokens|q_proj)", ["embed_tokens", "q_proj"]])
def test_an_embedding_that_peft_would_adapt_is_adapted_as_peft_adapts_it(spec):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=spec))
    ours = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4, target_modules=spec))
    assert "model.embed_tokens" in adapted_paths(ours)  # skipping it silently would differ
    assert adapted_paths(ours) == adapted_paths(theirs)


@pytest.mark.parametrize("spec", [r"0|2", ["0", "2"]])
def test_a_convolution_that_peft_would_adapt_is_adapted_as_peft_adapts_it(spec):
    base = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=spec))
    ours = repeft.wrap(base, repeft.LoRAConfig(r=2, target_modules=spec))
    assert "0" in adapted_paths(ours)  # skipping it silently would differ (tests/test_lora_conv.py: the maths)
    assert adapted_paths(ours) == adapted_paths(theirs)


class MultiheadAttentionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.lin = torch.nn.Linear(4, 2)


@pytest.mark.parametrize("spec", [r"mha|lin", ["mha", "lin"]])
def test_a_multihead_attention_that_peft_would_adapt_is_refused_by_name_not_skipped(spec):
    theirs = peft.get_peft_model(MultiheadAttentionNet(), peft.LoraConfig(r=2, target_modules=spec))
    assert "mha" in adapted_paths(theirs)  # PEFT adapts it: skipping it silently would differ
    base = MultiheadAttentionNet()
    with pytest.raises(repeft.TargetError, match="'mha', a MultiheadAttention"):
        repeft.wrap(base, repeft.LoRAConfig(r=2, target_modules=spec))
    assert all(p.requires_grad for p in base.parameters())  # the failed wrap left the model as it was


# -- adapters: adding, deleting, switching off ------------------------------------------------------


def both(**lora):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    return (peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kwargs)),
            repeft.get_peft_model(tiny_model("llama"), repeft.LoRAConfig(**kwargs)))


def trainable_names(model):
    return sorted(n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad)


def test_add_adapter_keeps_the_active_adapter_like_peft():
    theirs, ours = both()
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ours.add_adapter("other", repeft.LoRAConfig(r=2, target_modules=["q_proj"]))
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".other." in n)
    assert not any(p.requires_grad for n, p in theirs.named_parameters() if ".other." in n)


def test_deleting_an_unknown_adapter_is_a_value_error_like_peft():
    theirs, ours = both()
    with pytest.raises(ValueError):
        theirs.delete_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named 'nope'; adapters: \\['default'\\]"):
        ours.delete_adapter("nope")
    with pytest.raises(KeyError):  # what repeft raised before: callers catching it still do
        ours.set_adapter("nope")


def test_disabled_adapter_layers_are_frozen_like_peft_and_thaw_when_enabled():
    theirs, ours = both()
    before = (trainable_names(theirs), trainable_names(ours))
    assert before[0] and before[1]
    for model in (theirs, ours):
        model.disable_adapter_layers()
    assert trainable_names(theirs) == trainable_names(ours) == []
    for model in (theirs, ours):
        model.enable_adapter_layers()
    assert (trainable_names(theirs), trainable_names(ours)) == before
    with ours.disable_adapter():
        assert trainable_names(ours) == []
    assert trainable_names(ours) == before[1]


def test_default_lora_alpha_is_peft_s():
    assert repeft.LoRAConfig().lora_alpha == peft.LoraConfig().lora_alpha == 8
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=8, target_modules=["q_proj"]))
    ours = repeft.get_peft_model(tiny_model("llama"), repeft.LoRAConfig(r=8, target_modules=["q_proj"]))
    assert ours.configs["default"].scaling == theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]


def test_modules_to_save_on_a_container_is_refused_by_name():
    with pytest.raises(repeft.TargetError, match="'model.layers', a ModuleList, which has no forward"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=2, modules_to_save=["model.layers"]))


# -- files -----------------------------------------------------------------------------------------------


def test_save_pretrained_saves_every_adapter_like_peft(tmp_path):
    theirs, ours = both()
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ours.add_adapter("other", repeft.LoRAConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")

    def layout(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "README.md")

    assert layout(tmp_path / "ours") == layout(tmp_path / "peft") == [
        "adapter_config.json", "adapter_model.safetensors", "other/adapter_config.json", "other/adapter_model.safetensors"]
    ours.save_pretrained(tmp_path / "only", selected_adapters=["other"])
    assert layout(tmp_path / "only") == ["other/adapter_config.json", "other/adapter_model.safetensors"]
    reloaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "ours")
    reloaded.load_adapter(tmp_path / "ours" / "other", "other")
    assert sorted(reloaded.configs) == ["default", "other"] and reloaded.configs["other"].r == 2
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(TypeError, match=r"PEFT option\(s\) \['save_embedding_layers'\] are not supported"):
        ours.save_pretrained(tmp_path / "x", save_embedding_layers=True)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        ours.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_gives_eval_mode_unless_trainable_like_peft(is_trainable, tmp_path):
    theirs, ours = both(lora_dropout=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded_theirs = peft.PeftModel.from_pretrained(tiny_model("llama").train(), tmp_path / "peft", is_trainable=is_trainable)
    loaded_ours = repeft.AdapterModel.from_pretrained(tiny_model("llama").train(), tmp_path / "ours", is_trainable=is_trainable)
    assert loaded_ours.training == loaded_theirs.training == is_trainable
    batch = tiny_batch("llama")
    if not is_trainable:  # dropout off: the same output twice
        torch.testing.assert_close(loaded_ours(**batch).logits, loaded_ours(**batch).logits, atol=0, rtol=0)


def test_push_to_hub_uploads_the_adapters_not_the_base_model(monkeypatch):
    import huggingface_hub

    uploaded = {}

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded[repo_id] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    _, ours = both()
    ours.add_adapter("other", repeft.LoRAConfig(r=2, target_modules=["q_proj"]))
    ours.push_to_hub("me/tiny-lora")
    assert uploaded["me/tiny-lora"] == [
        "README.md", "adapter_config.json", "adapter_model.safetensors",  # the model card the Hub shows
        "other/README.md", "other/adapter_config.json", "other/adapter_model.safetensors"]


# -- PEFT's arguments and names (section 3) -----------------------------------------------------------


def test_peft_spellings_are_importable_from_repeft():
    assert repeft.PeftModel is repeft.AdapterModel and repeft.LoraConfig is repeft.LoRAConfig
    assert repeft.TaskType.SEQ_CLS == peft.TaskType.SEQ_CLS == "SEQ_CLS"
    assert repeft.LoraConfig(task_type=repeft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"


@pytest.mark.parametrize("selection", [
    {"layers_to_transform": [1]},
    {"layers_to_transform": 0, "layers_pattern": "layers"},
    {"exclude_modules": ["layers.0.self_attn.v_proj"]},
    {"exclude_modules": r".*\.1\.self_attn\.q_proj"},
])
def test_which_layers_adapt_follows_peft(selection):
    theirs, ours = both(**selection)
    assert adapted_paths(ours) == adapted_paths(theirs)
    assert 0 < len(adapted_paths(ours)) < 4


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_init_lora_weights_like_peft(init):
    theirs, ours = both(init_lora_weights=init, r=8)
    batch = tiny_batch("llama")
    base = tiny_model("llama")(**batch).logits
    for model in (theirs, ours):
        changed = (model(**batch).logits - base).abs().max().item() > 1e-6
        assert changed == (init is False)  # only False starts away from the base model

    def std_of(model, name):
        return torch.cat([p.flatten() for n, p in model.named_parameters() if name in n]).std().item()

    for factor in ("lora_A", "lora_B"):
        assert std_of(ours, factor) == pytest.approx(std_of(theirs, factor), rel=0.25, abs=1e-9)


@pytest.mark.parametrize("field, value, match", [
    ("bias", "all", "bias='all': repeft's LoRA trains no biases; use bias='none'"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa' is not supported by repeft .*PiSSA"),
    ("layers_pattern", "layers", "set layers_to_transform too"),
])
def test_peft_options_repeft_lacks_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        repeft.LoraConfig(**{field: value})


def randomized(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.3)
    return model


def test_peft_model_state_dicts_exchange_exactly_both_ways():
    theirs, ours = both()
    batch = tiny_batch("llama")
    randomized(ours)
    peft.set_peft_model_state_dict(theirs, repeft.get_peft_model_state_dict(ours))
    torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)
    randomized(theirs)
    result = repeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == result.unexpected_keys == []
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
    assert sorted(repeft.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))


def test_merge_adapter_and_merge_and_unload_take_peft_s_arguments():
    _, ours = both()
    batch = tiny_batch("llama")
    expected = randomized(ours)(**batch).logits
    ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    with pytest.raises(ValueError, match="repeft merges one adapter"):
        ours.merge_and_unload(adapter_names=["default", "other"])
    plain = ours.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"])
    torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)


def test_from_pretrained_and_load_adapter_take_peft_s_arguments(tmp_path):
    _, ours = both()
    randomized(ours)
    ours.add_adapter("other", repeft.LoRAConfig(r=2, target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path / "saved")
    inference = repeft.LoRAConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)
    loaded = repeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "saved", adapter_name="other",
                                              subfolder="other", config=inference, low_cpu_mem_usage=True)
    assert loaded.active_adapter == "other" and not loaded.training
    loaded.load_adapter(tmp_path / "saved", "default", is_trainable=True)
    loaded.set_adapter("default")  # loading does not switch, as in PEFT
    assert any(p.requires_grad for n, p in loaded.named_parameters() if ".default." in n)
    with pytest.raises(TypeError, match=r"\['token'\] are PEFT Hub or device options"):
        repeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "saved", token="hf_x")
    with pytest.raises(ValueError, match="config is prefix but"):
        repeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "saved", config=repeft.PrefixConfig())


def test_get_peft_model_autocast_adapter_dtype_like_peft():
    for autocast in (True, False):
        theirs = peft.get_peft_model(tiny_model("llama").to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                     autocast_adapter_dtype=autocast)
        ours = repeft.get_peft_model(tiny_model("llama").to(torch.bfloat16), repeft.LoraConfig(r=4, target_modules=["q_proj"]),
                                     autocast_adapter_dtype=autocast)

        def dtypes(model):
            return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

        assert dtypes(ours) == dtypes(theirs) == {torch.float32 if autocast else torch.bfloat16}
        theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]), autocast_adapter_dtype=autocast)
        ours.add_adapter("other", repeft.LoraConfig(r=2, target_modules=["v_proj"]), autocast_adapter_dtype=autocast)
        assert dtypes(ours) == dtypes(theirs)
    with pytest.raises(ValueError, match=r"\['mixed'\] not supported by repeft"):
        repeft.get_peft_model(tiny_model("llama"), repeft.LoraConfig(), mixed=True)


def test_loading_with_autocast_adapter_dtype_like_peft(tmp_path):
    saved = repeft.get_peft_model(tiny_model("llama"), repeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in saved.named_parameters():
            if "lora_B" in n:
                p.normal_()
    saved.save_pretrained(tmp_path / "saved")
    repeft.export_peft(saved, tmp_path / "peft")
    for autocast in (True, False):
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path / "peft",
                                                autocast_adapter_dtype=autocast)
        ours = repeft.PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path / "saved",
                                                autocast_adapter_dtype=autocast)
        ours.load_adapter(tmp_path / "saved", "second", autocast_adapter_dtype=autocast)
        theirs.load_adapter(tmp_path / "peft", "second", autocast_adapter_dtype=autocast)
        for model in (ours, theirs):
            lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
            assert {p.dtype for p in lora.values()} == {torch.float32 if autocast else torch.bfloat16}
        ours_b = [p for n, p in ours.named_parameters() if "lora_B" in n and "second" in n]
        theirs_b = [p for n, p in theirs.named_parameters() if "lora_B" in n and "second" in n]
        assert all(torch.equal(a, b) for a, b in zip(ours_b, theirs_b, strict=True))


PATTERNS = {"rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, "alpha_pattern": {"q_proj": 24}}


def test_rank_and_alpha_patterns_like_peft(tmp_path):
    theirs, ours = both(**PATTERNS)

    def ranks_and_scalings(model):
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, repeft.lora.LoRALinear):
                factors = module.adapters["default"]
                out[name.removeprefix("base_model.model.")] = (factors.lora_A.shape[0], factors.scaling)
            elif isinstance(module, peft.tuners.lora.LoraLayer):
                out[name.removeprefix("base_model.model.")] = (module.r["default"], module.scaling["default"])
        return out

    assert ranks_and_scalings(ours) == ranks_and_scalings(theirs)
    assert {r for r, _ in ranks_and_scalings(ours).values()} == {2, 4, 6}
    batch = tiny_batch("llama")
    randomized(ours)
    repeft.export_peft(ours, tmp_path / "to_peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "to_peft")
    torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)
    randomized(theirs).save_pretrained(tmp_path / "from_peft")
    imported = repeft.from_peft(tiny_model("llama"), tmp_path / "from_peft")
    torch.testing.assert_close(imported(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    reloaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(reloaded(**batch).logits, ours(**batch).logits, atol=0, rtol=0)


def test_rank_patterns_are_refused_where_parameters_are_shared():
    with pytest.raises(ValueError, match="rank_pattern / alpha_pattern are LoRA options; RepLoRAConfig needs one r"):
        repeft.RepLoRAConfig(rank_pattern={"v_proj": 2})
    with pytest.raises(ValueError, match="rank_pattern must be a mapping of strings to integers"):
        repeft.LoraConfig(rank_pattern={"v_proj": "2"})


def test_peft_s_base_fields_are_taken_and_unknown_options_refused_by_name():
    # PEFT's test helpers pass base_model_name_or_path to every config; a bare "unexpected keyword argument"
    # stopped 2,018 of PEFT's LoRA tests (benchmarks/peft_compat.py).
    config = repeft.LoraConfig(r=4, base_model_name_or_path="tiny-llama", revision="main")
    assert (config.base_model_name_or_path, config.revision) == ("tiny-llama", "main")
    assert config.peft_type == peft.LoraConfig().peft_type == "LORA"
    assert config.peft_type.value == peft.LoraConfig().peft_type.value == "LORA"  # an enum member, as in PEFT
    assert repeft.RepLoRAConfig.peft_type is None  # exported to PEFT as plain LoRA, not a PEFT method
    with pytest.raises(ValueError, match=r"LoRAConfig has no option \['layer_replication'\]: a PEFT option repeft does"):
        repeft.LoraConfig(layer_replication=[(0, 1)])
    with pytest.raises(ValueError, match="did you mean 'lora_alpha'"):
        repeft.LoraConfig(lora_aplha=16)


def test_combining_adapters_is_refused_by_name():
    _, ours = both()
    ours.add_adapter("other", repeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="add_weighted_adapter is not supported by repeft"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined")
    with pytest.raises(ValueError, match="repeft runs one adapter at a time"):
        ours.set_adapter(["default", "other"])


def test_merge_delete_and_unknown_names_behave_and_read_as_in_peft():
    for lib in (peft, repeft):
        model = lib.get_peft_model(tiny_model("llama"), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        init_lora_weights=False), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.eval()
        batch = tiny_batch("llama")
        model.merge_adapter()
        merged = model(**batch).logits
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
            model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, merged, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match=re.escape("Cannot delete adapter(s) ['a'] while they are merged")):
            model.delete_adapter("a")
        model.delete_adapter("b")  # the unmerged one may go, and the merge stays
        torch.testing.assert_close(model(**batch).logits, merged, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="Adapter nope does not exist"):
            model.delete_adapter("nope")


def test_from_pretrained_takes_peft_s_device_options_naming_the_base_s_device(tmp_path):
    repeft.get_peft_model(tiny_model("llama"), repeft.LoraConfig(r=4)).save_pretrained(tmp_path)
    for options in ({"torch_device": "cpu"}, {"device_map": {"": "cpu"}}, {"device_map": "cpu"}):
        loaded = repeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, **options)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match=r"torch_device='cuda'.*onto the base model's device \(cpu\)"):
        repeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, torch_device="cuda")
    with pytest.raises(ValueError, match=r"device_map='auto'.*onto the base model's device \(cpu\)"):
        repeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, device_map="auto")


def test_load_adapter_reports_no_missing_keys_and_a_config_changed_after_it_was_built_is_checked(tmp_path):
    model = repeft.get_peft_model(tiny_model("llama"), repeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    result = model.load_adapter(tmp_path, "other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    config = repeft.LoraConfig(r=4, target_modules=["q_proj"])
    config.bias = "all"  # as PEFT's tests do; repeft would otherwise train no bias, silently
    with pytest.raises(ValueError, match="bias='all': repeft's LoRA trains no biases"):
        model.add_adapter("third", config)
    assert sorted(model.peft_config) == ["default", "other"]


def test_from_pretrained_keeps_the_config_it_is_given_as_peft_does(tmp_path):
    repeft.get_peft_model(tiny_model("llama"), repeft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    for lib in (peft, repeft):
        config = lib.LoraConfig(r=4, target_modules=["q_proj"])
        loaded = lib.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, config=config)
        assert loaded.peft_config["default"] is config and config.inference_mode
