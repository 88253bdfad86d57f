"""Sizes read from files against this machine's memory (issue 22, point 7).

- A `config.json` within the schema's limits (hidden 65,536 x 4,096 layers: ~450 TiB of weights) through
  `generate`, `eval ppl`, `convert from-hf` and `train` (ckpt_type="hf"): one line naming what it needs
  and what is available, exit 2, and nothing allocated (every model is materialised with
  `Module.to_empty`, which the tests make fail: before the check, these commands allocated the 8 GB
  embedding first, then failed or were killed).
- A 4 MB single-line document through the default sentencepiece tokenizer under a 256 MiB address-space
  limit: tokenized whole it aborts (std::bad_alloc), a piece at a time it finishes; the pieces' ids
  are the whole text's.

    .venv/bin/python -m pytest tests/faults/test_resource_limits.py -q
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spindle.data.tokenizer as tokenizer_module
from spindle.cli import main as spindle
from spindle.hardware import SKIP_MEMORY_CHECK_ENV, available_memory, check_fits, refuse_unless_fits

pytestmark = [pytest.mark.faults]
REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30

HUGE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 65536,
        "intermediate_size": 65536, "num_hidden_layers": 4096, "num_attention_heads": 512,
        "num_key_value_heads": 512, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}


@pytest.fixture
def huge_hf(tmp_path, monkeypatch):
    """An HF folder whose config.json describes ~450 TiB of weights (its weight file holds one tiny
    tensor: the sizes come from the config); allocating any model from here on fails the test."""
    from safetensors.torch import save_file

    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HUGE))
    save_file({"model.norm.weight": torch.ones(4)}, str(folder / "model.safetensors"))

    def allocate(*_, **__):
        raise AssertionError("a model was allocated before its size was checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", allocate)
    monkeypatch.delenv(SKIP_MEMORY_CHECK_ENV, raising=False)
    return folder


def refused_in_one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "needs" in err and " TiB" in err and "available" in err and f"set {SKIP_MEMORY_CHECK_ENV}=1" in err, err
    return err


def test_generate_of_a_huge_config_is_refused_before_allocating(huge_hf, capsys):
    assert spindle(["generate", "--ckpt", str(huge_hf), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert "a model of 4,096 layers, hidden size 65,536 and vocabulary 32,000 needs" in refused_in_one_line(capsys)


def test_eval_ppl_of_a_huge_config_is_refused_before_allocating(huge_hf, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("hello " * 100)
    assert spindle(["eval", "ppl", "--ckpt", str(huge_hf), "--data", str(tmp_path / "doc.txt"), "--lengths", "16",
                    "--variants", "plain", "--windows", "1"]) == 2
    refused_in_one_line(capsys)


def test_convert_from_hf_of_a_huge_config_is_refused_before_allocating(huge_hf, tmp_path, capsys):
    assert spindle(["convert", "from-hf", str(huge_hf), str(tmp_path / "out")]) == 2
    refused_in_one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_training_a_huge_model_from_hf_weights_is_refused_before_allocating(huge_hf, tmp_path, capsys):
    config = tmp_path / "huge.py"
    config.write_text(f"""
