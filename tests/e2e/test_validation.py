"""Validation as InternEvo does it (issue 25 point 3), through `spindle train` / `spindle eval ppl` in this process.

- every token of the validation folder by default, the tail that does not fill a pack included, and the line says
  so ("all M tokens"); a bound only when `data.valid_max_tokens` is set, then "N of M tokens";
- val/{name}_acc beside _loss and _plex, in the console line and metrics.jsonl, the same numbers a plain forward of
  the saved weights gives;
- `eval ppl --windows-from documents` cuts its windows from inside every document (what validation evaluates at
  the training length) and says when the data holds fewer windows than asked.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import run_cli, tiny_config_text
from spindle.data.shard_writers import JsonBinWriter

SEQ = 16
DOC_ROWS = (1, 2, 1, 2, 1)  # documents of 16, 32, 16, 32, 16 tokens: 112 = 3 packs of 2 x 16 and a 16-token tail


def held_folder(root):
    folder = root / "valid" / "held"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 64, size=SEQ * rows) for rows in DOC_ROWS]
    writer = JsonBinWriter(str(folder / "v.bin"))
    for d in docs:
        writer.add([int(t) for t in d])
    writer.close()
    return docs


def train(tmp_path, *sets: str):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(tiny_config_text(tmp_path / "runs", data={"total_steps": 2, "valid_every": 2,
                                                             "valid_folder": str(tmp_path / "valid")},
                                    ckpt={"enable_save_ckpt": True, "save_ckpt_folder": str(tmp_path / "ckpt")}))
    r = run_cli("train", "--config", cfg, "--set", *sets) if sets else run_cli("train", "--config", cfg)
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return r.stdout, records[-1]


def plain_forward(ckpt, docs):
    """Loss and accuracy of every next-token label of every document, rows of SEQ tokens from each start."""
    from spindle.eval.load import load_model_for_eval

    model, _ = load_model_for_eval(str(ckpt))
    nll = hits = labels = 0.0
    with torch.no_grad():
        for doc in docs:
            for s in range(0, len(doc), SEQ):
                ids = torch.tensor(doc[s:s + SEQ])[None]
                target = torch.tensor(np.append(doc[s + 1:s + SEQ + 1], [-100] * SEQ)[:SEQ])[None]
                logits = model(ids, torch.arange(SEQ)[None]).float()
                valid = target[0] != -100
                logp = torch.log_softmax(logits[0][valid], -1)
                picked = logp.gather(1, target[0][valid][:, None]).squeeze(1)
                nll += float(-picked.double().sum())
                hits += float((picked >= logp.amax(-1)).sum())
                labels += float(valid.sum())
    return nll / labels, hits / labels


def test_the_whole_folder_with_accuracy_by_default(tmp_path):
    docs = held_folder(tmp_path)
    out, last = train(tmp_path)
    line = next(x for x in out.splitlines() if x.startswith("validation after step 1"))
    assert line.endswith("; all 112 tokens)") and "accuracy " in line, line
    assert last["val/held_tokens"] == 112 and math.isclose(last["val/held_plex"], math.exp(last["val/held_loss"]))
    loss, acc = plain_forward(tmp_path / "ckpt", docs)
    assert last["val/held_loss"] == pytest.approx(loss, rel=1e-5)  # the tail pack counted: 111 of 112 labels
    assert last["val/held_acc"] == pytest.approx(acc, abs=1e-12)
    assert f"accuracy {last['val/held_acc']:.4f}" in line

    # eval ppl at the training length: windows from inside every document, as validation cut them
    r = run_cli("eval", "ppl", "--ckpt", tmp_path / "ckpt", "--data", tmp_path / "valid" / "held", "--lengths", SEQ,
                "--variants", "plain", "--windows", 64, "--windows-from", "documents")
    assert r.returncode == 0, r.stderr
    assert "7 windows of 16 tokens, --windows-from documents" in r.stdout
    assert "--windows 64: the data holds only 7" in r.stdout
    r = run_cli("eval", "ppl", "--ckpt", tmp_path / "ckpt", "--data", tmp_path / "valid" / "held", "--lengths", SEQ,
                "--variants", "plain", "--windows", 64)
    assert "5 windows of 16 tokens, --windows-from starts (the first L tokens of each document" in r.stdout
    assert "--windows 64: the data holds only 5 (--windows-from documents cuts more" in r.stdout


def test_a_bound_only_when_set_and_then_n_of_m(tmp_path):
    held_folder(tmp_path)
    out, last = train(tmp_path, "data.valid_max_tokens=40")  # whole packs of 32: the first two
    assert "; 64 of 112 tokens)" in out and last["val/held_tokens"] == 64
    assert {"val/held_loss", "val/held_acc", "val/held_plex"} <= set(last)
