"""TRL's SFTTrainer on repeft models: the fused LM head reads the backbone, loss falls, adapter-only checkpoints.

TRL patches the model's forward with a fused LM head that computes the loss
from ``model.base_model(...).last_hidden_state`` (transformers' meaning of
``base_model``): on a repeft model that is the adapted backbone (repeft.tuner).
The fused loss is checked against the loss transformers computes from the
full logits, and ``repeft.adapter_trainer(SFTTrainer)`` against the files its
checkpoints hold and the adapter they reload.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import repeft

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = "the cat sat on mat a dog ran to park and".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS) + 3, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)
    return LlamaForCausalLM(config)


CONFIGS = {"lora": lambda: repeft.LoraConfig(r=4), "replora": lambda: repeft.RepLoRAConfig(r=4)}


def sft(tmp_path, model, trainer_class, max_steps=12, **overrides):
    texts = ["the cat sat on the mat", "a dog ran to the park", "the dog and the cat sat"] * 8
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=3, save_steps=6, report_to=[], use_cpu=True, seed=0, max_length=16, disable_tqdm=True,
        **overrides,
    )
    return trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                         processing_class=word_tokenizer())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_sft_trainer_trains_a_repeft_model_through_the_fused_lm_head(tmp_path, method):
    model = repeft.get_peft_model(tiny_llama(), CONFIGS[method]())
    trainer = sft(tmp_path, model, trl.SFTTrainer)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    assert any(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)

    # TRL's fused loss (backbone hidden states through the LM head in tiles) is the model's own loss.
    ids = torch.tensor([[4, 5, 6, 7, 3, 8], [9, 10, 11, 12, 3, 13]])
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_sft_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path, method):
    trainer_class = repeft.adapter_trainer(trl.SFTTrainer)
    assert issubclass(trainer_class, trl.SFTTrainer) and repeft.adapter_trainer(trl.SFTTrainer) is trainer_class
    model = repeft.get_peft_model(tiny_llama(), CONFIGS[method]())
    trainer = sft(tmp_path / "run", model, trainer_class)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-6"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # the frozen base is not copied into every checkpoint
    trainer.save_model()
    reloaded = repeft.load_adapter(tiny_llama(), tmp_path / "run")
    final = model.adapter_state_dict()
    assert all(torch.equal(reloaded.adapter_state_dict()[k], v) for k, v in final.items())

    resumed_model = repeft.get_peft_model(tiny_llama(), CONFIGS[method]())
    resumed = sft(tmp_path / "run", resumed_model, trainer_class)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in resumed_model.adapter_state_dict().items():
        torch.testing.assert_close(value, final[key], atol=1e-5, rtol=0)


def test_adapter_trainer_refuses_what_is_not_a_trainer():
    with pytest.raises(TypeError, match="transformers.Trainer subclass"):
        repeft.adapter_trainer(dict)
