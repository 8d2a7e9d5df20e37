"""Adapter files: bad input is refused with a clear message and nothing is half-loaded or half-written."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import stat
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import repeft
from repeft import cli, files
from tiny_models import tiny_batch, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    model.save_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


def snapshot(directory):
    """Every entry under ``directory`` (links not followed) with its bytes, or its target for a link."""
    found = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_file():
            found[key] = ("file", path.read_bytes(), path.stat().st_mtime_ns)
        else:
            found[key] = ("dir",)
    return found


def assert_untouched(base, reference):
    """A failed load leaves the model exactly as it was: no adapter layers, same grads."""
    assert all(type(a) is type(b) for a, b in zip(base.modules(), reference.modules()))
    assert [p.requires_grad for p in base.parameters()] == [p.requires_grad for p in reference.parameters()]


def test_adapter_dir_contents(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((saved / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["format_version"] == 2
    assert meta["config"]["r"] == 4
    assert meta["base_model"]["architecture"]["hidden_size"] == 32
    assert "model.layers.0.self_attn.q_proj" in meta["adapted_modules"]
    # A LoRA adapter is saved in PEFT's layout too (tests/test_peft_format.py).
    assert meta["peft_type"] == "LORA" and meta["r"] == 4
    assert in_file("model.layers.0.self_attn.q_proj.lora_A") in load_file(saved / "adapter_model.safetensors")


def in_file(name):
    """The name a LoRA adapter's tensor ``name`` (repeft's, as load errors give it) has in its file: PEFT's."""
    return f"base_model.model.{name}.weight"


def test_truncated_weights_are_rejected(saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    base = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match="corrupt or truncated"):
        repeft.load_adapter(base, saved)
    assert_untouched(base, tiny_model("llama"))


def test_corrupt_config_is_rejected(saved):
    (saved / "adapter_config.json").write_text('{"format": "repeft", ')
    with pytest.raises(repeft.AdapterFileError, match="not valid JSON"):
        repeft.load_adapter(tiny_model("llama"), saved)


def test_missing_key_is_rejected(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[in_file("model.layers.1.self_attn.v_proj.lora_B")]
    save_file(tensors, weights)
    base = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match="missing model.layers.1.self_attn.v_proj.lora_B"):
        repeft.load_adapter(base, saved)
    assert_untouched(base, tiny_model("llama"))


def test_shape_mismatch_is_rejected(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[in_file("model.layers.0.self_attn.q_proj.lora_A")] = torch.zeros(4, 31)
    save_file(tensors, weights)
    with pytest.raises(repeft.AdapterFileError, match=r"wrong shape.*q_proj.lora_A: file \(4, 31\), model \(4, 32\)"):
        repeft.load_adapter(tiny_model("llama"), saved)


def test_adapter_for_another_base_is_rejected(saved):
    other = tiny_model("mistral")
    with pytest.raises(repeft.AdapterFileError, match="made for another base model: model_type='llama'"):
        repeft.load_adapter(other, saved)
    assert_untouched(other, tiny_model("mistral"))


def test_failed_load_into_wrapped_model_keeps_its_adapters(saved):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=2), adapter_name="mine")
    batch = tiny_batch("llama")
    before = model(**batch).logits
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[in_file("model.layers.0.self_attn.q_proj.lora_B")] = torch.zeros(3, 4)
    save_file(tensors, weights)
    with pytest.raises(repeft.AdapterFileError):
        model.load_adapter(saved, "other")
    assert list(model.configs) == ["mine"] and model.active_adapter == "mine"
    torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)


def test_pickle_files_are_never_loaded(tmp_path):
    meta = {"format": "repeft", "format_version": 1, "config": {"method": "lora"}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(repeft.AdapterFileError, match="pickle files are never loaded"):
        repeft.load_adapter(tiny_model("llama"), tmp_path)


def test_a_peft_dir_of_another_method_is_refused_by_name(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"base_model.model.lm_head.ia3_l": torch.ones(96)}, tmp_path / "adapter_model.safetensors")
    base = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match="only PEFT LoRA adapters can be imported, this one is 'IA3'"):
        repeft.load_adapter(base, tmp_path)
    assert_untouched(base, tiny_model("llama"))


