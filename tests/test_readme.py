"""The README's example is the file the first set-up command runs, and that file runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_setup_commands_run_the_example_and_the_tests():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[:2]
    assert commands[0].endswith("python examples/quickstart.py")
    assert commands[1].endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and 'pip install -q -c "$PINS" -e ".[dev]"' in ci


def test_quickstart_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    diffs = [float(x) for x in re.findall(r"max \|diff\| = (\S+)", result.stdout)]
    assert len(diffs) == 2 and diffs[0] < 1e-5 and diffs[1] < 1e-4, result.stdout
    losses = [float(x) for x in re.findall(r"loss (\S+)", result.stdout)]
    assert losses[-1] < losses[0]
