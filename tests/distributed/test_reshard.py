"""A checkpoint written under dp2 x tp2 resumes under one process and under pp2, continuing the losses.

The checkpoint holds DCP tensors under parameter names (no layout in them) and the global data
position, so the resumed runs see the same packs as the uninterrupted run (layout_runs.py's "single").
"""

import json

import pytest

from distributed.marks import needs_pipeline_torch

pytestmark = pytest.mark.dist


@needs_pipeline_torch
@pytest.mark.runs("single", "reshard_dp2_tp2", "reshard_single", "reshard_pp2")
def test_dp2_tp2_checkpoint_resumes_under_one_process_and_pp2(layout_runs):
    reference = layout_runs["single"].losses  # lr_scheduler.total_steps is data.total_steps there: 10
    first = layout_runs["reshard_dp2_tp2"]
    ckpt = first.folder / "ckpt"
    assert (ckpt / "5.step").is_file()
    assert max(abs(a - b) for a, b in zip(first.losses, reference[:5])) < 1e-4
    state = json.loads((ckpt / "5" / "trainer_state.json").read_text())
    assert state["loader"]["position"] == 5 * 4  # 5 steps x (micro_num 2 x dp 2) packs, a global position
    for name in ("single", "pp2"):  # each resume continues from its own copy of step 5
        run = layout_runs[f"reshard_{name}"]
        assert "auto_resume: continuing from" in run.stdout and "(step 5, all state)" in run.stdout, run.stdout
        resumed = run.losses
        assert len(resumed) == 5, name  # steps 5..9
        diffs = [abs(a - b) for a, b in zip(resumed, reference[5:])]
        assert max(diffs) < 1e-4, f"{name}: {resumed} vs {reference[5:]}"
