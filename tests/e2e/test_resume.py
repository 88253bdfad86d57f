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


# ----------------------------------------------------------------------------- every feature that draws or counts

import pytest  # noqa: E402
import torch  # noqa: E402

from spindle.config import validate_config  # noqa: E402
from spindle.parallel.mesh import ParallelEnv  # noqa: E402
from spindle.train.trainer import Trainer  # noqa: E402

TEXT = "\n".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog." for i in range(400))
FEATURES = {
    "dropout": {"model": {"drop_rate": 0.2}},
    "attention_dropout": {"model": {"attn_drop_rate": 0.2}},
    "label_smoothing": {"loss": {"label_smoothing": 0.1}},
    "rampup": {"data": {"micro_num": 3, "rampup_batch_size": "1 1 2"}},
    "validation": {"data": {"valid_every": 1, "valid_micro_num": 1}, "model": {"drop_rate": 0.2}},
    "text_data": {"data": {"type": "text", "tokenizer_path": "byte"}, "model": {"drop_rate": 0.2}},
    # long-context metrics every step, between dropout steps: they must not move the training RNG
    "long_eval": {"data": {"type": "text", "tokenizer_path": "byte", "valid_every": 1}, "model": {"drop_rate": 0.2},
                  "long_eval": {"lengths": [16, 48], "variants": ["plain", "yarn"], "passkey_lengths": [256],
                                "passkey_depths": [0.5], "passkey_samples": 1}},
}


def _feature_cfg(tmp: Path, name: str, feature: str, total: int):
    data = {"seq_len": 16, "micro_num": 2, "micro_bsz": 2, "total_steps": total}
    raw = {
        "JOB_NAME": name,
        "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": str(tmp / name / "ckpt"), "checkpoint_every": 3},
        "data": data,
        "adam": {"lr": 1e-2},
        "lr_scheduler": {"warmup_ratio": 0.2, "total_steps": 6},
        "model": {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2, "vocab_size": 258,
                  "multiple_of": 16, "max_position_embeddings": 16},
        "trainer": {"run_folder": str(tmp), "tensorboard": False, "progress_bar": False, "seed": 13,
                    "num_threads": 1},
    }
    for section, values in FEATURES[feature].items():
        raw.setdefault(section, {}).update(values)
    if feature == "validation":
        from spindle.data.prepare import prepare

        (tmp / "valid.txt").write_text(TEXT)
        prepare([str(tmp / "valid.txt")], str(tmp / "valid" / "en"), "byte", overwrite=True, progress=False)
        data["valid_folder"] = str(tmp / "valid")
    if feature in ("text_data", "long_eval"):
        (tmp / "text").mkdir(exist_ok=True)
        for i in range(3):
            (tmp / "text" / f"f{i}.txt").write_text(TEXT[i * 3000:(i + 1) * 3000])
        data["train_folder"] = str(tmp / "text")
    return validate_config(raw)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_resume_is_bit_exact_with(feature, tmp_path, monkeypatch):
    quiet = dict(log=lambda *_: None)
    full = Trainer(_feature_cfg(tmp_path, "full", feature, 6), ParallelEnv(), **quiet).fit()["history"]
    first = Trainer(_feature_cfg(tmp_path, "cut", feature, 3), ParallelEnv(), **quiet).fit()["history"]

    # nothing may draw from the global generator between the restore and the first step
    restored = {}
    real_restore, real_step = Trainer._restore, Trainer.train_step

    def spy_restore(self):
        real_restore(self)
        restored["rng"] = torch.get_rng_state()

    def spy_step(self, mbs):
        if "first_step" not in restored:
            restored["first_step"] = torch.get_rng_state()
        return real_step(self, mbs)

    monkeypatch.setattr(Trainer, "_restore", spy_restore)
    monkeypatch.setattr(Trainer, "train_step", spy_step)
    from spindle.hardware import measure_cpu_peak_tflops

    measure_cpu_peak_tflops.cache_clear()  # the probe runs again in this Trainer, as in a new process
    second = Trainer(_feature_cfg(tmp_path, "cut", feature, 6), ParallelEnv(), **quiet)
    assert second.state.step == 3
    rest = second.fit()["history"]
    assert torch.equal(restored["rng"], restored["first_step"])
    keys = ["loss", "grad_norm"] + {"validation": ["val/en_loss"], "long_eval": ["val/ppl@48/yarn", "val/passkey@256"]
                                    }.get(feature, [])
    assert [[h[k] for k in keys] for h in first + rest] == [[h[k] for k in keys] for h in full]
