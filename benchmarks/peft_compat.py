"""PEFT's own LoRA tests, run under PEFT and under repeft (import lines pointed at repeft by a shim).

    python benchmarks/peft_compat.py --peft-repo /path/to/peft --max-tests 300

The PEFT checkout is the user's (nothing of PEFT's is copied here). Both runs use
benchmarks/peft_compat_shim/peft_compat_plugin.py: the baseline picks the LoRA tests
(at most ``--max-tests`` per file, evenly spread) and runs them under PEFT (the
checkout's ``src/`` if it has one, else the installed peft); the second run makes
``import peft`` resolve to repeft through peft_shim.py and runs the same tests.
Tests that fail under PEFT (offline Hub models included) do not count. Writes
``peft_compat.json`` and ``peft_compat.md`` (pass share per test file and how the
others end: refused by name, a PEFT name repeft lacks, or failed, with top reasons).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIM_DIR = Path(__file__).resolve().parent / "peft_compat_shim"
sys.path.insert(0, str(SHIM_DIR))

import compat_results  # noqa: E402
import peft_shim  # noqa: E402

DEFAULT_FILES = ["test_custom_models.py", "test_initialization.py"]
# Modules PEFT's test files import at module level that the LoRA tests do not need.
OPTIONAL_MODULES = "diffusers,attr"


def run_pytest(peft_repo: Path, mode: str, files: list[str], junit: Path, selection: Path, args: argparse.Namespace) -> int:
    paths = [str(SHIM_DIR)]
    if mode == "peft" and (peft_repo / "src" / "peft").is_dir():
        paths.append(str(peft_repo / "src"))
    if mode == "repeft":
        paths.append(str(ROOT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PEFT_COMPAT_MODE": mode,
           "PEFT_COMPAT_SELECTION": str(selection), "PEFT_COMPAT_TIMEOUT": str(args.timeout),
           "PEFT_COMPAT_STUBS": OPTIONAL_MODULES, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.max_tests:
        env["PEFT_COMPAT_MAX"] = str(args.max_tests)
    command = [sys.executable, "-m", "pytest", "-p", "peft_compat_plugin", "-p", "no:cacheprovider", "-o", "addopts=",
               "-q", "--tb=line", "-W", "ignore", f"--junitxml={junit}", *(["-k", args.k] if args.k else []),
               *[f"tests/{name}" for name in files]]
    print(f"[{mode}] {' '.join(command[2:])}", flush=True)
    log = junit.with_suffix(".log")
    with log.open("w") as out:
        return subprocess.run(command, cwd=peft_repo, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def peft_commit(peft_repo: Path, given: str | None) -> str:
    return given or git_head(peft_repo)


def git_head(repo: Path) -> str:
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-repo", type=Path, required=True, help="a PEFT checkout (its tests/ and src/)")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="test files under tests/")
    parser.add_argument("--max-tests", type=int, default=None, help="at most this many LoRA tests per file")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per test before it is stopped")
    parser.add_argument("-k", default=None, help="pytest -k expression, applied to both runs")
    parser.add_argument("--peft-commit", default=None, help="PEFT's commit, when the checkout has no .git")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peft_compat")
    parser.add_argument("--work", type=Path, default=None, help="keep both runs' junit XML and logs here")
    parser.add_argument("--reuse-work", action="store_true", help="do not run; re-read the runs kept in --work")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="run repeft only, against the PEFT run kept in --work (same files, -k and --max-tests)")
    args = parser.parse_args()
    peft_repo = args.peft_repo.resolve()

    if (args.reuse_work or args.reuse_baseline) and args.work is None:
        parser.error("--reuse-work and --reuse-baseline read the runs kept in --work; name the folder")
    with tempfile.TemporaryDirectory(prefix="peft-compat-") as tmp:
        work = args.work or Path(tmp)
        selection = work / "selection.txt"
        if not args.reuse_work:
            work.mkdir(parents=True, exist_ok=True)
            if not args.reuse_baseline:
                selection.unlink(missing_ok=True)  # the baseline appends the tests it picks
                run_pytest(peft_repo, "peft", args.files, work / "peft.xml", selection, args)
            run_pytest(peft_repo, "repeft", args.files, work / "repeft.xml", selection, args)
        selected = selection.read_text().splitlines() if selection.exists() else []
        baseline = compat_results.read_junit(work / "peft.xml")
        shimmed = compat_results.read_junit(work / "repeft.xml", peft_shim.id_renames())

    groups = compat_results.compare(baseline, shimmed, selected)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "peft_commit": peft_commit(peft_repo, args.peft_commit),
        "repeft_commit": git_head(ROOT),
        "files": args.files, "max_tests_per_file": args.max_tests, "timeout_s": args.timeout, "k": args.k,
        "total": compat_results.total(groups), "groups": groups,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "peft_compat.json", json.dumps(report, indent=2) + "\n")
    table = compat_results.markdown(groups)
    sample = f"at most {args.max_tests} LoRA tests per file" if args.max_tests else "every LoRA test"
    header = f"PEFT's own tests at {report['peft_commit'][:12]}, {report['date']}, {sample}, {' '.join(args.files)}\n\n"
    write_atomic(args.out / "peft_compat.md", header + table)
    print(header + table)


def write_atomic(path: Path, text: str) -> None:
    part = path.with_suffix(path.suffix + ".part")
    part.write_text(text)
    part.replace(path)


if __name__ == "__main__":
    main()
