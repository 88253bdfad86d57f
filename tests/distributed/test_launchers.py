"""Launchers: Slurm environment variables and torchrun give the same job; per-rank logs in the run folder."""

import json
import socket
import subprocess
import sys

import pytest

from distributed.layout_runs import ENV, ROOT, TINY

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.runs("dp2")
def test_slurm_launcher_matches_torchrun(tmp_path, layout_runs):
    port = free_port()
    folder = tmp_path / "slurm"
    procs = []
    for rank in range(2):
        env = {**ENV, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_JOB_NODELIST": "localhost"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        procs.append(subprocess.Popen(
            [sys.executable, "train.py", "--config", TINY, "--launcher", "slurm", "--port", str(port),
             "--backend", "gloo", "--seed", "5", "--set", f"trainer.run_folder={folder}", "data.micro_num=2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    slurm = [json.loads(l)["loss"] for l in (folder / "tiny" / "metrics.jsonl").read_text().splitlines()]
    torch_run = layout_runs["dp2"].losses  # torchrun, data.micro_num=2
    assert slurm == torch_run  # same layout, same seed: identical
    logs = folder / "tiny" / "logs"
    assert (logs / "rank0.log").is_file() and (logs / "rank1.log").is_file()
    assert "loss=" in (logs / "rank1.log").read_text()
    assert "tflops=" in outs[0][0] and "tflops=" not in outs[1][0]  # only rank 0 prints


@pytest.mark.runs("layout_error")
def test_layout_error_before_any_work(layout_runs):
    """Under torchrun (the launch of 2 processes), parallel.tensor=4: exit 2 on both ranks, rank 0 says why.
    (A worker's exit code as torchrun reports it: tests/journeys/test_launch.py's typo, a real launch.)"""
    r = layout_runs["layout_error"]
    assert r.rc == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("spindle: error:")]
    assert errors == ["spindle: error: parallel: world size 2 is not divisible by tensor (4) x pipeline (1)"], r.stderr
    assert not (r.folder / "tiny" / "metrics.jsonl").exists()
