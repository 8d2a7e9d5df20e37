"""Where repeft and PEFT share a feature, repeft behaves as PEFT does (issue 26, section 2).

PEFT itself is the reference: each test runs the same calls on a PEFT model
and a repeft model of the same base and compares what they do.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import repeft
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")


def adapted_paths(model):
    """Paths (under the base model) of the linear layers an adapter wraps, for PEFT and repeft alike."""
    if isinstance(model, repeft.AdapterModel):
        return sorted(p.removeprefix("base_model.") for p, layer in model.adapter_layers()
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
def test_an_embedding_that_peft_would_adapt_is_refused_by_name_not_skipped(spec):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=spec))
    assert "model.embed_tokens" in adapted_paths(theirs)  # PEFT adapts it: skipping it silently would differ
    base = tiny_model("llama")
    with pytest.raises(repeft.TargetError, match="selects 'model.embed_tokens', a Embedding; repeft's LoRA adapts"):
        repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=spec))
    assert not any(p.requires_grad is False for p in base.parameters())  # the failed wrap left the model as it was
