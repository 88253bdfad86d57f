"""The CLI from a built wheel, outside a checkout: the embedded demo config and the benchmarks are
package data, not files of the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_runs_the_demo_dry_run_and_lists_benchmarks_from_another_folder(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("spindle-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "spindle/configs/demo.py" in names and "spindle/benchmarks/bench_train.py" in names
    assert "spindle/assets/tokenizer/tokenizer.model" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    code = "import sys, spindle; assert spindle.__file__.startswith(sys.argv[1]), spindle.__file__; " \
           "from spindle.cli import main; sys.exit(main(sys.argv[2:]))"
    dry = subprocess.run([sys.executable, "-c", code, str(site), "train", "--dry-run"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "config: demo" in dry.stdout and "parameters:" in dry.stdout
    bench = subprocess.run([sys.executable, "-c", code, str(site), "bench"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "attention" in bench.stdout, bench.stderr
    assert not list(elsewhere.iterdir())  # a dry run writes nothing
    run = subprocess.run([sys.executable, "-c", code, str(site), "train", "--set", "data.total_steps=2",
                          "data.max_text_bytes=200000", "trainer.sample_tokens=4"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done: 2 steps" in run.stdout and (elsewhere / "runs" / "demo" / "ckpt" / "2.step").is_file()
