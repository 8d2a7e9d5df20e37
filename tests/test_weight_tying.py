"""``ensure_weight_tying``: PEFT's warnings where nothing tied is adapted, a refusal by name where something is."""

from __future__ import annotations

import warnings

import pytest
import torch

import repeft
from tiny_models import logits, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_false_is_accepted_silently_on_a_tied_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = repeft.wrap(tiny_model("gpt2"), repeft.LoraConfig(r=4, target_modules=["c_attn"], ensure_weight_tying=False))
    assert model.configs["default"].ensure_weight_tying is False


def test_true_on_a_model_without_tied_weights_warns_as_peft_and_changes_nothing():
    batch = tiny_batch("llama")
    config = dict(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    plain = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(**config))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="You have requested `ensure_weight_tying`, but no tied modules were found in the model"):
        tied = repeft.wrap(tiny_model("llama"), repeft.LoraConfig(**config, ensure_weight_tying=True))
    assert torch.equal(logits(tied, batch), logits(plain, batch))


def test_true_on_a_tied_model_that_adapts_no_tied_module_warns_as_peft():
    with pytest.warns(UserWarning, match="no tied modules are added in either `modules_to_save` or `target_modules`"):
        repeft.wrap(tiny_model("gpt2"), repeft.LoraConfig(r=4, target_modules=["c_attn"], ensure_weight_tying=True))


@pytest.mark.parametrize(
    "fields", [{"target_modules": ["c_attn", "wte"]}, {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}],
    ids=["target_modules", "modules_to_save"],
)
def test_true_where_a_tied_module_is_adapted_is_refused_by_name(fields):
    # GPT-2's lm_head is its wte: PEFT would tie the two adapters, repeft does not tie adapters.
    base = tiny_model("gpt2")
    with pytest.raises(repeft.TargetError, match=r"ensure_weight_tying=True: '(transformer\.wte|lm_head)' shares its weight"):
        repeft.wrap(base, repeft.LoraConfig(r=4, ensure_weight_tying=True, **fields))
    assert type(base.transformer.wte) is torch.nn.Embedding and type(base.lm_head) is torch.nn.Linear
