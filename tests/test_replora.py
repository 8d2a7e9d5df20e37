"""RepLoRA's two forms against hand-written maths, LoRA equivalence at init, the eval-mode factor cache.

The design.md checklist (identity, save/load, merge, ...) runs for RepLoRA in test_lora.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import logits, tiny_batch, tiny_model, train_steps

import repeft
from repeft.replora import RepLoRAFactors


def q_proj(model, layer=0):
    return model.base_model.model.model.layers[layer].self_attn.q_proj


def rms(m):
    return m.pow(2).mean().sqrt()


@pytest.mark.parametrize("axis,share_mlp", [("rank", False), ("feature", False), ("rank", True)])
def test_residual_factors_match_hand_written_formula(axis, share_mlp):
    config = repeft.RepLoRAConfig(r=4, mlp_hidden=6, axis=axis, share_mlp=share_mlp, target_modules=["q_proj"])
    f = q_proj(repeft.wrap(tiny_model("llama"), config)).adapters["default"]
    with torch.no_grad():  # move everything off its init: W2 = 0 and B_seed = 0 would hide most of g
        for p in f.parameters():
            p.normal_()
    A, B = f.factors()
    w1_A, w1_B = (f.hidden.weight,) * 2 if share_mlp else (f.hidden_A.weight, f.hidden_B.weight)

    def g(m, w1, w2):  # g(M) = M + (s / h) W2 tanh(W1 M / s), s = RMS(M), h = 6, on each column of M
        s = rms(m)
        return m + s / 6 * w2 @ torch.tanh(w1 @ m / s)

    if axis == "rank":  # columns of A_seed and rows of B_seed are length-r vectors
        expected_A, expected_B = g(f.lora_A_seed, w1_A, f.out_A.weight), g(f.lora_B_seed.T, w1_B, f.out_B.weight).T
    else:  # rows of A_seed (length d_in) and columns of B_seed (length d_out)
        expected_A, expected_B = g(f.lora_A_seed.T, w1_A, f.out_A.weight).T, g(f.lora_B_seed, w1_B, f.out_B.weight)
    torch.testing.assert_close(A, expected_A)
    torch.testing.assert_close(B, expected_B)
    assert not any(n.endswith("bias") for n, _ in f.named_parameters())


def test_residual_correction_scales_with_its_seed():
    # g(c M) = c g(M): the MLP acts on the seed's shape, not its size, so B (0 at init, growing
    # at Adam's pace) and A (LoRA's scale) get the same treatment.
    f = RepLoRAFactors(16, 12, repeft.RepLoRAConfig(r=4))
    with torch.no_grad():
        f.out_A.weight.normal_()
        A = f.factors()[0]
        f.lora_A_seed.mul_(1e-3)
        torch.testing.assert_close(f.factors()[0], 1e-3 * A)


def test_residual_seed_is_the_a_lora_would_draw():
    from repeft.lora import LoRAFactors

    torch.manual_seed(0)
    lora_A = LoRAFactors(16, 12, repeft.LoRAConfig(r=4)).lora_A
    torch.manual_seed(0)
    f = RepLoRAFactors(16, 12, repeft.RepLoRAConfig(r=4))
    assert torch.equal(f.lora_A_seed, lora_A) and torch.equal(f.factors()[0], lora_A)


def test_residual_is_lora_at_init_gradients_included():
    """Same start as LoRA: logits, gradients of A and B, and a first Adam step all equal LoRA's."""
    base, batch = tiny_model("llama"), tiny_batch("llama")
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    lora = repeft.wrap(copy.deepcopy(base), repeft.LoRAConfig(**cfg))
    rep = repeft.wrap(copy.deepcopy(base), repeft.RepLoRAConfig(mlp_hidden=8, form="residual", **cfg))
    pairs = []
    for (_, lora_layer), (_, rep_layer) in zip(lora.adapter_layers(), rep.adapter_layers()):
        a, b = lora_layer.adapters["default"], rep_layer.adapters["default"]
        with torch.no_grad():
            b.lora_A_seed.copy_(a.lora_A)
        assert torch.equal(b.lora_B_seed, a.lora_B)  # both zero
        pairs += [(a.lora_A, b.lora_A_seed), (a.lora_B, b.lora_B_seed)]
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (lora, rep)]
    for step in range(2):  # the first step (B = 0) and the second (B != 0, the MLPs still zero)
        for model, optimizer in zip((lora, rep), optimizers):
            optimizer.zero_grad()
            model(**batch).loss.backward()
        for a, b in pairs:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(logits(rep, batch), logits(lora, batch), atol=1e-6, rtol=0)
        for optimizer in optimizers:
            optimizer.step()
    # From the second step on the correction gets gradient and starts to move.
    assert q_proj(rep).adapters["default"].out_A.weight.grad.abs().sum() > 0


