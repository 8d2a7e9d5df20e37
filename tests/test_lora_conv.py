"""LoRA on nn.Conv1d/2d/3d against PEFT itself and against the convolution written out here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import repeft
from repeft.lora_conv import LoRAConv
from test_dora import as_repeft, assert_merged_like_peft
from tiny_models import logits, tiny_batch, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# (convolution, input shape): a kernel with stride and padding, a 1x1 kernel, an uneven 3-D kernel, groups.
CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (3, 4, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (3, 3, 9, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 6, 1), (3, 3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1)), (3, 2, 4, 6, 6)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding="same"), (3, 4, 7, 7)),
}
UNGROUPED = [kind for kind in CONVS if kind != "grouped"]
CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class ConvNet(nn.Module):
    """A convolution, then a linear head on the spatial mean of its output."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = CONVS[kind][0]()
        self.head = nn.Linear(self.conv.out_channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(2).mean(-1))


def inputs(kind: str) -> torch.Tensor:
    return torch.randn(CONVS[kind][1], generator=torch.Generator().manual_seed(1))


def peft_conv_lora(kind: str, **overrides):
    """A PEFT LoRA model on ``kind``'s convolution (and head) with nonzero factors, and a copy of its base.

    A DoRA magnitude is moved off its initial norm, so that it rescales the output.
    """
    base = ConvNet(kind)
    reference = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, target_modules=["conv", "head"], init_lora_weights=False)
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(**{**config, **overrides})).eval()
    move_magnitudes(model)
    return model, reference


def move_magnitudes(model) -> None:
    """Scale DoRA magnitudes (PEFT's or repeft's) off their initial norms, so that they rescale the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))


def conv_grads(model) -> dict[str, torch.Tensor]:
    """The conv adapter's gradients by parameter name, for PEFT and repeft models alike."""
    return {part: p.grad for name, p in model.named_parameters() if ".conv." in name and p.grad is not None
            for part in ("lora_A", "lora_B", "lora_magnitude_vector") if part in name}


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_identity_at_init_and_only_the_factors_train(kind, init):
    base = ConvNet(kind)
    x = inputs(kind)
    with torch.no_grad():
        expected = base(x)
    model = repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["conv"], init_lora_weights=init))
    assert isinstance(model.get_base_model().conv, LoRAConv)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    model(x).square().sum().backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"base_model.model.conv.adapters.default.lora_A", "base_model.model.conv.adapters.default.lora_B"}
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trained)
    assert model.get_base_model().conv.adapters["default"].lora_B.grad.abs().sum() > 0
    theirs = peft.get_peft_model(ConvNet(kind), peft.LoraConfig(r=4, target_modules=["conv"], init_lora_weights=init))
    shapes = {k: v.shape for k, v in repeft.get_peft_model_state_dict(model).items()}
    assert shapes == {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()}


@pytest.mark.parametrize("kind", UNGROUPED)
def test_dora_starts_as_lora_with_pefts_magnitude(kind):
    """At init m = ||W + s B A|| per output channel (PEFT's 1 x out x 1 ... shape), so DoRA is W + s B A."""
    base = ConvNet(kind)
    x = inputs(kind)
    config = dict(r=4, target_modules=["conv"], init_lora_weights=False)
    model = repeft.wrap(base, repeft.LoRAConfig(**config, use_dora=True))
    theirs = peft.get_peft_model(ConvNet(kind), peft.LoraConfig(**config, use_dora=True))
    tensors = repeft.get_peft_model_state_dict(model)
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()}
    conv = model.get_base_model().conv
    lora_A, lora_B = (p.detach() for p in conv.adapters["default"].factors())
    weight = conv.base_layer.weight.detach() + 8 / 4 * torch.einsum("or,ri...->oi...", lora_B.flatten(1), lora_A)
    torch.testing.assert_close(tensors["base_model.model.conv.lora_magnitude_vector"].flatten(), weight.flatten(1).norm(dim=1))
    plain = ConvNet(kind)  # the same base weights
    plain.conv.weight.data.copy_(weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=0)
        model.merge()
        torch.testing.assert_close(conv.base_layer.weight, weight, atol=1e-6, rtol=0)


