"""The JSON files of a checkpoint: the completion record (`{step}.step`) and `trainer_state.json` (its keys
and which load content restores each, defined here once).

The completion record is written last, after every file it lists is durable: the step, the run
lineage, and every file of the checkpoint with its size and SHA-256 (tensor shards included: a flipped
byte that keeps the size is found). Records of the second wave hashed only the small JSON / metadata
files; first-wave records hold just the step number.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spindle.config.ckpt_content import SAMPLER, SCHEDULER
from spindle.errors import SpindleError

RECORD_FORMAT = "spindle-checkpoint-2"
LEGACY_LINEAGE = "first-wave"  # checkpoints written before lineages existed form one lineage per folder
# the small files verification reads whole (and parses); every other file of a checkpoint is hashed as a stream
HASHED_FILES = (".metadata", "trainer_state.json", "config.json", ".owner.json", "tokenizer_identity.json")
# ckpt.verify: "hash" checks every recorded SHA-256 on load; "size" (for very large checkpoints) re-checks
# sizes and the small files' hashes only, and the run says so
VERIFY_MODES = ("hash", "size")
_CHUNK = 1 << 22


class DamagedCheckpoint(SpindleError):
    """A checkpoint that has its completion record but does not hold what the record promises."""


# --------------------------------------------------------------------------- the completion record


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path) -> str:
    """SHA-256 of a file read in 4 MiB pieces (tensor shards can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file_hashes(folder: Path, files: dict, where: str) -> None:
    """Each file of `files` ({name: record entry}) that the record hashes, against its content in `folder`."""
    for name, meta in sorted(files.items()):
        if meta is not None and "sha256" in meta and hash_file(Path(folder) / name) != meta["sha256"]:
            raise DamagedCheckpoint(f"{where}/{name}: content differs from the completion record (same size, "
                                    "other bytes: corrupted or rewritten)")


def completion_record(step: int, lineage: str, sizes: dict[str, int], hashes: dict[str, str]) -> bytes:
    files = {name: ({"size": size, "sha256": hashes[name]} if name in hashes else {"size": size})
             for name, size in sorted(sizes.items())}
    return (json.dumps({"format": RECORD_FORMAT, "step": step, "lineage": lineage, "files": files}, indent=1)
            + "\n").encode()


@dataclass(frozen=True)
class CompletionRecord:
    step: int
    lineage: str
    files: Optional[dict]  # None for first-wave records (the step number only)


def parse_record(data: bytes, where: str) -> CompletionRecord:
    text = data.decode("utf-8", errors="replace").strip()
    if text.isdigit():  # first wave: "N\n"
        return CompletionRecord(int(text), LEGACY_LINEAGE, None)
    try:
        rec = json.loads(text)
    except ValueError:
        raise DamagedCheckpoint(f"{where}: completion record is neither a step number nor JSON") from None
    ok = (isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT and _is_count(rec.get("step"))
          and isinstance(rec.get("lineage"), str) and isinstance(rec.get("files"), dict)
          and all(isinstance(v, dict) and _is_count(v.get("size")) for v in rec["files"].values()))
    if not ok:
        raise DamagedCheckpoint(f"{where}: malformed completion record (expected {RECORD_FORMAT} JSON with step, "
                                "lineage and files)")
    return CompletionRecord(rec["step"], rec["lineage"], rec["files"])


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


# --------------------------------------------------------------------------- the trainer state file

def _is_scaler(v) -> bool:
    scale = v.get("scale") if isinstance(v, dict) else None
    return (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
            and _is_count(v.get("growth_tracker")) and _is_count(v.get("hysteresis_tracker")))


# trainer_state.json's keys, defined once: key -> (the content part that restores it, check, what is expected).
# The counters sit at the top level; "loader" and "scaler" hold their owners' state dicts, checked further by them.
COUNTERS = {
    "step": (SAMPLER, _is_count, "a non-negative integer"),  # the next batch to train (skipped ones included)
    "updates": (SCHEDULER, _is_count, "a non-negative integer"),  # successful updates: the lr / beta2 schedules
    "num_consumed_tokens": (SAMPLER, _is_count, "a non-negative integer"),
    "inf_nan_skip_batches": (SAMPLER, _is_count, "a non-negative integer"),
}
TRAINER_STATE_KEYS = COUNTERS | {
    "loader": (SAMPLER, lambda v: isinstance(v, dict) and _is_count(v.get("position")), "an object with a position"),
}
OPTIONAL_TRAINER_STATE_KEYS = {
    "scaler": (SCHEDULER, _is_scaler, "an object with a finite scale > 0 and two counters"),
    # the layout the run had: never restored, compared by spindle.train.resume_check (which falls back when it
    # is not an object, so it is not refused here)
    "layout": (None, lambda v: True, "anything"),
    # checkpoints saved before the lineage was written only into .owner.json and the completion record
    "lineage": (None, lambda v: isinstance(v, str) and 0 < len(v) <= 128, "a string"),
}
# the RNG streams, saved as tensors beside the model and optimizer (DCP keys rng.cpu, rng.cuda), go with the data
RNG_CONTENT = SAMPLER


def fresh_trainer_state(**counters: int) -> dict:
    """A trainer state at the start of the data (the counters not given are 0): what conversions save."""
    return {key: counters.get(key, 0) for key in COUNTERS} | {"loader": {"position": 0}}


def select_state(state: dict, content: tuple[str, ...]) -> dict:
    """The part of a (verified) trainer state that a load of `content` restores."""
    parts = TRAINER_STATE_KEYS | OPTIONAL_TRAINER_STATE_KEYS
    return {key: value for key, value in state.items() if key in parts and parts[key][0] in content}


def parse_trainer_state(data: bytes, where: str) -> dict:
    """trainer_state.json, checked key by key: a damaged state is refused, never read as "no state"."""
    try:
        state = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedCheckpoint(f"{where}: damaged trainer state (not JSON: {exc})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{where}: damaged trainer state (expected a JSON object, got "
                                f"{type(state).__name__})")
    for key, (_, check, expected) in TRAINER_STATE_KEYS.items():
        if key not in state:
            raise DamagedCheckpoint(f"{where}: damaged trainer state (no '{key}')")
        if not check(state[key]):
            raise DamagedCheckpoint(f"{where}: damaged trainer state ('{key}' must be {expected}, got "
                                    f"{state[key]!r:.60})")
    for key, (_, check, expected) in OPTIONAL_TRAINER_STATE_KEYS.items():
        if key in state and not check(state[key]):
            raise DamagedCheckpoint(f"{where}: damaged trainer state ('{key}' must be {expected}, got "
                                    f"{state[key]!r:.60})")
    return state
