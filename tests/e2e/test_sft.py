"""SFT end to end: tools/alpaca_tokenizer.py -> masks -> labels -> a loss over response tokens only."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spindle.config import DataConfig, validate_config
from spindle.data.loader import build_train_loader
from spindle.data.shard_writers import ShardWriter, write_manifest
from spindle.data.shards import open_documents
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
ALPACA = [
    {"instruction": f"Give word {i}", "input": "please" if i % 2 else "", "output": f"word{i} is {'z' * (i % 5)}"}
    for i in range(10)
]
SEQ, BSZ = 48, 2


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    (tmp / "alpaca.json").write_text(json.dumps(ALPACA))
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "alpaca_tokenizer.py"), str(tmp / "alpaca.json"),
                        str(tmp / "out"), "byte", "--split_ratio", "0.1"], capture_output=True, text=True, cwd=tmp)
    assert p.returncode == 0, p.stderr
    return tmp / "out"


def data_cfg(folder):
    return DataConfig(train_folder=str(folder), seq_len=SEQ, micro_bsz=BSZ, micro_num=2, seed=1)


def expected_labels(raw_docs):
    """InternEvo's rule per document: label j = token j+1 if that token is positive, else -100; -100 at the end."""
    out = []
    for r in raw_docs:
        out += [t if t > 0 else -100 for t in r[1:]] + [-100]
    return out


def test_tool_layout_and_labels_follow_the_mask(sft_dir):
    train, valid = sft_dir / "train" / "en" / "dataset.bin", sft_dir / "valid" / "en" / "dataset.bin"
    assert train.is_file() and Path(str(train) + ".meta").is_file() and valid.is_file()
    assert (len(open_documents(str(train))), len(open_documents(str(valid)))) == (9, 1)
    loader = build_train_loader(data_cfg(sft_dir / "train"), 258, sft_dir / "cache", prefetch=False)
    assert loader.source_names == ["en"]
    packed = loader.packed[0]
    raw = [json.loads(line)["tokens"] for line in train.read_text().splitlines()]
    order = packed.order.tolist()
    stream_raw = [raw[k] for k in order]
    want_ids = [abs(t) for r in stream_raw for t in r]
    want_labels = expected_labels(stream_raw)
    got_ids = np.concatenate([packed[i].input_ids.ravel() for i in range(len(packed))]).tolist()
    got_labels = np.concatenate([packed[i].labels.ravel() for i in range(len(packed))]).tolist()
    n = len(got_ids)
    assert n == len(packed) * SEQ * BSZ and got_ids == want_ids[:n]
    # a row edge inside a document keeps the real next label; only document ends and prompts are -100
    assert got_labels == want_labels[:n]
    # every prompt byte is masked, every response byte is trained
    for r in stream_raw:
        text_prompt = bytes(-t for t in r if t < 0).decode()
        assert text_prompt.startswith("<|User|>:") and text_prompt.endswith("<|Bot|>:")
        assert bytes(t for t in r[1:-1] if t > 0).decode().endswith("\n")


def test_internevo_negative_id_file_with_int32_meta(tmp_path):
    """A file as InternEvo writes it: negative prompt ids, id 0 in a prompt, int32 (N, 2) meta."""
    docs = [[1, -5, -6, 7, 8, 2], [1, -9, 0, 11, 2]]
    lines = [(json.dumps({"tokens": d}) + "\n").encode() for d in docs]
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "x.bin").write_bytes(b"".join(lines))
    meta = np.array([(0, len(docs[0])), (len(lines[0]), len(docs[1]))], dtype=np.int32)
    np.save(tmp_path / "en" / "x.bin.meta", meta)
    (tmp_path / "en" / "x.bin.meta.npy").rename(tmp_path / "en" / "x.bin.meta")
    toks, mask = open_documents(str(tmp_path / "en" / "x.bin"))[1]
    assert toks.tolist() == [1, 9, 0, 11, 2] and mask.tolist() == [True, False, False, True, True]
    data = DataConfig(train_folder=str(tmp_path), seq_len=11, micro_bsz=1, micro_num=1, seed=1)
    loader = build_train_loader(data, 64, tmp_path / "cache", prefetch=False)
    packed = loader.packed[0]
    p = packed[0]
    stream = [docs[k] for k in packed.order.tolist()]
    assert p.input_ids.ravel().tolist() == [abs(t) for d in stream for t in d]
    assert p.labels.ravel().tolist() == expected_labels(stream)
    assert sorted(expected_labels(docs)) == sorted([-100] * 5 + [7, 8, 2, 11, 2, -100])


