"""Issue 25 point 1: the tokenizer that made a run's ids travels with it (spindle/data/tokenizer_identity.py).

Each case is what a user typed when it went wrong: data made by tools/tokenizer.py with a Hugging Face
tokenizer folder, trained without data.tokenizer_path, exported by `convert to-hf` (it wrote Spindle's
packaged 1024-piece tokenizer, or below 1024 ids none); sources prepared with two tokenizers trained
together; a resume on data of another tokenizer; `convert from-hf`'s hint dropping the tokenizer;
`spindle generate` with a padded vocabulary (IndexError from sentencepiece, ids silently gone with HF).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spindle.data.tokenizer import load_tokenizer
from tests import tokenizer_folders as hub
from tests.helpers import TINY, run_cli, tiny_config_text, tiny_raw, tokenize

TEXTS = ["def add(a, b):\n    return a + b\n", "Hello world, this is a tiny corpus.\n",
         "user question 3: what is 3 plus 3? the answer is 6.\n"]


def prepared(tmp_path: Path, folder: str, tokenizer) -> Path:
    """data/{folder}/output.bin made by tools/tokenizer.py with `tokenizer`, as the seed's guide does it."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t * 20}) + "\n" for t in TEXTS))
    out = tmp_path / "data" / folder / "output.bin"
    tokenize(raw, out, "--tokenizer", str(tokenizer))
    return out


def config(tmp_path: Path, name: str, **data) -> Path:
    """A tiny run (vocab 512: padded beyond both test tokenizers) that saves its final step; a declared MFU peak
    (no CPU probe: seconds)."""
    path = tmp_path / f"{name}.py"
    path.write_text(tiny_config_text(tmp_path / "runs", JOB_NAME=name, model={"vocab_size": 512},
                                     data={"total_steps": 1, **data}, ckpt={"enable_save_ckpt": True},
                                     trainer={**TINY["trainer"], "peak_tflops": 1.0}))
    return path


