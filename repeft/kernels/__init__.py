"""Adapter matmul kernels.

This package knows nothing of transformers: it takes tensors and returns tensors.
``lora_linear`` computes ``x W^T + b + s * dropout(x) A^T B^T`` and
``add_lora`` adds the low-rank term to an output some other layer already
computed (GPT-2's Conv1D, quantized bases).
"""

from .lora_torch import add_lora, lora_linear

__all__ = ["add_lora", "lora_linear"]
