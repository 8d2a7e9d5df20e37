"""VPT and VAPT on the ViT family: a hand-written reference, prompt layout, mixed adapters, errors.

PEFT's checklist on every ViT family is in test_conformance.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VISION_FAMILIES, logits, tiny_images, tiny_model, tiny_vision_model, train_steps

import repeft
from repeft.files import AdapterFileError
from repeft.targeting import TargetError

N = 3  # prompt tokens per layer in every test
CONFIGS = {
    "vpt-deep": lambda **kw: repeft.VPTConfig(n_prompt=N, **kw),
    "vpt-shallow": lambda **kw: repeft.VPTConfig(n_prompt=N, deep=False, **kw),
    "vapt": lambda **kw: repeft.VAPTConfig(n_prompt=N, kernel_size=2, mlp_hidden=4, **kw),
}
PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 3}


def randomize_(tokens):
    """Give VAPT's zero-initialised token maps random values, so every term of the maths is exercised."""
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_(0, 0.5)


def hooks_on(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


# -- an independent reference: ViT written out by hand, prompts spliced in by hand ---------------


def hand_vit_layer(layer, h, eps):
    """One ViT encoder layer from its weights: pre-norm attention and MLP, both residual."""
    batch, seq, d = h.shape
    att = layer.attention
    heads = att.num_attention_heads
    x = F.layer_norm(h, (d,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps)
    q, k, v = (F.linear(x, m.weight, m.bias).view(batch, seq, heads, -1).transpose(1, 2)
               for m in (att.q_proj, att.k_proj, att.v_proj))
    mixed = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v
    h = h + F.linear(mixed.transpose(1, 2).reshape(batch, seq, d), att.o_proj.weight, att.o_proj.bias)
    x = F.layer_norm(h, (d,), layer.layernorm_after.weight, layer.layernorm_after.bias, eps)
    return h + F.linear(F.gelu(F.linear(x, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias)


def hand_vapt_prompts(tokens, layer, patches, eps):
    """P_l = T + W2 relu(W1 T), T = A (k * LN(X)) + b, with the convolution as a sum over kernel offsets."""
    if layer == 0:
        return tokens.first.prompts[0].expand(patches.shape[0], -1, -1)
    t = tokens.layers[str(layer)]
    (rows, cols), d = tokens.grid, patches.shape[-1]
    z = F.layer_norm(patches, (d,), t.norm.weight, t.norm.bias, eps).transpose(1, 2).reshape(-1, d, rows, cols)
    K = t.kernel.shape[-1]
    out_r, out_c = rows - K + 1, cols - K + 1
    conv = sum(t.kernel[0, 0, i, j] * z[:, :, i : i + out_r, j : j + out_c] for i in range(K) for j in range(K))
    T = (conv.flatten(2) @ t.token_map.weight.T + t.token_map.bias).transpose(1, 2)
    return T + torch.relu(T @ tokens.mlp[0].weight.T) @ tokens.mlp[2].weight.T


def hand_vit_classifier(plain, head, pixels, prompts_for, n, interpolate=False):
    """Logits of ViTForImageClassification ``plain`` with prompts from ``prompts_for(layer, patches)``."""
    vit, c = plain.vit, plain.config
    emb = vit.embeddings
    proj = emb.patch_embeddings.projection
    patches = F.conv2d(pixels, proj.weight, proj.bias, stride=c.patch_size).flatten(2).transpose(1, 2)
    h = torch.cat([emb.cls_token.expand(len(pixels), -1, -1), patches], dim=1)
    h = h + (emb.interpolate_pos_encoding(h, *pixels.shape[-2:]) if interpolate else emb.position_embeddings)
    for index, layer in enumerate(vit.layers):
        patches = h[:, 1:] if index == 0 else h[:, 1 + n :]
        prompts = prompts_for(index, patches)
        if prompts is None:  # shallow VPT: the tokens the previous layer made
            prompts = h[:, 1 : 1 + n]
        h = hand_vit_layer(layer, torch.cat([h[:, :1], prompts, patches], dim=1), c.layer_norm_eps)
    cls = F.layer_norm(h[:, 0], (c.hidden_size,), vit.layernorm.weight, vit.layernorm.bias, c.layer_norm_eps)
    return F.linear(cls, head.weight, head.bias)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_matches_hand_written_reference(method):
    base = tiny_vision_model("vit")
    plain = copy.deepcopy(base)
    model = repeft.wrap(base, CONFIGS[method]())
    tokens = model.visual_prompts.adapters["default"]
    head = model.get_base_model().classifier.adapters["default"]
    randomize_(tokens)
    pixels = tiny_images()["pixel_values"]
    if method == "vapt":
        def prompts_for(layer, patches):  # VAPT's own LayerNorms: the reference's eps, not ViT's 1e-12
            return hand_vapt_prompts(tokens, layer, patches, 1e-5)
    else:
        def prompts_for(layer, patches):
            if layer >= len(tokens.prompts):
                return None
            return tokens.prompts[layer].expand(len(patches), -1, -1)
    with torch.no_grad():
        expected = hand_vit_classifier(plain, head, pixels, prompts_for, N)
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(48, 48), (32, 48)], ids=["48x48", "32x48"])
def test_vapt_at_other_image_sizes_with_interpolated_positions(size):
    base = tiny_vision_model("vit")
    plain = copy.deepcopy(base)
    model = repeft.wrap(base, CONFIGS["vapt"](image_size=list(size)))
    tokens = model.visual_prompts.adapters["default"]
    assert tokens.grid == (size[0] // 8, size[1] // 8)
    randomize_(tokens)
    pixels = tiny_images(height=size[0], width=size[1])["pixel_values"]
    head = model.get_base_model().classifier.adapters["default"]
    with torch.no_grad():
        expected = hand_vit_classifier(
            plain, head, pixels, lambda layer, p: hand_vapt_prompts(tokens, layer, p, 1e-5), N, interpolate=True
        )
        got = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vapt_defaults_are_the_official_configs():
    # The reference (VAPT's official config): a 2 x 2 filter and nn.LayerNorm's default eps 1e-5 per layer.
    config = repeft.VAPTConfig()
    assert config.kernel_size == 2
    model = repeft.wrap(tiny_vision_model("vit"), config)
    norms = [m for m in model.visual_prompts.adapters["default"].modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {1e-5}
    # norm_eps=None: the backbone's eps (1e-12 for ViT), what adapters saved before norm_eps used.
    model = repeft.wrap(tiny_vision_model("vit"), repeft.VAPTConfig(norm_eps=None))
    norms = [m for m in model.visual_prompts.adapters["default"].modules() if isinstance(m, torch.nn.LayerNorm)]
    assert {m.eps for m in norms} == {1e-12}
    assert repeft.AdapterConfig.from_saved({"method": "vapt", "kernel_size": 3}).norm_eps is None


def test_what_holds_at_init():
    base = tiny_vision_model("vit")
    reference = copy.deepcopy(base)
    model = repeft.wrap(base, CONFIGS["vapt"]())
    tokens = model.visual_prompts.adapters["default"]
    seen = {}
    for index, layer in enumerate(model.get_base_model().vit.layers):
        # Registered after the adapter's hook, so it sees the sequence the layer runs on.
        layer.register_forward_pre_hook(lambda m, args, kw, i=index: seen.__setitem__(i, args[0]), with_kwargs=True)
    batch = tiny_images()
    out = logits(model, batch)
    assert all(h.shape[1] == 1 + N + 16 for h in seen.values())
    torch.testing.assert_close(seen[0][:, 1 : 1 + N], tokens.first.prompts[0].expand(2, -1, -1), atol=0, rtol=0)
    for index in range(1, len(seen)):
        assert torch.equal(seen[index][:, 1 : 1 + N], torch.zeros(2, N, 32)), index
    # Zero prompt tokens still take part in attention, so the model is not the base model.
    assert not torch.allclose(out, logits(reference, batch))


@pytest.mark.parametrize("head", [True, False], ids=["classifier", "backbone"])
@pytest.mark.parametrize("method", ["vpt-deep", "vapt"])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_family_layout_gradients_and_disable(family, method, head):
    base = tiny_vision_model(family, head=head)
    reference = copy.deepcopy(base)
    model = repeft.wrap(base, CONFIGS[method]())
    batch = tiny_images()
    if not head:
        batch.pop("labels")
    out = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        ref = reference(**batch)
    first = out.logits if head else out.last_hidden_state
    assert first.shape == (ref.logits if head else ref.last_hidden_state).shape
    # Intermediate hidden states carry the prompts right after the class/distillation/register tokens.
    assert all(h.shape[1] == PREFIX[family] + N + 16 for h in out.hidden_states)
    (out.loss if head else out.last_hidden_state.square().mean()).backward()
    for name, param in model.named_parameters():
        trains = ".adapters.default." in "." + name
        assert param.requires_grad == trains, name
        assert (param.grad is not None) == trains, name
    assert any(name.startswith("visual_prompts.") for name, p in model.named_parameters() if p.requires_grad)
    assert any("classifier" in name for name, p in model.named_parameters() if p.requires_grad) == head
    with model.disable_adapter():
        again = logits(model, batch) if head else model(**batch).last_hidden_state
    torch.testing.assert_close(again, ref.logits if head else ref.last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_saved_adapter_names_and_base_model_are_checked(method, tmp_path):
    # The round trip itself is in test_conformance.py.
    model = repeft.wrap(tiny_vision_model("deit"), CONFIGS[method]())
    model.save_adapter(tmp_path / "adapter")
    assert {k.split(".")[0] for k in model.adapter_state_dict()} == {"visual_prompts", "classifier"}
    loaded = repeft.load_adapter(tiny_vision_model("deit"), tmp_path / "adapter")
    assert isinstance(loaded.configs["default"], type(CONFIGS[method]()))
    with pytest.raises(AdapterFileError, match="another base model"):
        repeft.load_adapter(tiny_vision_model("vit"), tmp_path / "adapter")


def test_multi_adapter_switch_and_delete():
    base = tiny_vision_model("vit")
    reference = copy.deepcopy(base)
    batch = tiny_images()
    model = repeft.wrap(base, CONFIGS["vpt-deep"](), adapter_name="vpt")
    train_steps(model, batch)
    out_vpt = logits(model, batch)
    model.add_adapter("vapt", repeft.VAPTConfig(n_prompt=5, kernel_size=3, mlp_hidden=4))
    model.add_adapter("lora", repeft.LoRAConfig(r=2))
    model.set_adapter("lora")
    train_steps(model, batch)  # trains the LoRA adapter only
    out_lora = logits(model, batch)
    model.set_adapter("vapt")
    assert all(p.requires_grad == (".adapters.vapt." in n) for n, p in model.named_parameters())
    train_steps(model, batch)
    out_vapt = logits(model, batch)
    model.set_adapter("vpt")
    torch.testing.assert_close(logits(model, batch), out_vpt, atol=0, rtol=0)
    model.delete_adapter("vpt")
    model.set_adapter("vapt")
    torch.testing.assert_close(logits(model, batch), out_vapt, atol=0, rtol=0)
    model.delete_adapter("vapt")  # the last visual prompts: their hooks go too
    assert "visual_prompts" not in model._modules
    assert hooks_on(model.get_base_model().vit) == 0
    torch.testing.assert_close(logits(model, batch), out_lora, atol=0, rtol=0)
    model.delete_adapter("lora")
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=0, rtol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", ["vpt-deep", "vapt"])
def test_gradient_checkpointing(method, reentrant):
    model = repeft.wrap(tiny_vision_model("dinov2"), CONFIGS[method]())
    batch = tiny_images()
    model.train()
    torch.manual_seed(0)  # same channel-dropout masks in both passes
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # transformers >= 5.2 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().dinov2.encoder.layer)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    grads = dict(model.named_parameters())
    for name, g in plain.items():
        torch.testing.assert_close(grads[name].grad, g, atol=1e-5, rtol=1e-4)


def test_parameter_counts_follow_the_formulas():
    d, L, n, h, K = 32, 3, N, 4, 2
    vpt = repeft.wrap(tiny_vision_model("vit", head=False), CONFIGS["vpt-deep"]())
    assert vpt.trainable_parameters()[0] == L * n * d
    vapt = repeft.wrap(tiny_vision_model("vit", head=False), CONFIGS["vapt"]())
    positions = (4 - K + 1) ** 2  # 4x4 patch grid, valid convolution
    assert vapt.trainable_parameters()[0] == n * d + (L - 1) * (2 * d + K * K + (positions + 1) * n) + 2 * d * h


def test_vapt_filters_start_standard_normal_like_the_reference():
    # The reference ChannelWiseConv2d draws its filter with torch.randn; nn.Conv2d's init would give std 1/(K sqrt 3).
    from repeft.vapt import PatchesToTokens

    torch.manual_seed(0)
    kernels = torch.cat([PatchesToTokens(8, (4, 4), 3, 2, 0.0, 1e-6).kernel.flatten() for _ in range(200)])
    assert abs(kernels.mean().item()) < 0.1 and 0.9 < kernels.std().item() < 1.1


def test_vapt_feature_mlp_drops_hidden_units_in_training_only():
    model = repeft.wrap(tiny_vision_model("vit"), CONFIGS["vapt"](channel_dropout=0.0, mlp_dropout=0.5))
    tokens = model.visual_prompts.adapters["default"]
    assert model.configs["default"].mlp_dropout == 0.5 and repeft.VAPTConfig().mlp_dropout == 0.1
    with torch.no_grad():
        t = torch.randn(2, N, 32)
        tokens.eval()
        torch.testing.assert_close(tokens.mlp(t), torch.relu(t @ tokens.mlp[0].weight.T) @ tokens.mlp[2].weight.T)
        tokens.train()
        hidden = []
        handle = tokens.mlp[1].register_forward_hook(lambda m, args, out: hidden.append(out))
        tokens.mlp(t)
        handle.remove()
    active = torch.relu(t @ tokens.mlp[0].weight.T) != 0
    assert 0.3 < ((hidden[0] == 0) & active).sum() / active.sum() < 0.7  # about half the active units dropped


def test_config_json_round_trip():
    for config in (repeft.VPTConfig(n_prompt=4, deep=False), repeft.VAPTConfig(image_size=[32, 48], channel_dropout=0.0)):
        assert repeft.AdapterConfig.from_json(config.to_json()) == config
    assert repeft.VAPTConfig(image_size=(48, 48)).image_size == 48


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: repeft.VPTConfig(n_prompt=0), "n_prompt must be a positive integer, got 0"),
        (lambda: repeft.VAPTConfig(n_prompt=-2), "n_prompt must be a positive integer, got -2"),
        (lambda: repeft.VPTConfig(n_prompt=2.5), "n_prompt"),
        (lambda: repeft.VAPTConfig(kernel_size=0), "kernel_size"),
        (lambda: repeft.VAPTConfig(channel_dropout=1.0), r"channel_dropout must be a number in \[0, 1\), got 1.0"),
        (lambda: repeft.VAPTConfig(mlp_dropout=-0.1), r"mlp_dropout must be a number in \[0, 1\), got -0.1"),
        (lambda: repeft.VAPTConfig(image_size=[32, 48, 3]), r"image_size must be a positive int or \[height, width\]"),
        (lambda: repeft.VAPTConfig(activation="swish"), "activation must be one of"),
    ],
)
def test_bad_config_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_fits_to_the_model_leave_it_untouched():
    base = tiny_vision_model("vit")
    with pytest.raises(ValueError, match="kernel_size 5 does not fit the 4x4 patch grid"):
        repeft.wrap(base, repeft.VAPTConfig(kernel_size=5))
    with pytest.raises(ValueError, match="does not fit the 0x4 patch grid"):
        repeft.wrap(base, repeft.VAPTConfig(image_size=[4, 32]))
    assert hooks_on(base) == 0 and all(p.requires_grad for p in base.parameters())
    with pytest.raises(TargetError, match="model_type 'bert'"):
        repeft.wrap(tiny_model("bert"), repeft.VPTConfig())


def test_bad_inputs_give_clear_errors():
    model = repeft.wrap(tiny_vision_model("dinov2"), CONFIGS["vapt"]())
    images = [tiny_images(1)["pixel_values"][0], tiny_images(1, 48, 48)["pixel_values"][0]]
    with pytest.raises(TypeError, match=r"one \(batch, channels, height, width\) tensor.*sizes 32x32, 48x48"):
        model(pixel_values=images)
    # DINOv2 interpolates its positions for any size, but this adapter's token maps fit a 4x4 grid only.
    with pytest.raises(ValueError, match="maps a 4x4 patch grid .* 48x48 images give a 6x6 grid"):
        model(**tiny_images(height=48, width=48))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[:, -2:] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(**tiny_images(), attention_mask=mask)
    model(**tiny_images(), attention_mask=torch.ones(2, 17, dtype=torch.long))  # all-ones masks are fine
    # VPT's prompts fit any grid.
    vpt = repeft.wrap(tiny_vision_model("dinov2"), CONFIGS["vpt-deep"]())
    assert vpt(**tiny_images(height=48, width=40)).logits.shape == (2, 5)
