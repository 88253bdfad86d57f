"""What a run loads at start, and loading it.

Precedence (printed at start, see docs/checkpoints.md):
  1. `auto_resume=True` and a completed checkpoint (normal or snapshot) in `save_ckpt_folder`: the
     newest *intact* one is loaded with all content (the same run continuing); newer damaged ones are
     moved to `damaged/` and named; when none is intact the run is refused. `load_ckpt_info` is then
     ignored (and the log says so).
  2. otherwise `load_ckpt_info` (or the legacy `load_ckpt_folder`): the listed `content` from that
     path; a damaged checkpoint is refused. `ckpt_type="hf"`: weights of a Hugging Face folder.
  3. otherwise fresh weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spindle.checkpoint.dcp_io import load_tensors
from spindle.checkpoint.discovery import (
    CkptRef, Location, Verified, is_remote, local_copy, newest_intact, open_ckpt_storage, resolve, scan_completed,
    strip_prefix, verify,
)
from spindle.checkpoint.records import select_state
from spindle.checkpoint.storage import Storage
from spindle.config import CkptConfig, LoadCkptInfo
from spindle.config.ckpt_content import (
    CONTENT_PARTS, MODEL, OPTIMIZER, SAMPLER, SCHEDULER, expand_content, needs_state,
)
from spindle.errors import SpindleError

HF_TYPES = ("hf", "hf_llama")


def is_internevo_folder(path: str | Path) -> bool:
    """InternEvo's checkpoint folders hold model_tp{t}_pp{p}.pt shards (read by spindle.interop.internevo)."""
    p = Path(path)
    return p.is_dir() and any(f.name.startswith("model_tp") and f.suffix == ".pt" for f in p.iterdir())


@dataclass
class LoadPlan:
    kind: str  # "fresh", "spindle" (a DCP checkpoint), "hf", "internevo" (a model_tp*_pp*.pt folder)
    content: tuple[str, ...]
    reason: str
    url: Optional[str] = None
    storage: Optional[Storage] = None
    verified: Optional[Verified] = None
    quarantine: list[tuple[CkptRef, str]] = field(default_factory=list)  # damaged newer ones to move aside

    @property
    def ref(self) -> Optional[CkptRef]:
        return self.verified.ref if self.verified is not None else None

    @property
    def continues_run(self) -> bool:
        """True when the trainer state is restored: the run lineage (and its counters) go on."""
        return self.verified is not None and SAMPLER in self.content

    @property
    def path(self):  # display / local path
        if self.storage is not None and self.ref is not None:
            local = self.storage.local_path(self.ref.rel)
            return Path(local) if local else Location(self.storage.url) / self.ref.rel
        return self.url


def plan_load(ckpt: CkptConfig, save_storage: Optional[Storage]) -> LoadPlan:
    """Decide what to load at start (the module docstring gives the precedence). Reads only."""
    info: Optional[LoadCkptInfo] = ckpt.load_ckpt_info
    if info is None and ckpt.load_ckpt_folder:
        info = LoadCkptInfo(path=ckpt.load_ckpt_folder, content=("all",))
    has_info = info is not None and bool(info.path)
    if ckpt.auto_resume and save_storage is not None:
        refs = scan_completed(save_storage)
        if refs:
            verified, damaged = newest_intact(save_storage, refs, ckpt.verify)
            if verified is None:
                reasons = "; ".join(reason for _, reason in damaged[:3])
                raise SpindleError(f"auto_resume: no intact checkpoint in {save_storage.url} ({reasons}); "
                                   "refusing to start over in a folder of saved checkpoints")
            note = f"; load_ckpt_info ({info.path}) is ignored" if has_info else ""
            fallback = "".join(f"; checkpoint {ref.step} is damaged ({reason}) and is moved to damaged/"
                               for ref, reason in damaged)
            return LoadPlan("spindle", CONTENT_PARTS, f"auto_resume: continuing from {save_storage.url}/"
                            f"{verified.ref.rel} (step {verified.ref.step}, all state){fallback}{note}"
                            f"{_size_only(ckpt)}",
                            storage=save_storage, verified=verified, quarantine=damaged)
    if has_info:
        if info.ckpt_type in HF_TYPES:
            return LoadPlan("hf", ("hf",), f"load_ckpt_info: Hugging Face weights from {info.path}", url=info.path)
        content = expand_content(info.content)
        if not is_remote(info.path) and is_internevo_folder(strip_prefix(info.path)):
            return LoadPlan("internevo", content, _internevo_reason(info.path, content), url=info.path)
        storage, ref = resolve(info.path, ckpt)
        verified = verify(storage, ref, need_state=needs_state(content), content=ckpt.verify)
        why = " (auto_resume found no completed checkpoint in save_ckpt_folder)" if ckpt.auto_resume else ""
        return LoadPlan("spindle", content, f"load_ckpt_info: loading {', '.join(content)} from "
                        f"{storage.url}/{ref.rel}{why}{_size_only(ckpt)}", url=info.path, storage=storage,
                        verified=verified)
    return LoadPlan("fresh", (), "no checkpoint to load: starting from freshly initialised weights")


def _internevo_reason(path: str, content: tuple[str, ...]) -> str:
    carried = ["weights"] if MODEL in content else []
    carried += ["the step and token counters"] if SAMPLER in content else []
    carried += ["the schedule position"] if SCHEDULER in content else []
    moments = ("; its AdamW moments are not mapped: the optimizer starts from zero moments"
               if OPTIMIZER in content else "")
    return (f"load_ckpt_info: InternEvo checkpoint {path}: loading {', '.join(carried) or 'nothing'}{moments}; "
            "InternEvo's sampler position is not Spindle's, the data starts at the beginning of its order")


def _size_only(ckpt: CkptConfig) -> str:
    return ("; its tensor files were checked by size only, not hashed (ckpt.verify='size')"
            if ckpt.verify == "size" else "")


def restore(plan: LoadPlan, model, optimizer, state=None, saved_state: Optional[dict] = None, process_group=None,
            partial: bool = False) -> dict:
    """Load what the plan's content selects: the tensors into model / optimizer / `state.rng`, and the trainer
    state's parts into `state` (a Stateful: spindle.train.state.TrainingState) — `saved_state`, the verified
    trainer state as the resume check completed it, else the verified one. Returns the verified trainer state."""
    with local_copy(plan.storage, plan.ref, plan.verified) as path:
        load_tensors(path, model, optimizer, plan.content, process_group, partial, rng=getattr(state, "rng", None))
    if state is not None:
        state.load_state_dict(select_state(saved_state or plan.verified.trainer_state, plan.content))
    return plan.verified.trainer_state


def load_checkpoint(path: Path, model, optimizer, content: tuple[str, ...], process_group=None,
                    partial: bool = False, rng=None) -> dict:
    """Verify the completed checkpoint folder `path` and load `content` from it (the RNG streams into the
    Stateful `rng` when given); returns its trainer state ({} when only weights were asked for)."""
    path = Path(path)
    storage = open_ckpt_storage(str(path.parent))
    if not path.name.isdigit():
        raise SpindleError(f"{path}: checkpoint folder name must be its step number")
    verified = verify(storage, CkptRef(int(path.name), path.name), need_state=needs_state(content))
    load_tensors(path, model, optimizer, content, process_group, partial, rng)
    return verified.trainer_state
