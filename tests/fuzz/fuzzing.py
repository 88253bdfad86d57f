"""What every fuzz target shares: its budget, a new seed every run, and the corpus of inputs that once failed.

- Budget: FUZZ_EXAMPLES generated cases per target (default 1,000: the six targets take about a minute
  together on the 2-core CI machine); the nightly-style search sets FUZZ_EXAMPLES=100000 (docs/reliability.md).
- Search: hypothesis explores from a seed drawn anew every run (FUZZ_SEED=N replays run N exactly), so the
  suite covers new inputs over time instead of the same derandomized ones. A failure prints the seed, the
  falsifying example and hypothesis' `@reproduce_failure(...)` blob.
- Corpus: tests/fuzz/corpus/<target>/<name>.json, each an input that once failed (with what it found), replayed
  by every run before any new search. A new failure found by the search goes there once fixed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from spindle.errors import SpindleError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CORPUS = Path(__file__).with_name("corpus")


def fuzz_settings(fn):
    """`@given(...)` test -> the budgeted, seeded search (apply above @given)."""
    return seed(SEED)(settings(max_examples=EXAMPLES, derandomize=False, deadline=None, database=None,
                               print_blob=True, suppress_health_check=list(HealthCheck))(fn))


def announce(target: str) -> None:
    """Printed first: pytest shows it with a failure, and it is how to run the same search again."""
    print(f"fuzz {target}: seed {SEED}, {EXAMPLES} cases; FUZZ_SEED={SEED} FUZZ_EXAMPLES={EXAMPLES} replays this "
          f"search")


def encode(value):
    """A case as JSON: bytes, tuples and numpy arrays tagged (JSON has none of them); NaN and inf as Python's
    json writes them."""
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value), value
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__bytes__" in value:
            return bytes.fromhex(value["__bytes__"])
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
        return {k: decode(v) for k, v in value.items()}
    return value


def corpus(*targets: str) -> list[tuple[str, str, object]]:
    """(target, file name, decoded case) of every corpus file of these targets."""
    out = []
    for target in targets:
        for path in sorted((CORPUS / target).glob("*.json")):
            out.append((target, path.stem, decode(json.loads(path.read_text())["case"])))
    return out


COUNTS: dict[str, int] = {}


def run_target(name: str, fn, *args) -> None:
    """Call fn(*args); SpindleError is the expected failure, anything else propagates (a bug)."""
    COUNTS[name] = COUNTS.get(name, 0) + 1
    try:
        fn(*args)
    except SpindleError as exc:
        assert str(exc).strip(), "empty SpindleError message"


def search(name: str, one, cases) -> None:
    """FUZZ_EXAMPLES new cases of the strategy `cases` through `one`."""
    announce(name)

    @fuzz_settings
    @given(cases)
    def fuzz(case):
        run_target(name, one, *case)

    fuzz()
    n = COUNTS.get(name, 0)
    print(f"fuzz {name}: {n} cases")
    assert n >= EXAMPLES, f"{name}: only {n} cases ran"


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
