"""benchmarks/peft_compat.py's pure parts: which tests count, keys, junit parsing, classification, the peft shim."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peft_compat_shim"))

import compat_results as cr  # noqa: E402
import peft_shim  # noqa: E402

import repeft  # noqa: E402


def test_lora_tests_are_lora_and_its_options_not_lora_derived_methods():
    assert cr.is_lora_test("test_custom_models::TestPeftCustomModel::test_merge[Vanilla MLP 1 LoRA-MLP-LoraConfig-c0]")
    assert cr.is_lora_test("test_custom_models::TestPeftCustomModel::test_merge[Conv1d LoRA with DoRA-Conv1d-LoraConfig-c1]")
    assert cr.is_lora_test("test_initialization::TestLoraInitialization::test_lora_pissa_linear_init_default")
    for other in ("Vanilla MLP 1 AdaLoRA-MLP-AdaLoraConfig", "MLP VBLoRA-MLP-VBLoRAConfig", "GLoRA-MLP-GloraConfig",
                  "MLP 1 LoHa-MLP-LoHaConfig"):
        assert not cr.is_lora_test(f"test_custom_models::TestPeftCustomModel::test_merge[{other}]"), other


def test_pytest_node_ids_and_junit_names_give_the_same_key():
    class_test = "tests/test_custom_models.py::TestPeftCustomModel::test_merge[MLP-LoraConfig-c0]"
    assert cr.nodeid_key(class_test) == cr.junit_key("tests.test_custom_models.TestPeftCustomModel", "test_merge[MLP-LoraConfig-c0]")
    module_test = "tests/test_other.py::test_lora_only"
    assert cr.nodeid_key(module_test) == cr.junit_key("tests.test_other", "test_lora_only")


def test_shimmed_ids_are_spelled_as_peft_spells_them():
    renames = peft_shim.id_renames()
    assert renames[repeft.LoraConfig.__name__] == "LoraConfig"
    key = f"test_x::T::test_merge[MLP-{repeft.LoraConfig.__name__}-c0]"
    assert cr.normalise(key, renames) == "test_x::T::test_merge[MLP-LoraConfig-c0]"
    assert cr.normalise("test_x::T::test[MyLoRAConfigs]", {"LoRAConfig": "LoraConfig"}) == "test_x::T::test[MyLoRAConfigs]"


def test_spread_keeps_order_and_reaches_the_end():
    assert cr.spread(list(range(10)), None) == list(range(10))
    assert cr.spread(list(range(10)), 20) == list(range(10))
    picked = cr.spread(list(range(100)), 4)
    assert picked == sorted(picked) and len(picked) == 4 and picked[-1] >= 75


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a.T" name="test_pass" />
<testcase classname="tests.test_a.T" name="test_missing"><failure message="{missing}">trace</failure></testcase>
<testcase classname="tests.test_a.T" name="test_refused"><failure message="ValueError: init_lora_weights='pissa' is not supported by repeft">t</failure></testcase>
<testcase classname="tests.test_a.T" name="test_kwarg"><failure message="TypeError: LoRAConfig.__init__() got an unexpected keyword argument 'use_dora'">t</failure></testcase>
<testcase classname="tests.test_a.T" name="test_assert"><failure message="AssertionError: assert 3 == 4">t</failure></testcase>
<testcase classname="tests.test_a.T" name="test_bare_value"><failure message="ValueError: shapes differ">t</failure></testcase>
<testcase classname="tests.test_a.T" name="test_setup"><error message="failed on setup with &quot;RuntimeError: boom&quot;">E   RuntimeError: boom</error></testcase>
<testcase classname="tests.test_a.T" name="test_skip"><skipped message="needs a GPU" /></testcase>
<testcase classname="tests.test_a.T" name="test_hub"><failure message="OSError: We couldn't connect to 'https://huggingface.co'">t</failure></testcase>
</testsuite></testsuites>"""


def _missing_message() -> str:
    with pytest.raises(peft_shim.NotInRepeft) as caught:
        peft_shim.placeholder("peft.tuners.lora.LoraLayer").update_layer
    return f"peft_shim.NotInRepeft: {caught.value}"


