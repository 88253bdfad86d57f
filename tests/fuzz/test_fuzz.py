"""Fuzzing with hypothesis: every target searches FUZZ_EXAMPLES new inputs each run from a fresh seed and
replays the corpus of inputs that once failed (tests/fuzz/fuzzing.py: budget, seed, corpus); the only
exception allowed out of a target is the project's own `SpindleError` (one clear line). Anything else is a
bug in the reader/loader.

Targets: the config loader (dicts, `--set` overrides, Python config files), the tokenizer tool
(tools/tokenizer.py on generated input files; tokenizer files), the `.bin`/`.bin.meta` and binary
shard readers, the checkpoint loader (mutated DCP checkpoints), the trainer-state file (generated JSON
read back into the loader and the loss scaler; those two in test_fuzz_checkpoint.py). Each target is a factory:
given a scratch folder, it returns
the function one case runs through, for the search and for the corpus alike.

    .venv/bin/python -m pytest tests/fuzz -m fuzz -q          # FUZZ_EXAMPLES=100000 for a long search
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from fuzzing import MUTATIONS, corpus, mutate, run_target, search
from helpers import tokenizer_tool

pytestmark = pytest.mark.fuzz

# --------------------------------------------------------------------------- 1. config loader

SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70000)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["torch.float16", "torch.bfloat16", "local:/x", "boto3:s3://b/p", "1-5,9", "auto",
                              "feishu", "slack", "json", "mtp", "isp", "dynamic", "cut", "streaming", "hf", "all",
                              "model", "fsdp", "1F1B", "inf", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _schema():
    from pydantic import BaseModel

    from spindle.config import SpindleConfig

    def keys(model, depth=0):
        out = {}
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type)
                        and issubclass(c, BaseModel)), None)
            out[name] = keys(sub, depth + 1) if sub is not None and depth < 3 else None
        return out

    return keys(SpindleConfig)


SCHEMA = _schema()


@st.composite
def raw_configs(draw, schema=None, depth=0):
    schema = SCHEMA if schema is None else schema
    out = {}
    names = sorted(schema)
    for name in draw(st.lists(st.sampled_from(names), max_size=4 if depth else 6, unique=True)):
        sub = schema[name]
        if sub is not None and draw(st.integers(0, 3)):
            out[name] = draw(raw_configs(sub, depth + 1))
        else:
            out[name] = draw(VALUES)
    if draw(st.integers(0, 9)) == 0:  # unknown / misspelt keys
        out[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
    return out


CONFIG_CASE = st.one_of(
    st.tuples(st.just("dict"), raw_configs()),
    st.tuples(st.just("override"), st.lists(st.text(max_size=30) | st.builds(
        lambda k, v: f"{k}={v}", st.sampled_from(["data.micro_bsz", "model.dtype", "adam.lr", "ckpt.checkpoint_every",
                                                  "parallel.tensor", "model.rope_scaling", "data", "x.y.z"]),
        st.text(max_size=12)), max_size=3)),
    st.tuples(st.just("file"), st.tuples(raw_configs(), st.text(max_size=40))),
)


def config_target(work: Path):
    from spindle.config import apply_overrides, load_config, validate_config

    cfg_file = work / "fuzz_config.py"

    def one(kind, case):
        if kind == "dict":
            validate_config(case, "<fuzz>")
        elif kind == "override":
            validate_config(apply_overrides({}, case), "<fuzz>")
        else:
            raw, junk = case
            lines = [f"{k} = {v!r}" for k, v in raw.items()]
            if junk:
                lines.insert(len(lines) // 2, junk)
            cfg_file.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
            load_config(cfg_file)

    return one


@pytest.mark.slow  # the search: FUZZ_EXAMPLES cases
def test_fuzz_config_loader(work):
    search("config", config_target(work), CONFIG_CASE)


# --------------------------------------------------------------------------- 2. tokenizer tool

TEXTS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=120).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.one_of(st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=30)),
                       st.builds(lambda v: json.dumps({"text": v}), VALUES),
                       st.builds(json.dumps, VALUES), st.text(max_size=20)), max_size=5)
    .map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
)
TOKENIZER_CASE = st.tuples(
    st.sampled_from([".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".json.gz", ".md"]),
    TEXTS, st.booleans(), st.booleans(), st.sampled_from(["text", "content", ""]),
    st.sampled_from(["byte", "byte", "byte", "tokfile.model", "tokfile.json", "tokdir"]),
)


def tokenizer_target(work: Path):
    tool = tokenizer_tool()  # tools/tokenizer.py
    d = work / "tok"
    d.mkdir(exist_ok=True)
    (d / "tokdir").mkdir(exist_ok=True)
    sink = io.StringIO()

    def one(ext, data, gz_valid, raw_json_line, key, tok):
        src = d / f"input{ext}"
        for old in d.glob("input*"):
            old.unlink()
        if ext.endswith(".gz"):  # valid gzip, gzip with a flipped byte in the stream, or not gzip at all
            data = gzip.compress(data) if gz_valid else (mutate(gzip.compress(data), [("flip", len(data) % 7 + 10, 1)])
                                                         if raw_json_line else data)
        src.write_bytes(data)
        if tok != "byte":  # a tokenizer file of garbage (the same bytes)
            target = d / "tokdir" / "tokenizer.json" if tok == "tokdir" else d / tok
            target.write_bytes(data)
            tok = str(d / tok)
        argv = ["--text_input_path", str(src), "--bin_output_path", str(d / "out.bin"), "--tokenizer", tok,
                "--workers", "1", "--overwrite"]
        if key:
            argv += ["--text_key", key]
        if raw_json_line:
            argv.append("--raw_json_line")
        sink.seek(0)
        sink.truncate()
        with redirect_stdout(sink), redirect_stderr(sink):
            rc = tool.main(argv)
        assert rc in (0, 2), rc
        if rc == 2:
            assert sink.getvalue().startswith("spindle: error: "), sink.getvalue()
        else:  # what it wrote reads back
            from spindle.data.shards import open_documents

            src_docs = open_documents(str(d / "out.bin"))
            assert len(src_docs) >= 1

    return one


@pytest.mark.slow  # the search: FUZZ_EXAMPLES cases
def test_fuzz_tokenizer_tool(work):
    search("tokenizer", tokenizer_target(work), TOKENIZER_CASE)


# --------------------------------------------------------------------------- 3. shard readers


def _valid_jsonbin(docs: list[list[int]]) -> tuple[bytes, np.ndarray]:
    lines, meta, off = [], [], 0
    for d in docs:
        line = (json.dumps({"tokens": d}) + "\n").encode()
        meta.append((off, len(d)))
        lines.append(line)
        off += len(line)
    return b"".join(lines), np.array(meta, dtype=np.int64).reshape(-1, 2)


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


DOCS = st.lists(st.lists(st.integers(-300, 70000), min_size=0, max_size=8), min_size=0, max_size=5)
ARRAYS = st.one_of(
    st.lists(st.integers(-2**40, 2**40), max_size=8).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.integers(-5, 40), max_size=8).map(lambda v: np.array(v, dtype=np.int32).reshape(-1, 2)
                                                   if len(v) % 2 == 0 else np.array(v, dtype=np.int32)),
    st.lists(st.floats(), max_size=6).map(lambda v: np.array(v)),
    st.just(np.zeros((0, 2), dtype=np.int64)), st.just(np.zeros((2, 3), dtype=np.uint8)),
)
SHARD_CASE = st.tuples(
    st.sampled_from(["jsonbin", "shard"]), DOCS,
    st.sampled_from(["valid", "mutate_data", "mutate_index", "random_index", "garbage_index", "both"]),
    MUTATIONS, MUTATIONS, ARRAYS, st.sampled_from([None, 64, 258, 70000]), st.sampled_from(["raise", "skip"]),
    st.sampled_from(["none", "mask", "bad_mask", "manifest", "bad_manifest"]),
)


def shards_target(work: Path):
    from spindle.data.shards import open_documents

    d = work / "shards"

    def one(kind, docs, how, data_ops, idx_ops, arr, vocab, on_error, extra):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        docs = [[abs(t) for t in doc] for doc in docs] if kind == "shard" else docs
        if kind == "jsonbin":
            data, index = _valid_jsonbin(docs)
            path, data_p, idx_p = d / "x.bin", d / "x.bin", d / "x.bin.meta"
        else:
            flat = np.array([t for doc in docs for t in doc], dtype=np.int64)
            dtype = "<u4" if flat.size and flat.max() > 65535 else "<u2"
            data = flat.astype(dtype).tobytes()
            index = np.cumsum([0] + [len(x) for x in docs]).astype(np.int64)
            path, data_p, idx_p = d / "x.tokens", d / "x.tokens", d / "x.idx.npy"
            n = int(index[-1])
            if extra in ("mask", "bad_mask"):
                mask = np.packbits(np.ones(n, dtype=bool), bitorder="little").tobytes()
                (d / "x.mask").write_bytes(mutate(mask, data_ops) if extra == "bad_mask" else mask)
            elif extra in ("manifest", "bad_manifest"):
                man = {"format": "spindle-shards", "version": 1, "dtype": dtype,
                       "shards": [{"name": "x", "dtype": dtype}]}
                text = json.dumps(man).encode()
                (d / "manifest.json").write_bytes(mutate(text, idx_ops) if extra == "bad_manifest" else text)
        idx_bytes = _npy(index)
        if how in ("mutate_data", "both"):
            data = mutate(data, data_ops)
        if how in ("mutate_index", "both"):
            idx_bytes = mutate(idx_bytes, idx_ops)
        elif how == "random_index":
            idx_bytes = _npy(arr)
        elif how == "garbage_index":
            idx_bytes = mutate(b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                               idx_ops)
        data_p.write_bytes(data)
        idx_p.write_bytes(idx_bytes)
        src = open_documents(str(path), vocab, on_error)
        assert len(src) == len(src.lengths)
        for i in range(len(src)):
            toks, mask = src[i]
            assert toks.ndim == 1 and (mask is None or mask.shape == toks.shape)

    return one


@pytest.mark.slow  # the search: FUZZ_EXAMPLES cases
def test_fuzz_shard_readers(work):
    search("shards", shards_target(work), SHARD_CASE)


# =========================================================================== the corpus

TARGETS = {"config": config_target, "tokenizer": tokenizer_target, "shards": shards_target}


@pytest.mark.parametrize("target, name, case", [pytest.param(*c, id=f"{c[0]}/{c[1]}") for c in corpus(*TARGETS)])
def test_corpus_input_that_once_failed(work, target, name, case):
    """Every input of tests/fuzz/corpus/<target>/ (each found a bug once) goes through its target again."""
    one = TARGETS[target](Path(tempfile.mkdtemp(dir=work)))
    run_target(target, one, *case)
