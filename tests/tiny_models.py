"""Tiny randomly initialised models of each family we support, and a batch for each.

Every test builds its model here, so no test downloads anything.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96


def _text_config(family: str, **overrides):
    """The tiny config of ``family``; ``overrides`` replace its fields (e.g. sizes bitsandbytes needs)."""
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
        )
    elif family == "gpt2":
        cls, kw = tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    elif family in ("bert", "roberta"):
        cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=130, num_labels=3,
        )
    elif family == "t5":
        cls = tf.T5Config
        kw = dict(
            d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=VOCAB,
            decoder_start_token_id=0, pad_token_id=0,
        )
    elif family == "vit":
        cls = tf.ViTConfig
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, num_labels=5,
        )
    elif family in ("gemma", "phi3"):
        cls = tf.GemmaConfig if family == "gemma" else tf.Phi3Config
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
        )
    elif family == "dinov2":
        cls = tf.Dinov2Config
        kw = dict(
            hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, num_labels=5,
        )
    else:
        raise ValueError(family)
    return cls(**{**kw, **overrides})


MODEL_CLASSES = {
    "llama": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "gpt2": tf.GPT2LMHeadModel,
    "bert": tf.BertForSequenceClassification,
    "roberta": tf.RobertaForSequenceClassification,
    "t5": tf.T5ForConditionalGeneration,
    "vit": tf.ViTForImageClassification,
    "gemma": tf.GemmaForCausalLM,
    "phi3": tf.Phi3ForCausalLM,
    "dinov2": tf.Dinov2ForImageClassification,
}
FAMILIES = list(MODEL_CLASSES)
CORE_FAMILIES = ["llama", "gpt2", "bert", "vit", "t5"]


def tiny_model(family: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A fresh model of ``family`` in eval mode (dropout off), same weights for the same seed."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](_text_config(family, **config_overrides))
    return model.eval()


def tiny_batch(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs with labels, so ``model(**batch).loss`` and ``.logits`` both exist."""
    g = torch.Generator().manual_seed(seed)
    if family in ("vit", "dinov2"):
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "labels": torch.randint(0, 5, (batch,), generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if family in ("bert", "roberta"):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (batch,), generator=g)}
    if family == "t5":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (batch, 5), generator=g)}
    return {"input_ids": ids, "labels": ids}


# -- ViT-family encoders for visual prompts (VPT, VAPT) --------------------------------------

VISION_FAMILIES = ["vit", "deit", "dinov2", "dinov2_with_registers"]


def tiny_vision_config(family: str, layers: int = 3, image_size: int = 32, patch_size: int = 8):
    """A 32x32-image, 4x4-patch-grid config of a ViT family; dropout off so outputs are repeatable."""
    common = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
        "image_size": image_size, "patch_size": patch_size, "num_labels": 5,
    }
    if family == "vit":
        return tf.ViTConfig(**common)
    if family == "deit":
        return tf.DeiTConfig(**common)
    if family == "dinov2":
        return tf.Dinov2Config(**common, mlp_ratio=2)
    if family == "dinov2_with_registers":
        return tf.Dinov2WithRegistersConfig(**common, mlp_ratio=2, num_register_tokens=2)
    raise ValueError(family)


VISION_CLASSIFIERS = {
    "vit": tf.ViTForImageClassification,
    "deit": tf.DeiTForImageClassification,
    "dinov2": tf.Dinov2ForImageClassification,
    "dinov2_with_registers": tf.Dinov2WithRegistersForImageClassification,
}
VISION_BACKBONES = {
    "vit": tf.ViTModel,
    "deit": tf.DeiTModel,
    "dinov2": tf.Dinov2Model,
    "dinov2_with_registers": tf.Dinov2WithRegistersModel,
}


def tiny_vision_model(family: str, head: bool = True, seed: int = 0, **config_kw) -> torch.nn.Module:
    """A fresh ViT-family classifier (``head=True``) or bare backbone in eval mode."""
    torch.manual_seed(seed)
    classes = VISION_CLASSIFIERS if head else VISION_BACKBONES
    return classes[family](tiny_vision_config(family, **config_kw)).eval()


def tiny_images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """``pixel_values`` and ``labels`` for the 5-class tiny vision models."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 3, height, width, generator=g),
        "labels": torch.randint(0, 5, (batch,), generator=g),
    }
