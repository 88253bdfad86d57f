"""Where a fit's lines and metrics go: every rank's own log in the run folder (logs/rank{r}.log), rank 0's
console (through the progress bar), metrics.jsonl, TensorBoard and the experiment trackers (rank 0), opened when
a fit starts and closed when it ends (spindle.train.trainer.Trainer.fit). The lines are the "spindle" loggers'
(spindle/logs.py): `logging()` routes them into the rank's log and rank 0's progress bar for the fit."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from spindle.logs import logging_to
from spindle.train.metrics import LineFile, MetricSinks, Progress, RunFolderFull, continue_tensorboard, format_line
from spindle.train.monitor import build_monitor
from spindle.train.trackers import Trackers

logger = logging.getLogger(__name__)


class RunOutputs:
    """Rank 0 also feeds the experiment trackers (spindle/train/trackers.py), continuing their runs when the fit
    starts past step 0; a failing tracker is reported through `alert(kind, message)`, a monitor's alert (by
    default a Monitor of the run's own `monitor.alert` settings: log line, alert file, webhook)."""

    def __init__(self, cfg, run_dir: Path, rank: int, is_main: bool, start_step: int,
                 alert: Optional[Callable[..., object]] = None):
        self.rank, self.is_main, self.log_every, self.total = rank, is_main, cfg.trainer.log_every, cfg.data.total_steps
        tensorboard = cfg.trainer.tensorboard and cfg.enable_tb
        if is_main and tensorboard:
            continue_tensorboard(cfg.resume_tb_folder, Path(cfg.tensorboard_folder or run_dir / "tensorboard"))
        self.sinks = None
        if is_main:
            trackers = Trackers(cfg, run_dir, resumed=start_step > 0,
                                alert=alert or build_monitor(cfg, run_dir, rank, is_main).alert)
            self.sinks = MetricSinks(run_dir, cfg.trainer.jsonl, tensorboard, cfg.tensorboard_folder, trackers)
        self.progress = Progress(self.total, start_step, cfg.trainer.progress_bar if is_main else False)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.rank_log = LineFile(run_dir / "logs" / f"rank{rank}.log")

    def logging(self) -> contextlib.AbstractContextManager:
        """Inside: every line into this rank's log; rank 0 also prints it, through the progress bar."""
        return logging_to(self.rank, console=self.progress.print, rank_file=self.rank_log)

    def write_step(self, record: dict, step: int, done: int) -> Optional[RunFolderFull]:
        """The step's line (every `trainer.log_every` steps and at the last) and metrics; `done`: the steps trained
        now. A write that failed (a full disk) is returned, for every rank to learn of it."""
        try:
            if step % self.log_every == 0 or done == self.total:
                logger.info(format_line(record))
            if self.is_main:
                self.sinks.write(record, step)
                self.progress.update(done, f"loss {record['loss']:.3f}")
        except RunFolderFull as exc:
            return exc
        return None

    def close(self) -> None:
        """Called from the fit's `finally`: an exception on its way out there marks the trackers' runs failed."""
        self.rank_log.close()
        self.progress.close()
        if self.sinks is not None:
            self.sinks.close(failed=sys.exc_info()[0] is not None)
