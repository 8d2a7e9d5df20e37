"""Write the adapters in this folder with the repeft version on PYTHONPATH, as old versions saved them.

They pin down that adapters saved before a format change still load and compute
what they did. The directories here were written by repeft at commit 7779353,
before issue 15 added RepLoRA's ``form``, zero-init's ``prompt_network`` and
VAPT's ``mlp_dropout`` and changed the prefix defaults (and before issue 25
added the prefix's ``init``, ``prefix_dropout`` and ``norga_layers``)::

    git archive 7779353 | tar -x -C /tmp/old && PYTHONPATH=/tmp/old:tests python tests/data/make_saved_adapters.py

and the two LoRA adapters, written by repeft at commit b076ab3 in format version 1 (repeft's tensor names,
before issue 26 gave a LoRA adapter PEFT's layout)::

    git archive b076ab3 | tar -x -C /tmp/old && \
        PYTHONPATH=/tmp/old:tests python tests/data/make_saved_adapters.py lora_format_v1 dora_format_v1

except ``replora_form_residual``, written by repeft at commit 44042e5 (issue 15's
residual form, before issue 25 made the shared form the default)::

    git archive 44042e5 | tar -x -C /tmp/old && \
        PYTHONPATH=/tmp/old:tests python tests/data/make_saved_adapters.py replora_form_residual

Each directory also holds ``expected_logits.safetensors``: the logits the
wrapped model gave on its tiny batch when the adapter was saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_models import tiny_batch, tiny_images, tiny_model, tiny_vision_model

import repeft

HERE = Path(__file__).resolve().parent

# name: (base model, config, batch); each config is that version's default form of the method.
ADAPTERS = {
    "replora_form_mlp": (lambda: tiny_model("llama"), lambda: repeft.RepLoRAConfig(
        r=2, lora_alpha=4, mlp_hidden=4, activation="gelu", target_modules=["q_proj", "v_proj"]),
        lambda: tiny_batch("llama")),
    "replora_form_residual": (lambda: tiny_model("llama"), lambda: repeft.RepLoRAConfig(
        r=2, lora_alpha=4, mlp_hidden=4, form="residual", target_modules=["q_proj", "v_proj"]),
        lambda: tiny_batch("llama")),
    "prefix_one_mlp": (lambda: tiny_model("llama"), lambda: repeft.PrefixConfig(n_prefix=3, mlp_hidden=8, norga=True),
                       lambda: tiny_batch("llama")),
    "zero_init_deepshare": (lambda: tiny_model("llama"), lambda: repeft.ZeroInitConfig(
        n_prompt=3, prompt_type="nonlinear", code_dim=4, mlp_hidden=8), lambda: tiny_batch("llama")),
    "lora_format_v1": (lambda: tiny_model("llama"), lambda: repeft.LoRAConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), lambda: tiny_batch("llama")),
    "dora_format_v1": (lambda: tiny_model("llama"), lambda: repeft.LoRAConfig(
        r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        lambda: tiny_batch("llama")),
    "vapt": (lambda: tiny_vision_model("vit"), lambda: repeft.VAPTConfig(n_prompt=3, kernel_size=2, mlp_hidden=4),
             tiny_images),
}


def write(name: str) -> None:
    make_base, make_config, make_batch = ADAPTERS[name]
    model, batch = repeft.wrap(make_base(), make_config()), make_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # off the init (B, gates, token maps move off zero), so the adapter changes the logits
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out = HERE / name
    model.save_adapter(out)
    with torch.no_grad():
        save_file({"logits": model(**batch).logits.contiguous()}, str(out / "expected_logits.safetensors"))
    print(f"wrote {out} with repeft {repeft.__version__} from {Path(repeft.__file__).parent}")


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ADAPTERS:
        write(name)
