"""The checkpoint manager: where and when to save, what may be pruned, whose checkpoints a folder holds.

When: `should_save(step, last, stop)` after every step — a checkpoint every `ckpt.checkpoint_every` steps, at
the run's last step (`ckpt.save_final`) and where the run stops or is asked to save (the stop file, a signal:
spindle.train.controls, spindle.train.signals); otherwise a snapshot every `ckpt.oss_snapshot_freq` steps, into
the older of two alternating slots. What: the model, the optimizer and the training state, a Stateful
(spindle.train.state.TrainingState: trainer_state.json, and its RNG streams as tensors).

Before anything is written into the save folder (`CheckpointManager.open`): a folder holding
checkpoints Spindle did not write (an InternEvo `20/model_tp0_pp0.pt`, ...) is refused, the folder
lock is taken (one writer, spindle.checkpoint.lock), and `adopt` refuses a folder holding checkpoints
of another run, or of this run newer than the step it continues from — so pruning and re-saving only
ever touch checkpoints of this run's lineage, and never the one just saved. What to load at start is
decided by spindle.checkpoint.loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from spindle.checkpoint.dcp_io import ProcessRNG, finish_write, write_tensors
from spindle.checkpoint.discovery import (
    CkptRef, FolderContents, Location, inspect_folder, open_ckpt_storage, record_lineage, scan_completed,
)
from spindle.checkpoint.loading import LoadPlan
from spindle.checkpoint.lock import FolderLock
from spindle.checkpoint.records import HASHED_FILES, completion_record, fresh_trainer_state, hash_file, sha256
from spindle.checkpoint.staging import Staging
from spindle.config import CkptConfig
from spindle.config.redact import redact
from spindle.errors import SpindleError
from spindle.fileio import fsync_dir, write_durable
from spindle.parallel.comm import all_gather_single, comm_tensor

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves into a save folder on local disk or S3, with snapshots, async upload and pruning.

    Every rank calls `save`; rank `is_writer` writes the JSON files and the completion record, holds the
    folder lock, and prunes. For remote storage each rank stages its own DCP files (spindle.checkpoint.
    staging) and uploads them; the record is written after every upload finished on every rank.
    """

    def __init__(self, url: str, ckpt: CkptConfig, *, job: str = "spindle", is_writer: bool = True,
                 process_group=None, distributed: bool = False,
                 alert: Optional[Callable[[str, str], None]] = None):
        self.url, self.ckpt, self.alert = url, ckpt, alert or (lambda kind, msg: None)
        self.is_writer, self.process_group, self.distributed = is_writer, process_group, distributed
        self.storage = open_ckpt_storage(url, ckpt)
        self.remote = self.storage.local_path("") is None
        self.location = Location(self.storage.url) if self.remote else Path(self.storage.local_path(""))
        self.lock = FolderLock(self.storage, job) if is_writer else None
        self.staging = Staging(self.storage, ckpt) if self.remote else None
        self.lineage: Optional[str] = None
        self.contents = FolderContents()
        self._slots: dict[int, int] = {}  # snapshot slot -> step of this lineage's snapshot in it
        self._pending: list[CkptRef] = []  # staged checkpoints whose upload has not been confirmed
        self._writing: Optional[tuple] = None  # the last save's (ref, folder, files, slot, DCP future)
        self._digests: dict[str, dict[str, str]] = {}  # rel -> SHA-256 of staged shards, for the record
        self.closed = False
        self.upload_seconds: list[float] = []

    # -- start-up

    def open(self) -> FolderContents:
        """Before anything is written: refuse checkpoints Spindle did not write, take the lock, ping."""
        self._on_writer(self._check_and_lock)
        self.contents = inspect_folder(self.storage)  # under the lock: what no other run can change now
        return self.contents

    def _check_and_lock(self) -> None:
        if self.remote:  # an endpoint that is down or mute fails fast, before any listing
            self.storage.ping()
        contents = inspect_folder(self.storage)
        if contents.foreign:
            raise SpindleError(
                f"{self.storage.url}: holds checkpoints Spindle did not write ({contents.describe_foreign()}); "
                "Spindle never writes into such a folder — set ckpt.save_ckpt_folder to a new folder (to start "
                "from an InternEvo checkpoint: load_ckpt_info=dict(path=..., ckpt_type='internevo'))")
        self.lock.acquire()
        if not self.remote:
            self.storage.ping()
        if self.staging is not None:
            self.staging.recover(self._commit_files)
        if contents.other:
            logger.info(f"checkpoint: {self.storage.url} also holds {', '.join(contents.other[:5])}, not written "
                        "by Spindle: left alone")

    def _on_writer(self, step: Callable[[], None]) -> None:
        """Run `step` on the writer; every rank learns whether it failed, so a refusal ends every rank the
        same way (one message, from the writer) instead of leaving the others in a collective."""
        error = None
        if self.is_writer:
            try:
                step()
            except SpindleError as exc:
                error = exc
        if self.distributed:
            failed = comm_tensor([0 if error is None else 1], torch.int64, self.process_group)
            dist.all_reduce(failed, group=self.process_group)
            if error is None and int(failed.item()):
                raise SpindleError("the checkpoint writer (rank 0) refused the save folder; see its message")
        if error is not None:
            raise error

    def adopt(self, plan: LoadPlan) -> str:
        """This run's lineage, after checking the folder holds nothing the run would overwrite or mix with.
        Moves the damaged checkpoints the plan skipped into damaged/ (writer, after every rank planned)."""
        same_folder = plan.storage is not None and plan.storage.url == self.storage.url
        skipped = {ref.rel for ref, _ in plan.quarantine} if same_folder else set()
        self.lineage = plan.verified.lineage if plan.continues_run else uuid.uuid4().hex
        resumed = plan.ref.step if plan.continues_run else 0
        others, newer = [], []
        for ref in self.contents.completed:
            if ref.rel in skipped:
                continue
            if record_lineage(self.storage, ref) != self.lineage:
                others.append(ref)
            elif ref.step > resumed:
                newer.append(ref)
        if others:
            raise SpindleError(
                f"{self.storage.url}: already holds checkpoints of another run (steps "
                f"{', '.join(str(r.step) for r in others[:8])}); this run would mix its checkpoints with them. "
                "Set ckpt.auto_resume=True to continue that run, or use a new ckpt.save_ckpt_folder")
        if newer:
            raise SpindleError(
                f"{self.storage.url}: holds checkpoints of this run newer than step {resumed} that it continues "
                f"from (steps {', '.join(str(r.step) for r in newer[:8])}); saving would overwrite them. Continue "
                "from the newest with ckpt.auto_resume=True, or save into a new ckpt.save_ckpt_folder")
        for ref in self.contents.completed:
            if ref.is_snapshot and ref.rel not in skipped:
                self._slots[int(ref.rel.split("/")[1])] = ref.step

        def move_damaged() -> None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for ref, _ in plan.quarantine if same_folder else []:
                dest = f"damaged/{ref.rel.replace('/', '-')}-{stamp}"
                self.storage.move(ref.marker, f"{dest}.step")
                self.storage.move(ref.rel, dest)
                logger.info(f"checkpoint: moved damaged checkpoint {ref.rel} to {self.storage.url}/{dest}")

        self._barrier()  # every rank has planned from the folder as it was
        self._on_writer(move_damaged)
        return self.lineage

    # -- when

    def should_save(self, step: int, last: bool, stop: bool) -> Optional[str]:
        """After `step` steps: "checkpoint", "snapshot" or None (module docstring). `last`: the run's last step;
        `stop`: the run stops here or is asked to save here (stop file, signal)."""
        every, snap = self.ckpt.checkpoint_every, self.ckpt.oss_snapshot_freq
        if (math.isfinite(every) and step % every == 0) or (last and self.ckpt.save_final) or stop:
            return "checkpoint"
        if math.isfinite(snap) and step % int(snap) == 0:
            return "snapshot"  # into the slot that does not hold the newest snapshot (save)
        return None

    # -- save

    def save(self, step: int, model, optimizer, state, config: dict, snapshot: bool = False,
             records: Optional[dict[str, bytes]] = None) -> str:
        """`state`: the training state, a Stateful whose state dict is trainer_state.json and whose `rng` (a
        Stateful of tensors) the RNG streams; a plain dict is the trainer state of a checkpoint written outside a
        run (the process's generators recorded). `records`: more small files of the step folder (name -> bytes),
        e.g. the tokenizer identity."""
        if self.closed:
            raise SpindleError(f"{self.storage.url}: the checkpoint manager is closed (its run ended)")
        if self.lineage is None:  # used without a training run: a new lineage in a folder of no checkpoints
            self.open()
            self.adopt(LoadPlan("fresh", (), "save"))
        if self._writing is not None:  # the previous asynchronous save: written, then recorded
            self._complete_write()
        self.wait()  # uploads of earlier saves are confirmed (or kept staged for a retry) first
        slot = None
        if snapshot:  # write into the slot that does not hold the newest snapshot: one always survives
            slot = min((0, 1), key=lambda s: self._slots.get(s, -1))
        ref = CkptRef(step, f"snapshot/{slot}/{step}" if snapshot else str(step))
        trainer_state = state.state_dict() if hasattr(state, "state_dict") else dict(state)
        if self.is_writer:
            self._clear(f"snapshot/{slot}" if snapshot else ref.rel)
        self._barrier()
        # the one place a save writes the lineage; the completion record copies it from here (_commit_files)
        owner = json.dumps({"lineage": self.lineage, "step": step, "host": socket.gethostname(),
                            "pid": os.getpid(), "time": time.time()}).encode()
        files = {".owner.json": owner, "trainer_state.json": json.dumps(trainer_state, indent=1).encode(),
                 # redacted here, for every writer (training, conversions): no secret at rest or uploaded
                 "config.json": json.dumps(redact(config), indent=1, default=str).encode(), **(records or {})}
        target = Path(self.storage.local_path(ref.rel)) if not self.remote else \
            self.staging.folder(ref.rel, _state_bytes(model, optimizer))
        try:
            future = write_tensors(target, model, optimizer, getattr(state, "rng", None) or ProcessRNG(),
                                   self.process_group, asynchronous=self.ckpt.async_save)
        except OSError as exc:
            raise self._not_written(target, exc) from None
        self._writing = (ref, target, files, slot, future)
        if future is not None:  # completed (files, record) at the next save or at close()
            return str(self.location / ref.rel) + " (tensors being written in the background)"
        return self._complete_write()

    @staticmethod
    def _not_written(target: Path, exc: OSError) -> SpindleError:
        # e.g. a full disk: one line; no completion record, the previous stays latest
        return SpindleError(f"{target}: checkpoint could not be written ({exc}); it is not marked complete, "
                            "the previous checkpoint stays the latest")

    def _complete_write(self) -> str:
        """After the tensors of the last save are on disk (an asynchronous write waited for here): the JSON
        files, fsynced, then the completion record (after every rank's files) or the upload. The record
        never names a checkpoint whose tensors are still being written."""
        (ref, target, files, slot, future), self._writing = self._writing, None
        try:
            finish_write(future)
            if self.is_writer:
                for name, data in files.items():
                    write_durable(target / name, data)
                fsync_dir(target)
        except OSError as exc:
            raise self._not_written(target, exc) from None
        if self.remote:
            self._digests[ref.rel] = self._staged_digests(target)
        if slot is not None:
            self._slots[slot] = ref.step
        if not self.remote:
            self._barrier()
            self._commit(ref)
            return str(self.location / ref.rel)
        if self.ckpt.async_upload:
            self._submit(ref)
            return str(self.location / ref.rel) + " (uploading in the background)"
        try:
            self.staging.upload_now(ref)
        except SpindleError as exc:
            raise SpindleError(f"checkpoint step {ref.step} was not uploaded to {self.location / ref.rel} and is "
                               f"not marked complete: {exc}") from None
        self._barrier()
        self._commit(ref)
        return str(self.location / ref.rel)

    def _clear(self, rel: str) -> None:
        """Empty a step folder or snapshot slot before writing into it: the record first, so a half-deleted
        folder is never taken for a checkpoint. The start-up checks made sure it holds only this lineage's
        checkpoints or Spindle's own unfinished saves."""
        if rel.startswith("snapshot/"):
            for f in self.storage.list_files(rel):
                if f.endswith(".step"):
                    self.storage.delete_prefix(f"{rel}/{f}")
        else:
            self.storage.delete_prefix(f"{rel}.step")
        if self.storage.exists(rel):
            self.storage.delete_prefix(rel)

    def _staged_digests(self, target: Path) -> dict[str, str]:
        """SHA-256 of the DCP shards just staged for a remote folder, hashed here before the upload so that
        the record needs no download. With several ranks each hashes its own shard (DCP names it
        `__{group rank}_0.distcp`) and the writer gathers the digests."""
        if not self.distributed:
            return {p.name: hash_file(p) for p in target.iterdir() if p.name.endswith(".distcp")}
        rank, world = dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        mine = target / f"__{rank}_0.distcp"
        digest = bytes.fromhex(hash_file(mine)) if mine.is_file() else bytes(32)  # zeros: unknown here
        gathered = comm_tensor((world * 32,), torch.uint8, self.process_group)
        all_gather_single(gathered, comm_tensor(list(digest), torch.uint8, self.process_group),
                          group=self.process_group)
        rows = gathered.cpu().view(world, 32)
        return {f"__{r}_0.distcp": bytes(rows[r].tolist()).hex() for r in range(world) if rows[r].any()}

    def _commit_files(self, ref: CkptRef) -> None:
        """Write the completion record of `ref` from the files the storage holds now: the size and SHA-256
        of each (shards hashed from the local folder, or the digests taken when they were staged)."""
        digests = self._digests.pop(ref.rel, {})
        sizes = self.storage.file_sizes(ref.rel)
        local = self.storage.local_path(ref.rel)
        hashes = {}
        for name in sizes:
            if name in HASHED_FILES or (local is None and name not in digests):
                hashes[name] = sha256(self.storage.read_bytes(f"{ref.rel}/{name}"))
            else:
                hashes[name] = digests[name] if local is None else hash_file(Path(local) / name)
        lineage = json.loads(self.storage.read_bytes(f"{ref.rel}/.owner.json"))["lineage"]
        self.storage.write_bytes(ref.marker, completion_record(ref.step, lineage, sizes, hashes))

    def _commit(self, ref: CkptRef) -> None:
        if not self.is_writer:
            self._digests.pop(ref.rel, None)
            return
        self._commit_files(ref)
        self.prune(keep=ref)

    def wait(self) -> None:
        """Settle background uploads: confirmed ones get their completion record (on one rank already in
        the upload thread); a failed one stays staged, is reported and alerted, and is submitted again —
        the run goes on."""
        if not self._pending:
            return
        failed = self.staging.settle()  # {rel: reason} of this rank's uploads
        if self.distributed:  # a checkpoint is complete when every rank's files landed
            ok = comm_tensor([0 if failed else 1], torch.int64, self.process_group)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.process_group)
            if int(ok.item()) == 0 and not failed:
                failed = {r.rel: "another rank's upload failed" for r in self._pending}
            elif not failed:
                for ref in self._pending:
                    self._commit(ref)
        pending, self._pending = self._pending, []
        for ref in pending:
            if ref.rel not in failed and not (self.distributed and failed):
                self.staging.remove(ref)
                continue
            reason = failed.get(ref.rel) or next(iter(failed.values()))
            message = (f"checkpoint upload of step {ref.step} to {self.location} failed ({reason}); it stays "
                       f"staged in {self.staging.root / ref.rel} and is retried in the background")
            logger.info(f"checkpoint: {message}")
            self.alert("checkpoint_upload", message)
            self._submit(ref)

    def _submit(self, ref: CkptRef) -> None:
        on_done = None if self.distributed else (lambda: self._commit(ref))
        self.staging.submit(ref, on_done)
        self._pending.append(ref)

    def close(self) -> None:
        """Confirm the last uploads (one more try for a failed one), then release the folder."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._writing is not None:
                self._complete_write()
            if self._pending:
                self.wait()
            if self._pending:
                self.wait()
            if self._pending:
                steps = ", ".join(str(r.step) for r in self._pending)
                raise SpindleError(f"checkpoint step {steps} could not be uploaded to {self.location}; it stays "
                                   f"staged in {self.staging.root} and is uploaded by the next run on this save "
                                   "folder")
        finally:
            if self.staging is not None:
                self.staging.close()
            if self.lock is not None:
                self.lock.release()

    def prune(self, keep: Optional[CkptRef] = None) -> None:
        """Keep the newest `keep_last_n` normal checkpoints of this lineage (never `keep`, just saved)."""
        n = self.ckpt.keep_last_n
        if not n or not self.is_writer:
            return
        ours = [r for r in scan_completed(self.storage)
                if not r.is_snapshot and r != keep and record_lineage(self.storage, r) == self.lineage]
        for ref in ours[: max(0, len(ours) - (n - 1 if keep is not None else n))]:
            self.storage.delete_prefix(ref.marker)  # unmark first: a half-deleted folder is never loaded
            self.storage.delete_prefix(ref.rel)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.process_group)


def save_weights_checkpoint(url: str, step: int, model, config: dict, counters: Optional[dict] = None,
                            records: Optional[dict[str, bytes]] = None) -> str:
    """A checkpoint holding weights (and `counters`, else zeros; the data position at its start) in a
    folder that holds no checkpoints yet: what conversions write, for `load_ckpt_info`."""
    manager = CheckpointManager(url, CkptConfig(), job="convert")
    try:
        manager.open()
        manager.adopt(LoadPlan("fresh", (), "conversion"))
        return manager.save(step, model, None, fresh_trainer_state(**{"step": step, **(counters or {})}), config,
                            records=records)
    finally:
        manager.close()


def _state_bytes(model, optimizer) -> int:
    """About how many bytes this rank's part of a checkpoint takes: weights, plus two AdamW moments."""
    local = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())
    return local * (3 if optimizer is not None else 1)


__all__ = ["CheckpointManager", "save_weights_checkpoint"]