def test_init_false_changes_the_output_from_the_start():
    base = ConvNet("conv2d")
    x = inputs("conv2d")
    with torch.no_grad():
        expected = base(x)
        model = repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["conv"], init_lora_weights=False))
        assert not torch.allclose(model(x), expected)


@pytest.mark.parametrize("kind", UNGROUPED)
def test_the_low_rank_term_is_the_convolution_with_s_B_A(kind):
    """conv(x, W) + s conv1x1(conv(x, A), B) == conv(x, W + s sum_r B[:, r] A[r]), written out here."""
    model = repeft.wrap(ConvNet(kind), repeft.LoRAConfig(r=4, lora_alpha=6, target_modules=["conv"], init_lora_weights=False))
    x = inputs(kind)
    conv = model.get_base_model().conv.base_layer
    lora_A, lora_B = (p.detach() for p in model.get_base_model().conv.adapters["default"].factors())
    delta = 6 / 4 * torch.einsum("or,ri...->oi...", lora_B.flatten(1), lora_A)
    with torch.no_grad():
        out = CONV_FUNCTIONS[type(conv)](x, conv.weight + delta, conv.bias, conv.stride, conv.padding)
        expected = model.get_base_model().head(out.flatten(2).mean(-1))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


KINDS_AND_DORA = [(kind, use_dora) for kind in CONVS for use_dora in (False, True)]


@pytest.mark.parametrize(("kind", "use_dora"), KINDS_AND_DORA)
def test_same_outputs_and_gradients_as_peft(kind, use_dora, tmp_path):
    theirs, reference = peft_conv_lora(kind, use_dora=use_dora)
    ours = as_repeft(theirs, reference, tmp_path, trainable=True)
    assert isinstance(ours.get_base_model().conv, LoRAConv)
    x = inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    for model in (theirs, ours):
        model(x).square().sum().backward()
    grads, expected = conv_grads(ours), conv_grads(theirs)
    assert set(grads) == set(expected) == {"lora_A", "lora_B", *["lora_magnitude_vector"] * use_dora}
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_as_peft_applies_it(use_dora, tmp_path):
    theirs, reference = peft_conv_lora("conv2d", target_modules=["conv"], lora_dropout=0.5, use_dora=use_dora)
    ours = as_repeft(theirs, reference, tmp_path, trainable=True)
    x = inputs("conv2d")
    outputs = []
    for model in (theirs.train(), ours.train()):
        torch.manual_seed(5)
        outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(outputs[1], ours.eval()(x))  # the dropout did drop something


@pytest.mark.parametrize(("kind", "use_dora"), KINDS_AND_DORA)
def test_export_peft_loads_in_peft_with_the_same_tensors_and_outputs(kind, use_dora, tmp_path):
    base = ConvNet(kind)
    reference = copy.deepcopy(base)
    config = repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=["conv", "head"], init_lora_weights=False, use_dora=use_dora)
    ours = repeft.wrap(base, config)
    move_magnitudes(ours)
    repeft.export_peft(ours, tmp_path / "exported")
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "exported").eval()
    x = inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=0)
    saved = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    factors = ours.get_base_model().conv.adapters["default"]
    assert torch.equal(saved["base_model.model.conv.lora_A.weight"], factors.lora_A.detach())
    assert torch.equal(saved["base_model.model.conv.lora_B.weight"], factors.lora_B.detach())
    assert peft.get_peft_model_state_dict(theirs).keys() == saved.keys()


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind", UNGROUPED)
def test_merge_matches_peft_and_unmerge_restores_the_base(kind, use_dora, tmp_path):
    theirs, reference = peft_conv_lora(kind, use_dora=use_dora)
    base_weight = reference.conv.weight.detach().clone()
    ours = as_repeft(theirs, reference, tmp_path)
    x = inputs(kind)
    with torch.no_grad():
        expected = ours(x)
        ours.merge()
        theirs.merge_adapter()
        conv = ours.get_base_model().conv
        torch.testing.assert_close(conv.base_layer.weight, theirs.base_model.model.conv.base_layer.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        ours.unmerge()
        torch.testing.assert_close(conv.base_layer.weight, base_weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=0)
        theirs.unmerge_adapter()
        plain = copy.deepcopy(ours).merge_and_unload()
        assert type(plain.conv) is type(conv.base_layer)
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)
        assert_merged_like_peft(ours, theirs)


