"""Finding and checking checkpoints: completion records, verification, and what a save folder holds.

A save folder (`ckpt.save_ckpt_folder`: `local:/dir`, a bare path, or `boto3:s3://bucket/prefix`)
holds one checkpoint per saved step:

    {step}/.owner.json                           written first: which run lineage is writing it (the one
                                                 place a save writes the lineage; the record copies it)
    {step}/.metadata, {step}/__{rank}_0.distcp   DCP tensors (spindle.checkpoint.dcp_io)
    {step}/trainer_state.json                    counters, sampler position, loss scaler (and the lineage in
                                                 checkpoints written before issue 26)
    {step}/config.json                           the resolved config of the run that wrote it
    {step}.step                                  the completion record, written last (below)
    snapshot/{0,1}/{step}/... + {step}.step      `oss_snapshot_freq` snapshots, two alternating slots
    damaged/{step}-{time}/                       checkpoints found damaged at resume, moved aside
    .spindle.lock                                held by the one run writing here (spindle.checkpoint.lock)

The completion record is JSON: the step, the run lineage, and every file of the checkpoint with its
size and SHA-256. It is written only after every file it lists is durable, and `verify` checks it on
load (every hash by default; sizes and the small files' hashes only with `ckpt.verify="size"`; the
shards of a remote checkpoint are hashed once downloaded): a checkpoint whose record does not match its files,
whose trainer state is missing or malformed, or whose metadata is unreadable is *damaged* — refused,
never taken for "nothing to restore". First-wave checkpoints carry a record holding just the step
number; they are checked for the files every checkpoint has.

A "lineage" is one training run and its resumptions: a fresh start draws a new id, a resume (all
state) inherits the id of the checkpoint it continues. Pruning and re-saving touch only checkpoints of
the run's own lineage (spindle.checkpoint.manager).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from spindle.checkpoint.dcp_io import parse_metadata
from spindle.checkpoint.records import (
    HASHED_FILES, LEGACY_LINEAGE, DamagedCheckpoint, check_file_hashes, parse_record, parse_trainer_state, sha256,
)
from spindle.checkpoint.storage import Storage, StorageNotFound, open_storage
from spindle.config import CkptConfig
from spindle.errors import SpindleError

MARKER_RE = re.compile(r"^(?:(snapshot/[01])/)?(\d+)\.step$")
# the files a Spindle checkpoint folder holds; anything else in a step folder was written by someone else.
# `.metadata.tmp`: DCP writes the metadata under that name and renames it, so a save killed between the
# two leaves it (an unfinished save of ours, not a foreign file)
SPINDLE_FILE_RE = re.compile(
    r"^(\.metadata|\.metadata\.tmp|__\d+_\d+\.distcp|trainer_state\.json|config\.json|\.owner\.json"
    r"|tokenizer_identity\.json)$")
OURS_AT_TOP = ("pings", "damaged", ".spindle.lock")


@dataclass(frozen=True)
class CkptRef:
    step: int
    rel: str  # "100" or "snapshot/1/100", relative to the save folder

    @property
    def marker(self) -> str:
        return f"{self.rel}.step"

    @property
    def is_snapshot(self) -> bool:
        return self.rel.startswith("snapshot/")


# --------------------------------------------------------------------------- finding and verifying


def scan_completed(storage: Storage) -> list[CkptRef]:
    """Checkpoints with a completion record and DCP metadata (normal and snapshot), ascending by step.

    At equal steps a normal checkpoint sorts after (wins over) a snapshot.
    """
    files = storage.list_files("")
    present = set(files)
    refs = []
    for f in files:
        m = MARKER_RE.match(f)
        if not m:
            continue
        rel = f"{m.group(1)}/{m.group(2)}" if m.group(1) else m.group(2)
        if f"{rel}/.metadata" in present:
            refs.append(CkptRef(int(m.group(2)), rel))
    return sorted(refs, key=lambda r: (r.step, not r.is_snapshot))


@dataclass(frozen=True)
class Verified:
    """A checkpoint whose files match its completion record, with its parsed trainer state."""

    ref: CkptRef
    lineage: str
    trainer_state: dict
    # record entries of the files whose hashes are still to check once the checkpoint is local (a remote one)
    unhashed: Optional[dict] = None


def verify(storage: Storage, ref: CkptRef, *, need_state: bool = True, content: str = "hash") -> Verified:
    """Check a checkpoint against its completion record; DamagedCheckpoint names the first problem.
    `content` is ckpt.verify: "hash" checks every recorded SHA-256 (of a remote checkpoint's shards when
    `local_copy` has downloaded them), "size" only the sizes and the small files' hashes."""
    where = f"{storage.url.rstrip('/')}/{ref.rel}"
    try:
        record = parse_record(storage.read_bytes(ref.marker), f"{storage.url.rstrip('/')}/{ref.marker}")
    except StorageNotFound:
        raise DamagedCheckpoint(f"{where}: no completion record {ref.step}.step") from None
    if record.step != ref.step:
        raise DamagedCheckpoint(f"{where}.step: completion record says step {record.step}")
    sizes = storage.file_sizes(ref.rel)
    expected = record.files if record.files is not None else \
        {name: None for name in (".metadata", "trainer_state.json", "config.json")}
    for name, meta in expected.items():
        if name not in sizes:
            raise DamagedCheckpoint(f"{where}/{name}: missing (the checkpoint's completion record lists it)")
        if meta is not None and sizes[name] != meta["size"]:
            raise DamagedCheckpoint(f"{where}/{name}: {sizes[name]} bytes, the completion record says "
                                    f"{meta['size']} (truncated or rewritten)")
    contents = {name: storage.read_bytes(f"{ref.rel}/{name}") for name in HASHED_FILES if name in expected}
    for name, data in contents.items():
        meta = expected[name]
        if meta is not None and "sha256" in meta and sha256(data) != meta["sha256"]:
            raise DamagedCheckpoint(f"{where}/{name}: content differs from the completion record (rewritten?)")
    parse_metadata(contents[".metadata"], f"{where}/.metadata")
    try:
        config = json.loads(contents["config.json"])
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise DamagedCheckpoint(f"{where}/config.json: damaged (expected a JSON object)")
    state = parse_trainer_state(contents["trainer_state.json"], f"{where}/trainer_state.json") if need_state else {}
    if need_state and state["step"] != ref.step:
        raise DamagedCheckpoint(f"{where}/trainer_state.json: holds step {state['step']}, the folder is step "
                                f"{ref.step}")
    lineage = record.lineage if record.files is not None else state.get("lineage", LEGACY_LINEAGE)
    shards = {n: m for n, m in expected.items() if n not in contents} if content == "hash" else {}
    local = storage.local_path(ref.rel)
    if shards and local is not None:
        check_file_hashes(Path(local), shards, where)
    return Verified(ref, lineage, state, unhashed=shards if local is None else None)