def one_line(result, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for needle in needles:
        assert needle in line, line
    return line


def test_tokenizer_tool_and_prepare_record_the_tokenizer_beside_their_output(tmp_path):
    qwen = hub.qwen2(tmp_path / "qwen")
    out = prepared(tmp_path, "cn", qwen)
    # the seed's two files, as they were, and the record beside them
    assert sorted(p.name for p in out.parent.iterdir()) == ["output.bin", "output.bin.meta",
                                                            "output.bin.tokenizer.json"]
    assert json.loads(out.read_text().splitlines()[0]).keys() == {"tokens"}
    record = json.loads((out.parent / "output.bin.tokenizer.json").read_text())
    assert record.pop("format") == "spindle-tokenizer-identity-1"
    assert record == load_tokenizer(qwen).identity() and record["path"] == str(qwen / "tokenizer.json")
    # spindle prepare: the manifest records it, with a path that finds it again from anywhere
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text(TEXTS[0] * 5)
    r = run_cli("prepare", "raw", "--out", "shards", "--tokenizer", "qwen", "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["tokenizer"]["path"] == str(qwen / "tokenizer.json")


def test_training_records_the_data_tokenizer_and_to_hf_exports_it(tmp_path):
    """Before: `tokenizer: default`, and (the model's 512 ids < the packaged 1024) no tokenizer at all."""
    qwen = hub.qwen2(tmp_path / "qwen")
    prepared(tmp_path, "cn", qwen)
    r = run_cli("train", "--config", config(tmp_path, "a", train_folder="data"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    step = tmp_path / "runs" / "a" / "ckpt" / "1"
    record = json.loads((step / "tokenizer_identity.json").read_text())
    assert record["sha256"] == load_tokenizer(qwen).identity()["sha256"]
    completion = json.loads((step.parent / "1.step").read_text())
    assert "sha256" in completion["files"]["tokenizer_identity.json"]  # a changed record is a damaged checkpoint

    r = run_cli("convert", "to-hf", step.parent, tmp_path / "hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"tokenizer: {qwen / 'tokenizer.json'} (recorded in" in r.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (qwen / name).read_bytes(), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == load_tokenizer(qwen).eos_id

    # --tokenizer must name the same tokenizer; a moved one is found again by --tokenizer, never by a default
    one_line(run_cli("convert", "to-hf", step.parent, tmp_path / "x", "--tokenizer", "default"),
             "--tokenizer default", "is not the tokenizer the model was trained with")
    qwen.rename(tmp_path / "moved")
    one_line(run_cli("convert", "to-hf", step.parent, tmp_path / "x"), "whose file is gone", "--tokenizer")
    r = run_cli("convert", "to-hf", step.parent, tmp_path / "x", "--tokenizer", tmp_path / "moved")
    assert r.returncode == 0 and (tmp_path / "x" / "tokenizer.json").is_file(), r.stderr


def test_to_hf_refuses_a_checkpoint_whose_tokenizer_is_unknown(tmp_path):
    """Random data and no data.tokenizer_path: before, the packaged tokenizer was written silently."""
    from spindle.checkpoint.manager import save_weights_checkpoint
    from spindle.config import validate_config
    from spindle.model.llama import build_model

    cfg = validate_config(tiny_raw(tmp_path, model={"vocab_size": 1024}))
    save_weights_checkpoint(str(tmp_path / "ck"), 1, build_model(cfg.model.to_args(), "cpu"), cfg.to_dict())
    one_line(run_cli("convert", "to-hf", tmp_path / "ck", tmp_path / "hf"),
             "does not record which tokenizer", "--tokenizer PATH")
    assert not (tmp_path / "hf").exists()
    r = run_cli("convert", "to-hf", tmp_path / "ck", tmp_path / "hf", "--tokenizer", "default")
    assert r.returncode == 0 and "tokenizer: default (--tokenizer)" in r.stdout, r.stderr


def test_a_tokenizer_mismatch_is_one_line_naming_both(tmp_path):
    qwen, internlm = hub.qwen2(tmp_path / "qwen"), hub.internlm2(tmp_path / "internlm")
    cn = prepared(tmp_path, "mixed/cn", qwen)
    en = prepared(tmp_path, "mixed/en", internlm)
    # two sources of one run (before: trained together, the same id meaning two things)
    one_line(run_cli("train", "--config", config(tmp_path, "m", train_folder="data/mixed"), cwd=tmp_path),
             f"{cn}.tokenizer.json".replace(str(tmp_path) + "/", ""), "internlm/tokenizer.model",
             "different tokenizers")
    # the data and data.tokenizer_path
    one_line(run_cli("train", "--config", config(tmp_path, "t", train_folder="data/mixed/cn",
                                                 tokenizer_path="internlm"), cwd=tmp_path),
             "data.tokenizer_path internlm", "qwen/tokenizer.json", "is not the tokenizer")
    # a checkpoint and the data it resumes on
    assert run_cli("train", "--config", config(tmp_path, "r", train_folder="data/mixed/cn"),
                   cwd=tmp_path).returncode == 0
    resume = config(tmp_path, "r", train_folder="data/mixed/en")
    resume.write_text(resume.read_text() + "ckpt = {'enable_save_ckpt': True, 'auto_resume': True}\n")
    one_line(run_cli("train", "--config", resume, cwd=tmp_path), "r/ckpt/1/tokenizer_identity.json",
             "the checkpoint was trained with hf tokenizer", f"{en.name}.tokenizer.json")


def test_from_hf_hint_keeps_the_folders_tokenizer_and_the_export_carries_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = hub.qwen2(tmp_path / "src")
    cfg = transformers.Qwen2Config(vocab_size=416, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(src))
    r = run_cli("convert", "from-hf", src, tmp_path / "ck")
    assert r.returncode == 0, r.stderr
    assert f"data = dict(tokenizer_path={str(src.resolve())!r})" in r.stdout  # before: the hint had no data line
    assert (tmp_path / "ck" / "0" / "tokenizer_identity.json").is_file()
    r = run_cli("convert", "to-hf", tmp_path / "ck", tmp_path / "back")
    assert r.returncode == 0 and "recorded in" in r.stdout, r.stderr
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_generate_never_samples_an_id_the_tokenizer_lacks(tmp_path):
    """A 512-id model read with a 320-piece sentencepiece tokenizer, sampled hot: before, `IndexError: piece id
    is out of range` from sentencepiece (and with an HF tokenizer the ids silently vanished)."""
    from spindle.checkpoint.manager import save_weights_checkpoint
    from spindle.config import validate_config
    from spindle.data.tokenizer_identity import Recorded, checkpoint_files
    from spindle.model.llama import build_model

    internlm = hub.internlm2(tmp_path / "internlm")
    cfg = validate_config(tiny_raw(tmp_path, model={"vocab_size": 512}))
    record = checkpoint_files(Recorded(load_tokenizer(internlm).identity(), "test"))
    save_weights_checkpoint(str(tmp_path / "ck"), 1, build_model(cfg.model.to_args(), "cpu"), cfg.to_dict(),
                            records=record)
    for seed in range(3):
        r = run_cli("generate", "--ckpt", tmp_path / "ck", "--prompt", "hello", "--max-new-tokens", "24",
                    "--temperature", "5", "--seed", str(seed))  # the checkpoint's tokenizer, not the packaged one
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == (f"note: the model's vocabulary (512) is padded beyond the tokenizer "
                                    f"{internlm / 'tokenizer.model'} (a vocabulary of 320): ids 320 .. 511 have "
                                    f"no token and are never sampled")
