"""Parameters that tensor parallelism leaves replicated get the whole gradient (issue 24, point 2): Qwen3's
per-head q/k norms see only a rank's heads, so their gradients are partial sums unless TP reduces them."""

import pytest

from distributed.torchrun_io import launch

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return launch("tp_replicated.py", tmp_path_factory.mktemp("tp_replicated") / "out.pt")


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_every_replicated_parameter_has_its_whole_gradient(layouts, layout):
    result = layouts[layout]
    assert result["not_reduced"] == [], f"{layout}: replicated parameters with partial gradients"
    worst = max(result["max_grad_diff"], key=result["max_grad_diff"].get)
    assert result["max_grad_diff"][worst] < 1e-5, (layout, worst, result["max_grad_diff"][worst])
    assert any("q_norm" in n for n in result["max_grad_diff"])  # the model under test has per-head norms