def newest_intact(storage: Storage, refs: list[CkptRef],
                  content: str = "hash") -> tuple[Optional[Verified], list[tuple[CkptRef, str]]]:
    """The newest checkpoint of `refs` that verifies, and the (ref, reason) of every newer damaged one."""
    damaged = []
    for ref in reversed(refs):
        try:
            return verify(storage, ref, content=content), damaged
        except DamagedCheckpoint as exc:
            damaged.append((ref, str(exc)))
    return None, damaged


# --------------------------------------------------------------------------- what a save folder holds


@dataclass
class FolderContents:
    completed: list[CkptRef] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # Spindle step folders without a completion record
    foreign: list[str] = field(default_factory=list)  # checkpoint-like entries Spindle did not write
    other: list[str] = field(default_factory=list)  # anything else: left alone

    def describe_foreign(self) -> str:
        shown = ", ".join(self.foreign[:3]) + (f" and {len(self.foreign) - 3} more" if len(self.foreign) > 3 else "")
        return shown


def inspect_folder(storage: Storage) -> FolderContents:
    """Sort every entry of a save folder into ours (complete / incomplete), foreign and other."""
    files = storage.list_files("")
    out = FolderContents()
    groups: dict[str, list[str]] = {}  # step folder rel ("8", "snapshot/1/8") -> its file names
    markers: set[str] = set()
    for f in files:
        parts = f.split("/")
        if parts[0] in OURS_AT_TOP:
            continue
        m = MARKER_RE.match(f)
        if m:
            markers.add(f[: -len(".step")])
            continue
        depth = 3 if parts[0] == "snapshot" else 1
        head = "/".join(parts[:depth])
        step_folder = (parts[0].isdigit() if depth == 1 else
                       len(parts) > 3 and parts[1] in ("0", "1") and parts[2].isdigit())
        if not step_folder:
            if parts[0] == "snapshot" or parts[0].isdigit() or re.match(r"^\d+\.step$", parts[0]):
                out.foreign.append(f)
            elif parts[0] not in out.other:
                out.other.append(parts[0])
            continue
        groups.setdefault(head, []).append("/".join(parts[depth:]))
    for rel, names in sorted(groups.items()):
        alien = [n for n in names if not SPINDLE_FILE_RE.match(n)]
        if alien:
            out.foreign.append(f"{rel}/ ({', '.join(sorted(alien)[:3])})")
        elif rel in markers and ".metadata" in names:
            out.completed.append(CkptRef(int(rel.rsplit("/", 1)[-1]), rel))
        else:
            out.incomplete.append(rel)
    for rel in sorted(markers - set(groups)):
        out.foreign.append(f"{rel}.step (a completion marker without its folder)")
    out.completed.sort(key=lambda r: (r.step, not r.is_snapshot))
    return out