def test_a_merge_that_overflows_a_float16_weight_is_refused_before_it_is_written():
    base = ConvNet("conv2d").half()
    model = repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    conv = model.get_base_model().conv
    with torch.no_grad():
        conv.adapters["default"].lora_A.fill_(1.0)
        conv.adapters["default"].lora_B.fill_(1e4)  # s B A = 2 * 4 * 1e4 = 8e4, past float16's 65504
    weight = conv.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="gives inf or NaN in this torch.float16 weight"):
        model.merge()
    assert model.merged_adapter() is None and torch.equal(conv.base_layer.weight, weight)


def test_merging_a_grouped_convolution_is_refused_by_name_as_in_peft(tmp_path):
    theirs, reference = peft_conv_lora("grouped")
    ours = as_repeft(theirs, reference, tmp_path)
    weight = ours.get_base_model().conv.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError):
        theirs.merge_adapter()
    with pytest.raises(ValueError, match="Conv2d with groups=2: its low-rank term is a dense convolution"):
        ours.merge()
    assert ours.merged_adapter() is None and torch.equal(ours.get_base_model().conv.base_layer.weight, weight)


def test_a_rank_that_is_not_a_multiple_of_groups_is_refused_by_name():
    base = ConvNet("grouped")
    with pytest.raises(repeft.TargetError, match="r=3 on the Conv2d 'conv' with groups=2: as in PEFT, r must be a multiple"):
        repeft.wrap(base, repeft.LoRAConfig(r=3, target_modules=["conv"]))
    assert type(base.conv) is nn.Conv2d and all(p.requires_grad for p in base.parameters())  # left as it was
    model = repeft.wrap(base, repeft.LoRAConfig(r=3, rank_pattern={"conv": 4}, target_modules=["conv", "head"]))
    assert model.get_base_model().conv.adapters["default"].lora_A.shape[0] == 4
    with pytest.raises(ValueError, match="divisible by groups"):
        peft.get_peft_model(ConvNet("grouped"), peft.LoraConfig(r=3, target_modules=["conv"]))


@pytest.mark.parametrize("kind", ["conv1d", "conv3d", "grouped"])
def test_save_and_load_give_the_same_adapter(kind, tmp_path):
    base = ConvNet(kind)
    fresh = copy.deepcopy(base)
    model = repeft.wrap(base, repeft.LoRAConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "saved")
    loaded = repeft.load_adapter(fresh, tmp_path / "saved")
    x = inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    for theirs, mine in zip(loaded.get_base_model().conv.adapters["default"].factors(),
                            model.get_base_model().conv.adapters["default"].factors()):
        assert torch.equal(theirs, mine)


