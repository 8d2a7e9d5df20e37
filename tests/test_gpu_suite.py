"""The GPU suite's CPU-runnable parts: argument parsing, every part at tiny size, the summary."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_suite


def test_suite_refuses_to_run_without_a_gpu_unless_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path)])


@pytest.mark.slow
def test_suite_smoke_runs_every_part_and_writes_the_summary(tmp_path):
    summary = gpu_suite.main(["--smoke", "--out", str(tmp_path)])
    assert {name: part["returncode"] for name, part in summary["parts"].items()} == dict.fromkeys(gpu_suite.PARTS, 0)
    assert json.loads((tmp_path / "suite.json").read_text())["smoke"] is True
    report = (tmp_path / "suite.md").read_text()
    for section in ("## Targets", "## Per layer", "## Whole-model step", "## Mixed-adapter batches"):
        assert section in report
    kernels = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert {row["mode"] for row in kernels} == {"fwd", "fwd_bwd", "decode"}
    step = json.loads((tmp_path / "step_overhead.json").read_text())["rows"]
    assert {"frozen base", "full fine-tuning", "repeft LoRA +dropout", "repeft RepLoRA +dropout"} <= set(step)
    # Every measured adapter row is held against the targets.
    assert sum(t["what"].startswith("step time") for t in summary["targets"]) == 4
