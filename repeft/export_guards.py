"""Checks every merged export makes before writing: it holds only finite numbers, and not over its own input.

Used by ``AdapterModel.save_merged``, ``repeft.export_merged`` and ``repeft export``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .files import AdapterFileError


def refuse_non_finite(state: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first float tensor of ``state`` that holds inf or NaN (nothing is written)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"merged tensor {key!r} holds inf or NaN in {tensor.dtype} (largest finite value "
                f"{torch.finfo(tensor.dtype).max:.6g}); nothing was written. Export in float32 or bfloat16, "
                "e.g. repeft.export_merged(model, out_dir, dtype=torch.bfloat16), or check the adapter's weights"
            )


def base_model_dir(model: nn.Module) -> str | None:
    """Where ``model`` (a transformers model) was loaded from, as its config records it, or None."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def refuse_overwriting_base(base_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> None:
    """Raise ``AdapterFileError`` if ``out_dir`` is ``base_dir``, the directory a base model is loaded from.

    An export there would replace the base weights it reads, and the next export would merge twice.
    """
    if base_dir is not None and os.path.isdir(base_dir) and os.path.realpath(out_dir) == os.path.realpath(base_dir):
        raise AdapterFileError(
            f"{out_dir} is the base model's own directory; writing there would replace the base weights "
            "the export reads. Export to another directory"
        )
