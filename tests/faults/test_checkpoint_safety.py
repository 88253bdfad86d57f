"""Nothing a user saved is lost: damaged states are refused (never taken for a fresh start), foreign and
other runs' checkpoints are never pruned or overwritten, one writer per save folder.

`spindle train` on real files (through spindle.cli.main in this process: what is tested is what lands on
disk; the owner of a folder in use is a real process, SIGKILLed); every test asserts the bytes of the
checkpoints that nothing should have touched are identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli

pytestmark = [pytest.mark.faults]
REPO = Path(__file__).resolve().parents[2]

CONFIG = """
JOB_NAME = "safe"
ckpt = dict(enable_save_ckpt=True, save_ckpt_folder={ckpt!r}, checkpoint_every={every}, auto_resume={resume},
            keep_last_n={keep})
data = dict(seq_len=16, micro_num=1, micro_bsz=2, total_steps={total})
adam = dict(lr=1e-2)
model = dict(hidden_size=16, num_attention_heads=2, num_layers=1, vocab_size=64, multiple_of=16,
             max_position_embeddings=16)
trainer = dict(run_folder={run!r}, tensorboard=False, progress_bar=False, seed=3, num_threads=1)
"""


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return e


def write_config(tmp: Path, name: str, ckpt: Path, total: int, every: int = 2, resume: bool = True,
                 keep=None) -> Path:
    path = tmp / f"{name}.py"
    path.write_text(CONFIG.format(ckpt=str(ckpt), every=every, resume=resume, keep=keep, total=total,
                                  run=str(tmp / f"runs-{name}")))
    return path


def train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--config", str(config), *extra)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hash)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".spindle.lock"}


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "safe" / "metrics.jsonl").read_text().splitlines()]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("spindle: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished run with checkpoints 2, 4, 6, 8 (copied per test)."""
    tmp = tmp_path_factory.mktemp("saved")
    ckpt = tmp / "ckpt"
    proc = train(write_config(tmp, "first", ckpt, total=8))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ckpt


def copy_run(saved: Path, tmp: Path) -> Path:
    import shutil

    dest = tmp / "ckpt"
    shutil.copytree(saved, dest)
    (dest / ".spindle.lock").unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------- 1. no silent fresh start


def test_missing_trainer_state_resumes_from_the_newest_intact_checkpoint(saved_run, tmp_path):
    ckpt = copy_run(saved_run, tmp_path)
    (ckpt / "8" / "trainer_state.json").unlink()
    before = {s: digest(ckpt / s) for s in ("2", "4", "6")}
    damaged_files = digest(ckpt / "8")
    proc = train(write_config(tmp_path, "again", ckpt, total=10))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint 8 is damaged" in proc.stdout and "trainer_state.json: missing" in proc.stdout
    assert "continuing from" in proc.stdout and "/6 (step 6, all state)" in proc.stdout
    assert logged_steps(tmp_path / "runs-again") == [6, 7, 8, 9]  # not from step 0
    for s, files in before.items():  # nothing rewritten
        assert digest(ckpt / s) == files
    moved = [p for p in (ckpt / "damaged").iterdir() if p.is_dir()]
    assert len(moved) == 1 and digest(moved[0]) == damaged_files  # the damaged one is kept, aside
    assert (ckpt / "8.step").is_file() and (ckpt / "10.step").is_file()  # re-trained 8, then 10


def test_no_intact_checkpoint_is_refused_and_nothing_is_touched(saved_run, tmp_path):
    ckpt = copy_run(saved_run, tmp_path)
    for step in (2, 4, 6, 8):
        (ckpt / str(step) / "trainer_state.json").write_text("{}")
    before = digest(ckpt)
    line = one_error_line(train(write_config(tmp_path, "again", ckpt, total=10)))
    assert "no intact checkpoint" in line and "trainer_state.json" in line
    assert digest(ckpt) == before


def test_load_ckpt_info_of_a_damaged_checkpoint_is_refused(saved_run, tmp_path):
    ckpt = copy_run(saved_run, tmp_path)
    shard = next((ckpt / "6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated tensors: the record's size no longer matches
    before = digest(ckpt)
    config = write_config(tmp_path, "load", tmp_path / "new", total=4, resume=False)
    line = one_error_line(train(config, "--set", f"ckpt.load_ckpt_info={{'path': '{ckpt}/6', 'content': ['all']}}"))
    assert f"{ckpt}/6/{shard.name}" in line and "truncated or rewritten" in line
    assert digest(ckpt) == before


# ----------------------------------------------------------------------------- 2. other runs' checkpoints


def test_fresh_run_in_a_folder_of_another_run_is_refused(saved_run, tmp_path):
    ckpt = copy_run(saved_run, tmp_path)
    before = digest(ckpt)
    line = one_error_line(train(write_config(tmp_path, "other", ckpt, total=4, resume=False, keep=2)))
    assert "already holds checkpoints of another run (steps 2, 4, 6, 8)" in line and "auto_resume" in line
    assert digest(ckpt) == before


def test_internevo_save_folder_is_never_touched(tmp_path):
    folder = tmp_path / "llm_ckpts"
    (folder / "20").mkdir(parents=True)
    torch.save({"blocks.0.mixer.Wqkv.weight": torch.ones(3)}, folder / "20" / "model_tp0_pp0.pt")
    torch.save({"state": {}}, folder / "20" / "optimizer_tp0_pp0_zo0.pt")
    (folder / "20.step").write_text("")
    before = digest(folder)
    line = one_error_line(train(write_config(tmp_path, "ie", folder, total=4, resume=True)))
    assert "holds checkpoints Spindle did not write" in line and "20/ (model_tp0_pp0.pt" in line
    assert digest(folder) == before and sorted(p.name for p in folder.iterdir()) == ["20", "20.step"]


def test_keep_last_n_never_prunes_the_checkpoint_just_saved(saved_run, tmp_path):
    ckpt = copy_run(saved_run, tmp_path)
    proc = train(write_config(tmp_path, "again", ckpt, total=12, every=2, keep=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in ckpt.glob("*.step")) == ["12.step"]
    assert logged_steps(tmp_path / "runs-again") == [8, 9, 10, 11]


# ----------------------------------------------------------------------------- 3. one writer


@pytest.mark.slow  # the owner is a real training process
def test_second_run_on_a_folder_in_use_is_refused_until_the_owner_dies(tmp_path):
    ckpt = tmp_path / "ckpt"
    config = write_config(tmp_path, "long", ckpt, total=100000, every=1000)
    first = subprocess.Popen([sys.executable, "-m", "spindle.cli", "train", "--config", str(config)],
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = ckpt / ".spindle.lock"
        deadline = time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        line = one_error_line(train(write_config(tmp_path, "second", ckpt, total=4)))
        assert "in use by job 'safe'" in line and f"pid {first.pid} " in line
        os.kill(first.pid, signal.SIGKILL)  # the owner dies without releasing anything
        first.wait(timeout=30)
        proc = train(write_config(tmp_path, "second", ckpt, total=4))
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
