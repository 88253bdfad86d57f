"""Journey 6: planning InternEvo's own 7B config for 8 GPUs on a laptop with the seed's entry point.
(`spindle train --config configs/7B_sft.py --dry-run --nproc 8` is tests/e2e/test_cli.py's.)"""

import shutil

import pytest

from tests.journeys.shell import ROOT, ok, sh, user_folder

pytestmark = pytest.mark.journeys


def test_internevo_7b_internlm2_config_plans_for_8_processes(tmp_path):
    folder = user_folder(tmp_path)
    shutil.copy(ROOT / "tests/fixtures/internevo_7B_internlm2.py", folder / "configs/7B_internlm2.py")
    before = sorted(folder.rglob("*"))
    alone = sh("python train.py --config ./configs/7B_internlm2.py --launcher torch --dry-run", folder)
    assert alone.returncode == 2 and "Traceback" not in alone.out
    assert [l for l in alone.stderr.splitlines() if l.startswith("spindle: error:")] == alone.stderr.splitlines()[-1:]
    assert "world size 1 is not divisible" in alone.stderr
    r = ok(sh("python train.py --config ./configs/7B_internlm2.py --launcher torch --dry-run --nproc 8", folder))
    assert "layout for 8 process(es): data 4 x context 2 x pipeline 1 x tensor 1" in r.stdout
    assert "parameters: 7,737,708,544" in r.stdout
    assert "accepted for compatibility, no effect here" in r.out
    assert sorted(folder.rglob("*")) == before  # a plan writes nothing (no run folder, no cache)


def test_internevo_7B_MoE4_config_plans_for_8_processes(tmp_path):
    """InternEvo's MoE config (configs/7B_MoE4_sft.py, model_type INTERNLM_MoE) with the seed's entry point."""
    folder = user_folder(tmp_path)
    shutil.copy(ROOT / "tests/fixtures/internevo_7B_MoE4_sft.py", folder / "configs/7B_MoE4_sft.py")
    r = ok(sh("python train.py --config ./configs/7B_MoE4_sft.py --launcher torch --dry-run --nproc 8", folder))
    assert "config: 7b_moe_train (model_type INTERNLM_MoE, dtype torch.bfloat16)" in r.stdout
    assert "parameters: 11,851,796,480" in r.stdout and "active parameters per token 7,422,611,456" in r.stdout
    assert "model.moe_type='GShard' top-2 (mapped" in r.out
