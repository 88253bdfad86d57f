"""Saving and loading training state with torch.distributed.checkpoint (DCP).

A save folder (`ckpt.save_ckpt_folder`: `local:/dir`, a bare path, or `boto3:s3://bucket/prefix`)
holds one checkpoint per saved step:

    {step}/.metadata, {step}/__{rank}_0.distcp   DCP: model, optimizer and RNG tensors under their
                                                 fully-qualified names (sharded, topology-independent)
    {step}/trainer_state.json                    counters, sampler position, loss scaler (JSON)
    {step}/config.json                           the resolved config of the run that wrote it
    {step}.step                                  the completion marker, written last
    snapshot/{0,1}/{step}/... + {step}.step      `oss_snapshot_freq` snapshots, two alternating slots

A folder without its marker is never loaded: a crash (or a failed upload) during a save leaves the
previous checkpoint as the latest.

Load precedence (printed at start, see docs/checkpoints.md):
  1. `auto_resume=True` and a completed checkpoint (normal or snapshot) in `save_ckpt_folder`:
     the highest step is loaded with all content (the same run continuing); `load_ckpt_info` is
     ignored.
  2. otherwise `load_ckpt_info` (or the legacy `load_ckpt_folder`): the listed `content` from
     that path (`ckpt_type="hf"`: model weights from a Hugging Face Llama folder);
  3. otherwise fresh weights.

No pickled code is ever executed on load: DCP's `.metadata` is read with an unpickler that admits
only DCP's own metadata classes, torch dtypes/sizes and plain containers; tensor payloads are read
by DCP with `torch.load(weights_only=True)`; our own state is JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from spindle.checkpoint.storage import AsyncUploader, LocalStorage, Storage, StorageNotFound, open_storage
from spindle.config import CkptConfig, LoadCkptInfo
from spindle.errors import SpindleError

CONTENTS = ("model", "optimizer", "scheduler", "sampler")
MARKER_RE = re.compile(r"^(?:(snapshot/[01])/)?(\d+)\.step$")
HF_TYPES = ("hf", "hf_llama", "llama")


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
    """Open a checkpoint storage; the S3 endpoint/region come from `ckpt` or the environment."""
    kwargs = {}
    if ckpt is not None and is_remote(url):
        kwargs = {"endpoint_url": ckpt.s3_endpoint_url, "region": ckpt.s3_region}
    return open_storage(url, **kwargs)


# --------------------------------------------------------------------------- finding checkpoints


@dataclass(frozen=True)
class CkptRef:
    step: int
    rel: str  # "100" or "snapshot/1/100", relative to the save folder

    @property
    def marker(self) -> str:
        return f"{self.rel}.step"


def scan_completed(storage: Storage) -> list[CkptRef]:
    """Completed checkpoints (normal and snapshot) in a save folder, ascending by step.

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
    return sorted(refs, key=lambda r: (r.step, not r.rel.startswith("snapshot")))


def completed_steps(folder: str | Path) -> list[int]:
    """Steps with a completion marker in a local save folder (normal checkpoints only), ascending."""
    if not Path(strip_prefix(str(folder))).is_dir():
        return []
    return sorted({r.step for r in scan_completed(LocalStorage(strip_prefix(str(folder))))
                   if "/" not in r.rel})


def _split_url(url: str) -> tuple[str, str]:
    url = url.rstrip("/")
    parent, _, name = url.rpartition("/")
    if not parent or parent.endswith(":") or parent.endswith(":/"):  # "s3://bucket" has no parent to step to
        raise SpindleError(f"{url}: cannot locate the folder that holds this checkpoint")
    return parent, name


def resolve(url: str, ckpt: Optional[CkptConfig] = None) -> tuple[Storage, CkptRef]:
    """A URL names a checkpoint folder (holding .metadata), a save folder (take its latest completed
    checkpoint, snapshots included), or `{save folder}/latest`. Returns (save-folder storage, ref)."""
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
    if any(d.isdigit() for d in storage.list_dirs("")):
        raise SpindleError(f"{storage.url}: holds checkpoint folders but none is complete (no N.step marker)")
    if local is not None and (local / "config.json").is_file() and (
            any(local.glob("*.safetensors")) or any(local.glob("*.bin"))):
        raise SpindleError(f"{local}: a Hugging Face model folder, not a Spindle checkpoint; use ckpt_type='hf' "
                           "or `spindle convert from-hf`")
    raise SpindleError(f"{storage.url}: not a Spindle checkpoint (no .metadata file, no completed N/ folder)")


