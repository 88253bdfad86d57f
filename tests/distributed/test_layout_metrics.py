"""Pipeline and tensor parallelism report what a single process reports: per-source loss / accuracy /
tokens of every step and the validation loss, on real source folders prepared with tools/tokenizer.py
(gloo, torchrun). Pipelines compute them on the last stage inside the schedule (validation through its
forward-only pass); tensor parallelism from vocabulary-sharded logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed.marks import layouts

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.dist

CONFIG = """
JOB_NAME = "ppm"
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps=4, train_folder={train!r}, valid_folder={valid!r},
            valid_every=2, valid_micro_num=3, min_length=4, seed=7, source_weights={{"code": 1.0, "en": 2.0}})
model = dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=4, vocab_size=1024,
             multiple_of=16, max_position_embeddings=32)
adam = dict(lr=3e-3)
ckpt = dict(enable_save_ckpt=False)
trainer = dict(seed=5, tensorboard=False, progress_bar=False, num_threads=1, log_every=1)
"""
TEXT = {
    "code": "def add(a, b):\n    return a + b\nfor i in range(10): print(i)\nwhile x < 3: x += 1\n",
    "en": "The quick brown fox jumps over the lazy dog.\nLanguage models predict the next token.\n",
}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppdata")
    for name, text, folder in [("code", TEXT["code"] * 30, "train/code"), ("en", TEXT["en"] * 30, "train/en"),
                               ("held", TEXT["en"] * 8 + TEXT["code"] * 8, "valid/held")]:
        src = root / f"{name}.txt"
        src.write_text(text)
        p = subprocess.run([sys.executable, str(ROOT / "tools" / "tokenizer.py"), "--text_input_path", str(src),
                            "--bin_output_path", str(root / folder / f"{name}.bin"), "--workers", "1"],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    cfg = root / "cfg.py"
    cfg.write_text(CONFIG.format(train=str(root / "train"), valid=str(root / "valid")))
    return cfg


def run(config: Path, folder: Path, nproc: int, overrides: list[str]) -> list[dict]:
    args = ["train.py", "--config", str(config), "--launcher", "torch", "--set", f"trainer.run_folder={folder}",
            *overrides]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return [json.loads(l) for l in (folder / "ppm" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    return run(config, tmp_path_factory.mktemp("single"), 1, [])


@pytest.mark.parametrize("name,overrides", layouts([
    ("pp2_1f1b", ["parallel.pipeline.size=2"]),
    ("pp2_interleaved", ["parallel.pipeline.size=2", "model.num_chunks=2"]),
    ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=True"]),
    ("pp2_cp2", ["parallel.pipeline.size=2", "parallel.context=2"]),  # 4 processes
]))
def test_layout_reports_sources_and_validation(config, reference, tmp_path, name, overrides):
    records = run(config, tmp_path / name, 4 if "cp2" in name else 2, overrides)
    assert [r["step"] for r in records] == [r["step"] for r in reference] == [0, 1, 2, 3]
    def reported(record):
        return {k for k in record if k.split("/")[0] in ("loss", "acc", "tokens")}

    assert {"loss/code", "loss/en", "tokens/code", "tokens/en"} <= set().union(*map(reported, reference))
    for ours, ref in zip(records, reference):
        assert reported(ours) == reported(ref)
        for k in reported(ref):
            assert ours[k] == pytest.approx(ref[k], abs=1e-4), (ours["step"], k)
    # validation after steps 2 and 4 (valid_every=2): 3 micro-batches through a 2-micro-batch schedule
    val = [(r["step"], r["val/held_loss"]) for r in records if "val/held_loss" in r]
    ref_val = [(r["step"], r["val/held_loss"]) for r in reference if "val/held_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in ref_val] == [1, 3]
    for (_, a), (_, b) in zip(val, ref_val):
        assert a == pytest.approx(b, abs=1e-4)
    assert ref_val[1][1] < ref_val[0][1]  # it learns the held-out text's statistics
