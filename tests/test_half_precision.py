"""float16/bfloat16 bases: adapters and trained heads (``modules_to_save``) stay float32, as in PEFT.

A half-precision head trained by AdamW turned NaN within a few steps (eps 1e-8
is 0 in float16); these tests pin down where the float32 copies live and that
merging and saving hand back plain half-precision modules.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import repeft
from repeft.layers import ModulesToSave
from test_lora import logits, train_steps
from tiny_models import tiny_batch, tiny_images, tiny_model, tiny_vision_model

HALF = [torch.float16, torch.bfloat16]
# (family, adapter config): every method, each on a model with a trained head.
CASES = {
    "bert-lora": ("bert", {"method": "lora", "r": 4}),
    "bert-replora": ("bert", {"method": "replora", "r": 4, "mlp_hidden": 8}),
    "bert-prefix": ("bert", {"method": "prefix", "n_prefix": 4, "mlp_hidden": 8}),
    "roberta-zero_init": ("roberta", {"method": "zero_init", "n_prompt": 4}),
    "vit-vpt": ("vit", {"method": "vpt", "n_prompt": 4}),
    "vit-vapt": ("vit", {"method": "vapt", "n_prompt": 4}),
}


def half_model(family: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    if family == "vit":
        return tiny_vision_model("vit").to(dtype), tiny_images()
    return tiny_model(family).to(dtype), tiny_batch(family)


@pytest.mark.filterwarnings("ignore:training VAPT on a float16 model")  # its own test below
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameters_are_float32_and_outputs_keep_the_model_dtype(case, dtype):
    family, config = CASES[case]
    base, batch = half_model(family, dtype)
    model = repeft.wrap(base, repeft.AdapterConfig.from_dict(config))
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any(".classifier." in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
    assert logits(model, batch).dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_head_trains_finite_and_merges_back_into_the_half_precision_model(dtype):
    base, batch = half_model("bert", dtype)
    model = repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["query", "value"]))
    train_steps(model, batch, steps=5)
    head = model.get_base_model().classifier
    assert isinstance(head, ModulesToSave) and torch.isfinite(head.current().weight).all()
    assert torch.isfinite(logits(model, batch)).all()

    expected = logits(model, batch)
    state = model.merged_state_dict()
    assert {t.dtype for t in state.values()} == {dtype}
    torch.testing.assert_close(state["classifier.weight"], head.current().weight.to(dtype))
    assert head.current().weight.dtype == torch.float32  # merging did not touch the trained copy
    merged = model.merge_and_unload()
    assert type(merged.classifier) is torch.nn.Linear and merged.classifier.weight.dtype == dtype
    torch.testing.assert_close(logits(merged, batch), expected, atol=2e-2, rtol=0)


def test_vapt_on_float16_warns_where_the_layer_norm_gradient_overflows():
    # VAPT's prompts start at zero; ViT's LayerNorm eps (1e-12) then gives 1/sqrt(eps) = 1e6 > float16's max.
    base, batch = half_model("vit", torch.float16)
    assert base.config.layer_norm_eps == 1e-12
    with pytest.warns(UserWarning, match="LayerNorm eps is 1e-12: its prompts start at zero"):
        model = repeft.wrap(base, repeft.VAPTConfig(n_prompt=4))
    model.train()
    model(**batch).logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert not all(torch.isfinite(g).all() for g in grads)  # what the warning is about

    for dtype in (torch.bfloat16, torch.float32):  # the ways out it names
        base, batch = half_model("vit", dtype) if dtype != torch.float32 else (tiny_vision_model("vit"), tiny_images())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = repeft.wrap(base, repeft.VAPTConfig(n_prompt=4))
        model.train()
        model(**batch).logits.float().logsumexp(-1).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
