"""Each reparameterized adapter trains as well as the plain adapter it reparameterizes (issue 15).

RepLoRA vs LoRA, the shared-structure prefix vs the independent one, non-linear
vs linear zero-init prompts, each pair from the same start on a tiny Llama that
distils a teacher (the base plus a random low-rank update). The task and the
measurements live in benchmarks/conditioning.py, which also runs the earlier
forms and a wider learning-rate grid (docs/methods/*.md quote its table).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import conditioning  # noqa: E402

PAIRS = conditioning.pairs()
pytestmark = pytest.mark.usefixtures("one_thread")  # as benchmarks/conditioning.py runs (--threads 1)


@pytest.fixture(scope="module")
def task():
    return conditioning.distillation_task()


@pytest.mark.parametrize("method", list(PAIRS))
def test_first_step_follows_the_gradient_as_closely_as_the_plain_counterparts(task, method):
    """cos(ΔW, -∂L/∂W) of the first Adam step, W the adapter's tensors (s·B·A, [K|V], P): >= 0.8x plain's."""
    first_batch = [task.loss_fn(task.batches(1, seed=0)[0])]
    cosines = []
    for model in conditioning.build_pair(task, *PAIRS[method]):
        conditioning.open_gates(model)  # zero-init prompts get no gradient while the gates are shut
        cosines += conditioning.step_alignment(model, first_batch, conditioning.PLAIN_LR)[0]
    reparameterized, plain = cosines
    assert plain > 0.05  # a step that follows the gradient at all, so the ratio means something
    assert reparameterized >= 0.8 * plain


# RepLoRA's per-projection form learns like LoRA. The shared form (the default, the paper's) cannot on
# this task: its q and v factors come from one pair of seeds through maps on the rank side, so their
# updates share row and column spaces, while the teacher moves q and v independently (capacity, not
# conditioning: its first step is as aligned as LoRA's; docs/methods/replora.md has the numbers).
LEARNING = {**PAIRS, "RepLoRA residual": (conditioning.VARIANTS["RepLoRA"][conditioning.RESIDUAL], PAIRS["RepLoRA"][1])}
SHARED_GAP = pytest.mark.xfail(strict=True, reason="shared seeds tie q and v; the teacher's q and v updates are independent")


@pytest.mark.slow
@pytest.mark.parametrize("factor", [1, 3])
@pytest.mark.parametrize("method", [pytest.param(m, marks=SHARED_GAP) if m == "RepLoRA" else m for m in LEARNING])
def test_learns_as_well_as_the_plain_counterpart_at_its_rates(task, method, factor):
    """KL to the teacher after 200 steps at the plain method's default rate and 3x it: within 1.1x of plain's."""
    lr = factor * conditioning.PLAIN_LR
    models = conditioning.build_pair(task, *LEARNING[method])
    start = conditioning.held_out_kl(models[1], task)  # both start here: same tensors
    reparameterized, plain = (conditioning.distill(model, task, lr, steps=200) for model in models)
    assert plain < 0.95 * start  # the plain method learns at this rate, so the comparison means something
    assert reparameterized <= 1.1 * plain
