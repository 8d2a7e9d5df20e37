"""Verdicts on the papers' claims, by a rule fixed before the runs.

Every comparison in a result JSON is ``other - baseline`` seed by seed, where
the paper claims ``other`` is better. The rule:

* a metric's difference **held** when the run has at least ``MIN_SEEDS`` seeds,
  the two-sided paired t-test on the per-seed differences gives p < ``ALPHA``,
  and the mean difference points the claimed way (accuracy and F1 up, loss down);
* **reversed** under the same test with the mean pointing the other way;
* **not shown** with enough seeds and p >= ``ALPHA``;
* **too few seeds** below ``MIN_SEEDS`` (the p-values are still reported: with
  3 seeds even a sign test cannot go below 0.25).

The sign test (two-sided binomial on the count of seeds that point the claimed
way) is reported beside the t-test, since it assumes nothing about the spread.

    python benchmarks/papers/verdicts.py                 # every results/*.json
    python benchmarks/papers/verdicts.py results/replora_vs_lora.json --metric accuracy
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats

ALPHA = 0.05
MIN_SEEDS = 5
LOWER_IS_BETTER = {"loss", "forgetting", "forgetting_task_given"}  # the last two: norga_continual.py
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def paired_test(differences: Sequence[float], metric: str) -> dict[str, float | int | None]:
    """Two-sided p-values of a paired t-test and a sign test on ``other - baseline`` per seed.

    ``n_claimed``: seeds whose difference points the way the claim says
    (ties count against it). The t-test's p is ``None`` for fewer than two
    seeds or differences that are all equal.

    >>> paired_test([0.02, 0.03, 0.01, 0.025, 0.015], "accuracy")["n_claimed"]
    5
    """
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    claimed = sum(sign * d > 0 for d in differences)
    n = len(differences)
    p_t = None
    if n >= 2 and statistics.pstdev(differences) > 0:
        p_t = float(stats.ttest_1samp(differences, 0.0).pvalue)
    p_sign = float(stats.binomtest(claimed, n, 0.5).pvalue) if n else None
    return {"p_t": p_t, "p_sign": p_sign, "n_claimed": claimed}


def verdict(differences: Sequence[float], metric: str) -> str:
    """The rule above, in one word or two."""
    if len(differences) < MIN_SEEDS:
        return f"too few seeds ({len(differences)} < {MIN_SEEDS})"
    p_t = paired_test(differences, metric)["p_t"]
    if p_t is None or p_t >= ALPHA:
        return "not shown"
    better = statistics.fmean(differences) * (-1.0 if metric in LOWER_IS_BETTER else 1.0) > 0
    return "held" if better else "reversed"


def table(result: dict[str, Any], metrics: Sequence[str]) -> list[str]:
    """Markdown rows ``| comparison | x | metric | mean ± std | claimed way | p (t) | p (sign) | verdict |``."""
    rows = []
    for comparison, by_metric in result.get("paired", {}).items():
        for metric in metrics:
            for x, cell in by_metric.get(metric, {}).items():
                d = cell["differences"]
                test = paired_test(d, metric)
                std = statistics.stdev(d) if len(d) > 1 else 0.0
                p_t = "—" if test["p_t"] is None else f"{test['p_t']:.3f}"
                rows.append(
                    f"| {comparison} | {x} | {metric} | {statistics.fmean(d):+.4f} ± {std:.4f} | "
                    f"{test['n_claimed']}/{len(d)} | {p_t} | {test['p_sign']:.3f} | {verdict(d, metric)} |"
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("results", nargs="*", type=Path, help="result JSON files (default: every results/*.json)")
    parser.add_argument("--metric", action="append", help="metrics to judge (default: accuracy and loss)")
    args = parser.parse_args(argv)
    metrics = args.metric or ["accuracy", "loss"]
    for path in args.results or sorted(RESULTS_DIR.glob("*.json")):
        result = json.loads(path.read_text())
        if not result.get("paired"):
            continue
        print(f"\n### {path.name}: {len(result.get('seeds', []))} seeds\n")
        print("| comparison | fraction | metric | Δ mean ± std | seeds the claimed way | p (paired t) | p (sign) | verdict |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(table(result, metrics)))


if __name__ == "__main__":
    main()
