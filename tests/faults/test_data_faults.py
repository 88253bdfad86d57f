"""Faults in data files under real processes.

- A shard truncated while `spindle train` reads it: exit 2 and one line naming the file, never SIGBUS.
- Symlink loops under the data folder: `spindle prepare` and `spindle train` finish, each file read once.
- Two processes building the same raw-text cache at once: one builds, the other waits, both train.

    .venv/bin/python -m pytest tests/faults/test_data_faults.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spindle.data.prepare import prepare

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # real training processes, each test
REPO = Path(__file__).resolve().parents[2]

CONFIG = """
JOB_NAME = "data"
data = dict(seq_len=32, micro_num=1, micro_bsz=2, total_steps={steps}, train_folder={train!r}, type={kind!r},
            tokenizer_path="byte", text_glob="**/*.txt")
model = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=1, vocab_size=258,
             multiple_of=16, max_position_embeddings=32)
adam = dict(lr=1e-2)
ckpt = dict(enable_save_ckpt=False, save_final=False)
trainer = dict(run_folder={run!r}, tensorboard=False, progress_bar=False, log_every=1, num_threads=1)
"""


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))


def write_config(tmp: Path, train: Path, steps: int, kind: str = "tokenized", name: str = "cfg.py") -> Path:
    cfg = tmp / name
    cfg.write_text(CONFIG.format(steps=steps, train=str(train), kind=kind, run=str(tmp / ("run-" + cfg.stem))))
    return cfg


def train_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "spindle.cli", "train", "--config", str(cfg)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def corpus(folder: Path, n_files: int = 2, lines: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        (folder / f"part{k}.txt").write_text("".join(f"file {k} line {i}: the quick brown fox\n" for i in range(lines)))
    return folder


def test_shard_truncated_while_training_is_one_clear_error(tmp_path):
    shards = tmp_path / "train"
    prepare([str(corpus(tmp_path / "raw"))], str(shards), "byte", workers=1, progress=False)
    shard = shards / "shard-00000.tokens"
    cfg = write_config(tmp_path, shards, steps=100_000)
    metrics = tmp_path / "run-cfg" / "data" / "metrics.jsonl"
    proc = subprocess.Popen(train_cmd(cfg), env=child_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        os.truncate(shard, shard.stat().st_size // 3)  # what a concurrent `prepare --overwrite` or a full disk does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])  # SIGBUS would be -7 (shell: 135)
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1 and str(shard) in errors[0] and "truncated" in errors[0], err[-3000:]


def loops(folder: Path) -> None:
    """Two symlink loops: one to the folder itself, one from a sub-folder back to its parent."""
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "deep.txt").write_text("deep file line one\ndeep file line two\n")
    os.symlink(".", folder / "self")
    os.symlink("..", folder / "sub" / "up")


def test_symlink_loops_never_hang_nor_duplicate(tmp_path):
    raw = corpus(tmp_path / "raw", lines=20)
    loops(raw)
    p = subprocess.run([sys.executable, "-m", "spindle.cli", "prepare", str(raw), "--out", str(tmp_path / "shards"),
                        "--tokenizer", "byte", "--workers", "1"], env=child_env(), cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    man = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert man["documents"] == 2 * 20 + 2  # every real line once: two parts and the deep file
    assert sorted(os.path.relpath(s, raw) for s in man["sources"]) == ["part0.txt", "part1.txt", "sub/deep.txt"]
    # the token folder with loops, and the raw-text folder with loops, both train
    loops(tmp_path / "shards")
    for kind, folder in (("tokenized", tmp_path / "shards"), ("text", raw)):
        cfg = write_config(tmp_path, folder, steps=2, kind=kind, name=f"{kind}.py")
        t = subprocess.run(train_cmd(cfg), env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert t.returncode == 0, (kind, t.stderr[-2000:])


RACE = """
import logging, sys, time
from pathlib import Path
from spindle.config import DataConfig
from spindle.data.loader import text_cache
logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="%(message)s")  # its build line, on stdout
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
data = DataConfig(type="text", train_folder=sys.argv[1], tokenizer_path="byte")
print(text_cache(data, Path(sys.argv[2])))
"""


def test_two_processes_build_the_text_cache_once(tmp_path):
    raw = corpus(tmp_path / "raw", n_files=40, lines=400)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(raw), str(tmp_path / "cache"), str(go)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(3)  # both imported and waiting
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    outs = [out.strip().splitlines() for out, _ in results]
    assert outs[0][-1] == outs[1][-1]  # the same cache folder
    assert sum(any("tokenizing" in line for line in o) for o in outs) == 1  # built by one of them
    cache = Path(outs[0][-1])
    man = json.loads((cache / "text" / "manifest.json").read_text())
    assert man["documents"] == 40
    assert [p.name for p in cache.parent.iterdir() if ".partial-" in p.name] == []  # no staged folder left