@contextlib.contextmanager
def local_copy(storage: Storage, ref: CkptRef) -> Iterator[Path]:
    """The checkpoint as a local folder: in place for local storage, else downloaded to a temp dir."""
    path = storage.local_path(ref.rel)
    if path is not None:
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"spindle-ckpt-{ref.step}-"))
    try:
        storage.download_dir(ref.rel, str(tmp))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def open_checkpoint(url: str, ckpt: Optional[CkptConfig] = None) -> Iterator[Path]:
    """Resolve `url` and yield a local folder holding that completed checkpoint."""
    storage, ref = resolve(url, ckpt)
    with local_copy(storage, ref) as path:
        yield path


def resolve_checkpoint_dir(path: str) -> Path:
    """A local checkpoint folder for `path` (kept for callers that need a plain Path)."""
    storage, ref = resolve(path)
    local = storage.local_path(ref.rel)
    if local is None:
        raise SpindleError(f"{path}: remote checkpoint; use open_checkpoint() to download it")
    return Path(local)


# --------------------------------------------------------------------------- load plan


@dataclass
class LoadPlan:
    url: Optional[str]
    content: tuple[str, ...]
    reason: str
    storage: Optional[Storage] = None
    ref: Optional[CkptRef] = None

    @property
    def path(self):  # display / local path
        if self.storage is not None and self.ref is not None:
            local = self.storage.local_path(self.ref.rel)
            return Path(local) if local else Location(self.storage.url) / self.ref.rel
        return self.url


def plan_load(ckpt: CkptConfig, save_storage: Optional[Storage]) -> LoadPlan:
    """Decide what to load at start (see the module docstring for the precedence)."""
    info: Optional[LoadCkptInfo] = ckpt.load_ckpt_info
    if info is None and ckpt.load_ckpt_folder:
        info = LoadCkptInfo(path=ckpt.load_ckpt_folder, content=("all",))
    has_info = info is not None and bool(info.path)
    if ckpt.auto_resume and save_storage is not None:
        refs = scan_completed(save_storage)
        if refs:
            ref = refs[-1]
            note = f"; load_ckpt_info ({info.path}) is ignored" if has_info else ""
            return LoadPlan(None, CONTENTS, f"auto_resume: continuing from {save_storage.url}/{ref.rel} "
                                            f"(step {ref.step}, all state){note}", save_storage, ref)
    if has_info:
        if info.ckpt_type in HF_TYPES:
            return LoadPlan(info.path, ("hf",), f"load_ckpt_info: Hugging Face Llama weights from {info.path}")
        content = CONTENTS if "all" in info.content else tuple(info.content)
        storage, ref = resolve(info.path, ckpt)
        why = " (auto_resume found no completed checkpoint in save_ckpt_folder)" if ckpt.auto_resume else ""
        return LoadPlan(info.path, content, f"load_ckpt_info: loading {', '.join(content)} from "
                                            f"{storage.url}/{ref.rel}{why}", storage, ref)
    return LoadPlan(None, (), "no checkpoint to load: starting from freshly initialised weights")


# --------------------------------------------------------------------------- safe metadata


