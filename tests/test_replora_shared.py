"""RepLoRA's shared form (the paper's): seeds shared by a block's query and value, one map per projection.

The reference below is written from the formulas in docs/methods/replora.md with
plain torch on the saved tensors; it calls nothing of repeft's maths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_mixed_batch import alone
from tiny_models import logits, tiny_batch, tiny_model, train_steps

import repeft


def attn(model, layer=0):
    return model.base_model.model.model.layers[layer].self_attn


def randomize_adapter(model, scale=0.3):
    """Move every adapter tensor off its init (B' = 0 and W2 = 0 would hide most of the maps)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn_like(p))


def reference_factors(state, prefix, proj, d_in, d_out, reparam, r, hidden):
    """A_P = g_{A,P}(A'[:, :d_in]) and B_P = g_{B,P}(B'[:d_out]), g acting on the length-r vectors."""
    seed_A, seed_B = state[f"{prefix}.q_proj.lora_A_seed"], state[f"{prefix}.q_proj.lora_B_seed"]

    def g(rows, side):  # rows: (n, r)
        if reparam == "linear":  # g(M) = M + M L^T / r
            return rows + rows @ state[f"{prefix}.{proj}.map_{side}.weight"].T / r
        w1, w2 = state[f"{prefix}.{proj}.hidden_{side}.weight"], state[f"{prefix}.{proj}.out_{side}.weight"]
        s = rows.pow(2).mean().sqrt()  # g(M) = M + (s / h) W2 tanh(W1 M / s)
        return rows + s / hidden * torch.tanh(rows / s @ w1.T) @ w2.T

    return g(seed_A[:, :d_in].T, "A").T, g(seed_B[:d_out], "B")


@pytest.mark.parametrize("reparam", ["mlp", "linear"])
def test_shared_form_matches_an_independent_reference(reparam):
    base, batch = tiny_model("llama"), tiny_batch("llama")  # 4 query heads over 2 key/value heads: v_proj is narrower
    config = repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=6, reparam=reparam)
    model = repeft.wrap(copy.deepcopy(base), config)
    randomize_adapter(model)
    state = {k: v.detach() for k, v in model.adapter_state_dict().items()}
    # One pair of seeds per block, sized for q_proj (the wider), held once.
    assert not any("v_proj.lora_" in k for k in state)
    assert state["model.layers.0.self_attn.q_proj.lora_B_seed"].shape == (32, 4)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for proj in ("q_proj", "v_proj"):
                linear = getattr(layer.self_attn, proj)
                A, B = reference_factors(state, f"model.layers.{i}.self_attn", proj, linear.in_features,
                                         linear.out_features, reparam, r=4, hidden=6)
                linear.weight += 2.0 * B @ A
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    model.merge()  # exact merge of the shared form, and back
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("reparam", ["mlp", "linear"])
def test_shared_form_starts_as_lora_with_tied_factors(reparam):
    """At init: the base model's outputs, and the seeds' gradients are LoRA's with A_Q = A_V = A' summed."""
    base, batch = tiny_model("llama"), tiny_batch("llama")
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    rep = repeft.wrap(copy.deepcopy(base), repeft.RepLoRAConfig(reparam=reparam, **cfg))
    lora = repeft.wrap(copy.deepcopy(base), repeft.LoRAConfig(**cfg))
    torch.testing.assert_close(logits(rep, batch), logits(base, batch), atol=0, rtol=0)
    for i in range(2):
        seed = attn(rep, i).q_proj.adapters["default"].lora_A_seed
        with torch.no_grad():
            for proj in ("q_proj", "v_proj"):
                getattr(attn(lora, i), proj).adapters["default"].lora_A.copy_(seed)
    rep.train(), lora.train()
    rep(**batch).loss.backward()
    lora(**batch).loss.backward()
    for i in range(2):
        owner = attn(rep, i).q_proj.adapters["default"]
        q, v = (getattr(attn(lora, i), p).adapters["default"] for p in ("q_proj", "v_proj"))
        torch.testing.assert_close(owner.lora_A_seed.grad, q.lora_A.grad + v.lora_A.grad)
        expected_B = q.lora_B.grad.clone()
        expected_B[: v.lora_B.shape[0]] += v.lora_B.grad  # v_proj uses B's leading rows
        torch.testing.assert_close(owner.lora_B_seed.grad, expected_B)