JOB_NAME = "huge"
data = dict(seq_len=16, micro_bsz=1, total_steps=1)  # no model section: the folder's config.json gives it
ckpt = dict(load_ckpt_info=dict(path={str(huge_hf)!r}, content=("model",), ckpt_type="hf"), enable_save_ckpt=False)
trainer = dict(run_folder={str(tmp_path / "runs")!r}, tensorboard=False, progress_bar=False)
""")
    assert spindle(["train", "--config", str(config)]) == 2
    err = refused_in_one_line(capsys)
    assert "training model.num_layers=4,096 x model.hidden_size=65,536" in err
    assert "(weights " in err and " + grads " in err and " + optimizer " in err


def test_the_check_counts_model_state_per_process_and_has_an_override(monkeypatch):
    from spindle.errors import SpindleError

    monkeypatch.setattr("spindle.hardware.available_memory", lambda device: (10 * GIB, "this machine has 10 GiB"))
    monkeypatch.delenv(SKIP_MEMORY_CHECK_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    state = {"weights": 3 * GIB, "grads": 3 * GIB, "optimizer": 3 * GIB, "activations": 50 * GIB, "total": 59 * GIB}
    refuse_unless_fits(state, "cpu", "training")  # 9 GiB: activations (a rough figure) are not counted
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks of this machine share its memory
    with pytest.raises(SpindleError, match=r"^training needs 18.0 GiB \(weights 3.0 GiB \+ grads 3.0 GiB \+ "
                                           r"optimizer 3.0 GiB\) x 2 processes on this machine but this machine"):
        refuse_unless_fits(state, "cpu", "training")
    monkeypatch.setenv(SKIP_MEMORY_CHECK_ENV, "1")
    refuse_unless_fits(state, "cpu", "training")
    check_fits(1 << 60, "cpu", "anything")


def test_available_memory_reads_meminfo_and_the_address_space_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:    2097152 kB\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        assert available_memory("cpu", str(meminfo)) == (2 * GIB, f"this machine has 2.0 GiB available "
                                                                  f"(MemAvailable in {meminfo})")
    mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + GIB, hard))  # `ulimit -v`: what this process may still map
    try:
        have, where = available_memory("cpu", str(meminfo))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert 0.5 * GIB < have <= GIB and "the address-space limit (ulimit -v) of this process" in where


# ----------------------------------------------------------------------------- long documents

CHILD = """
import sys
import spindle.data.tokenizer as T
if sys.argv[2] == "whole":
    T.PIECE_CHARS = 1 << 62  # as before: the text handed to sentencepiece in one string
unit = "def f(x): return x + 1  # some words here and there "
text = (unit * (int(sys.argv[1]) // len(unit) + 1))[: int(sys.argv[1])]
print(len(T.load_tokenizer("default").encode(text)))
"""


def tokenize_under_limit(chars: int, how: str, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(chars), how], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))


@pytest.mark.slow
def test_a_long_single_line_document_is_tokenized_in_bounded_memory():
    chars, limit = 4_000_000, 256 << 20  # sentencepiece alone wanted ~40 bytes per character of one string
    whole = tokenize_under_limit(chars, "whole", limit)
    assert whole.returncode != 0 and ("bad_alloc" in whole.stderr or "MemoryError" in whole.stderr), whole.stderr[-500:]
    pieces = tokenize_under_limit(chars, "pieces", limit)
    assert pieces.returncode == 0, pieces.stderr[-2000:]
    assert int(pieces.stdout) > chars // 4


def tokenizers(tmp_path):
    from tests import tokenizer_folders

    load = tokenizer_module.load_tokenizer
    return {"default": load("default"), "byte": load("byte"), "qwen2 (byte-level BPE)": load(tokenizer_folders.qwen2(
        tmp_path / "qwen2")), "internlm2 (sentencepiece folder)": load(tokenizer_folders.internlm2(tmp_path / "i2"))}


def test_the_ids_of_a_long_text_are_those_of_the_whole_text(tmp_path, monkeypatch):
    """Cut every 4,096 characters (instead of every 1 MiB), at newlines, spaces and runs of them: the same
    ids as the text in one piece, for sentencepiece (whose dummy prefix would otherwise start every
    piece), byte-level BPE and bytes; in a batch too."""
    import random

    rng = random.Random(0)
    words = ["def", "f(x):", "return", "x", "+", "1", "the", "answer", "é", "日本", "  ", "\t", "\n", "\n\n", " \n",
             "42"]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "\n", "  "]) for _ in range(20_000))
    pieces = list(tokenizer_module.text_pieces(text, 4096))
    assert "".join(pieces) == text and len(pieces) > 15 and max(map(len, pieces)) <= 4096
    for name, tok in tokenizers(tmp_path).items():
        whole = tok.encode(text)
        monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 4096)
        assert tok.encode(text) == whole, name
        assert tok.encode_batch(["short", text, "text"]) == [tok.encode("short"), whole, tok.encode("text")], name
        monkeypatch.undo()


def test_a_text_without_whitespace_is_cut_at_the_bound():
    assert [len(p) for p in tokenizer_module.text_pieces("a" * 10_000 + " b", 4096)] == [4096, 4096, 1810]
