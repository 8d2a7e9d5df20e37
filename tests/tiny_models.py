"""Tiny randomly initialised models of each family we support, a batch for each, and how tests run them.

Every test builds its model here, so no test downloads anything.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
VISION_FAMILIES = ["vit", "deit", "dinov2", "dinov2_with_registers"]


# Shapes every decoder shares: 4 query heads over 2 key/value heads of width 8.
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
)
# Small experts for the mixture-of-experts families.
_EXPERTS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32),
}
# Gemma 2 / 3 with what makes them differ biting at these sizes: a sliding window shorter than the test
# sequences on layer 0, and (Gemma 2) attention logits soft-capped at a value the scores reach.
_GEMMA = dict(
    head_dim=8, pad_token_id=0, query_pre_attn_scalar=8, sliding_window=3,
    layer_types=["sliding_attention", "full_attention"],
)


def _text_config(family: str, **overrides):
    """The tiny config of ``family``; ``overrides`` replace its fields (e.g. sizes bitsandbytes needs)."""
    decoders = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "mixtral": tf.MixtralConfig,
        "qwen2_moe": tf.Qwen2MoeConfig, "qwen3": tf.Qwen3Config, "olmo2": tf.Olmo2Config,
    }
    if family in decoders:
        cls, kw = decoders[family], dict(_DECODER, **_EXPERTS.get(family, {}))
        if family == "qwen3":
            kw["head_dim"] = 8
        if family == "olmo2":
            kw["eos_token_id"] = 2  # the default is outside the tiny vocabulary
    elif family in ("gemma2", "gemma3_text"):
        cls = tf.Gemma2Config if family == "gemma2" else tf.Gemma3TextConfig
        kw = dict(_DECODER, **_GEMMA)
        if family == "gemma2":
            kw["attn_logit_softcapping"] = 0.5
    elif family == "gpt2":
        cls, kw = tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    elif family == "gpt_neox":
        cls = tf.GPTNeoXConfig
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=128,
        )
    elif family == "opt":
        cls = tf.OPTConfig
        kw = dict(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
            vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
        )
    elif family == "falcon":
        cls = tf.FalconConfig
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
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
    elif family in ("gemma", "phi3"):
        cls = tf.GemmaConfig if family == "gemma" else tf.Phi3Config
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
        )
    elif family in VISION_FAMILIES:
        return tiny_vision_config(family, layers=2, **overrides)
    else:
        raise ValueError(family)
    return cls(**{**kw, **overrides})


MODEL_CLASSES = {
    "llama": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "mixtral": tf.MixtralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "qwen2_moe": tf.Qwen2MoeForCausalLM,
    "qwen3": tf.Qwen3ForCausalLM,
    "gemma": tf.GemmaForCausalLM,
    "gemma2": tf.Gemma2ForCausalLM,
    "gemma3_text": tf.Gemma3ForCausalLM,
    "olmo2": tf.Olmo2ForCausalLM,
    "phi3": tf.Phi3ForCausalLM,
    "gpt2": tf.GPT2LMHeadModel,
    "gpt_neox": tf.GPTNeoXForCausalLM,
    "opt": tf.OPTForCausalLM,
    "falcon": tf.FalconForCausalLM,
    "bert": tf.BertForSequenceClassification,
    "roberta": tf.RobertaForSequenceClassification,
    "t5": tf.T5ForConditionalGeneration,
    "vit": tf.ViTForImageClassification,
    "deit": tf.DeiTForImageClassification,
    "dinov2": tf.Dinov2ForImageClassification,
    "dinov2_with_registers": tf.Dinov2WithRegistersForImageClassification,
}
# Every family the tests build, by model_type; each is a key of MODEL_CLASSES.
FAMILIES = list(MODEL_CLASSES)
CORE_FAMILIES = ["llama", "gpt2", "bert", "vit", "t5"]
# Families whose tiny model generates text (causal LMs and T5).
GENERATIVE_FAMILIES = [f for f in FAMILIES if f not in ("bert", "roberta") and f not in VISION_FAMILIES]


def tiny_model(family: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A fresh model of ``family`` in eval mode (dropout off), same weights for the same seed."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](_text_config(family, **config_overrides))
    return model.eval()


def tiny_batch(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs with labels, so ``model(**batch).loss`` and ``.logits`` both exist."""
    g = torch.Generator().manual_seed(seed)
    if family in VISION_FAMILIES:
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "labels": torch.randint(0, 5, (batch,), generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if family in ("bert", "roberta"):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (batch,), generator=g)}
    if family == "t5":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (batch, 5), generator=g)}
    return {"input_ids": ids, "labels": ids}


def logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def train_steps(model, batch, steps=3, lr=1e-2, **kw):
    """``steps`` AdamW steps on the trainable parameters (in train mode), then back to eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(**batch, **kw).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# -- ViT-family encoders for visual prompts (VPT, VAPT) --------------------------------------


def tiny_vision_config(family: str, layers: int = 3, image_size: int = 32, patch_size: int = 8, **overrides):
    """A 32x32-image, 4x4-patch-grid config of a ViT family; dropout off so outputs are repeatable."""
    common = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
        "image_size": image_size, "patch_size": patch_size, "num_labels": 5, **overrides,
    }
    if family == "vit":
        return tf.ViTConfig(**common)
    if family == "deit":
        return tf.DeiTConfig(**common)
    if family == "dinov2":
        return tf.Dinov2Config(**{"mlp_ratio": 2, **common})
    if family == "dinov2_with_registers":
        return tf.Dinov2WithRegistersConfig(**{"mlp_ratio": 2, "num_register_tokens": 2, **common})
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
