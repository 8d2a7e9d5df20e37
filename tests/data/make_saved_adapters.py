"""Write the adapters in this folder with the repeft version on PYTHONPATH, as old versions saved them.

They pin down that adapters saved before a format change still load and compute
what they did. ``replora_form_mlp/`` was written by repeft at commit 7779353
(before RepLoRA's ``form`` field existed; its RepLoRA was what ``form="mlp"`` is
now)::

    git archive 7779353 | tar -x -C /tmp/old && PYTHONPATH=/tmp/old:tests python tests/data/make_saved_adapters.py

Each directory also holds ``expected_logits.safetensors``: the logits the
wrapped tiny Llama gave on ``tiny_batch("llama")`` when the adapter was saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_models import tiny_batch, tiny_model

import repeft

HERE = Path(__file__).resolve().parent


def main() -> None:
    model = repeft.wrap(tiny_model("llama"), repeft.RepLoRAConfig(
        r=2, lora_alpha=4, mlp_hidden=4, activation="gelu", target_modules=["q_proj", "v_proj"]))
    batch = tiny_batch("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # B moves off zero, so the adapter changes the logits
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out = HERE / "replora_form_mlp"
    model.save_adapter(out)
    with torch.no_grad():
        save_file({"logits": model(**batch).logits.contiguous()}, str(out / "expected_logits.safetensors"))
    print(f"wrote {out} with repeft {repeft.__version__} from {Path(repeft.__file__).parent}")


if __name__ == "__main__":
    main()