def tiny_trainer(tmp_path):
    cfg = validate_config({
        "JOB_NAME": "sft",
        "data": {"seq_len": SEQ, "micro_bsz": BSZ, "micro_num": 2, "total_steps": 2},
        "model": {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 1,
                  "vocab_size": 258, "multiple_of": 16, "max_position_embeddings": SEQ},
        "adam": {"lr": 1e-2}, "lr_scheduler": {"warmup_ratio": 0.0}, "ckpt": {"enable_save_ckpt": False},
        "trainer": {"run_folder": str(tmp_path), "tensorboard": False, "progress_bar": False, "seed": 5},
    })
    return Trainer(cfg, ParallelEnv())


def step_loss(tmp_path, batch):
    """The loss train_step reports (computed before its update) of a freshly initialised model."""
    return tiny_trainer(tmp_path).train_step([mb.map(torch.clone) for mb in batch])["loss"]


def test_loss_depends_on_response_tokens_not_prompt_labels(sft_dir, tmp_path):
    loader = build_train_loader(data_cfg(sft_dir / "train"), 258, sft_dir / "cache", prefetch=False)
    batch = loader.next_step(0)
    prompt = [mb.labels == -100 for mb in batch]
    assert all(p.any() and (~p).any() for p in prompt)
    base = step_loss(tmp_path, batch)

    # the reported loss is the mean cross-entropy over the response targets alone
    model = tiny_trainer(tmp_path).raw_model
    with torch.no_grad():
        tot, cnt = 0.0, 0
        for mb in batch:
            logits = model(mb.input_ids, mb.position_ids).float()
            keep = mb.labels != -100
            tot += F.cross_entropy(logits[keep], mb.labels[keep], reduction="sum").item()
            cnt += int(keep.sum())
    assert base == pytest.approx(tot / cnt, rel=1e-5)

    # what the prompt positions would predict (their unmasked next tokens, or any other ids) never reaches
    # the loss: the mask turns every one of them into -100, whatever the values were
    gen = torch.Generator().manual_seed(0)
    for _ in range(1):
        other = [torch.where(p, torch.randint(0, 258, p.shape, generator=gen), mb.labels)
                 for p, mb in zip(prompt, batch)]
        remasked = [replace(mb, labels=torch.where(p, torch.full_like(o, -100), o))
                    for p, mb, o in zip(prompt, batch, other)]
        assert step_loss(tmp_path, remasked) == base
        # had they been trained (no mask), the loss would change
        assert (step_loss(tmp_path, [replace(mb, labels=o) for mb, o in zip(batch, other)])
                != pytest.approx(base, rel=1e-4))

    # changing response tokens changes the loss
    changed = list(batch)
    lab = changed[0].labels.clone()
    j = int(torch.nonzero(lab.view(-1) != -100)[0])
    lab.view(-1)[j] = (lab.view(-1)[j] + 1) % 256
    changed[0] = replace(changed[0], labels=lab)
    assert step_loss(tmp_path, changed) != pytest.approx(base, rel=1e-6)


def test_explicit_mask_shard_equals_negative_id_file(sft_dir, tmp_path):
    """The same SFT data as a Spindle binary shard with an explicit .mask gives the same batches and loss."""
    src = open_documents(str(sft_dir / "train" / "en" / "dataset.bin"))
    (tmp_path / "shards" / "en").mkdir(parents=True)
    w = ShardWriter(str(tmp_path / "shards" / "en"), "part", 258, with_loss_mask=True)
    for i in range(len(src)):
        toks, mask = src[i]
        w.add(toks, mask)
    write_manifest(str(tmp_path / "shards" / "en"), None, [w.close()])
    a = build_train_loader(data_cfg(sft_dir / "train"), 258, tmp_path / "c1", prefetch=False).next_step(0)
    b = build_train_loader(data_cfg(tmp_path / "shards"), 258, tmp_path / "c2", prefetch=False).next_step(0)
    for x, y in zip(a, b):
        assert all(torch.equal(getattr(x, k), getattr(y, k))
                   for k in ("input_ids", "labels", "position_ids", "type_ids"))
    assert step_loss(tmp_path, a) == step_loss(tmp_path, b)
