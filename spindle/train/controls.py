"""What a run must agree on between steps, across ranks: the stop file, writes that failed, a signal to save on.

InternEvo's `ckpt.stop_file_path` holds a step number N: at step N the run saves and quits (0, or a
missing file, means go on; -N saves at step N and goes on, a Spindle extension). After acting on it
the file is reset to 0, as InternEvo does, so a restart trains on to total_steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from spindle.parallel.comm import comm_tensor

logger = logging.getLogger(__name__)


def step_signals(stop_file: Optional[str], env, write_failed: bool,
                 signalled: int = 0) -> tuple[Optional[int], bool, int]:
    """In one collective (a MAX all-reduce on the world group's device): the stop file's value, read by rank 0,
    whether any rank could not write its metrics or log, and the number of a signal that asks to save and stop
    (spindle.train.signals; 0: none): a rank that got one tells the others, and all stop at this step."""
    value = comm_tensor((3,), torch.int64)  # on the backend's device: a CPU tensor breaks under NCCL
    if stop_file and env.is_main:
        try:
            text = Path(stop_file).read_text().strip()
            value[0] = int(text) if text else 0
        except (OSError, ValueError):
            value[0] = 0
    value[1] = int(write_failed)
    value[2] = signalled
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    stop, failed, signal_number = (int(v) for v in value.tolist())
    return stop or None, bool(failed), signal_number


def stops_at(stop: Optional[int], step: int) -> bool:
    """Whether the stop file's value `stop` ends the run after `step` steps (N > 0: at step N, or at once when
    the run is past it)."""
    return bool(stop and stop > 0 and step >= stop)


def saves_at(stop: Optional[int], step: int) -> bool:
    """Whether the stop file asks for a checkpoint after `step` steps: where it stops the run, and at step N of
    a -N (save and go on)."""
    return stops_at(stop, step) or bool(stop and step == abs(stop))


def acted_on_stop_file(stop_file: str, stop: int, step: int, saving: bool, is_main: bool) -> None:
    """After "save and quit at step N": say so, and reset the file to 0 (rank 0)."""
    saved = f"checkpoint saved at step {step}" if saving else \
        "saving is off (ckpt.enable_save_ckpt=False), so nothing was saved"
    logger.info(f"stop file {stop_file}: asked to stop at step {stop}; stopping at step {step} ({saved})")
    if is_main:
        try:
            Path(stop_file).write_text("0\n")
            logger.info(f"stop file {stop_file}: reset to 0, a restart continues to data.total_steps")
        except OSError as exc:
            logger.info(f"stop file {stop_file}: could not reset it to 0 ({exc.strerror}); a restart would stop again")
