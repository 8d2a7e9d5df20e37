"""LoRA on ``nn.Embedding`` against PEFT itself: same weights give the same logits and gradients, files exchange exactly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file

import repeft
from repeft.lora_embedding import LoRAEmbedding
from test_dora import as_repeft, assert_grads_like_peft
from test_mixed_batch import alone
from tiny_models import logits, tiny_batch, tiny_model, train_steps

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# Gemma 3's embedding has a padding_idx (pad_token_id=0) and multiplies its output by embed_scale.
TARGETS = {"llama": ["embed_tokens", "q_proj"], "gemma3_text": ["embed_tokens", "v_proj"], "gpt2": ["wte", "c_attn"]}


def batch_with_padding(family: str) -> dict[str, torch.Tensor]:
    batch = tiny_batch(family)
    batch["input_ids"][:, 0] = 0  # the padding token: its row of A gets no gradient where padding_idx is 0
    batch["labels"] = batch["input_ids"]
    return batch


def peft_lora(family: str, **overrides):
    """A PEFT LoRA model of ``family`` with nonzero embedding factors, and an untouched copy of its base."""
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False,
                  fan_in_fan_out=family == "gpt2")
    torch.manual_seed(3)
    return peft.get_peft_model(base, peft.LoraConfig(**{**config, **overrides})), reference


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_same_weights_give_peft_logits_and_gradients(family, tmp_path):
    theirs, reference = peft_lora(family)
    ours = as_repeft(theirs, reference, tmp_path, trainable=True)
    assert isinstance(ours.get_base_model().model.embed_tokens, LoRAEmbedding)
    batch = batch_with_padding(family)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-5, rtol=0)
    theirs.train(), ours.train()
    for model in (theirs, ours):
        model(**batch).loss.backward()
    grads = assert_grads_like_peft(ours, theirs)
    assert {f"base_model.model.model.embed_tokens.lora_embedding_{part}" for part in "AB"} < set(grads)
    if family == "gemma3_text":
        assert grads["base_model.model.model.embed_tokens.lora_embedding_A"][:, 0].abs().max() == 0  # padding_idx


def test_dropout_is_not_applied_to_embeddings_as_in_peft(tmp_path):
    theirs, reference = peft_lora("llama", target_modules=["embed_tokens"], lora_dropout=0.5)
    ours = as_repeft(theirs, reference, tmp_path, trainable=True)
    batch = tiny_batch("llama")
    expected = logits(theirs, batch)
    theirs.train(), ours.train()
    torch.testing.assert_close(logits(theirs, batch), expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_is_peft_s(init):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=init))
    ours = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=init))
    layer = theirs.base_model.model.model.embed_tokens
    their_A, their_B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    our_A, our_B = ours.get_base_model().model.embed_tokens.adapters["default"].factors()
    assert our_A.shape == their_A.shape == (4, 96) and our_B.shape == their_B.shape == (32, 4)
    assert bool((our_A == 0).all()) == bool((their_A == 0).all()) == (init is not False)
    for B in (our_B, their_B):  # normal(0, 1) in both libraries
        assert 0.7 < B.std().item() < 1.3 and B.abs().max() < 6


def test_identity_at_init_and_only_adapter_parameters_train():
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    expected = logits(base, batch)
    model = repeft.wrap(base, repeft.LoraConfig(r=4, target_modules=TARGETS["llama"]))
    torch.testing.assert_close(logits(model, batch), expected, atol=0, rtol=0)
    model.train()
    model(**batch).loss.backward()
    trained = {name.rpartition(".")[2] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def trained(family: str = "llama", **config):
    model = repeft.wrap(tiny_model(family), repeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], **config))
    train_steps(model, tiny_batch(family), steps=3, lr=5e-2)
    return model


def test_merge_unmerge_and_merge_and_unload_are_exact():
    model = trained()
    batch = tiny_batch("llama")
    weight = model.get_base_model().model.embed_tokens.weight.detach().clone()
    expected = logits(model, batch)
    assert (expected - logits(tiny_model("llama"), batch)).abs().max() > 1e-3  # the adapter changed the output
    model.merge()
    assert not torch.equal(model.get_base_model().model.embed_tokens.weight, weight)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge()
    torch.testing.assert_close(model.get_base_model().model.embed_tokens.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)


def test_merged_weights_equal_peft_s_merge(tmp_path):
    theirs, reference = peft_lora("llama")
    ours = as_repeft(theirs, reference, tmp_path)
    batch = tiny_batch("llama")
    mine, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    torch.testing.assert_close(mine.model.embed_tokens.weight, peft_merged.model.embed_tokens.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(mine, batch), logits(peft_merged, batch), atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = trained()
    batch = tiny_batch("llama")
    model.save_pretrained(tmp_path / "ours")
    assert {f"base_model.model.model.embed_tokens.lora_embedding_{part}" for part in "AB"} <= set(  # PEFT's names
        load_file(tmp_path / "ours" / "adapter_model.safetensors")
    )
    loaded = repeft.AdapterModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)


def test_export_peft_loads_in_peft_with_the_same_logits(tmp_path):
    model = trained()
    model.eval()
    batch = tiny_batch("llama")
    repeft.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch), atol=1e-5, rtol=0)
    back = repeft.from_peft(tiny_model("llama"), tmp_path / "peft")
    torch.testing.assert_close(logits(back, batch), logits(model, batch), atol=0, rtol=0)


def test_a_peft_adapter_with_other_base_embedding_weights_is_refused_by_name(tmp_path):
    theirs, _ = peft_lora("llama")
    theirs.save_pretrained(tmp_path / "peft")  # PEFT also saves the base embedding (save_embedding_layers)
    with pytest.raises(repeft.AdapterFileError, match="save_embedding_layers"):
        repeft.from_peft(tiny_model("llama", seed=1), tmp_path / "peft")


def test_tied_gpt2_embedding_merges_untied_and_matches_the_unmerged_model(tmp_path):
    model = trained("gpt2")
    base = model.get_base_model()
    assert base.lm_head.weight is base.transformer.wte.weight  # tied
    batch = tiny_batch("gpt2")
    head = base.lm_head.weight.detach().clone()
    expected = logits(model, batch)
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    assert torch.equal(base.lm_head.weight, head) and base.config.tie_word_embeddings is False
    model.unmerge()
    assert base.lm_head.weight is base.transformer.wte.weight and base.config.tie_word_embeddings is True
    model.save_merged(tmp_path / "merged")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=0)
    repeft.export_merged(model, tmp_path / "exported")  # merges from the unmerged layers, on the meta-built copy
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(logits(exported, batch), expected, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)


def test_mixed_batch_rows_use_their_own_embedding_adapter():
    model = trained()
    model.add_adapter("other", repeft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    model.eval()
    batch = {"input_ids": tiny_batch("llama", batch=3)["input_ids"]}
    names = ["other", "__base__", "default"]
    mixed = logits(model, batch, adapter_names=names)
    for row, name in enumerate(names):
        one = {"input_ids": batch["input_ids"][row : row + 1]}
        torch.testing.assert_close(mixed[row : row + 1], alone(model, name, lambda: logits(model, one)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config, match",
    [
        (repeft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], lora_bias=True),
         "lora_bias=True is not supported for Embedding"),
        (repeft.RepLoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"]), "does not adapt embeddings"),
    ],
)
def test_lora_bias_and_replora_on_an_embedding_are_refused_by_name(config, match):
    base = tiny_model("llama")
    with pytest.raises(repeft.TargetError, match=match):
        repeft.wrap(base, config)
    assert type(base.model.embed_tokens) is torch.nn.Embedding  # nothing was wrapped


def test_trainable_token_indices_is_refused_by_name():
    with pytest.raises(ValueError, match=r"no option \['trainable_token_indices'\]"):
        repeft.LoraConfig(r=4, target_modules=["embed_tokens"], trainable_token_indices=[0, 1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_with_cache_equals_without(family):
    model = trained(family)
    prompt = tiny_batch(family)["input_ids"][:, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
        mixed = model.generate(input_ids=prompt, adapter_names=["default", "__base__"], **kwargs)
        with model.disable_adapter():
            base_rows = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(mixed[0], cached[0]) and torch.equal(mixed[1], base_rows[1])


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = tiny_batch("llama")
    grads = []
    for checkpointing in (False, True):
        model = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_embedding_A" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_peft_s_merge_of_a_tied_embedding_also_changes_the_head_which_repeft_s_does_not():
    """Why repeft unties: PEFT 0.21.2 merges into the shared weight, so its merged model is not its unmerged one."""
    theirs = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(r=4, target_modules=["wte"], init_lora_weights=False))
    batch = tiny_batch("gpt2")
    expected = logits(theirs, batch)
    theirs.merge_adapter()
    assert (logits(theirs, batch) - expected).abs().max() > 1e-2


def test_an_embedding_whose_weight_other_embeddings_hold_warns_that_they_stay_unadapted():
    # T5 calls encoder.embed_tokens and decoder.embed_tokens, never `shared`, though all three hold one weight.
    with pytest.warns(UserWarning, match=r"'shared', whose weight the embeddings \['encoder.embed_tokens', 'decoder.embed_tokens'\]"):
        repeft.wrap(tiny_model("t5"), repeft.LoraConfig(r=4, target_modules=["shared"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repeft.wrap(tiny_model("t5"), repeft.LoraConfig(r=4, target_modules=["shared", "embed_tokens"]))
