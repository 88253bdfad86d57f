"""Every mixture-of-experts layout reproduces the one-process losses on the same global batch (gloo, torchrun):
data parallel, expert parallel (all-to-all dispatch) with FSDP over the ranks holding the same experts, with
ZeRO-3, with GShard capacity dropping, with tensor + sequence parallelism of the attention, and the experts
split over all four ranks. The one-process reference takes micro_num x dp micro-batches per step
(tests/distributed/layout_runs.py); the runs end with the one-process closing sample."""

import pytest

from distributed.layout_runs import MOE_LAYOUTS
from distributed.marks import layouts
from distributed.parity_checks import closing_sample, within

pytestmark = pytest.mark.dist

RUNS = lambda name: (MOE_LAYOUTS[name][0], name)  # noqa: E731


@pytest.mark.parametrize("name", layouts(MOE_LAYOUTS, runs=RUNS))
def test_moe_layout_matches_one_process(layout_runs, name):
    reference = layout_runs[MOE_LAYOUTS[name][0]]
    losses = layout_runs[name].losses
    assert within(losses, reference.losses, tol=1e-5), f"{name}: {losses} vs {reference.losses}"
    assert reference.losses[-1] < reference.losses[0]
    assert closing_sample(layout_runs[name].stdout) == closing_sample(reference.stdout)
