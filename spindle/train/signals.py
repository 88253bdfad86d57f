"""Save on a scheduler's signal: SIGTERM (a Slurm time limit, a preemption) and, where the config lists it, an
early warning such as Slurm's `#SBATCH --signal=USR1@120` ask the run to save at the next step boundary and
exit (`ckpt.save_on_signals`, `ckpt.save_on_signal_timeout_s`; docs/checkpoints.md "Saving on a signal").

The handler only notes the request: the loop finishes the step it is in, the ranks agree on the step in
spindle.train.controls.step_signals (one rank's signal is every rank's), all save that step and leave with
exit code 128 + the signal's number (143 for SIGTERM: what a shell reports for a process SIGTERM ended, so
a job script, torchrun or Slurm sees a run that did not finish, whatever it does with that: requeue, retry).

What must not wait: a second signal, or no save within the timeout (a step or a save that hangs, a peer
that is gone), end the process at once with a line and the same code; nothing half-written is marked as a
checkpoint. A SIGTERM that is a launcher's death (PDEATHSIG, spindle.parallel.launch.LauncherWatch) and any
signal while saving is off go on to the handler they replaced (the monitor's alert, the LauncherWatch, the
default exit) after one line that says nothing was saved. Under a launcher (PDEATHSIG armed) telling the two
apart may take up to spindle.parallel.launch.PARENT_EXIT_GRACE_S (2 s), as it did before.

torchrun forwards the SIGTERM it gets to its ranks, and Slurm signals every process of a step: a rank under
torchrun sees the scheduler's SIGTERM twice, within milliseconds; a repeat within REPEAT_WINDOW_S counts
as the same request there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

from spindle.parallel.launch import launcher_exited, launcher_watched

logger = logging.getLogger(__name__)

REPEAT_WINDOW_S = 1.0  # under torchrun: the same signal again this soon is the agent forwarding it


def exit_code(signum: int) -> int:
    return 128 + signum


def write_stderr(line: str) -> None:
    """One line straight to fd 2: safe inside a signal handler (print() may be in the middle of a write)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class SignalSave:
    """While a fit runs (`install` ... `restore`, main thread): the configured signals become a request to save.
    `requested` is this rank's pending signal number (0: none), for the loop's agreement; `leave` says where
    the run saved and `exit_if_stopped` raises the SystemExit once the fit has cleaned up."""

    def __init__(self, names: tuple[str, ...], timeout_s: float, saving: bool, rank: int, distributed: bool,
                 alert: Callable[[str, str], object] = lambda kind, message: None):
        self.signums = [signal.Signals[name] for name in names]
        self.timeout_s, self.saving, self.alert = timeout_s, saving, alert
        self.prefix = f"spindle: rank {rank}: " if distributed else "spindle: "
        self.repeat_window_s = REPEAT_WINDOW_S if os.environ.get("TORCHELASTIC_RUN_ID") else 0.0
        self.requested = 0
        self.stopped_by = 0  # the signal the run saved and stopped for (every rank, after the agreement)
        self._requested_at = 0.0
        self._previous: dict[int, object] = {}
        self._parent: Optional[int] = None
        self._done = threading.Event()
        self.restart = "a restart resumes from it"  # from_config: how, when auto_resume is off

    @classmethod
    def from_config(cls, ckpt, saving: bool, env, alert) -> "SignalSave":
        made = cls(ckpt.save_on_signals, ckpt.save_on_signal_timeout_s, saving, env.rank, env.distributed, alert)
        if not ckpt.auto_resume:  # a plain restart would refuse the folder (it holds another run's checkpoints)
            made.restart = "a restart with ckpt.auto_resume=True resumes from it"
        return made

    def install(self) -> "SignalSave":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread; a fit elsewhere keeps the defaults
        self._parent = os.getppid() if launcher_watched() else None
        for signum in self.signums:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:  # nohup and the like: the user asked for the signal to be ignored
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)
        return self

    def restore(self) -> None:
        self._done.set()
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._previous = {}

    # ------------------------------------------------------------------ in the handler

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested:
            if signum == self.requested and now - self._requested_at < self.repeat_window_s:
                return  # the launcher forwarding the signal this rank already has
            self._exit_now(signum, f"a second signal ({name}) while saving for {signal.Signals(self.requested).name}:"
                                   " exiting at once, without a checkpoint")
        # noted before the launcher check, which may wait: a forwarded repeat meanwhile is the same request
        self.requested, self._requested_at = signum, now
        if signum == signal.SIGTERM and self._parent is not None and launcher_exited(self._parent):
            self._pass_on(signum, frame)  # the launcher died: the LauncherWatch ends this rank at once
            return
        if not self.saving:
            write_stderr(f"{self.prefix}{name} received: saving is off (ckpt.enable_save_ckpt=False), so nothing "
                         "was saved; exiting")
            self._pass_on(signum, frame)
            return
        message = (f"{name} received: saving a checkpoint at the end of this step, then exiting (within "
                   f"ckpt.save_on_signal_timeout_s={self.timeout_s:g} s; a second signal exits at once, unsaved)")
        write_stderr(self.prefix + message)
        self.alert(name.lower(), message)
        threading.Thread(target=self._deadline, args=(signum,), name="spindle-signal-deadline", daemon=True).start()

    def _pass_on(self, signum: int, frame) -> None:
        """What this signal did before the fit: the previous Python handler, else its default action."""
        self.requested = 0
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _deadline(self, signum: int) -> None:
        if not self._done.wait(self.timeout_s):
            self._exit_now(signum, f"no checkpoint within ckpt.save_on_signal_timeout_s={self.timeout_s:g} s of "
                                   f"{signal.Signals(signum).name} (the step or the save did not finish): exiting "
                                   "without one")

    def _exit_now(self, signum: int, message: str) -> None:
        write_stderr(self.prefix + message)
        os._exit(exit_code(signum))  # no clean-up that could wait: a checkpoint half-written is never marked

    # ------------------------------------------------------------------ in the loop

    def leave(self, signum: int, step: int, saved_to: Optional[str]) -> None:
        """After the agreed step's save: the line that says where (or that saving is off)."""
        self.stopped_by = signum
        name = signal.Signals(signum).name
        where = (f"checkpoint of step {step} saved to {saved_to}; {self.restart}" if saved_to else
                 f"saving is off (ckpt.enable_save_ckpt=False), so nothing was saved at step {step}")
        logger.info(f"stopped by {name}: {where} (exit code {exit_code(signum)})")

    def exit_if_stopped(self) -> None:
        """After the fit's clean-up: the exit a signal asked for. A signal that came after the last step's
        agreement found the run finished (its final save done): it still ends the process, not the sample."""
        if self.requested and not self.stopped_by:
            self.stopped_by = self.requested
            logger.info(f"{signal.Signals(self.requested).name} received after the last step: the run had finished; "
                        f"exiting (exit code {exit_code(self.requested)})")
        if self.stopped_by:
            raise SystemExit(exit_code(self.stopped_by))
