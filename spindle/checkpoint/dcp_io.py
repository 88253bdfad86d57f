"""Reading and writing the tensors of one checkpoint folder with torch.distributed.checkpoint (DCP).

    {step}/.metadata, {step}/__{rank}_0.distcp   model, optimizer and RNG tensors under their
                                                 fully-qualified names (sharded, topology-independent);
                                                 the RNG streams from / into a Stateful given by the caller

No pickled code is ever executed on load:
- DCP's `.metadata` is read with an unpickler that admits only DCP's own metadata classes, torch
  dtypes/sizes and plain containers;
- tensor payloads are read by DCP with `torch.load(weights_only=True)`;
- entries the metadata declares as bytes (DCP pickles every non-tensor value it saves: the optimizer's
  param_groups numbers) go through `SafeLoadPlanner`: refused where the state dict expects a tensor,
  otherwise read with `torch.load(weights_only=True)` and kept only when plain data of the expected
  type. DCP's default planner would unpickle them with weights_only off: any code a crafted
  checkpoint holds would run.
The JSON files beside the tensors (trainer state, config) and the completion record are written by the
manager (spindle.checkpoint.manager).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import logging
import pickle
import re
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from spindle.checkpoint.records import RNG_CONTENT
from spindle.config.ckpt_content import MODEL, OPTIMIZER
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)

# Optimizer state keyed "state.<param name>.exp_avg", "param_groups.<param name>.lr": every entry names
# its parameter, so a rank holding a pipeline stage or a shard reads exactly its part of any layout.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


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


def parse_metadata(data: bytes, where: str):
    """DCP Metadata from the bytes of a `.metadata` file, through the safe unpickler."""
    try:
        metadata = _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - truncated or foreign metadata
        raise SpindleError(f"{where}: unreadable checkpoint metadata (truncated or not a DCP checkpoint): "
                           f"{type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, dcp.metadata.Metadata) or not isinstance(  # admitted types, not DCP's (fuzz)
            getattr(metadata, "state_dict_metadata", None), dict):
        raise SpindleError(f"{where}: not DCP checkpoint metadata (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = Path(str(self.path)) / ".metadata"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SpindleError(f"{path.parent}: not a Spindle checkpoint (no .metadata)") from None
        metadata = parse_metadata(data, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if getattr(metadata, "planner_data", None) is None:
            metadata.planner_data = {}
        return metadata


def read_metadata(path: Path):
    return SafeFileSystemReader(str(path)).read_metadata()


def _pickled_entry(key: str, where: str) -> SpindleError:
    return SpindleError(f"{where}: entry {key} is declared as pickled bytes where a tensor is expected (a crafted or "
                        "foreign checkpoint); Spindle never unpickles objects from a checkpoint, refusing it")


_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, with the bytes entries read as data (module docstring)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def create_local_plan(self):
        entries = self.metadata.state_dict_metadata
        for key, value in self.state_dict.items():
            if isinstance(value, torch.Tensor) and isinstance(entries.get(key), BytesStorageMetadata):
                raise _pickled_entry(key, self.where)
        return super().create_local_plan()

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        expected = self.state_dict.get(key)
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an object weights_only refuses: pickled code, or damage
            raise SpindleError(f"{self.where}: entry {key} holds pickled objects that are not plain data "
                               f"({type(exc).__name__}); Spindle never unpickles code from a checkpoint, "
                               "refusing it") from None
        numbers = (int, float)
        same_kind = type(loaded) is type(expected) or (
            isinstance(loaded, numbers) and isinstance(expected, numbers) and not isinstance(loaded, bool))
        if not _is_plain(loaded) or (expected is not None and not same_kind):
            raise SpindleError(f"{self.where}: entry {key} holds a {type(loaded).__name__} where a "
                               f"{type(expected).__name__} is expected (a crafted or damaged checkpoint)")
        super().load_bytes(read_item, _as_stream(loaded))


def _as_stream(value) -> io.BytesIO:
    # DefaultLoadPlanner.load_bytes places what it unpickles (with weights_only=False) into the state dict;
    # hand it the checked value re-serialized, which holds plain data only
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """The process's generators: the CPU one, and the current CUDA device's if any."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class ProcessRNG:
    """The process's own generators as a Stateful: the RNG streams a checkpoint written outside a training run
    (a conversion) records. A run saves and restores its own (spindle.train.host.RunRNG)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        if "cpu" in state:
            torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])


def _rng_to_load(saved_keys: set[str], here: dict) -> dict:
    """Templates for the RNG states this checkpoint holds and this run has (`here`: its Stateful's state dict; a
    checkpoint written on a CPU machine has no CUDA state, and the other way round): the CPU state always, the
    CUDA state when both sides have it, a note otherwise."""
    wanted = {}
    for device, template in here.items():
        if f"rng.{device}" in saved_keys:
            wanted[device] = template
        else:
            logger.info(f"checkpoint: no {device} RNG state in the checkpoint (written on a machine without one); "
                        f"the {device} generator keeps its seed")
    for key in saved_keys:
        device = key.split(".", 1)[1]
        if device not in here:
            logger.info(f"checkpoint: the checkpoint's {device} RNG state is not restored (no {device} device here)")
    return wanted


# --------------------------------------------------------------------------- write / load tensors


def write_tensors(path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], rng: Stateful,
                  process_group=None, asynchronous: bool = False) -> Optional[Future]:
    """Write the DCP files of one checkpoint (every rank calls this; DCP coordinates): the model, the optimizer
    and the RNG streams (`rng`'s state dict, as rng.cpu / rng.cuda).

    `asynchronous`: `dcp.async_save` — the tensors are copied to host memory before it returns (training
    may change them right after), the files are written in a background thread; the returned future
    resolves when they are (pass it to `finish_write`)."""
    state = {"model": get_model_state_dict(model), "rng": rng.state_dict()}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    path.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group, assuming single process" is expected on 1 rank
            save = dcp.async_save if asynchronous else dcp.save
            result = save(state, storage_writer=dcp.FileSystemWriter(str(path)), process_group=process_group)
    except CheckpointException as exc:  # e.g. a full disk: one line, not DCP's rank tracebacks
        raise OSError(describe_load_error(exc)) from None
    return result if asynchronous else None


def finish_write(future: Optional[Future]) -> None:
    """Wait for an asynchronous write (nothing to wait for after a synchronous one); its failure as one
    OSError, as `write_tensors` reports a synchronous one."""
    if future is None:
        return
    try:
        future.result()
    except CheckpointException as exc:
        raise OSError(describe_load_error(exc)) from None


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
        if isinstance(saved[name], BytesStorageMetadata):
            raise _pickled_entry(prefix + name, str(path))
        want, got = tuple(t.shape), _shape(saved[name])
        if got is not None and got != want:
            raise SpindleError(f"{path}: parameter {name} has shape {list(got)} in the checkpoint but "
                               f"{list(want)} in the model built from the config")
    extra = [] if partial else [k for k in saved if k not in model_sd]
    if extra:
        raise SpindleError(f"{path}: checkpoint parameter {extra[0]} does not exist in the model built from the "
                           "config" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def load_tensors(
    path: Path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    content: tuple[str, ...],
    process_group=None,
    partial: bool = False,
    rng: Optional[Stateful] = None,
) -> None:
    """Load the selected content into place: model, optimizer, and with the data position (records.RNG_CONTENT)
    the RNG streams into `rng` (its load_state_dict, explicitly)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise SpindleError(f"{path}: not a Spindle checkpoint (no .metadata)")
    state: dict = {}
    if MODEL in content:
        state["model"] = get_model_state_dict(model)
        check_model_shapes(path, state["model"], partial=partial)
    if OPTIMIZER in content and optimizer is not None:
        if not any(k.startswith("optimizer.") for k in read_metadata(path).state_dict_metadata):
            raise SpindleError(f"{path}: holds no optimizer state (weights and counters only, as `spindle convert` "
                               "writes them); to start with a fresh AdamW, load it with load_ckpt_info "
                               "content=('model', 'scheduler', 'sampler') instead of 'all'")
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    if RNG_CONTENT in content and rng is not None:
        saved_rng = {k for k in read_metadata(path).state_dict_metadata if k.startswith("rng.")}
        wanted = _rng_to_load(saved_rng, rng.state_dict())
        if wanted:
            state["rng"] = wanted
    if state:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(str(path)),
                         process_group=process_group)
        except SpindleError:
            raise
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - one line naming the checkpoint
            refused = _refusal_inside(exc)
            if refused is not None:  # SafeLoadPlanner's, raised on some rank inside DCP
                raise refused from None
            raise SpindleError(f"{path}: cannot load checkpoint (truncated or damaged?): "
                               f"{describe_load_error(exc)}") from None
    if "model" in state:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=OPTIM_OPTIONS)
    if "rng" in state:
        rng.load_state_dict(state["rng"])


def _refusal_inside(exc: BaseException) -> Optional[SpindleError]:
    """The SpindleError a rank raised inside DCP (which wraps every rank's failure), if any."""
    failures = exc.failures if isinstance(exc, CheckpointException) else {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, SpindleError):
            return inner
    return None


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
