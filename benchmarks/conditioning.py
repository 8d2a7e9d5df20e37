"""Do the reparameterized adapters train as well as their plain counterparts? Two checks, side by side.

Each reparameterized method is compared with the plain method it reparameterizes,
from the same start (the plain one's parameters are set to the tensors the
reparameterized one produces):

===================  =====================================  ============================
pair                 reparameterized (library default)      plain counterpart
===================  =====================================  ============================
RepLoRA              A, B out of maps on shared seeds        LoRA: free A, B
shared prefix        K_l, V_l out of an MLP on E_l           independent K_l, V_l
non-linear prompts   P_l out of a network on codes           linear prompts: free P_l
===================  =====================================  ============================

1. **Conditioning**: the cosine between the change an Adam step makes to the
   materialised adapter tensor (s·B·A, [K_l | V_l], P_l) and the negative
   gradient of the loss with respect to that tensor, for the first steps. A
   parameterization that moves the tensor "sideways" wastes its steps. For the
   prompts the gates are opened to tanh(1) first (at the zero init the
   prompts get no gradient at all). The size of that change, relative to the
   plain counterpart's at the same rate, shows how much faster one rate moves
   the reparameterized adapter.
2. **Learning**: distil a teacher, the tiny base model plus a random rank-4
   update of its query and value projections, for a fixed number of AdamW
   steps on fresh random tokens (the rate decaying linearly to zero), at the
   plain counterpart's default learning rate (``PLAIN_LR``) and at 3x it;
   report the KL to the teacher on held-out batches.

The tests (tests/test_reparameterized.py) assert both on the library defaults;
this script also runs the other forms (``VARIANTS``) and a wider learning-rate
grid, and writes ``results/conditioning.json`` and ``.md``::

    python benchmarks/conditioning.py                      # ~10 min of CPU
    python benchmarks/conditioning.py --steps 100 --lr-factors 1 3
    python benchmarks/conditioning.py --methods RepLoRA --out benchmarks/results/replora_forms

RepLoRA's default is the paper's shared form: a block's q and v start with the
same A (the seed A'), so its plain counterpart is LoRA with A_Q = A_V at init;
the variant "LoRA from its own init" is LoRA as it comes (independent A's).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import repeft
from repeft.lora import LoRALinear
from repeft.prefix import PrefixAdapter
from repeft.zero_init import ZeroInitAdapter

TARGETS = ["q_proj", "v_proj"]
# The plain counterparts' default rates: those of repeft's recipes for LoRA, prefix and prompts (3e-3).
PLAIN_LR = 3e-3


def pairs() -> dict[str, tuple[repeft.AdapterConfig, repeft.AdapterConfig]]:
    """(reparameterized, plain) config per method, the reparameterized one at the library's defaults."""
    return {
        "RepLoRA": (repeft.RepLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                    repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS)),
        "shared prefix": (repeft.PrefixConfig(n_prefix=8), repeft.PrefixConfig(n_prefix=8, structure="independent")),
        "non-linear prompts": (repeft.ZeroInitConfig(n_prompt=8, prompt_type="nonlinear"),
                               repeft.ZeroInitConfig(n_prompt=8)),
    }


# Other forms of the reparameterized side, run by the benchmark for comparison.
RESIDUAL = "form='residual' (issue 15: seeds per projection)"
VARIANTS = {
    "RepLoRA": {
        "shared, reparam='linear'": repeft.RepLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, reparam="linear"),
        RESIDUAL: repeft.RepLoRAConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, form="residual"),
        "form='mlp' (before issue 15)": repeft.RepLoRAConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, form="mlp", activation="gelu"),
        "LoRA from its own init (A_Q, A_V independent)": repeft.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    },
    "shared prefix": {"one MLP for all layers, 512 wide (before issue 15)": repeft.PrefixConfig(
        n_prefix=8, mlp_per_layer=False, mlp_hidden=512)},
    "non-linear prompts": {"deepshare, GELU 128 (before issue 15)": repeft.ZeroInitConfig(
        n_prompt=8, prompt_type="nonlinear", prompt_network="deepshare", mlp_hidden=128, activation="gelu")},
}


# -- the task -----------------------------------------------------------------------------------