def test_bad_form_is_refused():
    with pytest.raises(ValueError, match=r"form must be one of \('shared', 'residual', 'mlp'\)"):
        repeft.RepLoRAConfig(form="plain")


@pytest.mark.parametrize("form", ["shared", "residual", "mlp"])
def test_all_forms_train_merge_and_export_exactly(form, tmp_path):
    config = repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=8, form=form, target_modules=["q_proj", "v_proj"])
    base = tiny_model("llama")
    model, batch = repeft.wrap(copy.deepcopy(base), config), tiny_batch("llama")
    train_steps(model, batch)
    expected = logits(model, batch)
    model.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert loaded.configs["default"].form == form
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    model.merge()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_mlp_form_factors_match_hand_written_mlp():
    config = repeft.RepLoRAConfig(r=4, mlp_hidden=6, form="mlp", activation="tanh", target_modules=["q_proj"])
    f = q_proj(repeft.wrap(tiny_model("llama"), config)).adapters["default"]
    torch.nn.init.normal_(f.out_B.weight)
    A, B = f.factors()

    def g(m, hidden, out):  # g(M) = W2 act(W1 M + b1) + b2, one vector of length r at a time
        return out.weight @ torch.tanh(hidden.weight @ m + hidden.bias[:, None]) + out.bias[:, None]

    torch.testing.assert_close(A, g(f.lora_A_seed, f.hidden_A, f.out_A))
    torch.testing.assert_close(B, g(f.lora_B_seed.T, f.hidden_B, f.out_B).T)
    # B comes out of a zero-initialised output layer; A has LoRA's kaiming-uniform spread.
    fresh = q_proj(repeft.wrap(tiny_model("llama"), config)).adapters["default"]
    A0, B0 = fresh.factors()
    assert torch.equal(B0, torch.zeros_like(B0))
    assert abs(A0.std().item() - 1 / (3 * 32) ** 0.5) < 1e-3


@pytest.mark.parametrize("axis", ["rank", "feature"])
def test_mlp_form_factors_are_spread_out_at_init(axis):
    # Every row of A (and every row of the hidden activations that B is made from) must differ,
    # or the adapter starts out seeing one direction of the input. Effective rank = participation
    # ratio of the singular values; LoRA's random A scores ~r.
    torch.manual_seed(0)
    f = RepLoRAFactors(384, 384, repeft.RepLoRAConfig(r=8, axis=axis, form="mlp", activation="gelu"))
    A, _ = f.factors()

    def effective_rank(m):
        sv = torch.linalg.svdvals(m.detach())
        return (sv.sum() ** 2 / (sv**2).sum()).item()

    assert effective_rank(A) > 5
    rows = f.lora_B_seed if axis == "rank" else f.lora_B_seed.T
    assert effective_rank(f.act(f.hidden_B(rows))) > 5


# -- the eval-mode factor cache ---------------------------------------------------------------


class CountingFactors:
    """Counts how often a RepLoRAFactors module really computes its factors."""

    def __init__(self, factors: RepLoRAFactors) -> None:
        self.calls = 0
        compute = factors._compute

        def counted():
            self.calls += 1
            return compute()

        factors._compute = counted