def test_a_config_of_neither_format_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "other", "peft_type": "LORA"}))
    with pytest.raises(repeft.AdapterFileError, match="neither a repeft adapter config .* nor a PEFT one"):
        repeft.load_adapter(tiny_model("llama"), tmp_path)


def test_crash_during_save_leaves_previous_adapter_intact(saved, monkeypatch):
    before = {k: v.clone() for k, v in load_file(saved / "adapter_model.safetensors").items()}
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(saved)
    after = load_file(saved / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temp dirs left behind


def test_crash_during_merged_export_leaves_nothing(tmp_path, monkeypatch):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(type(model.get_base_model()), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed"):
        model.save_merged(tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_target_that_matches_nothing_names_closest_modules():
    base = tiny_model("llama")
    with pytest.raises(repeft.TargetError, match=r"\['q_prj'\] match no module.*closest linear layer names: q_proj"):
        repeft.wrap(base, repeft.LoRAConfig(target_modules=["q_prj"]))
    assert_untouched(base, tiny_model("llama"))
    with pytest.raises(repeft.TargetError, match="regex 'attn.*' matches no linear layer"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules="attn.*"))
    with pytest.raises(repeft.TargetError, match="LlamaAttention"):
        repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=["self_attn"]))


def test_targets_by_suffix_and_regex():
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=r"model\.layers\.1\..*_proj"))
    paths = [p for p, _ in model.adapter_layers()]
    assert len(paths) == 7 and all(".layers.1." in p for p in paths)
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules=["layers.0.mlp.up_proj"]))
    assert [p for p, _ in model.adapter_layers()] == ["base_model.model.model.layers.0.mlp.up_proj"]
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(target_modules="all-linear"))
    assert not any("lm_head" in p for p, _ in model.adapter_layers())


def test_unsupported_architecture_without_targets_explains_what_to_pass():
    import transformers as tf

    base = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=50))
    with pytest.raises(repeft.TargetError, match="no default target_modules for model_type 'bloom'.*query_key_value"):
        repeft.wrap(base, repeft.LoRAConfig())


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        repeft.LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\] for LoRAConfig"):
        repeft.AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ValueError, match="activation must be one of"):
        repeft.RepLoRAConfig(activation="swish")
    config = repeft.RepLoRAConfig(r=3, share_mlp=True)
    assert repeft.AdapterConfig.from_json(config.to_json()) == config


def test_wrapping_twice_is_refused():
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig())
    with pytest.raises(TypeError, match="add_adapter"):
        repeft.wrap(model, repeft.LoRAConfig())


# -- saving into a directory that holds other files ----------------------------------------------


def randomized(model):
    torch.manual_seed(5)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return model


SAVES = {
    "save_adapter": lambda model, out: model.save_adapter(out),
    "save_pretrained": lambda model, out: model.save_pretrained(out),
    "save_merged": lambda model, out: model.save_merged(out),
    "export_peft": lambda model, out: repeft.export_peft(model, out),
    "export_merged": lambda model, out: repeft.export_merged(model, out),
}


