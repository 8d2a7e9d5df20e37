"""Run under ``torchrun --nproc_per_node 2``: repeft's adapters trained, saved, loaded and run under ``fully_shard``.

For each case every process trains a tiny Llama sharded with FSDP2 the way
accelerate shards it (one unit per decoder layer, then the root) on its half
of a batch, and, beside it, an unsharded copy on the whole batch: one process
with the same global batch. The main process writes what it measured to the
``report.json`` in the folder named on the command line; ``tests/test_fsdp.py``
checks it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import repeft
from repeft import fsdp
from tiny_models import VOCAB, tiny_model

STEPS, ROWS, SEQ = 3, 8, 10
CASES = {
    "lora": repeft.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "replora": repeft.RepLoRAConfig(r=4, mlp_hidden=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    # Dropout masks are drawn per process: the sharded and the single copy agree only without it.
    "prefix": repeft.PrefixConfig(n_prefix=3, prefix_dropout=0.0),
    "zero_init": repeft.ZeroInitConfig(n_prompt=3),
}


def wrapped(config: repeft.AdapterConfig, base_dtype: torch.dtype = torch.float32) -> repeft.AdapterModel:
    torch.manual_seed(0)  # the same base and adapter on every process and for both copies
    model = repeft.wrap(tiny_model("llama").to(base_dtype), config)
    if isinstance(config, repeft.ZeroInitConfig):
        with torch.no_grad():  # open the gates, so the prompts get gradients from the first step
            model.attention_adapters.adapters["default"].gates.fill_(0.5)
    return model.train()


def shard(model: repeft.AdapterModel, policy: MixedPrecisionPolicy | None = None) -> repeft.AdapterModel:
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    fsdp.register_generate(model)
    return model


def train(model: repeft.AdapterModel, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The loss of each step and the first step's gradients (gathered whole)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=1e-3)
    losses, first_grads = [], None
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        first_grads = first_grads or {n: fsdp.gathered(p.grad).clone() for n, p in named.items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, first_grads


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run_case(config: repeft.AdapterConfig, ids: torch.Tensor, out_dir: Path, policy=None, base_dtype=torch.float32):
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = ids.chunk(world)[rank]
    reference = wrapped(config, base_dtype)
    reference_losses, reference_grads = train(reference, ids)
    sharded = shard(wrapped(config, base_dtype), policy)
    sharded_losses, sharded_grads = train(sharded, mine)
    # Each process's loss is the mean over its rows (all full length): their mean is the whole batch's.
    for loss in sharded_losses:
        dist.all_reduce(loss)
        loss /= world
    expected = {k: v.detach() for k, v in reference.adapter_state_dict().items()}
    result = {
        "sharded": all(fsdp.is_sharded(p) for p in sharded.parameters()),
        "loss_diff": max(abs(a.item() - b.item()) for a, b in zip(sharded_losses, reference_losses)),
        # Relative to the largest gradient: reduced across processes (FSDP) vs computed on the whole batch.
        "grad_diff": max_diff(sharded_grads, reference_grads) / max(g.abs().max().item() for g in reference_grads.values()),
        "adapter_diff": max_diff({k: fsdp.gathered(v) for k, v in sharded.adapter_state_dict().items()}, expected),
    }

    # Saved once, by the main process, gathered whole; loaded back, each process keeps its slice.
    sharded.save_adapter(out_dir, is_main_process=rank == 0)
    dist.barrier()
    result["files"] = sorted(p.name for p in out_dir.iterdir())
    _, saved = sharded.read_adapter(out_dir)
    result["saved_diff"] = max_diff(saved, expected)
    fresh = shard(wrapped(config, base_dtype), policy).eval()
    fresh.load_adapter_tensors("default", saved, source=str(out_dir))
    reference.eval()
    with torch.no_grad():
        result["reload_logits_diff"] = (fresh(input_ids=ids).logits.float() - reference(input_ids=ids).logits.float()).abs().max().item()
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    result["generate_equal"] = torch.equal(fresh.generate(input_ids=ids[:2], **kwargs), reference.generate(input_ids=ids[:2], **kwargs))
    try:
        fresh.merge()
        result["merge"] = "merged"
    except ValueError as exc:
        result["merge"] = str(exc)
    return result


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    root = Path(out_dir)  # shared by the processes
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    results = {name: run_case(config, ids, root / name) for name, config in CASES.items()}
    # The FSDP2 half-precision set-up: a bf16 base beside float32 adapter weights in one unit,
    # gathered and run in bf16, gradients reduced in float32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results["lora_bf16"] = run_case(CASES["lora"], ids, root / "lora_bf16", policy, torch.bfloat16)
    # Sharded per decoder layer no unit holds most of the weights; BERT names no layer class to wrap.
    results["llama_units_warning"] = fsdp.coarse_unit_warning(shard(wrapped(CASES["lora"])))
    bert = repeft.wrap(tiny_model("bert"), repeft.LoRAConfig(r=4, target_modules=["query", "value"]))
    fully_shard(bert.get_base_model().get_input_embeddings())
    results["bert_units_warning"] = fsdp.coarse_unit_warning(fully_shard(bert))
    if dist.get_rank() == 0:
        (root / "report.json").write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