def owner_lineage(storage: Storage, rel: str) -> Optional[str]:
    """The lineage written into a step folder's .owner.json when its save began (None if absent/unreadable)."""
    try:
        owner = json.loads(storage.read_bytes(f"{rel}/.owner.json"))
    except (StorageNotFound, ValueError):
        return None
    return owner.get("lineage") if isinstance(owner, dict) and isinstance(owner.get("lineage"), str) else None


def record_lineage(storage: Storage, ref: CkptRef) -> Optional[str]:
    """The lineage of a completed checkpoint from its record (cheap: no file checks); None if unreadable."""
    try:
        record = parse_record(storage.read_bytes(ref.marker), ref.marker)
    except (SpindleError, StorageNotFound):
        return None
    if record.files is not None:
        return record.lineage
    try:
        state = json.loads(storage.read_bytes(f"{ref.rel}/trainer_state.json"))
    except (StorageNotFound, ValueError):
        return LEGACY_LINEAGE
    return state.get("lineage", LEGACY_LINEAGE) if isinstance(state, dict) else LEGACY_LINEAGE


# --------------------------------------------------------------------------- opening and resolving paths


def strip_prefix(url: str) -> str:
    """'local:/x' -> '/x'. Other prefixes (boto3:) are handled by spindle.checkpoint.storage."""
    return url[len("local:"):] if url.startswith("local:") else url


def is_remote(url: str) -> bool:
    return url.startswith("boto3:") or url.startswith("s3://")


class Location(str):
    """A save-folder URL that joins like a Path (`loc / "100"`), for printing remote folders."""

    def __truediv__(self, other) -> "Location":
        return Location(f"{self.rstrip('/')}/{other}")


def open_ckpt_storage(url: str, ckpt: Optional[CkptConfig] = None) -> Storage:
    """Open a checkpoint storage; the S3 endpoint, region and timeouts come from `ckpt` or the environment."""
    kwargs = {}
    if ckpt is not None and is_remote(url):
        kwargs = {"endpoint_url": ckpt.s3_endpoint_url, "region": ckpt.s3_region, "settings": ckpt.s3_settings()}
    return open_storage(url, **kwargs)


def _split_url(url: str) -> tuple[str, str]:
    url = url.rstrip("/")
    parent, _, name = url.rpartition("/")
    if not parent or parent.endswith(":") or parent.endswith(":/"):  # "s3://bucket" has no parent to step to
        raise SpindleError(f"{url}: cannot locate the folder that holds this checkpoint")
    return parent, name


