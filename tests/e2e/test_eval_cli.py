"""`spindle eval ppl`, `spindle eval passkey` and `spindle generate` end to end on a tiny trained checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def spindle(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "spindle.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Train a 2-layer byte-level model for a few steps through Spindle's Trainer; return its checkpoint."""
    from spindle.config import validate_config
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("evalcli")
    text = tmp / "text"
    text.mkdir()
    for i in range(4):
        (text / f"doc{i}.txt").write_text("def f(x):\n    return x + 1\n" * (40 + 10 * i))
    cfg = validate_config({
        "JOB_NAME": "tiny",
        "ckpt": {"enable_save_ckpt": True, "auto_resume": False},
        "data": {"type": "text", "train_folder": str(text), "text_glob": "*.txt", "tokenizer_path": "byte",
                 "seq_len": 32, "micro_bsz": 4, "total_steps": 4, "pack_sample_into_one": True},
        "model": {"hidden_size": 32, "num_attention_heads": 2, "num_kv_attention_heads": 2, "num_layers": 2,
                  "vocab_size": 258, "multiple_of": 16, "max_position_embeddings": 32},
        "trainer": {"run_folder": str(tmp / "runs"), "tensorboard": False, "progress_bar": False},
    })
    tr = Trainer(cfg, ParallelEnv(), log=lambda *_: None)
    tr.fit()
    return tmp, tr.save_dir


def test_eval_ppl_writes_json_and_png(ckpt):
    tmp, ck = ckpt
    out = tmp / "ppl"
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "text"), "--lengths", "32,64,128",
                "--variants", "plain,dynamic,yarn,logn,ntk:4", "--windows", "2", "--chunk", "48", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "ppl.json").read_text())
    assert res["train_len"] == 32 and res["lengths"] == [32, 64, 128]
    assert set(res["variants"]) == {"plain", "dynamic", "yarn", "logn", "ntk:4"}
    assert res["variants"]["dynamic"]["per_length"] and not res["variants"]["plain"]["per_length"]
    p = res["variants"]["plain"]["length"]
    # up to the training length, dynamic NTK, YaRN (factor 1) and log-n are the plain model
    for v in ("dynamic", "yarn", "logn"):
        assert abs(res["variants"][v]["length"]["32"]["nll"] - p["32"]["nll"]) < 1e-5
    assert (out / "ppl.png").stat().st_size > 10_000
    assert "perplexity over the first L tokens" in r.stdout


def test_eval_passkey_writes_grid(ckpt):
    tmp, ck = ckpt
    out = tmp / "pk"
    r = spindle("eval", "passkey", "--ckpt", str(ck), "--lengths", "256,512", "--depths", "0,0.5,1",
                "--samples", "1", "--variants", "plain,dynamic", "--mode", "teacher", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "passkey.json").read_text())
    acc = res["variants"]["plain"]["accuracy"]
    assert len(acc) == 2 and len(acc[0]) == 3 and all(0 <= a <= 1 for row in acc for a in row)
    assert (out / "passkey.png").is_file()


def test_eval_bad_input_is_one_line_exit_2(ckpt):
    tmp, ck = ckpt
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "nope"), "--out", str(tmp / "x"))
    assert r.returncode == 2 and r.stderr.strip().startswith("spindle: error:") and "nope" in r.stderr
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "text"), "--variants", "warp",
                "--out", str(tmp / "x"))
    assert r.returncode == 2 and "warp" in r.stderr


def test_generate_streams_and_accepts_sampling_options(ckpt):
    tmp, ck = ckpt
    r = spindle("generate", "--ckpt", str(ck), "--prompt", "def f(", "--max-new-tokens", "12", "--temperature", "0.8",
                "--top-k", "5", "--top-p", "0.9", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(") and len(r.stdout) > len("def f(\n")


def test_generate_with_dynamic_ntk(ckpt):
    tmp, ck = ckpt
    r = spindle("generate", "--ckpt", str(ck), "--prompt", "x" * 40, "--max-new-tokens", "8", "--rope-scaling", "dynamic")
    assert r.returncode == 0, r.stderr
