"""pytest plugin for benchmarks/peft_compat.py (loaded with ``-p peft_compat_plugin``), set by environment variables.

PEFT_COMPAT_MODE      "peft" (baseline) or "repeft" (install the peft -> repeft shim first)
PEFT_COMPAT_SELECTION file of test keys: the baseline writes the LoRA tests it keeps, the repeft run runs those
PEFT_COMPAT_MAX       at most this many LoRA tests per test file (evenly spread), baseline only
PEFT_COMPAT_TIMEOUT   seconds a test may run before it is stopped (TestTimeout)
PEFT_COMPAT_STUBS     comma-separated optional modules the test files import but the LoRA tests do not use
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest

import compat_results
import peft_shim

MODE = os.environ.get("PEFT_COMPAT_MODE", "peft")
if MODE == "repeft":
    peft_shim.install()


def _stub_missing_modules() -> None:
    for name in filter(None, os.environ.get("PEFT_COMPAT_STUBS", "").split(",")):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _stub(name)


# Stand-ins where PEFT's own code uses an uninstalled module at import time (peft/tuners/lora/corda.py).
_SUBSTITUTES = {"attr.dataclass": dataclasses.dataclass}


def _stub(name: str) -> types.ModuleType:
    def attribute(attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _SUBSTITUTES.get(f"{name}.{attr}") or peft_shim.placeholder(f"{name}.{attr}")

    stub = types.ModuleType(name)
    stub.__getattr__ = attribute  # type: ignore[attr-defined]
    return stub


_stub_missing_modules()


class TestTimeout(Exception):
    __test__ = False  # not a test class


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selection = Path(os.environ["PEFT_COMPAT_SELECTION"])
    renames = peft_shim.id_renames() if MODE == "repeft" else {}
    keyed = [(compat_results.normalise(compat_results.nodeid_key(item.nodeid), renames), item) for item in items]
    if MODE == "peft":
        by_file: dict[str, list] = defaultdict(list)
        for key, item in keyed:
            if compat_results.is_lora_test(key):
                by_file[key.split("::")[0]].append((key, item))
        limit = int(os.environ["PEFT_COMPAT_MAX"]) if os.environ.get("PEFT_COMPAT_MAX") else None
        kept = [pair for pairs in by_file.values() for pair in compat_results.spread(pairs, limit)]
        with selection.open("a") as out:
            out.writelines(f"{key}\n" for key, _ in kept)
    else:
        wanted = set(selection.read_text().splitlines())
        kept = [(key, item) for key, item in keyed if key in wanted]
    kept_items = {id(item) for _, item in kept}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_items])
    items[:] = [item for _, item in kept]


def pytest_collection_finish(session: pytest.Session) -> None:
    peft_shim.collection_done()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    seconds = float(os.environ.get("PEFT_COMPAT_TIMEOUT", "0"))

    def stop(signum, frame):
        raise TestTimeout(f"stopped after {seconds:g} s")

    if seconds:
        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