@pytest.mark.parametrize("save", list(SAVES))
def test_saving_into_a_directory_keeps_files_it_did_not_write(save, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    SAVES[save](model, out)
    SAVES[save](model, out)  # and again, over its own files
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-2" / "state.json").is_file()
    written = sorted(p.name for p in out.iterdir() if p.name not in ("notes.txt", "checkpoint-2"))
    if "merged" in save:
        assert written == ["config.json", "generation_config.json", "model.safetensors"]
    else:
        card = ["README.md"] if save == "save_pretrained" else []  # PEFT's model card, from save_pretrained only
        assert written == sorted(["adapter_config.json", "adapter_model.safetensors", *card])


def test_merged_save_replaces_the_weight_files_of_an_earlier_one(tmp_path):
    # As transformers' save_pretrained does: a stale shard would be loaded beside the new file.
    out = tmp_path / "merged"
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    model.save_merged(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    model.save_merged(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_follow_the_umask(umask, tmp_path):
    model = repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4))
    old = os.umask(umask)
    try:
        model.save_adapter(tmp_path / "a" / "adapter")
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "adapter"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    for path in (tmp_path / "a" / "adapter").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_save_interrupted_while_moving_files_in_is_read_whole_and_finished_by_the_next_save(saved, monkeypatch):
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=2)))
    moves = []

    def replace_then_die(src, dst):
        moves.append(dst)
        if len(moves) == 3:  # the staging folder, then the config: killed before the weights
            raise KeyboardInterrupt
        os.rename(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(saved)
    monkeypatch.undo()
    left = snapshot(saved)
    assert any(name.startswith(files.COMMIT) for name in left)
    loaded = repeft.load_adapter(tiny_model("llama"), saved)  # the new adapter, whole
    assert loaded.configs["default"].r == 2
    assert all(torch.equal(v, model.adapter_state_dict()[k]) for k, v in loaded.adapter_state_dict().items())
    assert snapshot(saved) == left  # a load writes nothing
    other = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    other.save_adapter(saved / "elsewhere")  # a save in another directory leaves this one alone
    assert snapshot(saved)[files.CONFIG_NAME] == left[files.CONFIG_NAME]
    model.save_adapter(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "elsewhere"]


def test_merged_save_interrupted_between_shards_is_finished_whole(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    model.save_merged(out)  # an earlier, unsharded save: its model.safetensors must go
    moves = []

    def replace_then_die(src, dst):
        moves.append(dst)
        if len(moves) == 5:  # staging folder, config, generation config, first shard: then killed
            raise KeyboardInterrupt
        os.rename(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        model.save_merged(out, max_shard_size="20KB")
    monkeypatch.undo()
    files.recover(out)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    reloaded = type(model.get_base_model()).from_pretrained(out).eval()
    batch = tiny_batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_an_adapter_left_hidden_by_an_older_save_killed_between_renames_still_loads(saved):
    # repeft's first saves renamed the old directory to .NAME.old-PID, then the new one in; a kill
    # between the two left only the hidden copy, and loading said the adapter did not exist.
    import subprocess
    import sys

    expected = repeft.load_adapter(tiny_model("llama"), saved).adapter_state_dict()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    hidden = saved.with_name(f".{saved.name}.old-{dead.stdout.strip()}")
    saved.rename(hidden)
    model = repeft.load_adapter(tiny_model("llama"), saved)
    assert hidden.is_dir() and not saved.exists()  # read where it lies: a load moves nothing
    for key, tensor in model.adapter_state_dict().items():
        torch.testing.assert_close(tensor, expected[key], atol=0, rtol=0)


def test_random_kills_while_saving_never_lose_or_mix_the_adapter(tmp_path):
    # Two adapters of different rank saved in turn by a child process killed at random moments:
    # every load after a kill gets one of them whole, and no staging folder outlives the next recovery.
    target = tmp_path / "adapter"
    versions = [
        ({"format": "repeft", "format_version": 1, "config": {"method": "lora"}, "rank": r},
         {"x.lora_A": torch.full((r, 64), float(r)), "x.lora_B": torch.full((64, r), float(r))})
        for r in (2, 4)
    ]
    files.write_adapter_dir(target, *versions[0])
    rng = random.Random(0)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                for i in itertools.count():
                    files.write_adapter_dir(target, *versions[i % 2])
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.001, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        meta, tensors = files.read_adapter_dir(target)
        r = meta["rank"]
        assert tensors.keys() == versions[0][1].keys()
        assert all(torch.equal(tensors[k], v) for k, v in versions[r // 4][1].items())
        files.recover(target)  # what the next save does first
        assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# -- hostile or broken values ------------------------------------------------------------------


def edit_tensors(saved, edit):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


def edit_config(saved, edit):
    path = saved / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# Reading the file names its tensors as stored (PEFT's names); fitting them to the model, as repeft names them.
KEY = "model.layers.0.self_attn.q_proj.lora_A"
FILE_KEY = in_file(KEY)
BAD_TENSORS = {
    "nan": (lambda t: t[FILE_KEY].__setitem__((0, 0), float("nan")), rf"tensor '{FILE_KEY}' holds 1 NaN or infinite"),
    "inf": (lambda t: t[FILE_KEY].__setitem__((1, 2), float("inf")), rf"tensor '{FILE_KEY}' holds 1 NaN or infinite"),
    "int64": (lambda t: t.__setitem__(FILE_KEY, t[FILE_KEY].long()),
              rf"tensor '{KEY}' is torch.int64 but the model's is torch.float32"),
    "bool": (lambda t: t.__setitem__(FILE_KEY, t[FILE_KEY] > 0), rf"tensor '{KEY}' is torch.bool"),
    "float8": (lambda t: t.__setitem__(FILE_KEY, t[FILE_KEY].to(torch.float8_e4m3fn)),
               rf"tensor '{FILE_KEY}' is torch.float8_e4m3fn; adapter weights"),
}
BAD_CONFIGS = {
    "lora_alpha NaN": (lambda m: m["config"].update(lora_alpha=float("nan")), r"lora_alpha must be a number in \(0, 1e\+06\), got nan"),
    "lora_alpha string": (lambda m: m["config"].update(lora_alpha="16"), "lora_alpha must be a number in .*, got '16'"),
    # Loaded, every forward would overflow (1e308) or the adapter would do nothing or the opposite (<= 0).
    "lora_alpha huge": (lambda m: m["config"].update(lora_alpha=1e308), r"lora_alpha must be a number in .*, got 1e\+308"),
    "lora_alpha zero": (lambda m: m["config"].update(lora_alpha=0), "lora_alpha must be a number in .*, got 0"),
    "lora_alpha negative": (lambda m: m["config"].update(lora_alpha=-8.0), "lora_alpha must be a number in .*, got -8.0"),
    "use_rslora string": (lambda m: m["config"].update(use_rslora="no"), "use_rslora must be true or false, got 'no'"),
    "r bool": (lambda m: m["config"].update(r=True), "r must be a positive integer, got True"),
    # Built on the meta device first: refused by shape, before allocating 2**40 x 32 floats.
    "huge r": (
        lambda m: m["config"].update(r=2**40),
        r"wrong shape, e\.g\. .*lora_A: file \(4, 32\), model \(1099511627776, 32\)",
    ),
    "format_version string": (lambda m: m.update(format_version="2"), "format_version must be an integer, got '2'"),
    "base_model string": (lambda m: m.update(base_model="llama"), "base_model must be a JSON object, got 'llama'"),
    "config list": (lambda m: m.update(config=[]), "config must be a JSON object"),
}


def nest_deeply(saved, _):
    (saved / "adapter_config.json").write_text('{"format": "repeft", "config": ' + "[" * 100_000 + "]" * 100_000 + "}")


BROKEN = {
    **{f"tensor: {name}": (edit_tensors, edit, match) for name, (edit, match) in BAD_TENSORS.items()},
    **{f"config: {name}": (edit_config, edit, match) for name, (edit, match) in BAD_CONFIGS.items()},
    "config nested 100,000 deep": (nest_deeply, None, "nests JSON too deeply"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_values_in_the_files_are_refused_by_name(case, saved):
    breakage, edit, match = BROKEN[case]
    breakage(saved, edit)
    base = tiny_model("llama")
    with pytest.raises(repeft.AdapterFileError, match=match):
        repeft.load_adapter(base, saved)
    assert_untouched(base, tiny_model("llama"))


# -- the command line on broken and good adapter directories ----------------------------------


@pytest.fixture
def base_dir(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def run_cli(capsys, *argv):
    """(exit code, the last line on stderr); a traceback fails the test."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.rstrip("\n").rsplit("\n", 1)[-1]


CLI_BREAKAGES = {
    **{name: (breakage, edit) for name, (breakage, edit, _) in BROKEN.items()},
    "truncated config": (lambda d, _: (d / "adapter_config.json").write_text('{"format": "repeft", '), None),
    "truncated weights": (lambda d, _: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00"), None),
}


@pytest.mark.parametrize("case", list(CLI_BREAKAGES))
def test_export_of_a_broken_adapter_is_one_line_and_exit_code_2(case, saved, base_dir, tmp_path, capsys):
    breakage, edit = CLI_BREAKAGES[case]
    breakage(saved, edit)
    code, err = run_cli(capsys, "export", saved, "--base", base_dir, "--out", tmp_path / "merged")
    assert code == 2 and err.startswith("repeft export: error: "), err
    assert not (tmp_path / "merged").exists()  # no NaN (or any) model written


def test_info_on_a_truncated_weights_file_is_one_line_and_exit_code_2(saved, capsys):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    code, err = run_cli(capsys, "info", saved)
    assert code == 2 and err.startswith("repeft info: error: ") and "corrupt or truncated" in err, err


@pytest.mark.parametrize("damage", ["model: [\n", "task: causal_lm\nmodel: {path: x}\nadapter: {method: nope}\n"])
def test_info_on_a_run_with_a_damaged_recipe_is_one_line_and_exit_code_2(tmp_path, capsys, damage):
    (tmp_path / "recipe.yaml").write_text(damage)
    code = cli.main(["info", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"repeft info: error: {tmp_path} looks like a run, but its recipe.yaml is damaged: "), err


@pytest.mark.parametrize("where", [".", "sub"])
def test_export_into_its_own_input_is_refused(where, saved, base_dir, capsys):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    code, err = run_cli(capsys, "export", saved, "--format", "peft", "--base", base_dir, "--out", saved / where)
    assert code == 2 and "inside it" in err
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_export_of_a_bare_classifier_adapter_needs_no_flags_and_keeps_label_names(tmp_path, capsys):
    import transformers as tf

    # The base checkpoint is a headless encoder (like MiniLM); the adapter was trained on a classifier.
    tiny_model("bert").bert.save_pretrained(tmp_path / "base")
    classifier = tf.BertForSequenceClassification.from_pretrained(
        tmp_path / "base", id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1}
    ).eval()
    model = randomized(repeft.wrap(classifier, repeft.LoRAConfig(r=4)))
    model.save_adapter(tmp_path / "adapter")
    code, err = run_cli(capsys, "export", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is tf.BertForSequenceClassification
    assert merged.config.id2label == {0: "ham", 1: "spam"} and merged.config.label2id == {"ham": 0, "spam": 1}
    batch = {k: v for k, v in tiny_batch("bert").items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_export_onto_a_missing_base_is_one_line_and_exit_code_2(saved, tmp_path, capsys):
    code, err = run_cli(capsys, "export", saved, "--base", tmp_path / "no-such-model", "--out", tmp_path / "merged")
    assert code == 2 and err.startswith("repeft export: error: cannot load the base model"), err


# -- hostile adapter directories: a load writes nothing, a save writes only inside -------------------


def plant_commit(directory, manifest, files_in_it):
    """A save folder as a hostile download could ship it: a manifest and files of the attacker's choosing."""
    commit = directory / f"{files.COMMIT}666-evil"
    commit.mkdir()
    for name, text in files_in_it.items():
        (commit / name).parent.mkdir(parents=True, exist_ok=True)
        (commit / name).write_text(text)
    (commit / files.MANIFEST).write_text("\n".join(manifest))
    return commit


@pytest.fixture
def hostile(saved, tmp_path):
    """``saved`` plus a link to a 'home' outside it and save folders that try to write through it, above it
    and over the user's model shards."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("the user's")
    (saved / "link").symlink_to(home)
    (saved / "model-00001-of-00002.safetensors").write_text("the user's shard")
    plant_commit(saved, ["link/.bashrc", "../x", "model.safetensors", ".bashrc"], {
        "link/.bashrc": "rm -rf ~", "../x": "moved up", "model.safetensors": "evil", ".bashrc": "hidden",
    })
    staging = saved / f"{files.STAGING}1-evil"  # a dead writer's staging folder that is a link out
    staging.symlink_to(home)
    return saved


def read_only_uses(saved, capsys):
    yield lambda: repeft.load_adapter(tiny_model("llama"), saved)
    yield lambda: files.read_adapter_dir(saved)
    yield lambda: cli.main(["info", str(saved)])
    peft_dir = saved.parent / "peft"
    repeft.export_peft(repeft.load_adapter(tiny_model("llama"), saved), peft_dir)
    plant_commit(peft_dir, ["../y"], {"../y": "moved up"})
    yield lambda: repeft.from_peft(tiny_model("llama"), peft_dir)


def test_reading_a_hostile_directory_writes_nothing(hostile, tmp_path, capsys):
    before = {"adapter": snapshot(hostile), "outside": snapshot(tmp_path / "home")}
    for use in read_only_uses(hostile, capsys):
        use()
        assert {"adapter": snapshot(hostile), "outside": snapshot(tmp_path / "home")} == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_saving_into_a_hostile_directory_writes_only_its_files_inside_it(hostile, tmp_path):
    outside = snapshot(tmp_path / "home")
    model = randomized(repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)))
    model.save_adapter(hostile)
    assert snapshot(tmp_path / "home") == outside  # nothing through the link, no staging folder emptied there
    assert not (tmp_path / "x").exists()
    assert (hostile / "model-00001-of-00002.safetensors").read_text() == "the user's shard"
    assert not (hostile / ".bashrc").exists()
    # A plain checkpoint name a dead save listed is moved in (it could have shipped in the folder anyway).
    assert (hostile / "model.safetensors").read_text() == "evil"
    assert not any(p.name.startswith(files.COMMIT) for p in hostile.iterdir())
    loaded = repeft.load_adapter(tiny_model("llama"), hostile)
    for key, value in loaded.adapter_state_dict().items():
        torch.testing.assert_close(value, model.adapter_state_dict()[key], atol=0, rtol=0)


def test_a_save_refuses_no_directory_but_never_follows_a_link_named_like_its_files(saved, tmp_path):
    # A link in place of adapter_config.json is replaced, not written through.
    outside = tmp_path / "victim.json"
    outside.write_text("the user's")
    (saved / files.CONFIG_NAME).unlink()
    (saved / files.CONFIG_NAME).symlink_to(outside)
    repeft.wrap(tiny_model("llama"), repeft.LoRAConfig(r=4)).save_adapter(saved)
    assert outside.read_text() == "the user's" and not (saved / files.CONFIG_NAME).is_symlink()


# -- concurrent saves and loads ---------------------------------------------------------------------


def versions_of_rank(*ranks):
    return [
        ({"format": "repeft", "format_version": 1, "config": {"method": "lora"}, "rank": r},
         {"x.lora_A": torch.full((r, 64), float(r)), "x.lora_B": torch.full((64, r), float(r))})
        for r in ranks
    ]


def assert_whole(meta, tensors):
    r = meta["rank"]
    assert tensors["x.lora_A"].shape == (r, 64) and bool((tensors["x.lora_A"] == r).all()), (r, tensors["x.lora_A"].shape)


def test_two_processes_saving_while_a_third_loads_never_mix_two_adapters(tmp_path):
    # Before the directory lock: a reader racing writers got a mixed read 27 times in 1,500, and two
    # writers left one adapter's config beside the other's tensors 1 time in 400.
    target = tmp_path / "adapter"
    versions = versions_of_rank(2, 4)
    files.write_adapter_dir(target, *versions[0])
    deadline = time.time() + 2.0
    writers = []
    for version in versions:
        pid = os.fork()
        if pid == 0:
            try:
                while time.time() < deadline:
                    files.write_adapter_dir(target, *version)
            finally:
                os._exit(0)
        writers.append(pid)
    reads = 0
    while time.time() < deadline:
        assert_whole(*files.read_adapter_dir(target))
        reads += 1
    for pid in writers:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert_whole(*files.read_adapter_dir(target))
    assert reads > 50
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
