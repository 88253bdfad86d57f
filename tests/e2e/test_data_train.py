"""Data as a user prepares it: text -> tools/tokenizer.py -> train/{cn,code,en}/ + valid/<leaf>/ ->
`python train.py --config CONFIG` -> per-source and per-validation-set metrics in metrics.jsonl."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
JOB_NAME = "sources"
TRAIN_FOLDER = {train!r}
VALID_FOLDER = {valid!r}
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps=3, train_folder=TRAIN_FOLDER,
            valid_folder=VALID_FOLDER, valid_every=3, valid_micro_num=1, min_length=4, seed=7,
            source_weights={{"cn": 1.0, "code": 1.0, "en": 2.0}})
model = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=1, vocab_size=1024,
             multiple_of=16, max_position_embeddings=32)
adam = dict(lr=1e-2)
ckpt = dict(enable_save_ckpt=False)
trainer = dict(run_folder={run!r}, tensorboard=False, progress_bar=False, log_every=1)
"""

TEXT = {
    "cn": "今天天气很好，我们去公园散步。\n学习语言模型需要很多数据。\n",
    "code": "def add(a, b):\n    return a + b\nfor i in range(10): print(i)\n",
    "en": "The quick brown fox jumps over the lazy dog.\nLanguage models predict the next token.\n",
}


def tokenize(src: Path, out: Path):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "tokenizer.py"), "--text_input_path", str(src),
                        "--bin_output_path", str(out), "--workers", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_source_folders_train_and_validate_end_to_end(tmp_path):
    for name, text in TEXT.items():
        src = tmp_path / "raw" / f"{name}.txt"
        src.parent.mkdir(exist_ok=True)
        src.write_text(text * 20)
        tokenize(src, tmp_path / "train" / name / "part" / f"{name}.bin")
    src = tmp_path / "raw" / "held.txt"
    src.write_text(TEXT["en"] * 5)
    tokenize(src, tmp_path / "valid" / "held_en" / "held.bin")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG.format(train=str(tmp_path / "train"), valid=str(tmp_path / "valid"), run=str(tmp_path / "run")))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--launcher", "torch"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(l) for l in (tmp_path / "run" / "sources" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    keys = set().union(*lines)
    names = {k.split("/", 1)[1] for k in keys if k.startswith("tokens/")}
    assert names and names <= {"cn", "code", "en"}
    for r in lines:
        per = [n for n in names if f"tokens/{n}" in r]
        total = sum(r[f"tokens/{n}"] for n in per)
        assert math.isclose(r["loss"], sum(r[f"loss/{n}"] * r[f"tokens/{n}"] for n in per) / total, rel_tol=1e-6)
    last = lines[-1]
    assert "val/held_en_loss" in last and math.isclose(last["val/held_en_plex"], math.exp(last["val/held_en_loss"]))
    assert "val/held_en_loss" not in lines[0]  # valid_every=3: after the third step only