@pytest.fixture
def eval_model():
    model = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, mlp_hidden=8, target_modules=["q_proj"]))
    train_steps(model, tiny_batch("llama"))  # ends in eval mode, B != 0
    f = q_proj(model).adapters["default"]
    return model, f, CountingFactors(f)


def test_eval_mode_computes_factors_once(eval_model):
    model, f, counter = eval_model
    batch = tiny_batch("llama")
    first = logits(model, batch)
    with torch.inference_mode():
        second = model(**batch).logits
    third = logits(model, batch)
    assert counter.calls == 1
    assert torch.equal(first, second) and torch.equal(first, third)
    with torch.no_grad():
        cached = f.factors()
    assert all(not t.requires_grad and not t.is_inference() for t in cached)  # safe outside inference_mode
    assert counter.calls == 1


@pytest.mark.parametrize("change", ["optimizer step", "copy_", "load_adapter_tensors", "load_state_dict(assign=True)",
                                    "train()", "to(float64)"])
def test_eval_cache_is_dropped_when_the_factors_may_change(eval_model, change):
    model, f, counter = eval_model
    batch = tiny_batch("llama")
    logits(model, batch)
    if change == "optimizer step":
        model.train()
        model(**batch).loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        model.eval()
    elif change == "copy_":
        with torch.no_grad():
            f.out_B.weight.copy_(torch.randn_like(f.out_B.weight))
    elif change == "load_adapter_tensors":
        state = {k: torch.randn_like(v) for k, v in model.adapter_state_dict().items()}
        model.load_adapter_tensors("default", state)
    elif change == "load_state_dict(assign=True)":  # new Parameter objects, not new values in the old ones
        f.load_state_dict({k: torch.randn_like(v) for k, v in f.state_dict().items()}, assign=True)
    elif change == "train()":
        model.train()
        model.eval()
    else:
        model.to(torch.float64)
    calls = counter.calls
    with torch.no_grad():
        expected = f._compute()
        got = f.factors()
    assert counter.calls == calls + 2  # the reference above, and one recompute
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_factors_keep_their_graph_when_gradients_are_needed(eval_model):
    # Eval mode but grads wanted (e.g. an attribution method): no cache, a fresh graph each call.
    model, f, counter = eval_model
    batch = tiny_batch("llama")
    for _ in range(2):
        model(**batch).loss.backward()
    assert counter.calls == 2
    assert f.out_A.weight.grad is not None


def test_loaded_inference_adapter_caches_even_with_grad_enabled(tmp_path):
    # Parameters frozen (inference_mode config): no graph to keep, so grad mode does not matter,
    # and the cached tensors are safe to save for backward (inputs may need gradients).
    model = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, mlp_hidden=8, target_modules=["q_proj"]))
    train_steps(model, tiny_batch("llama"))
    model.save_adapter(tmp_path / "a")
    loaded = repeft.load_adapter(tiny_model("llama"), tmp_path / "a")
    counter = CountingFactors(q_proj(loaded).adapters["default"])
    embeds = loaded.get_input_embeddings()(tiny_batch("llama")["input_ids"]).detach().requires_grad_()
    for _ in range(2):
        loaded(inputs_embeds=embeds).logits.sum().backward()
    assert counter.calls == 1 and embeds.grad is not None


def test_eval_factors_are_a_lookup():
    # What a decode path calling factors() on every forward relies on: no MLP work, the same tensors.
    f = RepLoRAFactors(64, 64, repeft.RepLoRAConfig(r=8)).eval()
    with torch.no_grad():
        first = f.factors()
        assert all(a is b for a, b in zip(first, f.factors()))


def test_adapters_start_in_the_mode_of_the_model_they_join():
    # A model loaded for inference is in eval mode; its new adapter must not run dropout or skip the cache.
    model = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    assert not q_proj(model).training and not q_proj(model).adapters["default"].training
    model.train()
    model.add_adapter("second", repeft.LoRAConfig(r=2, target_modules=["v_proj"]))
    assert model.base_model.model.model.layers[0].self_attn.v_proj.training