@pytest.mark.parametrize("shared_modules,owners", [
    (None, {"q_proj": True, "k_proj": True, "v_proj": False, "o_proj": True}),  # default: the q/v pair
    ("all", {"q_proj": True, "k_proj": False, "v_proj": False, "o_proj": False}),
    (["q_proj", "k_proj", "v_proj"], {"q_proj": True, "k_proj": False, "v_proj": False, "o_proj": True}),
])
def test_shared_modules_picks_the_group(shared_modules, owners):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, target_modules=targets,
                                                                  shared_modules=shared_modules))
    block = attn(model, 1)
    assert {p: hasattr(getattr(block, p).adapters["default"], "lora_A_seed") for p in targets} == owners
    # Parameters counted once: what the modules register equals the saved tensors.
    trainable, _ = model.trainable_parameters()
    assert trainable == sum(v.numel() for v in model.adapter_state_dict().values())
    batch = tiny_batch("llama")
    torch.testing.assert_close(logits(model, batch), logits(tiny_model("llama"), batch), atol=0, rtol=0)


def test_residual_and_shared_forms_differ_only_in_where_the_seeds_live():
    """form="residual" gives every projection its own seeds; the shared form one pair per block."""
    cfg = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    residual = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(form="residual", **cfg)).adapter_state_dict()
    shared = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(**cfg)).adapter_state_dict()
    assert set(shared) < set(residual)
    assert set(residual) - set(shared) == {f"model.layers.{i}.self_attn.v_proj.lora_{m}_seed"
                                           for i in range(2) for m in "AB"}


def test_shared_form_trains_saves_and_reloads(tmp_path):
    base, batch = tiny_model("llama"), tiny_batch("llama")
    model = repeft.wrap(copy.deepcopy(base), repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=8, reparam="linear"))
    train_steps(model, batch)
    expected = logits(model, batch)
    model.save_adapter(tmp_path / "a")
    loaded = repeft.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert loaded.configs["default"].form == "shared" and loaded.configs["default"].reparam == "linear"
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
    # A deep copy keeps v_proj's seeds those of its own copy of q_proj.
    clone = copy.deepcopy(loaded)
    assert attn(clone).v_proj.adapters["default"].seed_owner is attn(clone).q_proj.adapters["default"]


def test_reparam_linear_needs_a_residual_form():
    with pytest.raises(ValueError, match="reparam='linear' needs form='shared' or 'residual'"):
        repeft.RepLoRAConfig(form="mlp", reparam="linear")
    with pytest.raises(ValueError, match="shared_modules must be"):
        repeft.RepLoRAConfig(shared_modules="q_proj")


# -- the eval-mode cache after writes that bump no version counter (issue 24 item 7) ------------


@pytest.mark.parametrize("write", ["AdamW(fused=True)", "AdamW(foreach=True)", ".data write to a seed"])
def test_eval_cache_sees_updates_that_bump_no_version(write):
    model, batch = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, mlp_hidden=8)), tiny_batch("llama")
    train_steps(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    model(**batch).loss.backward()  # gradients first (eval mode), then a cached no-grad forward
    logits(model, batch)
    if write == ".data write to a seed":  # v_proj's factors come from q_proj's seeds
        attn(model).q_proj.adapters["default"].lora_B_seed.data.add_(0.5)
    else:
        kind = "fused" if "fused" in write else "foreach"
        torch.optim.AdamW(params, lr=0.05, **{kind: True}).step()
    got = logits(model, batch)
    for module in model.modules():  # the same model with every cache dropped
        if hasattr(module, "_cache"):
            module._cache = None
    torch.testing.assert_close(got, logits(model, batch), atol=0, rtol=0)


def test_shared_form_in_a_mixed_adapter_batch():
    """Each row with its own adapter (shared RepLoRA, LoRA, none) equals that adapter run alone."""
    model = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, mlp_hidden=8), "shared")
    model.add_adapter("lora", repeft.LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_adapter(model)  # only the active adapter trains; the other gets moved off zero too
    model.set_adapter("shared")
    randomize_adapter(model)
    model.eval()
    batch = tiny_batch("llama", batch=3)
    names = ["shared", "__base__", "lora"]
    mixed = logits(model, {"input_ids": batch["input_ids"]}, adapter_names=names)
    for row, name in enumerate(names):
        whole = alone(model, name, lambda: logits(model, {"input_ids": batch["input_ids"]}))
        torch.testing.assert_close(mixed[row], whole[row], atol=1e-5, rtol=0)
