"""Shared by the torchrun scripts of tests/distributed and their tests: launch a script on N gloo ranks and
read what its rank 0 wrote (`launch`); inside the script, write the results on rank 0 (`save_results`) and
leave (`finish`). The scripts run by layout_runs.py (one launch for several) save and return: the launch
keeps the process group."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(script: str, out: Path, nproc: int = 2, timeout: int = 240):
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).with_name(script)), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return torch.load(out)


def save_results(rank: int, results: dict, out: str) -> None:
    if rank == 0:
        torch.save(results, out)
    dist.barrier()


def finish(rank: int, results: dict, out: str) -> None:
    save_results(rank, results, out)
    dist.destroy_process_group()
