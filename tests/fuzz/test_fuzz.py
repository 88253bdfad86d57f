"""Fuzzing with hypothesis (derandomized: the same cases every run): every target is fed at least
FUZZ_EXAMPLES (default 10,000) generated inputs, and the only exception allowed out of it is the
project's own `SpindleError` (one clear line). Anything else is a bug in the reader/loader.

Targets: the config loader (dicts, `--set` overrides, Python config files), the tokenizer tool
(tools/tokenizer.py on generated input files; tokenizer files), the `.bin`/`.bin.meta` and binary
shard readers, the checkpoint loader (mutated DCP checkpoints), the trainer-state file (generated JSON
read back into the loader and the loss scaler).

    .venv/bin/python -m pytest tests/fuzz -m fuzz -q          # FUZZ_EXAMPLES=1000 for a quick pass
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spindle.errors import SpindleError

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}


def run_target(name: str, fn, *args) -> None:
    """Call fn(*args); SpindleError is the expected failure, anything else propagates (a bug)."""
    COUNTS[name] = COUNTS.get(name, 0) + 1
    try:
        fn(*args)
    except SpindleError as exc:
        assert str(exc).strip(), "empty SpindleError message"


def check_count(name: str) -> None:
    n = COUNTS.get(name, 0)
    print(f"fuzz {name}: {n} cases")
    assert n >= EXAMPLES, f"{name}: only {n} cases ran"


@pytest.fixture(scope="module")
def work():
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # memory-backed: 10k file writes per target
    d = Path(tempfile.mkdtemp(prefix="spindle-fuzz-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def mutate(data: bytes, ops: list) -> bytes:
    """Apply (kind, position, value) edits: flip a byte, insert, delete a run, truncate."""
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b and kind != "insert":
            continue
        i = pos % (len(b) + 1) if kind == "insert" else pos % len(b)
        if kind == "flip":
            b[i] ^= (val % 255) + 1
        elif kind == "insert":
            b[i:i] = bytes([val % 256]) * (1 + val % 4)
        elif kind == "delete":
            del b[i:i + 1 + val % 16]
        else:
            del b[i:]
    return bytes(b)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "flip", "insert", "delete", "truncate"]),
                               st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4)

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


def test_fuzz_config_loader(work):
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

    @FUZZ
    @given(CONFIG_CASE)
    def fuzz(case):
        run_target("config", one, *case)

    fuzz()
    check_count("config")


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


def test_fuzz_tokenizer_tool(work):
    sys.path.insert(0, str(REPO / "tools"))
    import tokenizer as tool  # tools/tokenizer.py

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

    @FUZZ
    @given(TOKENIZER_CASE)
    def fuzz(case):
        run_target("tokenizer", one, *case)

    fuzz()
    check_count("tokenizer")


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


def test_fuzz_shard_readers(work):
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

    @FUZZ
    @given(SHARD_CASE)
    def fuzz(case):
        run_target("shards", one, *case)

    fuzz()
    check_count("shards")


# --------------------------------------------------------------------------- 4. checkpoint loader

CKPT_CASE = st.tuples(
    st.sampled_from(["metadata"] * 6 + ["distcp", "trainer_state", "marker", "delete", "replace_metadata"]),
    MUTATIONS, st.sampled_from(["model"] * 5 + ["all"]),
    st.sampled_from([".metadata", "__0_0.distcp", "trainer_state.json", "config.json"]),
    st.binary(max_size=64),
)


def test_fuzz_checkpoint_loader(work):
    import pickle

    import torch

    from spindle.checkpoint.discovery import resolve
    from spindle.checkpoint.loading import CONTENTS, load_checkpoint
    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig, validate_config
    from spindle.model.llama import build_model
    from spindle.train.optim import build_optimizer

    torch.set_num_threads(1)
    cfg = validate_config({"model": {"hidden_size": 16, "num_attention_heads": 2, "num_kv_attention_heads": 1,
                                     "num_layers": 1, "vocab_size": 32, "multiple_of": 16,
                                     "max_position_embeddings": 16}})
    model = build_model(cfg.model.to_args(), torch.device("cpu"), seed=1)
    opt = build_optimizer(model, cfg.adam, "cpu")
    good = work / "ckpt_good"
    CheckpointManager(str(good), CkptConfig()).save(3, model, opt, {
        "step": 3, "updates": 3, "num_consumed_tokens": 96, "inf_nan_skip_batches": 0, "loader": {"position": 3},
        "scaler": {"scale": 1.0, "growth_tracker": 0, "hysteresis_tracker": 2}}, {})
    originals = {f: (good / "3" / f).read_bytes() for f in os.listdir(good / "3")}
    case_dir = work / "ckpt_case"
    shutil.copytree(good, case_dir)
    dirty: set[str] = set(originals)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(work / "PWNED"),))

    def one(where, ops, content, victim, blob):
        step_dir = case_dir / "3"  # restore the good checkpoint: what the previous case changed
        for f in case_dir.iterdir():
            if f.is_file() and f.name != "3.step":
                f.unlink()
        if not (case_dir / "3.step").exists():
            (case_dir / "3.step").write_bytes(b"3\n")
        for name in dirty:
            (step_dir / name).write_bytes(originals[name])
        dirty.clear()
        dirty.update({"metadata": [".metadata"], "replace_metadata": [".metadata"], "distcp": ["__0_0.distcp"],
                      "trainer_state": ["trainer_state.json"], "delete": [victim], "marker": []}[where])
        if where == "metadata":
            (step_dir / ".metadata").write_bytes(mutate(originals[".metadata"], ops))
        elif where == "distcp":
            (step_dir / "__0_0.distcp").write_bytes(mutate(originals["__0_0.distcp"], ops))
        elif where == "trainer_state":
            (step_dir / "trainer_state.json").write_bytes(mutate(originals["trainer_state.json"], ops))
        elif where == "marker":
            (case_dir / "3.step").unlink()
            (case_dir / (blob.hex()[:6] or "x")).write_bytes(blob)
        elif where == "delete":
            (step_dir / victim).unlink()
        else:  # a hostile or foreign pickle as metadata
            payload = [Evil(), {"a": 1}, blob, torch.zeros(2)][ops[0][1] % 4]
            (step_dir / ".metadata").write_bytes(pickle.dumps(payload))
        storage, ref = resolve(str(case_dir))  # the marker rule: no marker -> SpindleError, never a load
        load_checkpoint(Path(storage.local_path(ref.rel)), model, opt, ("model",) if content == "model" else CONTENTS)

    @FUZZ
    @given(CKPT_CASE)
    def fuzz(case):
        run_target("checkpoint", one, *case)

    fuzz()
    assert not (work / "PWNED").exists(), "a pickled payload was executed"
    check_count("checkpoint")


# =========================================================================== trainer state

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
STATE_KEYS = ["step", "updates", "num_consumed_tokens", "inf_nan_skip_batches", "loader", "scaler", "lineage"]
GOOD_STATE = {"step": 4, "updates": 4, "num_consumed_tokens": 128, "inf_nan_skip_batches": 0,
              "loader": {"position": 4}, "scaler": {"scale": 1.0, "growth_tracker": 0, "hysteresis_tracker": 2},
              "lineage": "abc"}
STATE_CASE = st.tuples(
    st.dictionaries(st.sampled_from(STATE_KEYS + ["position", "fingerprint", "x"]), JSON_VALUE, max_size=5),
    st.dictionaries(st.sampled_from(["position", "fingerprint", "cursor", "scale", "growth_tracker",
                                     "hysteresis_tracker"]), JSON_VALUE, max_size=4),
    st.sampled_from(["replace", "loader", "scaler", "drop", "text"]),
    st.binary(max_size=24),
)


def test_fuzz_trainer_state(work):
    """A trainer_state.json of any content: parsed (damaged -> one line), then read back into a real loader
    and loss scaler, as a resume does."""
    from spindle.checkpoint.records import parse_trainer_state
    from spindle.config import validate_config
    from spindle.data.loader import build_train_loader
    from spindle.train.optim import DynamicLossScaler

    cfg = validate_config({"data": {"seq_len": 8, "micro_bsz": 1}, "model": {"vocab_size": 32}})
    loader = build_train_loader(cfg.data, 32, work / "cache", prefetch=False)
    scaler = DynamicLossScaler.from_config(cfg.grad_scaler, enabled=True)

    def one(top, inner, mode, blob):
        state = dict(GOOD_STATE)
        if mode == "replace":
            state.update(top)
        elif mode in ("loader", "scaler"):
            state[mode] = inner
        elif mode == "drop":
            for key in top:
                state.pop(key, None)
        data = json.dumps(state, allow_nan=True).encode() if mode != "text" else blob
        parsed = parse_trainer_state(data, "trainer_state.json")
        loader.load_state_dict(parsed["loader"])
        if "scaler" in parsed:
            scaler.load_state_dict(parsed["scaler"])

    @FUZZ
    @given(STATE_CASE)
    def fuzz(case):
        run_target("trainer_state", one, *case)

    fuzz()
    check_count("trainer_state")
