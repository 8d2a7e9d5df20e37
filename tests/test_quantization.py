"""LoRA and RepLoRA on bitsandbytes 4-bit and 8-bit bases, and merged export from them.

Quantized models are made the way users make them: a tiny float llama is saved
and loaded back with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
(bitsandbytes quantizes on the CPU too). The float reference for each one is
the same llama with every quantized weight replaced by its dequantization,
computed here with bitsandbytes' own functions rather than repeft's.

bitsandbytes takes another path on CPUs with AVX512-BF16: the first eval-mode,
no-grad forward of a 4-bit layer repacks its weight for a bf16 inference
kernel. Tests must not depend on the CPU they run on, so every test forces the
portable path (``portable_cpu`` below) and the tests of the repacked layout
force the other one: ``avx512bf16_cpu`` makes new layers believe the CPU has
AVX512-BF16, and ``cpu_repack`` applies bitsandbytes' own repacking (pure
torch, runs anywhere). The models are large enough for that repacking
(d_out a multiple of 32, d_in of the 64-wide quantization block).

Tolerances: in fp32 the adapter model on a quantized base computes with the
dequantized weights exactly, so it matches the reference to float rounding
(atol 1e-5). Merged float exports match to 1e-4 (design.md section 7).
Two paths are approximate by design and get their own stated tolerances:
LLM.int8 inference (eval mode) quantizes activations too, and bf16 compute
rounds the activations.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import repeft
from repeft.quantization import dequantize_weight, keep_standard_layout, quant_type
from tiny_models import tiny_batch, tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="the bnb extra (pip install repeft[bnb]) is not installed")

QCONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
METHODS = {
    "lora": lambda: repeft.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "replora": lambda: repeft.RepLoRAConfig(r=4, lora_alpha=8, mlp_hidden=8, target_modules="all-linear"),
}
CASES = [("nf4", "lora"), ("nf4-double", "replora"), ("fp4", "lora"), ("int8", "lora"), ("int8", "replora")]
# Sizes bitsandbytes' CPU repacking accepts: k/v projections 2 heads x 16 = 32 wide, every d_in >= 64.
QUANT_SIZES = {"llama": {"hidden_size": 64, "intermediate_size": 128}, "gpt2": {"n_embd": 64}}


def quant_llama():
    return tiny_model("llama", **QUANT_SIZES["llama"])


@pytest.fixture(autouse=True)
def portable_cpu(monkeypatch):
    """Layers made in a test believe the CPU has no AVX512-BF16, whatever it has."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Layers made in the test believe the CPU has AVX512-BF16 (their eval forward would repack)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def cpu_repack(model):
    """What an eval-mode forward does to every 4-bit weight on an AVX512-BF16 CPU, done directly."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.data, module.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state
            )


def packed(module):
    return isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False)


def repacked_dequantization(layer):
    """The matrix a standard-layout 4-bit layer computes with once repacked: absmax rounded to bf16.

    Computed with bitsandbytes' own functions on the standard layout, before any repacking.
    """
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    rounded = copy.copy(state)
    rounded.absmax, rounded.nested, rounded.dtype = absmax.float().to(torch.bfloat16).float(), False, torch.float32
    return bnb.functional.dequantize_4bit(layer.weight.data, rounded)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    quant_llama().save_pretrained(path)
    return path


def load_quantized(path, qname, **extra):
    config = BitsAndBytesConfig(**QCONFIGS[qname], **extra)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


def dequantized_reference(quantized, repacked=False):
    """The float llama with each bitsandbytes weight replaced by bitsandbytes' own dequantization.

    ``repacked``: the weights the 4-bit layers compute with after ``cpu_repack``.
    """
    return dequantized_into(quant_llama(), quantized, repacked)


def dequantized_into(reference, quantized, repacked=False):
    """``reference`` (float, of ``quantized``'s architecture) with bitsandbytes' dequantization of its weights."""
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and repacked:
            weight = repacked_dequantization(module)
        elif isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            weight = module.weight.data.float() * scb.float()[:, None] / 127
        else:
            continue
        path = name.replace(".base_layer", "").removeprefix("base_model.model.")
        reference.get_submodule(path).weight.data.copy_(weight)
    return reference


def logits(model, batch, train=False):
    model.train(train)
    with torch.no_grad():
        out = model(**batch).logits
    model.eval()
    return out


def train_steps(model, batch, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(params=CASES, ids=[f"{q}-{m}" for q, m in CASES])
def case(request, llama_dir):
    """(quant name, trained adapter model on the quantized base, same adapter on the dequantized float base, batch)."""
    qname, method = request.param
    quantized = load_quantized(llama_dir, qname)
    reference = repeft.wrap(dequantized_reference(quantized), METHODS[method]())
    model = repeft.wrap(quantized, METHODS[method]())
    batch = tiny_batch("llama")
    train_steps(model, batch)
    reference.load_adapter_tensors("default", model.adapter_state_dict())
    return qname, model, reference, batch


def test_identity_at_init(llama_dir):
    quantized = load_quantized(llama_dir, "nf4")
    batch = tiny_batch("llama")
    expected = logits(quantized, batch)
    model = repeft.wrap(quantized, METHODS["replora"]())
    assert torch.equal(logits(model, batch), expected)


def test_matches_float_reference_on_dequantized_weights(case):
    qname, model, reference, batch = case
    assert all(quant_type(layer.base_layer) is not None for _, layer in model.adapter_layers())
    # Training mode: 4-bit and (on the CPU) 8-bit layers multiply by the dequantized weight.
    torch.testing.assert_close(logits(model, batch, train=True), logits(reference, batch), atol=1e-5, rtol=0)
    if qname == "int8":
        # LLM.int8 inference also rounds activations to int8: up to 2e-3..2e-2 here (logit std ~0.1).
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=5e-2, rtol=0)
    else:
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)


def test_only_adapter_params_get_gradients(case):
    _, model, _, batch = case
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if ".adapters." not in k}
    model.train()
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        is_adapter = ".adapters.default." in name
        assert param.requires_grad == is_adapter, name
        assert (param.grad is not None) == is_adapter, name
        if is_adapter:
            assert param.dtype == torch.float32  # the adapter stays in its own dtype
    train_steps(model, batch)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_save_load_round_trip(case, llama_dir, tmp_path):
    qname, model, reference, batch = case
    model.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(load_quantized(llama_dir, qname), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    # The same adapter on the dequantized float base: the exact float counterpart.
    on_float = repeft.load_adapter(dequantized_reference(load_quantized(llama_dir, qname)), tmp_path / "adapter")
    torch.testing.assert_close(logits(on_float, batch), logits(reference, batch), atol=1e-6, rtol=0)


def test_merged_float_export_loads_without_quantization(case, tmp_path, capsys):
    _, model, reference, batch = case
    report = repeft.export_merged(model, tmp_path / "merged", probe_batch=batch)
    assert "max |diff|" in capsys.readouterr().out
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {"F32"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(quant_type(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), logits(reference, batch), atol=1e-4, rtol=0)
    assert report.weights == "float32" and report.max_abs_diff is not None


@pytest.mark.parametrize("target", ["nf4", "int8"])
def test_requantized_export_reports_its_error(llama_dir, tmp_path, capsys, target):
    model = repeft.wrap(load_quantized(llama_dir, "nf4"), METHODS["lora"]())
    batch = tiny_batch("llama")
    train_steps(model, batch, lr=5e-2)
    report = repeft.export_merged(model, tmp_path / "merged", requantize=target, probe_batch=batch)
    printed = capsys.readouterr().out
    assert f"{report.max_abs_diff:.3e}" in printed and f"{report.mean_abs_diff:.3e}" in printed
    assert 0 < report.mean_abs_diff <= report.max_abs_diff
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    assert {quant_type(m) for m in requantized.modules()} >= {target}
    # The reported numbers are those of the checkpoint on disk.
    diff = (logits(requantized, batch) - logits(model, batch)).abs()
    assert diff.max().item() == pytest.approx(report.max_abs_diff, rel=1e-5)
    # Without a probe batch the error is still measured, on random tokens, and says so.
    report = repeft.export_merged(model, tmp_path / "merged", requantize=target)
    assert report.max_abs_diff > 0 and "random token ids" in capsys.readouterr().out


def test_in_place_merge_is_refused(llama_dir, tmp_path):
    model = repeft.wrap(load_quantized(llama_dir, "nf4"), METHODS["lora"]())
    for action in (model.merge, model.merge_and_unload, lambda: model.save_merged(tmp_path / "merged")):
        with pytest.raises(ValueError, match="export_merged"):
            action()
        assert model.merged_adapter() is None
    assert not (tmp_path / "merged").exists()
    # q_proj left in float: it merges first, then v_proj refuses and q_proj must be unmerged again.
    mixed = load_quantized(llama_dir, "nf4", llm_int8_skip_modules=["q_proj", "lm_head"])
    model = repeft.wrap(mixed, repeft.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train_steps(model, tiny_batch("llama"))
    expected = logits(model, tiny_batch("llama"))
    with pytest.raises(ValueError, match="Linear4bit"):
        model.merge()
    assert model.merged_adapter() is None
    torch.testing.assert_close(logits(model, tiny_batch("llama")), expected, atol=1e-6, rtol=0)


def test_bf16_compute_and_autocast(llama_dir):
    batch = tiny_batch("llama")
    fp32 = repeft.wrap(load_quantized(llama_dir, "nf4"), METHODS["lora"]())
    train_steps(fp32, batch)
    expected = logits(fp32, batch)
    bf16 = repeft.wrap(load_quantized(llama_dir, "nf4", bnb_4bit_compute_dtype=torch.bfloat16), METHODS["lora"]())
    bf16.load_adapter_tensors("default", fp32.adapter_state_dict())
    # bf16 keeps 8 bits of mantissa: logits of size ~1 move by a few 1e-3.
    torch.testing.assert_close(logits(bf16, batch), expected, atol=3e-2, rtol=0)
    bf16.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(**batch)
    out.loss.backward()
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.logits.float(), expected, atol=5e-2, rtol=0)


@pytest.mark.filterwarnings("error:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_prepare_quantized_model_upcasts_and_checkpoints(llama_dir):
    def prepared(checkpointing):
        base = AutoModelForCausalLM.from_pretrained(
            llama_dir, quantization_config=BitsAndBytesConfig(**QCONFIGS["nf4"]), device_map="cpu", dtype=torch.bfloat16
        )
        return repeft.prepare_quantized_model(base, gradient_checkpointing=checkpointing)

    base = prepared(checkpointing=True)
    assert base.model.norm.weight.dtype == torch.float32
    assert {p.dtype for p in base.parameters()} == {torch.float32, torch.uint8}
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    batch = tiny_batch("llama")
    grads = []
    for model in (repeft.wrap(base, METHODS["lora"]()), repeft.wrap(prepared(checkpointing=False), METHODS["lora"]())):
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="before repeft.wrap"):
        repeft.prepare_quantized_model(repeft.wrap(quant_llama(), METHODS["lora"]()))


@pytest.mark.parametrize("qname", ["nf4", "nf4-double", "fp4"])
def test_dequantize_weight_matches_bitsandbytes_in_both_layouts(llama_dir, qname):
    layer = load_quantized(llama_dir, qname).model.layers[0].mlp.down_proj
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_weight(layer), expected)
    repacked = repacked_dequantization(layer)
    assert not torch.equal(repacked, expected)  # bf16 absmax: the check below can tell the layouts apart
    cpu_repack(layer)
    packed_data = layer.weight.data.clone()
    assert torch.equal(dequantize_weight(layer), repacked)
    # Decoding never changes the layer (bitsandbytes' own inverse rewrites absmax, lossily).
    assert layer.weight.quant_state.packing_format_for_cpu and torch.equal(layer.weight.data, packed_data)


@pytest.mark.parametrize("qname", ["nf4", "nf4-double", "fp4"])
def test_merged_export_after_cpu_repacking(llama_dir, tmp_path, qname):
    """Issue: export after any eval forward on an AVX512-BF16 CPU decoded the repacked weights wrongly."""
    model = repeft.wrap(load_quantized(llama_dir, qname), METHODS["lora"]())
    batch = tiny_batch("llama")
    train_steps(model, batch, lr=5e-2)
    reference = repeft.wrap(dequantized_reference(model.get_base_model(), repacked=True), METHODS["lora"]())
    reference.load_adapter_tensors("default", model.adapter_state_dict())
    cpu_repack(model)
    repeft.export_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, batch), logits(reference, batch), atol=1e-4, rtol=0)


def test_wrap_unpacks_repacked_weights(llama_dir):
    quantized = load_quantized(llama_dir, "nf4-double")
    reference = repeft.wrap(dequantized_reference(quantized, repacked=True), METHODS["lora"]())
    cpu_repack(quantized)  # e.g. the user ran the base model in eval mode before wrapping it
    model = repeft.wrap(quantized, METHODS["lora"]())
    assert not any(packed(m) for m in model.modules())
    batch = tiny_batch("llama")
    train_steps(model, batch)
    reference.load_adapter_tensors("default", model.adapter_state_dict())
    for train in (True, False):
        torch.testing.assert_close(logits(model, batch, train), logits(reference, batch), atol=1e-5, rtol=0)


def test_adapter_model_never_repacks_on_avx512bf16_cpus(llama_dir, avx512bf16_cpu):
    """Eval then train, as a training loop with evaluation does: same numbers, gradients reach every layer."""
    quantized = load_quantized(llama_dir, "nf4")
    assert all(m.support_avx512bf16_for_cpu for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit))
    reference = repeft.wrap(dequantized_reference(quantized), METHODS["lora"]())
    model = repeft.wrap(quantized, METHODS["lora"]())
    batch = tiny_batch("llama")
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    assert not any(packed(m) for m in model.modules())
    for net in (model, reference):
        torch.manual_seed(0)
        for p in net.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        net.train()
        net(**batch).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4)


def test_requantized_export_on_avx512bf16_cpus(llama_dir, tmp_path, avx512bf16_cpu, monkeypatch):
    model = repeft.wrap(load_quantized(llama_dir, "nf4"), METHODS["lora"]())
    batch = tiny_batch("llama")
    train_steps(model, batch, lr=5e-2)
    report = repeft.export_merged(model, tmp_path / "merged", requantize="nf4", probe_batch=batch)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    diff = (logits(requantized, batch) - logits(model, batch)).abs()
    assert diff.max().item() == pytest.approx(report.max_abs_diff, rel=1e-5)
    assert report.max_abs_diff < 0.5 * logits(model, batch).std().item()


def test_gpt2_conv1d_layout_in_export(tmp_path):
    tiny_model("gpt2", **QUANT_SIZES["gpt2"]).save_pretrained(tmp_path / "gpt2")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "gpt2", quantization_config=BitsAndBytesConfig(**QCONFIGS["nf4"]), device_map="cpu"
    )
    model = repeft.wrap(base, repeft.LoRAConfig(r=4))
    batch = tiny_batch("gpt2")
    train_steps(model, batch)
    repeft.export_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), atol=1e-4, rtol=0)



def test_transformers_trainer_trains_an_adapter_on_a_quantized_base(llama_dir, tmp_path):
    # transformers' Trainer refuses quantized models "without adapters"; a wrapped one has them.
    from transformers import Trainer, TrainingArguments

    model = repeft.wrap(repeft.prepare_quantized_model(load_quantized(llama_dir, "nf4"), gradient_checkpointing=False),
                        repeft.LoRAConfig(r=4, target_modules="all-linear"))
    batch = tiny_batch("llama", batch=4)
    rows = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in batch["input_ids"]]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert any(not torch.equal(v, before[k]) for k, v in model.adapter_state_dict().items())