def test_junit_outcomes_are_classified(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT.format(missing=_missing_message()))
    outcomes = cr.read_junit(path)
    category = {key.split("::")[-1]: cr.classify(outcome) for key, outcome in outcomes.items()}
    assert category == {"test_pass": "passed", "test_missing": "missing name", "test_refused": "refused by name",
                        "test_kwarg": "unexpected argument", "test_assert": "failed", "test_bare_value": "failed",
                        "test_setup": "failed", "test_skip": "skipped", "test_hub": "failed"}
    assert outcomes["test_a::T::test_setup"].kind == "RuntimeError"
    assert cr.needs_network(outcomes["test_a::T::test_hub"]) and not cr.needs_network(outcomes["test_a::T::test_assert"])
    assert cr.classify(None) == "not collected"


def test_compare_counts_only_tests_that_pass_under_peft(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT.format(missing=_missing_message()))
    shimmed = cr.read_junit(path)
    selected = sorted(shimmed)
    baseline = {key: cr.Outcome(key, "passed") for key in selected}
    hub = "test_a::T::test_hub"
    baseline[hub] = shimmed[hub]  # fails under PEFT too (offline): counted as needing the network, not against repeft
    group = cr.compare(baseline, shimmed, selected)["test_a"]
    assert group["selected"] == 9 and group["needs_network"] == 1 and group["peft_passed"] == 8
    assert group["repeft_passed"] == 1 and group["share"] == round(1 / 8, 4)
    assert group["outcomes"]["failed"] == 3 and group["outcomes"]["missing name"] == 1
    assert dict(group["top_reasons"]["failed"])["AssertionError: assert N == N"] == 1
    table = cr.markdown({"test_a": group})
    assert "| test_a | 9 | 8 | 1 | 12.5% |" in table and "| total |" in table


def test_shim_resolves_peft_names_to_repeft_and_refuses_the_rest_on_use(monkeypatch):
    assert peft_shim.resolve("peft", "LoraConfig") is repeft.LoraConfig
    assert peft_shim.resolve("peft", "prepare_model_for_kbit_training") is repeft.prepare_quantized_model
    assert peft_shim.resolve("peft.import_utils", "is_bnb_available")() is False
    layer = peft_shim.resolve("peft.tuners.lora", "LoraLayer")
    assert layer.__name__ == "LoraLayer"  # parametrised ids print it as PEFT's would
    with pytest.raises(ImportError, match="peft.tuners.lora.LoraLayer is not provided by repeft"):
        isinstance(object(), layer)
    monkeypatch.setattr(peft_shim, "_collecting", True)
    config = peft_shim.resolve("peft", "IA3Config")(target_modules=["q"])  # test modules build configs at import
    with pytest.raises(peft_shim.NotInRepeft, match="peft.IA3Config"):
        config.target_modules
    assert not isinstance(repeft.LoraConfig(), peft_shim.resolve("peft", "PromptLearningConfig"))


def test_placeholders_can_be_built_while_collecting_but_not_inside_a_test(monkeypatch):
    config_class = peft_shim.resolve("peft", "VeloraConfig")
    monkeypatch.setattr(peft_shim, "_collecting", True)
    config_class(num_groups=-1)  # a test module's parametrisation, built at import
    peft_shim.collection_done()
    # A test expecting VeloraConfig to raise ValueError must not see "nothing raised" (a silent pass or a false failure).
    with pytest.raises(peft_shim.NotInRepeft, match="peft.VeloraConfig"):
        config_class(num_groups=-1)


@pytest.fixture
def clean_peft_imports():
    saved = {name: mod for name, mod in sys.modules.items() if name == "peft" or name.startswith("peft.")}
    finders = list(sys.meta_path)
    yield
    sys.meta_path[:] = finders
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_installed_shim_answers_peft_imports(clean_peft_imports):
    peft_shim.install()
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners import lora
    from peft.tuners.lora.layer import LoraLayer

    assert (LoraConfig, PeftModel, get_peft_model) == (repeft.LoraConfig, repeft.PeftModel, repeft.get_peft_model)
    assert lora.LoraConfig is repeft.LoraConfig  # a listed submodule, not a placeholder
    with pytest.raises(ImportError, match="peft.tuners.lora.layer.LoraLayer"):
        LoraLayer.update_layer
