"""Data as a user prepares it: text -> tools/tokenizer.py -> train/{cn,code,en}/ + valid/<leaf>/ ->
`python train.py --config CONFIG` (its `spindle.cli.main`, in this process) -> per-source and
per-validation-set metrics in metrics.jsonl, each source's figures those of its own tokens."""

import json
import math

import torch
import torch.nn.functional as F

from helpers import tokenize
from spindle.cli import main
from spindle.model.loss import IGNORE_INDEX
from spindle.train.trainer import Trainer

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


def per_source(trainer, micro_batches) -> dict:
    """Each source's labelled tokens and mean loss in this step, from the batches' own source ids and the
    model's logits before the update (what the step's metrics must say, computed apart from them)."""
    losses, counts = {}, {}
    with torch.no_grad():
        for b in micro_batches:
            logits = trainer.raw_model(b.input_ids, b.position_ids).float()
            token_loss = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), reduction="none",
                                         ignore_index=IGNORE_INDEX)
            valid = b.labels.flatten() != IGNORE_INDEX
            for t in b.type_ids.flatten()[valid].unique().tolist():
                name = trainer.loader.source_names[t]
                mine = valid & (b.type_ids.flatten() == t)
                losses[name] = losses.get(name, 0.0) + token_loss[mine].sum().item()
                counts[name] = counts.get(name, 0) + int(mine.sum())
    return {name: (counts[name], losses[name] / counts[name]) for name in counts}


def test_source_folders_train_and_validate_end_to_end(tmp_path, monkeypatch):
    for name, text in TEXT.items():
        src = tmp_path / "raw" / f"{name}.txt"
        src.parent.mkdir(exist_ok=True)
        src.write_text(text * 20)
        tokenize(src, tmp_path / "train" / name / "part" / f"{name}.bin")
    src = tmp_path / "raw" / "held.txt"
    src.write_text(TEXT["en"] * 5)
    tokenize(src, tmp_path / "valid" / "held_en" / "held.bin")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG.format(train=str(tmp_path / "train"), valid=str(tmp_path / "valid"),
                                 run=str(tmp_path / "run")))
    expected, real_step = [], Trainer.train_step

    def step(self, micro_batches):
        expected.append(per_source(self, micro_batches))
        return real_step(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(cfg), "--launcher", "torch"]) == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "sources" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    names = {k.split("/", 1)[1] for r in lines for k in r if k.startswith("tokens/")}
    assert names == {"cn", "code", "en"}  # every source was drawn and reported under its own name
    for r, want in zip(lines, expected):
        assert {k.split("/", 1)[1] for k in r if k.startswith("tokens/")} == set(want)
        for name, (tokens, loss) in want.items():
            assert r[f"tokens/{name}"] == tokens and math.isclose(r[f"loss/{name}"], loss, rel_tol=1e-5), name
        total = sum(tokens for tokens, _ in want.values())
        assert math.isclose(r["loss"], sum(loss * tokens for tokens, loss in want.values()) / total, rel_tol=1e-5)
    assert len({round(loss, 3) for want in expected for _, loss in want.values()}) > 1  # the sources differ
    last = lines[-1]
    assert "val/held_en_loss" in last and math.isclose(last["val/held_en_plex"], math.exp(last["val/held_en_loss"]))
    assert "val/held_en_loss" not in lines[0]  # valid_every=3: after the third step only
