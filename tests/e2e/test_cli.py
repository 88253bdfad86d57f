"""The command line end to end: dry run, config errors (exit 2, one line), the demo for a few steps.

A real process for each exit path (the 7B dry run: exit 2 alone and exit 0 planned; --debug: a traceback, exit
1; torchrun's single process: exit 0), the other checks through spindle.cli.main in this process
(helpers.run_cli). The demo's own run and files: tests/journeys/test_docs_commands.py::
test_the_readme_demo_trains_and_writes_its_run_folder (the README's command, run there once)."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def spindle(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "spindle.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_7b_prints_estimates_without_allocating():
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    alone = spindle("train", "--config", "configs/7B_sft.py", "--dry-run")  # the seed's zero1=8 on 1 process
    assert alone.returncode == 2 and "parallel.zero1=8 does not divide the data-parallel size 1" in alone.stderr
    assert "--nproc N" in alone.stderr
    r = spindle("train", "--config", "configs/7B_sft.py", "--dry-run", "--nproc", "8")  # planned for 8 GPUs
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "layout for 8 process(es): data 8 x context 1 x pipeline 1 x tensor 1" in out
    assert "parameters: 7,321,423,872 (7.32 B" in out
    assert "FLOPs per token" in out and "InternEvo formula: 44.41 GFLOP" in out
    assert "tokens per step: 16,384 per data-parallel rank x 8 = 131,072" in out
    assert "memory estimate per device" in out
    # a 7B fp32 model would need ~29 GB; the dry run stays small
    peak_kb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    assert peak_kb < 2_000_000


@pytest.mark.parametrize("cfg_text, expected", [
    ("model = dict(num_layerz=2)\n", "model.num_layerz: unknown key; did you mean 'model.num_layers'?"),
    ("data = dict(micro_bsz='x')\n", "data.micro_bsz: expected an integer, not a str"),
    ("adam = dict(lr=-1)\n", "adam.lr: Input should be greater than or equal to 0"),
    ("x = (\n", "config does not parse"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, cfg_text, expected):
    cfg = tmp_path / "bad.py"
    cfg.write_text(cfg_text)
    r = run_cli("train", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(cfg) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_set_override_error_and_debug_traceback(tmp_path):
    r = run_cli("train", "--set", "model.hiden_size=8")
    assert r.returncode == 2 and "did you mean 'model.hidden_size'" in r.stderr
    r = spindle("train", "--set", "model.hiden_size=8", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.dist
def test_torchrun_single_process_runs_the_same_job(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=1", "train.py", "--config",
                        "configs/demo.py", "--launcher", "torch", "--set", "data.total_steps=2",
                        f"trainer.run_folder={tmp_path}", "trainer.sample_tokens=0", "data.max_text_bytes=400000",
                        "trainer.log_every=1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    direct = run_cli("train", "--set", "data.total_steps=2", f"trainer.run_folder={tmp_path / 'direct'}",
                     "trainer.sample_tokens=0", "data.max_text_bytes=400000", "trainer.log_every=1", cwd=ROOT)
    def losses(out):
        return [l.split(",loss=")[1].split(",")[0] for l in out.splitlines() if l.startswith("tflops=")]
    assert losses(r.stdout) == losses(direct.stdout) and len(losses(r.stdout)) == 2


def test_every_set_option_applies(tmp_path):
    """`--set a=1 --set b=2` applies both (before: argparse kept only the last --set, silently)."""
    r = run_cli("train", "--dry-run", "--set", "model.num_layers=3", "--set", "model.hidden_size=96",
                "model.num_attention_heads=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 layers" in r.stdout and "hidden 96" in r.stdout, r.stdout
