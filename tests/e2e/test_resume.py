"""Exact resume: a training process killed with SIGKILL at a random step and restarted with
auto_resume produces the same per-step losses as an uninterrupted run, bit for bit (CPU, fp32)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOTAL = 12

CONFIG = """
JOB_NAME = "resume"
ckpt = dict(enable_save_ckpt=True, checkpoint_every=3, auto_resume=True, keep_last_n=2)
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps={total}, fixed_random_dataset_seqlen=False)
adam = dict(lr=1e-2)
lr_scheduler = dict(warmup_ratio=0.2, total_steps={total})
model = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=96,
             multiple_of=16, max_position_embeddings=32)
trainer = dict(run_folder={run!r}, tensorboard=False, progress_bar=False, seed=11, num_threads=1, log_every=1)
"""

# The runner slows each step down (a sleep after the step: numerics untouched) so the kill lands
# mid-run, then calls the real CLI.
RUNNER = """
import sys, time
from spindle.train import trainer as T
_step = T.Trainer.train_step
def slow(self, mbs):
    out = _step(self, mbs)
    time.sleep(0.15)
    return out
T.Trainer.train_step = slow
from spindle.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _setup(tmp: Path, name: str) -> tuple[Path, Path]:
    run = tmp / name
    run.mkdir()
    cfg = run / "config.py"
    cfg.write_text(CONFIG.format(total=TOTAL, run=str(run)))
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    return cfg, run / "resume"


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run re-logs the steps after its checkpoint: last wins
    return out


def test_sigkill_then_auto_resume_is_bit_exact(tmp_path):
    runner = tmp_path / "runner.py"
    cfg_a, run_a = _setup(tmp_path, "a")
    cfg_b, run_b = _setup(tmp_path, "b")
    ref = subprocess.Popen([sys.executable, str(runner), str(cfg_a)], env=_env(), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    kill_after = random.Random(1234).randint(4, TOTAL - 3)  # seeded "random" step
    victim = subprocess.Popen([sys.executable, str(runner), str(cfg_b)], env=_env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_b / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            os.kill(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert victim.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    logged_before_kill = len(metrics.read_text().splitlines())
    assert logged_before_kill < TOTAL

    resumed = subprocess.run([sys.executable, str(runner), str(cfg_b)], env=_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "auto_resume: continuing from" in resumed.stdout, resumed.stdout
    out_a, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, out_a

    want, got = _losses(run_a), _losses(run_b)
    assert sorted(want) == list(range(TOTAL)) and sorted(got) == list(range(TOTAL))
    assert got == want  # bit for bit: float equality of every step's loss
