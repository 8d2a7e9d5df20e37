"""The GPU suite: kernel tests on CUDA, then every kernel benchmark, in one command (about 6-8 min on one H100/H200).

    python -m benchmarks.gpu_suite --out results/gpu             # on a machine with a CUDA GPU
    python -m benchmarks.gpu_suite --smoke --out /tmp/suite      # CPU, tiny: checks the suite itself

Parts (``--parts`` picks some), each in its own process so that a crash (a
bad kernel can kill the CUDA context) costs only its part, each with a time limit:

    tests    pytest of the kernel, dispatcher and mixed-batch tests, on CUDA
    kernels  benchmarks/lora_kernels.py: one layer, plain vs PEFT vs compiled PEFT vs repeft
             torch / triton / auto; fwd, fwd+bwd, decode; d in {2048, 4096, 8192}, r in {8, 16, 64}, bf16
    step     benchmarks/step_overhead.py at the Llama shape (hidden 2048, 8 layers, batch 8 x 1024, bf16):
             frozen base, full FT, PEFT LoRA, repeft LoRA and RepLoRA, with and without dropout
    mixed    benchmarks/mixed_adapters.py: adapter_names throughput vs PEFT's mixed batch

Writes each part's JSON and markdown, plus ``suite.json`` and ``suite.md``
(every table, the issue's targets marked met or not, and how long each part took)
into the folder given. ``REPEFT_KERNEL_CACHE`` is pointed at ``kernel_cache.json``
there, so the dispatcher's decisions are kept too. ``--smoke`` runs the parts at
tiny sizes on CPU (tests: collection only); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_kernels.py", "tests/test_kernel_dispatch.py", "tests/test_mixed_batch.py"]
PARTS = ("tests", "kernels", "step", "mixed")
# Seconds each part may take (8 minutes in all, with room for process start-up).
LIMITS = {"tests": 180, "kernels": 160, "step": 90, "mixed": 50}
# The targets, as ratios measured in one run.
LAYER_TARGETS = {"fwd": 1.05, "fwd_bwd": 1.15, "decode": 1.5}
STEP_TIME_TARGET, STEP_MEMORY_TARGET = 1.15, 1.10


def commands(out: Path, smoke: bool) -> dict[str, list[str]]:
    """The command line of each part."""
    py = sys.executable
    smoke_flag = ["--smoke"] if smoke else []
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES] + (["--collect-only"] if smoke else [])
    kernels = [py, "benchmarks/lora_kernels.py", "--out", str(out / "kernels"), *smoke_flag]
    if smoke:  # compiling PEFT on CPU takes longer than all the rest
        kernels += ["--variants", "plain", "peft", "repeft_torch", "repeft_triton", "repeft_auto"]
    step = [py, "benchmarks/step_overhead.py", "--out", str(out), "--with-dropout", "0.05", "--rounds", "5"]
    if smoke:
        step += ["--hidden", "64", "--layers", "1", "--batch", "2", "--seq", "16", "--vocab", "64", "--rounds", "1",
                 "--steps", "1", "--device", "cpu"]
    else:
        step += ["--hidden", "2048", "--layers", "8", "--batch", "8", "--seq", "1024", "--vocab", "32000",
                 "--dtype", "bfloat16"]
    mixed = [py, "benchmarks/mixed_adapters.py", "--out", str(out), *smoke_flag]
    if smoke:
        mixed += ["--variants", "base", "peft_mixed", "repeft_mixed_torch", "repeft_mixed_auto"]
    return {"tests": tests, "kernels": kernels, "step": step, "mixed": mixed}


def run_part(name: str, command: list[str], out: Path, limit: float) -> dict:
    """Run one part; its output goes to ``<out>/<name>.log``."""
    # PYTHONPATH: repeft need not be installed (a lent GPU machine has only a copy of the tree).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, REPEFT_KERNEL_CACHE=str(out / "kernel_cache.json"))
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
    print(f"   {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f} s; {tail[0]}", flush=True)
    return {"command": command[1:], "returncode": code, "seconds": round(seconds, 1), "last_line": tail[0]}


def targets(out: Path) -> list[dict]:
    """The issue's targets against what the parts measured (those that ran)."""
    checks = []
    kernels = out / "kernels.json"
    if kernels.is_file():
        for row in json.loads(kernels.read_text())["results"]:
            if row["variant"] == "repeft_auto" and row["time_vs_plain"] is not None:
                limit = LAYER_TARGETS[row["mode"]]
                checks.append(dict(what=f"layer {row['mode']} d={row['d']} r={row['r']} (auto vs plain)",
                                   value=row["time_vs_plain"], limit=limit))
    step = out / "step_overhead.json"
    if step.is_file():
        rows = json.loads(step.read_text())["rows"]
        memory = "cuda_peak_ratio" if "cuda_peak_ratio" in rows["frozen base"] else "memory_ratio"
        for name, row in rows.items():
            if name.startswith("repeft"):
                checks.append(dict(what=f"step time: {name} / frozen base", value=row["time_ratio"], limit=STEP_TIME_TARGET))
                checks.append(dict(what=f"step memory: {name} / frozen base", value=row[memory], limit=STEP_MEMORY_TARGET))
    for check in checks:
        check["met"] = check["value"] <= check["limit"]
    return checks


def markdown(summary: dict, out: Path) -> str:
    lines = [f"# GPU suite: {summary['device']}", "", f"torch {summary['torch']}; {summary['when']}", "",
             "| part | result | seconds |", "|---|---|---:|"]
    for name, part in summary["parts"].items():
        result = "ok" if part["returncode"] == 0 else f"FAILED ({part['returncode']}): see {name}.log"
        lines.append(f"| {name} | {result} | {part['seconds']} |")
    if summary["targets"]:
        lines += ["", "## Targets (issue 18)", "", "| what | measured | target | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['what']} | {t['value']:.3f} | <= {t['limit']} | {'yes' if t['met'] else 'NO'} |"
                  for t in summary["targets"]]
    for title, name in (("Per layer", "kernels.md"), ("Whole-model step", "step_overhead.md"),
                        ("Mixed-adapter batches", "mixed_adapters.md")):
        if (out / name).is_file():
            lines += ["", f"## {title}", "", (out / name).read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, markdown and logs")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that the suite runs")
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --smoke to check the suite on CPU")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(out, args.smoke)
    limits = {name: (600 if args.smoke else LIMITS[name]) for name in PARTS}
    parts = {name: run_part(name, cmds[name], out, limits[name]) for name in args.parts}
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
               else "cpu (smoke: numbers meaningless)",
               "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "smoke": args.smoke, "parts": parts, "targets": targets(out)}
    (out / "suite.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "suite.md").write_text(markdown(summary, out))
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    return summary


if __name__ == "__main__":
    main()
