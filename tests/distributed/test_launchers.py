"""Launchers: Slurm environment variables and torchrun give the same job; per-rank logs in the run folder."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_parity import CONFIG, ENV, ROOT, run

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_launcher_matches_torchrun(tmp_path):
    port = free_port()
    folder = tmp_path / "slurm"
    procs = []
    for rank in range(2):
        env = {**ENV, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_JOB_NODELIST": "localhost"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        procs.append(subprocess.Popen(
            [sys.executable, "train.py", "--config", CONFIG, "--launcher", "slurm", "--port", str(port),
             "--backend", "gloo", "--seed", "5", "--set", f"trainer.run_folder={folder}", "data.micro_num=4"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    slurm = [json.loads(l)["loss"] for l in (folder / "tiny" / "metrics.jsonl").read_text().splitlines()]
    torch_run = run(tmp_path, "torchrun", 2, ["data.micro_num=4"])
    assert slurm == torch_run  # same layout, same seed: identical
    logs = folder / "tiny" / "logs"
    assert (logs / "rank0.log").is_file() and (logs / "rank1.log").is_file()
    assert "loss=" in (logs / "rank1.log").read_text()
    assert "tflops=" in outs[0][0] and "tflops=" not in outs[1][0]  # only rank 0 prints


def test_layout_error_before_any_work(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--config", CONFIG,
                        "--launcher", "torch", "--set", f"trainer.run_folder={tmp_path}", "parallel.tensor=4"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "world size 2 is not divisible by tensor (4) x pipeline (1)" in r.stderr
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()
