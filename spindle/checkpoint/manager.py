"""Saving and loading training state with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `{save_ckpt_folder}/{step}/` holding
- the DCP files (`.metadata` + one `.distcp` per writing rank): model and optimizer tensors
  under their fully-qualified names (sharded, so a checkpoint saved under one parallel layout
  loads under another), plus the torch RNG states;
- `trainer_state.json`: counters, sampler position, loss-scaler state (plain JSON, no pickle);
- `config.json`: the resolved config of the run that wrote it;
and, written last, the completion marker `{save_ckpt_folder}/{step}.step` (InternEvo's name).
A folder without its marker is never loaded: a crash during a save leaves the previous
checkpoint as the latest.

Load precedence (printed at start): a completed checkpoint in `save_ckpt_folder` with
`auto_resume=True` wins (everything is restored: it is the same run continuing); otherwise
`load_ckpt_info` (or the legacy `load_ckpt_folder`) loads the listed `content`; otherwise the run
starts fresh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from spindle.config import CkptConfig, LoadCkptInfo
from spindle.errors import SpindleError

MARKER_RE = re.compile(r"^(\d+)\.step$")
CONTENTS = ("model", "optimizer", "scheduler", "sampler")


def strip_prefix(url: str) -> str:
    """'local:/x' -> '/x'. Other prefixes (boto3:) are handled by spindle.checkpoint.storage."""
    return url[len("local:"):] if url.startswith("local:") else url


def completed_steps(folder: str | Path) -> list[int]:
    """Steps with a completion marker, ascending."""
    root = Path(folder)
    if not root.is_dir():
        return []
    steps = []
    for entry in os.listdir(root):
        m = MARKER_RE.match(entry)
        if m and (root / m.group(1)).is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve_checkpoint_dir(path: str) -> Path:
    """A path may name a checkpoint folder (holding .metadata) or a save folder (take its latest)."""
    p = Path(strip_prefix(path))
    if (p / ".metadata").is_file():
        marker = p.parent / f"{p.name}.step"
        if MARKER_RE.match(marker.name) and not marker.exists():
            raise SpindleError(f"{p}: checkpoint is incomplete (no completion marker {marker.name}); not loading it")
        return p
    steps = completed_steps(p)
    if steps:
        return p / str(steps[-1])
    if p.is_dir() and any(d.isdigit() for d in os.listdir(p)):
        raise SpindleError(f"{p}: holds checkpoint folders but none is complete (no N.step marker)")
    raise SpindleError(f"{p}: not a Spindle checkpoint (no .metadata file, no completed N/ folder)")


@dataclass
class LoadPlan:
    path: Optional[Path]
    content: tuple[str, ...]
    reason: str


def plan_load(ckpt: CkptConfig, save_dir: Optional[Path]) -> LoadPlan:
    if ckpt.auto_resume and save_dir is not None and completed_steps(save_dir):
        latest = completed_steps(save_dir)[-1]
        return LoadPlan(save_dir / str(latest), CONTENTS,
                        f"auto_resume: continuing from {save_dir / str(latest)} (all state); load_ckpt_info is ignored")
    info: Optional[LoadCkptInfo] = ckpt.load_ckpt_info
    if info is None and ckpt.load_ckpt_folder:
        info = LoadCkptInfo(path=ckpt.load_ckpt_folder, content=("all",))
    if info is not None and info.path:
        if info.ckpt_type in ("hf", "hf_llama", "llama"):
            return LoadPlan(Path(strip_prefix(info.path)), ("hf",), f"load_ckpt_info: Hugging Face weights from {info.path}")
        content = CONTENTS if "all" in info.content else tuple(info.content)
        return LoadPlan(resolve_checkpoint_dir(info.path), content,
                        f"load_ckpt_info: loading {', '.join(content)} from {info.path}")
    return LoadPlan(None, (), "no checkpoint to load: starting from freshly initialised weights")


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    trainer_state: dict,
    config: dict,
    process_group=None,
    is_writer: bool = True,
) -> Path:
    """Write `{folder}/{step}/` then the marker `{folder}/{step}.step`. Every rank calls this."""
    path = folder / str(step)
    marker = folder / f"{step}.step"
    if is_writer:
        if marker.exists():
            marker.unlink()  # re-saving a step: it is incomplete until the new marker lands
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    state = {"model": get_model_state_dict(model), "rng": _rng_state()}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group, assuming single process" is expected on 1 rank
        dcp.save(state, checkpoint_id=str(path), process_group=process_group)
    if is_writer:
        (path / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (path / "config.json").write_text(json.dumps(config, indent=1, default=str))
        _fsync_dir(path)
        marker.write_text(f"{step}\n")
        _fsync_dir(folder)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    content: tuple[str, ...],
    process_group=None,
) -> dict:
    """Load the selected content into model/optimizer in place; returns trainer_state.json (or {})."""
    if not (path / ".metadata").is_file():
        raise SpindleError(f"{path}: not a Spindle checkpoint (no .metadata)")
    state: dict = {}
    if "model" in content:
        state["model"] = get_model_state_dict(model)
    if "optimizer" in content and optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if "sampler" in content:
        state["rng"] = _rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path), process_group=process_group)
    except Exception as exc:  # noqa: BLE001 - turn DCP's errors into one line naming the checkpoint
        raise SpindleError(f"{path}: cannot load checkpoint: {describe_load_error(exc)}") from None
    if "model" in state:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if "rng" in state:
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    ts = path / "trainer_state.json"
    return json.loads(ts.read_text()) if ts.is_file() else {}


def describe_load_error(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"Size mismatch.*?key (\S+).*?(torch\.Size\(\[[^\]]*\]\)).*?(torch\.Size\(\[[^\]]*\]\))", text, re.S)
    if m:
        return f"parameter {m.group(1)} has shape {m.group(3)} in the checkpoint but {m.group(2)} in the model"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:500]


def prune_old(folder: Path, keep_last_n: Optional[int]) -> None:
    if not keep_last_n:
        return
    for step in completed_steps(folder)[:-keep_last_n]:
        (folder / f"{step}.step").unlink(missing_ok=True)  # unmark first: a half-deleted folder is never loaded
        shutil.rmtree(folder / str(step), ignore_errors=True)
