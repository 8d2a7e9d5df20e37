import os

import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before
# triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
