"""PEFT's ``ensure_weight_tying``: where repeft can honour it exactly, and a refusal by name where it cannot.

With ``ensure_weight_tying=True`` PEFT ties the adapters of modules that share
a weight (an input embedding and the lm_head tied to it): one LoRA (the head's
factors are the embedding's, transposed) or one trained copy for
``modules_to_save``. repeft does not tie adapters, so an adapter that reaches a
tied module is refused; where nothing tied is adapted, PEFT only warns, and so
does repeft (with PEFT's words). Tied modules are found by their weights, not
by their names.
"""

from __future__ import annotations

import warnings

from torch import nn

from .merging import shared_parameters
from .targeting import TargetError


def _weight(module: nn.Module):
    """The weight a (possibly wrapped) module uses from the base model: a wrapper's base layer's or original's."""
    for wrapped in ("base_layer", "original"):  # LoRALinear, ModulesToSave
        if isinstance(getattr(module, wrapped, None), nn.Module):
            module = getattr(module, wrapped)
    return getattr(module, "weight", None)


def check_weight_tying(base: nn.Module, adapted: list[str]) -> None:
    """For ``ensure_weight_tying=True``: refuse if a module in ``adapted`` shares its weight, else warn as PEFT does."""
    shared = shared_parameters(base)
    if not shared:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model", stacklevel=5)
        return
    tied = [path for path in adapted if id(_weight(base.get_submodule(path))) in shared]
    if tied:
        raise TargetError(
            f"ensure_weight_tying=True: {tied[0]!r} shares its weight with another module (tied word embeddings), and "
            "repeft does not tie adapters across tied modules. Use ensure_weight_tying=False (the adapter changes "
            f"{tied[0]!r} only; the module tied to it keeps the base weight, as in PEFT without the option), or untie "
            "the weights before wrapping"
        )
    warnings.warn(
        "You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` or "
        "`target_modules`",
        stacklevel=5,
    )
