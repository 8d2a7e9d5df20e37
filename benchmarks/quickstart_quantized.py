"""The quickstart recipe (RepLoRA on the pretrained MiniLM, SMS spam) on a float, NF4 and LLM.int8 base.

Each variant runs ``recipes/quickstart.yaml`` in its own process (so each
peak RSS is its own) with ``model.quantization`` set, no evaluation before
training and no checkpoints, and reports the eval accuracy after training,
the base model's stored weights (quantized codes and their scales counted,
each storage once) and the process's peak resident memory.

    OMP_NUM_THREADS=1 python benchmarks/quickstart_quantized.py [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["none", "nf4", "int8"]


def base_bytes(model) -> int:
    """Bytes of a model's stored tensors (bitsandbytes' absmax / SCB included), each storage once."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def run_one(quantization: str, steps: int, out: str) -> dict:
    from repeft.recipe import load_recipe
    from repeft.train import build_model, train

    overrides = [f"model.quantization={quantization}", f"train.max_steps={steps}", "eval.before=false",
                 "checkpoint.every=0", f"output.dir={out}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    result = train(recipe)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the base is loaded again below
    saved = load_recipe(Path(result.output_dir) / "recipe.yaml")
    return {
        "quantization": quantization,
        "accuracy": result.eval_after["accuracy"],
        "f1_macro": result.eval_after["f1_macro"],
        "wall_time_s": result.wall_time_s,
        "base_weights_mib": base_bytes(build_model(saved, saved.data.labels)) / 2**20,
        "peak_rss_mib": peak_rss_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.out)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            child = subprocess.run(
                [sys.executable, __file__, "--one", variant, "--steps", str(args.steps), "--out", f"{tmp}/{variant}"],
                check=True, capture_output=True, text=True, cwd=ROOT,
            )
            rows.append(json.loads(child.stdout.split("RESULT ", 1)[1]))
    print("| base | eval accuracy | macro F1 | base weights (MiB) | peak RSS (MiB) | run (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['quantization']} | {row['accuracy']:.4f} | {row['f1_macro']:.4f} | {row['base_weights_mib']:.1f} "
              f"| {row['peak_rss_mib']:.0f} | {row['wall_time_s']:.0f} |")


if __name__ == "__main__":
    main()
