"""Fuzzing the checkpoint loader (mutated DCP checkpoints, hostile pickles) and the trainer-state file
(generated JSON read back into the loader and the loss scaler), as tests/fuzz/test_fuzz.py fuzzes the other
readers: new cases every run, the corpus of inputs that once failed replayed (tests/fuzz/fuzzing.py)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

from fuzzing import MUTATIONS, corpus, mutate, run_target, search

pytestmark = pytest.mark.fuzz

# --------------------------------------------------------------------------- checkpoint loader

CKPT_CASE = st.tuples(
    st.sampled_from(["metadata"] * 6 + ["distcp", "trainer_state", "marker", "delete", "replace_metadata"]),
    MUTATIONS, st.sampled_from(["model"] * 5 + ["all"]),
    st.sampled_from([".metadata", "__0_0.distcp", "trainer_state.json", "config.json"]),
    st.binary(max_size=64),
)


def checkpoint_target(work: Path):
    import pickle

    import torch

    from spindle.checkpoint.discovery import resolve
    from spindle.checkpoint.loading import load_checkpoint
    from spindle.config.ckpt_content import CONTENT_PARTS as CONTENTS
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
        assert not (work / "PWNED").exists(), "a pickled payload was executed"

    return one


@pytest.mark.slow  # the search: FUZZ_EXAMPLES cases
def test_fuzz_checkpoint_loader(work):
    search("checkpoint", checkpoint_target(work), CKPT_CASE)


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


def trainer_state_target(work: Path):
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

    return one


@pytest.mark.slow  # the search: FUZZ_EXAMPLES cases
def test_fuzz_trainer_state(work):
    search("trainer_state", trainer_state_target(work), STATE_CASE)


# =========================================================================== the corpus

TARGETS = {"checkpoint": checkpoint_target, "trainer_state": trainer_state_target}


@pytest.mark.parametrize("target, name, case", [pytest.param(*c, id=f"{c[0]}/{c[1]}") for c in corpus(*TARGETS)])
def test_corpus_input_that_once_failed(work, target, name, case):
    """Every input of tests/fuzz/corpus/<target>/ (each found a bug once) goes through its target again."""
    one = TARGETS[target](Path(tempfile.mkdtemp(dir=work)))
    run_target(target, one, *case)
