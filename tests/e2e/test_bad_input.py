"""Bad input, the way a user meets it: one line naming the key / option / file, exit code 2, no traceback,
nothing already saved touched — also under torchrun, where rank 0 alone says it."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from spindle.config import load_config, validate_config
from spindle.errors import SpindleError

REPO = Path(__file__).resolve().parents[2]
TINY = ("JOB_NAME = 'bad'\nmodel = dict(hidden_size=32, num_attention_heads=4, num_layers=1, vocab_size=64, "
        "multiple_of=16)\ndata = dict(seq_len=16, micro_bsz=2, total_steps=2)\n")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "torchrun")
    return subprocess.run([exe, "--standalone", "--nproc_per_node=2", str(REPO / "train.py"), *args],
                          env=env(), cwd=cwd, capture_output=True, text=True, timeout=180)


def ours_only(stderr: str) -> None:
    """One `spindle: error:` line; the only traceback is torchrun's own report of the exit codes. Both
    ranks exit 2 — unless torchrun, which stops the other workers at the first failure it sees, got to
    the slower one in the milliseconds before it exited."""
    assert stderr.count("spindle: error:") == 1, stderr
    assert "/spindle/" not in stderr and "gloo" not in stderr.lower(), stderr
    root = stderr[stderr.index("Root Cause"):]
    assert re.search(r"exitcode  : 2\b", root), stderr  # the first rank to end ended with 2
    codes = re.findall(r"exitcode  : (-?\d+)", stderr)
    assert len(codes) == 2 and set(codes) <= {"2", "-15"}, stderr


@pytest.mark.parametrize("text, key, expected", [
    ("adam = dict(lr=float('nan'))", "adam.lr", "finite number"),
    ("adam = dict(adam_eps=float('inf'))", "adam.adam_eps", "finite number"),
    ("model = dict(init_std=float('nan'))", "model.init_std", "finite number"),
    ("ckpt = dict(checkpoint_every=0.5)", "ckpt.checkpoint_every", "whole number of steps"),
    ("ckpt = dict(oss_snapshot_freq=2.5)", "ckpt.oss_snapshot_freq", "whole number of steps"),
    ("trainer = dict(seed=-1)", "trainer.seed", "greater than or equal to 0"),
    ("trainer = dict(seed=2**40)", "trainer.seed", "less than or equal to 4294967295"),
    ("trainer = dict(num_threads=10**6)", "trainer.num_threads", "more threads than cores"),
    ("model = dict(num_layers=True)", "model.num_layers", "expected an integer, not a bool"),
    ("model = dict(hidden_size='4096')", "model.hidden_size", "expected an integer, not a str"),
    ("model = dict(vocab_size=10**12)", "model.vocab_size", "less than or equal to"),
    ("hybrid_zero_optimizer = dict(clip_grad_norm=float('inf'))", "hybrid_zero_optimizer.clip_grad_norm",
     "finite number"),
    ("lr_scheduler = dict(warmup_ratio=float('nan'))", "lr_scheduler.warmup_ratio", "finite number"),
    ("monitor = dict(alert=dict(stuck_timeout_s=float('inf')))", "monitor.alert.stuck_timeout_s", "finite number"),
])
def test_every_numeric_key_is_checked(tmp_path, text, key, expected):
    path = tmp_path / "cfg.py"
    path.write_text(text + "\n")
    with pytest.raises(SpindleError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{key}:" in message and expected in message and "\n" not in message, message


def test_set_keeps_the_values_the_file_made(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("from pathlib import Path\nckpt = dict(save_ckpt_folder=Path('/data/ckpts'))\n")
    cfg = load_config(path, ["data.micro_bsz=2"])
    assert cfg.ckpt.save_ckpt_folder == "/data/ckpts"  # not "PosixPath('/data/ckpts')"
    assert cfg.data.micro_bsz == 2


def test_set_of_a_module_constant_reaches_everything_derived_from_it():
    seed = REPO / "configs" / "7B_sft.py"
    cfg = load_config(seed, ["SEQ_LEN=4096"])
    assert cfg.data.seq_len == 4096 and cfg.constants["SEQ_LEN"] == 4096
    assert load_config(seed).data.seq_len == 2048
    with pytest.raises(SpindleError, match=r"--set NOT_A_CONSTANT=1: NOT_A_CONSTANT is not assigned at the top"):
        load_config(seed, ["NOT_A_CONSTANT=1"])


def test_set_total_steps_gives_the_schedule_the_same_length():
    seed = REPO / "configs" / "7B_sft.py"
    base = load_config(seed)
    assert base.lr_scheduler.total_steps == base.data.total_steps
    cfg = load_config(seed, ["data.total_steps=20"])
    assert cfg.data.total_steps == 20 and cfg.lr_scheduler.total_steps == 20
    both = load_config(seed, ["data.total_steps=20", "lr_scheduler.total_steps=100"])
    assert both.lr_scheduler.total_steps == 100  # set explicitly: kept


def test_cuda_device_on_a_machine_without_one(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = tmp_path / "cfg.py"
    path.write_text(TINY + "trainer = dict(device='cuda', run_folder=%r)\n" % str(tmp_path))
    proc = run_cli("train", "--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("spindle: error: trainer.device='cuda' but this machine has no usable CUDA "
                                   f"device (torch {torch.__version__}); use trainer.device='auto' or 'cpu'")


@pytest.mark.dist
def test_bad_config_under_torchrun_is_said_once(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(TINY + "adam = dict(lr=float('nan'))\n")
    proc = torchrun("--config", str(path), "--launcher", "torch", cwd=tmp_path)
    assert proc.returncode != 0
    ours_only(proc.stderr)
    assert "adam.lr: Input should be a finite number (got nan)" in proc.stderr


@pytest.mark.dist
def test_refused_save_folder_under_torchrun_ends_every_rank_cleanly(tmp_path):
    folder = tmp_path / "llm_ckpts"
    (folder / "20").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, folder / "20" / "model_tp0_pp0.pt")
    (folder / "20.step").write_text("")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    path = tmp_path / "cfg.py"
    path.write_text(TINY + f"ckpt = dict(enable_save_ckpt=True, save_ckpt_folder={str(folder)!r})\n"
                    f"trainer = dict(run_folder={str(tmp_path / 'runs')!r})\n")
    proc = torchrun("--config", str(path), "--launcher", "torch", cwd=tmp_path)
    ours_only(proc.stderr)
    assert "holds checkpoints Spindle did not write" in proc.stderr
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_validate_config_accepts_inf_where_it_means_never():
    cfg = validate_config({"ckpt": {"checkpoint_every": math.inf, "oss_snapshot_freq": float("inf")}})
    assert cfg.ckpt.checkpoint_every == math.inf