class _SafeUnpickler(pickle.Unpickler):
    """Admits only what DCP's .metadata legitimately holds; anything else is a foreign/hostile file."""

    def find_class(self, module: str, name: str):
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module in ("builtins",) and name in ("set", "frozenset", "slice", "tuple", "list", "dict"):
            import builtins

            return getattr(builtins, name)
        if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "PurePosixPath", "WindowsPath"):
            import pathlib

            return getattr(pathlib, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module.startswith("torch.distributed.checkpoint"):
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = Path(str(self.path)) / ".metadata"
        try:
            metadata = _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
        except FileNotFoundError:
            raise SpindleError(f"{path.parent}: not a Spindle checkpoint (no .metadata)") from None
        except Exception as exc:  # noqa: BLE001 - truncated or foreign metadata
            raise SpindleError(f"{path}: unreadable checkpoint metadata (truncated or not a DCP checkpoint): "
                               f"{type(exc).__name__}: {exc}") from None
        if not isinstance(metadata, dcp.metadata.Metadata) or not isinstance(  # admitted types, not DCP's (fuzz)
                getattr(metadata, "state_dict_metadata", None), dict):
            raise SpindleError(f"{path}: not DCP checkpoint metadata (holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if getattr(metadata, "planner_data", None) is None:
            metadata.planner_data = {}
        return metadata


def read_metadata(path: Path):
    return SafeFileSystemReader(str(path)).read_metadata()


# --------------------------------------------------------------------------- save / load tensors


# Optimizer state keyed "state.<param name>.exp_avg", "param_groups.<param name>.lr": every entry names
# its parameter, so a rank holding a pipeline stage or a shard reads exactly its part of any layout.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def write_dcp(path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
              trainer_state: dict, config: dict, process_group=None, is_writer: bool = True) -> None:
    """Write the DCP files and the JSON files of one checkpoint into the local folder `path`."""
    state = {"model": get_model_state_dict(model), "rng": _rng_state()}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group, assuming single process" is expected on 1 rank
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), process_group=process_group)
        if is_writer:
            (path / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            (path / "config.json").write_text(json.dumps(config, indent=1, default=str))
            _fsync_dir(path)
    except (OSError, CheckpointException) as exc:  # e.g. a full disk: one line, not DCP's rank tracebacks
        raise SpindleError(f"{path}: checkpoint could not be written ({describe_load_error(exc)}); it is not "
                           "marked complete, the previous checkpoint stays the latest") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _shape(meta) -> Optional[tuple]:
    size = getattr(meta, "size", None)
    return tuple(size) if size is not None else None


def check_model_shapes(path: Path, model_sd: dict, prefix: str = "model.", partial: bool = False) -> None:
    """Every model tensor must exist in the checkpoint with the same shape; name both otherwise.
    `partial`: the model is one pipeline stage, so the checkpoint may hold more than it."""
    meta = read_metadata(path).state_dict_metadata
    saved = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    if not saved:
        raise SpindleError(f"{path}: not a Spindle checkpoint (no model tensors in it)")
    missing = [k for k in model_sd if k not in saved]
    if missing:
        raise SpindleError(f"{path}: checkpoint has no parameter {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + " — a checkpoint of a different model?")
    for name, t in model_sd.items():
        want, got = tuple(t.shape), _shape(saved[name])
        if got is not None and got != want:
            raise SpindleError(f"{path}: parameter {name} has shape {list(got)} in the checkpoint but "
                               f"{list(want)} in the model built from the config")
    extra = [] if partial else [k for k in saved if k not in model_sd]
    if extra:
        raise SpindleError(f"{path}: checkpoint parameter {extra[0]} does not exist in the model built from the "
                           "config" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    content: tuple[str, ...],
    process_group=None,
    partial: bool = False,
) -> dict:
    """Load the selected content into model/optimizer in place; returns trainer_state.json (or {})."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise SpindleError(f"{path}: not a Spindle checkpoint (no .metadata)")
    state: dict = {}
    if "model" in content:
        state["model"] = get_model_state_dict(model)
        check_model_shapes(path, state["model"], partial=partial)
    if "optimizer" in content and optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    if "sampler" in content:
        state["rng"] = _rng_state()
    if state:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), process_group=process_group)
        except SpindleError:
            raise
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - one line naming the checkpoint
            raise SpindleError(f"{path}: cannot load checkpoint (truncated or damaged?): "
                               f"{describe_load_error(exc)}") from None
    if "model" in state:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=OPTIM_OPTIONS)
    if "rng" in state:
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    ts = path / "trainer_state.json"
    try:
        return json.loads(ts.read_text()) if ts.is_file() else {}
    except ValueError as exc:
        raise SpindleError(f"{ts}: damaged trainer state: {exc}") from None


def describe_load_error(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"Size mismatch.*?key (\S+).*?(torch\.Size\(\[[^\]]*\]\)).*?(torch\.Size\(\[[^\]]*\]\))", text, re.S)
    if m:
        return f"parameter {m.group(1)} has shape {m.group(3)} in the checkpoint but {m.group(2)} in the model"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # DCP wraps rank failures in a CheckpointException holding tracebacks; the last
    # "SomeError: message" line is the cause
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln)
              and not ln.startswith("CheckpointException")]
    first = causes[-1] if causes else (lines[0] if lines else type(exc).__name__)
    return first.split(". ")[0][:300]


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves into a save folder on local disk or S3, with snapshots, async upload and pruning.

    Every rank calls `save`; rank `is_writer` writes the JSON files, the marker, and prunes.
    For remote storage each rank stages its own DCP files under `async_upload_tmp_folder` and
    uploads them; the marker is written after every upload finished (and, on several ranks, after
    a barrier).
    """

    def __init__(self, url: str, ckpt: CkptConfig, *, is_writer: bool = True, process_group=None,
                 distributed: bool = False, log: Callable[[str], None] = print):
        self.url, self.ckpt, self.log = url, ckpt, log
        self.is_writer, self.process_group, self.distributed = is_writer, process_group, distributed
        self.storage = open_ckpt_storage(url, ckpt)
        self.remote = self.storage.local_path("") is None
        self.location = Location(self.storage.url) if self.remote else Path(self.storage.local_path(""))
        self.uploader = AsyncUploader(self.storage) if self.remote and ckpt.async_upload else None
        self._deferred: list[CkptRef] = []  # markers to write after the pending uploads (several ranks)
        self.upload_seconds: list[float] = []

    # -- queries --

    def ping(self) -> None:
        if self.is_writer:
            self.storage.ping()

    def completed(self) -> list[CkptRef]:
        return scan_completed(self.storage)

    # -- save --

    def save(self, step: int, model, optimizer, trainer_state: dict, config: dict,
             snapshot_slot: Optional[int] = None) -> str:
        self.wait()  # the previous upload must be complete (and marked) before a new save starts
        base = f"snapshot/{snapshot_slot}" if snapshot_slot is not None else ""
        ref = CkptRef(step, f"{base}/{step}" if base else str(step))
        if self.is_writer:
            if base:  # a slot holds one checkpoint: unmark, then clear it
                for f in self.storage.list_files(base):
                    if f.endswith(".step"):
                        self.storage.delete_prefix(f"{base}/{f}")
                for d in self.storage.list_dirs(base):
                    self.storage.delete_prefix(f"{base}/{d}")
            else:
                self.storage.delete_prefix(ref.marker)  # re-saving a step: incomplete until the new marker
                self.storage.delete_prefix(ref.rel)
        if self.distributed:
            dist.barrier(group=self.process_group)
        if not self.remote:
            write_dcp(Path(self.storage.local_path(ref.rel)), model, optimizer, trainer_state, config,
                      self.process_group, self.is_writer)
            self._commit(ref)
            return str(self.location / ref.rel)
        stage = Path(self.ckpt.async_upload_tmp_folder or tempfile.gettempdir()) / f"spindle-{os.getpid()}" / ref.rel
        shutil.rmtree(stage, ignore_errors=True)
        write_dcp(stage, model, optimizer, trainer_state, config, self.process_group, self.is_writer)
        if self.uploader is not None:
            on_done = None if self.distributed else (lambda: self._commit(ref))
            self._deferred.append(ref)
            self.uploader.submit(str(stage), ref.rel, on_done=on_done, remove_local=True)
            return str(self.location / ref.rel) + " (uploading in the background)"
        try:
            self.storage.upload_dir(str(stage), ref.rel)
        except SpindleError as exc:
            raise SpindleError(f"checkpoint step {step} was not uploaded to {self.location / ref.rel} and is "
                               f"not marked complete: {exc}") from None
        shutil.rmtree(stage, ignore_errors=True)
        if self.distributed:
            dist.barrier(group=self.process_group)
        self._commit(ref)
        return str(self.location / ref.rel)

    def _commit(self, ref: CkptRef) -> None:
        if not self.is_writer:
            return
        self.storage.write_bytes(ref.marker, f"{ref.step}\n".encode())
        if not self.remote:
            _fsync_dir(Path(self.storage.local_path(ref.marker)).parent)
        self.prune()

    def wait(self) -> None:
        """Finish background uploads; raise a clear error if one failed (its marker is not written)."""
        if self.uploader is None or not self._deferred:
            return
        refs, self._deferred = self._deferred, []
        try:
            self.uploader.wait()
        except SpindleError as exc:
            steps = ", ".join(str(r.step) for r in refs)
            raise SpindleError(f"checkpoint upload to {self.location} failed; step {steps} is not marked "
                               f"complete: {exc}") from None
        if self.distributed:
            dist.barrier(group=self.process_group)
            for ref in refs:
                self._commit(ref)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.uploader is not None:
                self.uploader.close()

    def prune(self) -> None:
        n = self.ckpt.keep_last_n
        if not n or not self.is_writer:
            return
        normal = [r for r in self.completed() if "/" not in r.rel]
        for ref in normal[:-n]:
            self.storage.delete_prefix(ref.marker)  # unmark first: a half-deleted folder is never loaded
            self.storage.delete_prefix(ref.rel)


# --------------------------------------------------------------------------- legacy helpers


def save_checkpoint(folder: Path, step: int, model, optimizer, trainer_state: dict, config: dict,
                    process_group=None, is_writer: bool = True) -> Path:
    """Write `{folder}/{step}/` then the marker `{folder}/{step}.step` (local folders)."""
    mgr = CheckpointManager(str(folder), CkptConfig(), is_writer=is_writer, process_group=process_group)
    mgr.save(step, model, optimizer, trainer_state, config)
    return Path(folder) / str(step)


def prune_old(folder: Path, keep_last_n: Optional[int]) -> None:
    if keep_last_n:
        CheckpointManager(str(folder), CkptConfig(keep_last_n=keep_last_n)).prune()


__all__ = [
    "CONTENTS", "CheckpointManager", "CkptRef", "LoadPlan", "Location", "StorageNotFound", "load_checkpoint",
    "local_copy", "open_checkpoint", "plan_load", "resolve", "resolve_checkpoint_dir", "scan_completed",
]