@dataclass
class Task:
    """A tiny Llama, a teacher (it plus a random low-rank update) and batches of random tokens."""

    base: nn.Module
    teacher: nn.Module
    vocab: int
    batch: int = 16
    seq: int = 32

    def batches(self, n: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, self.vocab, (self.batch, self.seq), generator=g) for _ in range(n)]

    def loss_fn(self, ids: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
        """The student's KL to the teacher on ``ids``, mean per token."""
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits.log_softmax(-1)

        def loss(model: nn.Module) -> torch.Tensor:
            logp = model(input_ids=ids).logits.log_softmax(-1)
            return nn.functional.kl_div(logp, target, log_target=True, reduction="sum") / ids.numel()

        return loss


def distillation_task(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, rank: int = 4,
                      strength: float = 1.0) -> Task:
    """Teacher = base + a random rank-``rank`` update of each query and value projection, ``strength`` x ||W||.

    The base's weights are drawn at std 0.1 (not Llama's 0.02), so its logits
    spread over about one unit and the teacher differs from it by a KL of ~0.4.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=0.1)
    base = LlamaForCausalLM(config).eval()
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                w = module.weight
                update = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
                w += strength * w.norm() / update.norm() * update
    return Task(base, teacher, vocab)


# -- the adapter tensors and their gradients ----------------------------------------------------


def _attention_adapter(model: repeft.AdapterModel) -> nn.Module | None:
    layer = getattr(model, "attention_adapters", None)
    return None if layer is None else layer.adapters[model.active_adapter]


def _lora_layers(model: repeft.AdapterModel) -> list[LoRALinear]:
    return [layer for _, layer in model.adapter_layers() if isinstance(layer, LoRALinear)]


def adapter_tensors(model: repeft.AdapterModel) -> list[torch.Tensor]:
    """The tensors the adapter hands the model: s·B·A per layer, [K_l | V_l] per layer, or P_l per layer."""
    adapter = _attention_adapter(model)
    with torch.no_grad():
        if isinstance(adapter, PrefixAdapter):
            return [torch.cat(adapter.flat_prefix(layer), -1) for layer in range(adapter.geometry.n_layers)]
        if isinstance(adapter, ZeroInitAdapter):
            return [adapter.layer_prompts(i).clone() for i in range(adapter.n_layers)]
        return [layer.delta_weight(model.active_adapter) for layer in _lora_layers(model)]


def adapter_gradients(model: repeft.AdapterModel, loss_fn: Callable[[nn.Module], torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d ``adapter_tensors(model)``, in the same order; parameter gradients are left cleared."""
    adapter = _attention_adapter(model)
    if adapter is None:
        # W + s·B·A enters the matmul like W does, so W's gradient is the one wanted.
        weights = [layer.base_layer.weight for layer in _lora_layers(model)]
        for w in weights:
            w.requires_grad_(True)
        try:
            loss_fn(model).backward()
            grads = [w.grad for w in weights]
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
    else:
        # Hand the attention leaf copies of the tensors the adapter makes, and read their gradients.
        name = "flat_prefix" if isinstance(adapter, PrefixAdapter) else "layer_prompts"
        make, leaves = getattr(adapter, name), {}

        def as_leaves(index: int):
            out = make(index)
            leaves[index] = [t.detach().requires_grad_() for t in (out if isinstance(out, tuple) else (out,))]
            return tuple(leaves[index]) if isinstance(out, tuple) else leaves[index][0]

        setattr(adapter, name, as_leaves)
        try:
            loss_fn(model).backward()
        finally:
            delattr(adapter, name)
        grads = [torch.cat([t.grad for t in leaves[i]], -1) for i in sorted(leaves)]
    model.zero_grad(set_to_none=True)
    return grads


def start_plain_at(plain: repeft.AdapterModel, reparameterized: repeft.AdapterModel) -> None:
    """Set the plain adapter's parameters to the tensors the reparameterized one produces (gates copied too)."""
    source, target = _attention_adapter(reparameterized), _attention_adapter(plain)
    with torch.no_grad():
        if source is None:
            for a, b in zip(_lora_layers(reparameterized), _lora_layers(plain)):
                lora_A, lora_B = a.adapters[reparameterized.active_adapter].factors()
                factors = b.adapters[plain.active_adapter]
                factors.lora_A.copy_(lora_A)
                factors.lora_B.copy_(lora_B)
        elif isinstance(source, PrefixAdapter):
            for layer in range(source.geometry.n_layers):
                keys, values = source.flat_prefix(layer)
                target.keys[layer].copy_(keys)
                target.values[layer].copy_(values)
        else:
            for i in range(source.n_layers):
                target.prompts[i].copy_(source.layer_prompts(i))
            target.gates.copy_(source.gates)


def open_gates(model: repeft.AdapterModel, value: float = 1.0) -> None:
    adapter = _attention_adapter(model)
    if isinstance(adapter, ZeroInitAdapter):
        with torch.no_grad():
            adapter.gates.fill_(value)


# -- the two checks -----------------------------------------------------------------------------


def step_alignment(model: repeft.AdapterModel, losses: list[Callable], lr: float) -> tuple[list[float], list[float]]:
    """cos(ΔW_k, -∂L_k/∂W) and ||ΔW_k|| for the Adam steps k = 1..len(losses), W the adapter's tensors."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    cosines, sizes = [], []
    for loss_fn in losses:
        grad = torch.cat([g.flatten() for g in adapter_gradients(model, loss_fn)])
        before = torch.cat([t.flatten() for t in adapter_tensors(model)])
        loss_fn(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = torch.cat([t.flatten() for t in adapter_tensors(model)]) - before
        cosines.append((-(step @ grad) / (step.norm() * grad.norm()).clamp_min(1e-30)).item())
        sizes.append(step.norm().item())
    model.eval()
    return cosines, sizes


def distill(model: repeft.AdapterModel, task: Task, lr: float, steps: int, seed: int = 1) -> float:
    """``steps`` AdamW steps towards the teacher, lr decaying linearly to 0; the mean KL on 4 held-out batches.

    The decay, as in repeft's trainer, measures where training gets rather than
    the noise floor a constant rate leaves.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for ids in task.batches(steps, seed):
        task.loss_fn(ids)(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return held_out_kl(model, task)


def held_out_kl(model: nn.Module, task: Task) -> float:
    """The mean KL to the teacher on 4 batches no training run sees."""
    model.eval()
    held_out = task.batches(4, seed=10_001)
    with torch.no_grad():
        return sum(task.loss_fn(ids)(model).item() for ids in held_out) / len(held_out)


def build_pair(task: Task, reparameterized: repeft.AdapterConfig, plain: repeft.AdapterConfig,
               seed: int = 0) -> tuple[repeft.AdapterModel, repeft.AdapterModel]:
    """Both adapters on copies of the task's base, the plain one starting where the other does."""
    torch.manual_seed(seed)
    rep = repeft.wrap(copy.deepcopy(task.base), reparameterized)
    torch.manual_seed(seed)
    flat = repeft.wrap(copy.deepcopy(task.base), plain)
    start_plain_at(flat, rep)
    return rep, flat


# -- the benchmark ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps of the learning check")
    parser.add_argument("--align-steps", type=int, default=3, help="Adam steps whose alignment is reported")
    parser.add_argument("--lr-factors", type=float, nargs="+", default=[1 / 3, 1, 3, 10],
                        help=f"learning rates as multiples of the plain default {PLAIN_LR:g}")
    parser.add_argument("--methods", nargs="+", choices=list(pairs()), default=list(pairs()),
                        help="run only these pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = distillation_task()
    lrs = [f * PLAIN_LR for f in args.lr_factors]
    rows, t0 = [], time.time()
    for method, (default, plain) in pairs().items():
        if method not in args.methods:
            continue
        forms = {"plain counterpart": plain, "default": default, **VARIANTS[method]}
        for form, config in forms.items():
            rep, flat = build_pair(task, default if form == "plain counterpart" else config, plain)
            model = flat if form == "plain counterpart" else rep
            open_gates(model)
            align, sizes = step_alignment(model, [task.loss_fn(ids) for ids in task.batches(args.align_steps, 0)],
                                          PLAIN_LR)
            losses = {}
            for lr in lrs:
                rep, flat = build_pair(task, default if form == "plain counterpart" else config, plain)
                losses[f"{lr:g}"] = distill(flat if form == "plain counterpart" else rep, task, lr, args.steps)
            rows.append({"method": method, "form": form, "config": config.to_dict(), "alignment": align,
                         "step_size": sizes, "final_kl": losses})
            print(f"{method:18s} {form:52s} align {[round(a, 3) for a in align]} "
                  + " ".join(f"{lr}: {kl:.4f}" for lr, kl in losses.items()), flush=True)
    result = {"benchmark": "conditioning", "plain_lr": PLAIN_LR, "lrs": lrs, "steps": args.steps,
              "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "rows": rows}
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conditioning.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "conditioning.md").write_text(table + "\n")
    print(table)
    return result


def markdown(result: dict) -> str:
    lrs = list(result["rows"][0]["final_kl"])
    lines = ["| method | form | step alignment (steps 1, 2, 3) | step size / plain's (step 1) | "
             + " | ".join(f"KL at lr {lr}" for lr in lrs) + " |", "|---|---|---|---:|" + "---:|" * len(lrs)]
    plain = {}
    for row in result["rows"]:
        if row["form"] == "plain counterpart":
            plain[row["method"]] = row
        ref = plain[row["method"]]
        cells = []
        for lr, kl in row["final_kl"].items():
            ratio = "" if row is ref else f" ({kl / ref['final_kl'][lr]:.2f}x)"
            cells.append(f"{kl:.4f}{ratio}")
        align = ", ".join(f"{a:.3f}" for a in row["alignment"])
        size = row["step_size"][0] / ref["step_size"][0]
        lines.append(f"| {row['method']} | {row['form']} | {align} | {size:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"KL to the teacher after {result['steps']} AdamW steps (held-out batches); in brackets, the ratio to "
                 f"the plain counterpart at the same rate. Plain default lr {result['plain_lr']:g}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main() and 0)
