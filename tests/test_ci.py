"""CI installs the exact versions last tested, inside the ranges pyproject.toml gives users."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as CI runs

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci"


def pins() -> dict[str, Version]:
    found = {}
    for line in (CI / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and "+" not in version, f"constraints.txt: {line!r} is not an exact pin without a local tag"
            found[canonical(name)] = Version(version)
    return found


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_dependency_is_pinned_inside_its_pyproject_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pinned = pins()
    for requirement in requirements:
        name = canonical(requirement.name)
        assert name in pinned, f"{requirement.name} is not pinned in .ci/constraints.txt"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {requirement}"
    # The README's set-up installs torch 2.13.0 first (the CPU wheel here); CI must not move it.
    assert pinned["torch"] == Version("2.13.0")


def test_ci_installs_every_package_through_the_constraints():
    installs = [line for line in (CI / "run").read_text().splitlines() if "pip install" in line]
    assert len(installs) == 4 and all('-c "$PINS"' in line for line in installs)
    assert 'PINS=.ci/constraints.txt' in (CI / "run").read_text()
    for script in ("run", "run-latest", "pin"):
        assert os.access(CI / script, os.X_OK), script
        subprocess.run(["bash", "-n", str(CI / script)], check=True)