def resolve(url: str, ckpt: Optional[CkptConfig] = None) -> tuple[Storage, CkptRef]:
    """A URL names a checkpoint folder (holding .metadata), a save folder (take its latest completed
    checkpoint, snapshots included), or `{save folder}/latest`. Returns (save-folder storage, ref);
    `verify` it before reading."""
    if not url:
        raise SpindleError("checkpoint path is empty")
    if url.rstrip("/").endswith("/latest"):
        url = url.rstrip("/")[: -len("/latest")]
    local = None if is_remote(url) else Path(strip_prefix(url))
    if local is not None and local.is_file():
        raise SpindleError(f"{local}: not a Spindle checkpoint (a file, expected a DCP checkpoint folder; "
                           "for a Hugging Face folder use ckpt_type='hf' or `spindle convert from-hf`)")
    storage = open_ckpt_storage(url, ckpt)
    if storage.exists(".metadata"):
        parent, name = _split_url(url)
        pstore = open_ckpt_storage(parent, ckpt)
        if not name.isdigit():
            raise SpindleError(f"{url}: checkpoint folder name must be its step number")
        ref = CkptRef(int(name), name)
        if not pstore.exists(ref.marker):
            raise SpindleError(f"{url}: checkpoint is incomplete (no completion marker {name}.step beside it); "
                               "not loading it")
        return pstore, ref
    refs = scan_completed(storage)
    if refs:
        return storage, refs[-1]
    if local is not None and not local.exists():
        raise SpindleError(f"{local}: checkpoint path does not exist")
    if local is not None and any(local.glob("model_tp*_pp*.pt")):
        raise SpindleError(f"{local}: an InternEvo checkpoint (model_tp*_pp*.pt), not a Spindle one; load it "
                           "with load_ckpt_info(ckpt_type='internevo') or `spindle convert from-internevo`")
    if any(d.isdigit() for d in storage.list_dirs("")):
        raise SpindleError(f"{storage.url}: holds checkpoint folders but none is complete (no N.step marker)")
    if local is not None and (local / "config.json").is_file() and (
            any(local.glob("*.safetensors")) or any(local.glob("*.bin"))):
        raise SpindleError(f"{local}: a Hugging Face model folder, not a Spindle checkpoint; use ckpt_type='hf' "
                           "or `spindle convert from-hf`")
    raise SpindleError(f"{storage.url}: not a Spindle checkpoint (no .metadata file, no completed N/ folder)")


@contextlib.contextmanager
def local_copy(storage: Storage, ref: CkptRef, verified: Optional[Verified] = None) -> Iterator[Path]:
    """The checkpoint as a local folder: in place for local storage, else downloaded to a temp dir (and
    the hashes `verify` left for it checked there)."""
    path = storage.local_path(ref.rel)
    if path is not None:
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"spindle-ckpt-{ref.step}-"))
    try:
        storage.download_dir(ref.rel, str(tmp))
        if verified is not None and verified.unhashed:
            check_file_hashes(tmp, verified.unhashed, f"{storage.url.rstrip('/')}/{ref.rel}")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def open_checkpoint(url: str, ckpt: Optional[CkptConfig] = None, need_state: bool = False) -> Iterator[Path]:
    """Resolve `url`, verify it, and yield a local folder holding that completed checkpoint."""
    storage, ref = resolve(url, ckpt)
    verified = verify(storage, ref, need_state=need_state, content=ckpt.verify if ckpt is not None else "hash")
    with local_copy(storage, ref, verified) as path:
        yield path


def checkpoint_config(path: Path):
    """The validated SpindleConfig a Spindle checkpoint folder was written with (its config.json)."""
    from spindle.config import validate_config

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SpindleError(f"{path}: no config.json beside the checkpoint")
    try:
        raw = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as exc:
        raise SpindleError(f"{cfg_file}: not a readable JSON config ({exc})") from None
    if not isinstance(raw, dict):
        raise SpindleError(f"{cfg_file}: expected a JSON object (the run's config), found {type(raw).__name__}")
    raw.pop("constants", None)
    return validate_config(raw, str(cfg_file))
