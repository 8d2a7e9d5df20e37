import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before
# triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny-model steps (``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models are all per-op overhead: a second thread only adds synchronisation,
    which on a busy 2-core machine made such modules 3-30x slower in wall time.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
