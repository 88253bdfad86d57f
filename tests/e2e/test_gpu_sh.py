"""bench/gpu.sh: on a machine without a CUDA device it stops at once (one line, exit 2) instead of
installing or training; its CPU smoke mode runs every stage a GPU run runs (dense and packed steps with
their attention kernel, the bit-exact resume round trip, the MoE step with its expert kernel)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_no_cuda_device_exits_at_once_with_one_line(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env={**ENV, "OUT": str(tmp_path)}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bench/gpu.sh: no CUDA device")
    assert not any(tmp_path.iterdir())  # nothing ran
    assert time.monotonic() - t0 < 60  # no install, no training (a bound against hours, not a timing)


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
    r = subprocess.run(["bash", "bench/gpu.sh", "--preset", "tiny", "--device", "cpu"], cwd=ROOT,
                       env={**ENV, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "all stages passed" in r.stdout and "resume round trip (tiny, bf16, cpu): bit-exact" in r.stdout
    found = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    results = {(out["packed"], out.get("moe", False)): out for out in found}
    assert len(found) == len(results) == 3  # dense rows, packed documents, MoE
    assert results[False, False]["attention_kernel"] == "sdpa_causal"
    assert results[True, False]["attention_kernel"] == "segments"
    moe = results[False, True]
    assert moe["expert_kernel"] == "loop" and moe["active_params"] < moe["params"]  # the CPU's kernel
    for out in results.values():
        assert out["dtype"] == "torch.bfloat16" and out["tokens_per_s"]["median"] > 0 and out["mfu"]["median"] > 0