def test_several_adapters_switch_and_share_a_batch_as_in_peft(tmp_path):
    theirs, reference = peft_conv_lora("conv2d", target_modules=["conv"])
    torch.manual_seed(4)
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = repeft.from_peft(reference, tmp_path / "peft")
    ours = repeft.from_peft(ours, tmp_path / "peft" / "other", adapter_name="other").eval()
    x = inputs("conv2d")
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        single = {}
        for name in ("default", "other"):
            theirs.set_adapter(name), ours.set_adapter(name)
            single[name] = ours(x)
            torch.testing.assert_close(single[name], theirs(x), atol=1e-6, rtol=0)
        with ours.disable_adapter():
            single["__base__"] = ours(x)
        mixed = ours(x, adapter_names=names)
        torch.testing.assert_close(mixed, theirs(x, adapter_names=names), atol=1e-6, rtol=0)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_the_patch_projection_of_a_vit_matches_peft_and_exports_merged(use_dora, tmp_path):
    base = tiny_model("vit")
    reference = copy.deepcopy(base)
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["projection", "q_proj"], init_lora_weights=False,
                             use_dora=use_dora)
    theirs = peft.get_peft_model(base, config).eval()
    move_magnitudes(theirs)
    ours = as_repeft(theirs, reference, tmp_path)
    assert isinstance(ours.get_base_model().vit.embeddings.patch_embeddings.projection, LoRAConv)
    batch = tiny_batch("vit")
    expected = logits(theirs, batch)
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)
    repeft.export_merged(ours, tmp_path / "merged")
    merged = type(reference).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("conv", "config", "message"),
    [
        (nn.Conv2d(3, 6, 3), repeft.RepLoRAConfig(r=4, target_modules=["conv"]),
         "the Conv2d 'conv': RepLoRAConfig does not adapt convolutions"),
        (nn.Conv1d(4, 6, 3, dilation=2), repeft.LoRAConfig(r=4, target_modules=["conv"]),
         r"dilation=\(2,\), padding_mode='zeros': PEFT's LoRA convolves with dilation 1"),
        (nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), repeft.LoRAConfig(r=4, target_modules=["conv"]),
         "padding_mode='reflect': PEFT's LoRA convolves with dilation 1 and zero padding"),
    ],
)
def test_convolutions_repeft_cannot_adapt_as_peft_does_are_refused_by_name(conv, config, message):
    base = ConvNet("conv2d")
    base.conv = conv
    with pytest.raises(repeft.TargetError, match=message):
        repeft.wrap(base, config)
    assert type(base.conv) is type(conv) and all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kind", list(CONVS))
def test_lora_bias_on_a_convolution_as_peft_computes_it(kind, tmp_path):
    theirs, reference = peft_conv_lora(kind, target_modules=["conv"], lora_bias=True)
    with torch.no_grad():  # a bias that shows (PEFT starts it at zero for init_lora_weights=True)
        theirs.base_model.model.conv.lora_B["default"].bias.normal_()
    ours = as_repeft(theirs, reference, tmp_path, trainable=True)
    layer = ours.get_base_model().conv
    assert torch.equal(layer.lora_B["default"].weight, theirs.base_model.model.conv.lora_B["default"].weight)
    x = inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
        # conv(x, W) + s * (conv(conv(x, A), B) + b), written out here.
        conv, factors = layer.base_layer, layer.adapters["default"]
        f = CONV_FUNCTIONS[type(conv)]
        after_A = f(x, factors.lora_A, None, conv.stride, conv.padding)
        low_rank = f(after_A, factors.lora_B, None, 1, 0, 1, conv.groups) + factors.lora_B_bias.view(1, -1, *[1] * (x.dim() - 2))
        torch.testing.assert_close(layer(x), conv(x) + factors.scaling * low_rank, atol=1e-6, rtol=0)
    for model in (theirs, ours):
        model(x).square().sum().backward()
    torch.testing.assert_close(layer.adapters["default"].lora_B_bias.grad,
                               theirs.base_model.model.conv.lora_B["default"].bias.grad, atol=1e-6, rtol=1e-5)
    if kind != "grouped":  # PEFT refuses to merge a grouped convolution
        with torch.no_grad():
            ours.merge()
            theirs.merge_adapter()
            torch.testing.assert_close(layer.base_layer.bias, theirs.base_model.model.conv.base_layer.bias,
                                       atol=1e-6, rtol=0)
