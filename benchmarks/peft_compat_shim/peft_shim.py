"""A stand-in ``peft`` package for running PEFT's own tests on repeft.

Installed on ``sys.meta_path``, it answers every ``import peft`` / ``from peft... import X``:
PEFT's names that repeft provides resolve to repeft's objects (the two-line switch the
README promises), and every other name resolves to a placeholder that raises
``NotInRepeft`` (an ImportError) when a test uses it. Importing stays lazy so that a test
file that merely *mentions* a PEFT internal at module level still collects, and only the
tests that use it stop, counted as "missing" rather than as failures of claimed features.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

SHIM_MARK = "is not provided by repeft"

# PEFT module -> {PEFT name: repeft name}; a module listed here is also importable as a submodule.
PEFT_TO_REPEFT: dict[str, dict[str, str]] = {
    "peft": {
        "PeftModel": "PeftModel",
        "LoraConfig": "LoraConfig",
        "TaskType": "TaskType",
        "get_peft_model": "get_peft_model",
        "get_peft_model_state_dict": "get_peft_model_state_dict",
        "set_peft_model_state_dict": "set_peft_model_state_dict",
        "prepare_model_for_kbit_training": "prepare_quantized_model",
    },
    "peft.peft_model": {"PeftModel": "PeftModel"},
    "peft.mapping_func": {"get_peft_model": "get_peft_model"},
    "peft.tuners": {"LoraConfig": "LoraConfig"},
    "peft.tuners.lora": {"LoraConfig": "LoraConfig"},
    "peft.tuners.lora.config": {"LoraConfig": "LoraConfig"},
    "peft.utils": {
        "TaskType": "TaskType",
        "get_peft_model_state_dict": "get_peft_model_state_dict",
        "set_peft_model_state_dict": "set_peft_model_state_dict",
    },
    "peft.utils.peft_types": {"TaskType": "TaskType"},
    "peft.utils.save_and_load": {
        "get_peft_model_state_dict": "get_peft_model_state_dict",
        "set_peft_model_state_dict": "set_peft_model_state_dict",
    },
    "peft.tuners.tuners_utils": {"BaseTunerLayer": "AdapterLayer"},
    "peft.import_utils": {},
}


class NotInRepeft(ImportError):
    """A test used a PEFT name that repeft does not provide."""


def _missing(qualname: str) -> NotInRepeft:
    return NotInRepeft(f"{qualname} {SHIM_MARK} (peft_compat shim)")


class _PlaceholderInstance:
    """What calling a placeholder gives while pytest collects; using it raises."""

    def __init__(self, qualname: str) -> None:
        object.__setattr__(self, "_qualified", qualname)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise _missing(f"{self._qualified}(...).{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _missing(f"{self._qualified}(...)")

    def __repr__(self) -> str:
        return f"<{self._qualified}(...): {SHIM_MARK}>"


_collecting = True  # the plugin sets it False once pytest has collected the tests


def collection_done() -> None:
    """From now on calling a placeholder raises: inside a test, building a PEFT object repeft lacks must stop it."""
    global _collecting
    _collecting = False


class _PlaceholderMeta(type):
    """Placeholders are classes, so PEFT's parametrised test ids (which print class names) stay the same."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if _collecting:  # test modules build configs at import time; using one raises
            return _PlaceholderInstance(cls.__qualified__)
        raise _missing(cls.__qualified__)

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise _missing(f"{cls.__qualified__}.{attr}")

    # A repeft config is no instance of a PEFT config class repeft lacks (PEFT's common tests branch on
    # ``isinstance(config, PromptLearningConfig)``); layers and wrappers are another matter: a test that
    # looks for PEFT's layer classes must stop, not silently find none.
    def __instancecheck__(cls, obj: Any) -> bool:
        if cls.__name__.endswith("Config"):
            return False
        raise _missing(cls.__qualified__)

    def __subclasscheck__(cls, sub: Any) -> bool:
        if cls.__name__.endswith("Config"):
            return sub is cls
        raise _missing(cls.__qualified__)

    def __getitem__(cls, key: Any) -> Any:
        raise _missing(cls.__qualified__)

    def __iter__(cls) -> Any:
        raise _missing(cls.__qualified__)

    def __contains__(cls, key: Any) -> bool:
        raise _missing(cls.__qualified__)


def placeholder(qualname: str) -> type:
    """A class standing for PEFT's ``qualname``: using it in any way raises ``NotInRepeft``."""
    module, _, name = qualname.rpartition(".")
    return _PlaceholderMeta(name, (), {"__qualified__": qualname, "__module__": module})


def _environment_helper(module: str, name: str) -> Any:
    """PEFT's environment queries (not features): availability checks and the device the tests run on."""
    if module == "peft.import_utils" and name.startswith("is_"):
        if name == "is_transformers_ge_v5":
            import transformers
            from packaging import version

            return lambda: version.parse(transformers.__version__) >= version.parse("5.0.0.dev0")
        return lambda *args, **kwargs: False
    if module == "peft.utils" and name == "infer_device":
        return lambda: "cpu"
    return None


def resolve(module: str, name: str) -> Any:
    """What ``from <module> import <name>`` gives under the shim."""
    import repeft

    repeft_name = PEFT_TO_REPEFT.get(module, {}).get(name)
    if repeft_name is not None:
        return getattr(repeft, repeft_name)
    helper = _environment_helper(module, name)
    return helper if helper is not None else placeholder(f"{module}.{name}")


def id_renames() -> dict[str, str]:
    """repeft class name -> PEFT name, for the classes whose ``__name__`` shows in test ids."""
    import repeft

    renames = {}
    for names in PEFT_TO_REPEFT.values():
        for peft_name, repeft_name in names.items():
            obj = getattr(repeft, repeft_name)
            own = getattr(obj, "__name__", peft_name)
            if own != peft_name and isinstance(obj, type):
                renames[own] = peft_name
    return renames


class _ShimModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        submodule = f"{self.__name__}.{name}"
        value = importlib.import_module(submodule) if submodule in PEFT_TO_REPEFT else resolve(self.__name__, name)
        setattr(self, name, value)  # the same object on every import, as with a real module
        return value


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "peft" or fullname.startswith("peft."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _ShimModule(spec.name)
        module.__path__ = []  # a package, so any ``peft.x.y`` imports (as a placeholder module)
        module.__version__ = "0.0.0+repeft-shim"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Route ``peft`` imports to the shim (call before anything imports peft)."""
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _ShimFinder())
