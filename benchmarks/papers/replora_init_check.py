"""How spread out is the adapter's A at initialisation? LoRA vs RepLoRA's forms (axis "rank" and "feature").

A diagnostic for the RepLoRA vs LoRA result (docs/results.md): it prints, for a
layer of MiniLM's width (d=384, r=8), the singular values of the materialised
A relative to the largest one, and the share of A's energy in its row means
(the part of each row that is constant across input features, so only sees
``sum(x)``). A LoRA A is full rank with flat singular values, and so is the
residual form's (it is LoRA's A). The first ``form="mlp"`` initialisation, with
seeds at LoRA's scale, made A nearly rank one and nearly constant along the
input axis; the unit-normal seeds ``form="mlp"`` has now fixed that. Takes a
second; no data or model needed.

    python benchmarks/papers/replora_init_check.py [--d 384] [--r 8] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

import torch

import repeft
from repeft.lora import LoRAFactors
from repeft.replora import RepLoRAFactors


def spread(a: torch.Tensor) -> dict:
    a = a.detach().float()
    sv = torch.linalg.svdvals(a)
    row_mean_share = (a.mean(1, keepdim=True).expand_as(a).norm() ** 2 / a.norm() ** 2).item()
    return {"singular_values_rel": [round(v, 3) for v in (sv / sv[0]).tolist()],
            "effective_rank": round((sv.sum() ** 2 / (sv**2).sum()).item(), 2),  # participation ratio
            "row_mean_energy_share": round(row_mean_share, 4), "std": round(a.std().item(), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=384, help="d_in = d_out of the layer (MiniLM: 384)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--mlp-hidden", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out: dict[int, dict] = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        rows = {"LoRA": LoRAFactors(args.d, args.d, repeft.LoRAConfig(r=args.r)).factors()[0]}
        for form in ("residual", "mlp"):
            for axis in ("rank", "feature"):
                cfg = repeft.RepLoRAConfig(r=args.r, mlp_hidden=args.mlp_hidden, axis=axis, form=form,
                                           activation="tanh" if form == "residual" else "gelu")
                rows[f"RepLoRA {form} axis={axis}"] = RepLoRAFactors(args.d, args.d, cfg).factors()[0]
        out[seed] = {name: spread(a) for name, a in rows.items()}
        for name, s in out[seed].items():
            print(f"seed {seed} {name:31s} eff. rank {s['effective_rank']:5.2f} / {args.r}, row-mean share "
                  f"{s['row_mean_energy_share']:.4f}, std {s['std']:.4f}, sv/max {s['singular_values_rel']}")


if __name__ == "__main__":
    main()
