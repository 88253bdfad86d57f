"""InternEvo MoE configs and checkpoints through the training entry points (issue 27 points 4, 5): the 7B_MoE4 config
plans for 8 GPUs with total and active parameters, and load_ckpt_info(ckpt_type="internevo") starts training from
an InternEvo MoE checkpoint with its weights (the folder cut as tests/unit/test_internevo_moe_ckpt.py cuts it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spindle.config import validate_config
from spindle.interop.internevo import read_internevo

pytest.importorskip("transformers")  # internevo_folders builds its dense cases from transformers

from internevo_folders import X, internevo_config_class as config_class  # noqa: E402
from test_internevo_moe_ckpt import source_model, write_moe_folder  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "internevo_7B_MoE4_sft.py"


@pytest.fixture
def internevo_config_class():
    with config_class() as config:
        yield config


def test_internevo_7B_MoE4_plans_for_8_gpus_with_total_and_active_parameters(capsys):
    from spindle.cli import main

    assert main(["train", "--config", str(FIXTURE), "--dry-run", "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    # by hand: embedding + head 2 x 103168 x 4096; per layer attention 4 x 4096^2, two norms, the router 4 x 4096,
    # 4 experts of 3 x 4096 x 5632 (2 of them per token); the final norm
    assert "parameters: 11,851,796,480 (11.85 B" in out
    assert "4 experts, top 2, expert width 5632; active parameters per token 7,422,611,456" in out
    assert "layout for 8 process(es): data 8 x context 1 x pipeline 1 x tensor 1" in out
    assert "moe.use_rts (no effect: only InternEvo's top-1 gate reads it)" in out


def test_load_ckpt_info_starts_training_from_a_moe_checkpoint(tmp_path, internevo_config_class):
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    model = source_model()
    folder = write_moe_folder(tmp_path / "41", model, 2, 1, internevo_config_class)
    cfg = validate_config({
        "model_type": "INTERNLM_MoE", "model": dict(read_internevo(folder).model, dtype="torch.float32"),
        "data": {"seq_len": 16, "micro_bsz": 1, "total_steps": 50},
        "trainer": {"run_folder": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
        "ckpt": {"load_ckpt_info": {"path": str(folder), "content": ("model",), "ckpt_type": "internevo"}}})
    trainer = Trainer(cfg, ParallelEnv())
    with torch.no_grad():
        assert (trainer.raw_model.eval()(X) - model(X)).abs().max().item() == 0.0

