"""A checkpoint written under dp2 x tp2 resumes under one process and under pp2, continuing the losses.

The checkpoint holds DCP tensors under parameter names (no layout in them) and the global data
position, so the resumed runs see the same packs as the uninterrupted run.
"""

import json
import shutil

import pytest

from distributed.marks import needs_pipeline_torch
from tests.distributed.test_parity import run

pytestmark = pytest.mark.dist

LR = "lr_scheduler.total_steps=10"


@needs_pipeline_torch
def test_dp2_tp2_checkpoint_resumes_under_one_process_and_pp2(tmp_path):
    reference = run(tmp_path, "reference", 1, [LR])
    ckpt = tmp_path / "ckpt"
    save = ["ckpt.enable_save_ckpt=True", f"ckpt.save_ckpt_folder=local:{ckpt}", "ckpt.checkpoint_every=5", LR]
    first = run(tmp_path, "dp2_tp2", 4, ["data.micro_num=4", "parallel.tensor=2", "data.total_steps=5", *save])
    assert (ckpt / "5.step").is_file()
    assert max(abs(a - b) for a, b in zip(first, reference[:5])) < 1e-4
    state = json.loads((ckpt / "5" / "trainer_state.json").read_text())
    assert state["loader"]["position"] == 5 * 8  # 5 steps x (micro_num 4 x dp 2) packs, a global position
    for name, nproc, layout in (("single", 1, []), ("pp2", 2, ["parallel.pipeline.size=2"])):
        own = tmp_path / f"ckpt_{name}"  # each resume continues from its own copy of step 5
        shutil.copytree(ckpt, own)
        resume = ["ckpt.enable_save_ckpt=True", f"ckpt.save_ckpt_folder=local:{own}", "ckpt.auto_resume=True", LR]
        resumed = run(tmp_path, f"resume_{name}", nproc, [*resume, *layout])
        assert len(resumed) == 5, name  # steps 5..9
        diffs = [abs(a - b) for a, b in zip(resumed, reference[5:])]
        assert max(diffs) < 1e-4, f"{name}: {resumed} vs {reference[5:]}"
