"""SIGTERM saves (issue 25 point 4): a scheduler's SIGTERM (a time limit, a preemption) used to end a run without
saving, and a run with no checkpoint yet was lost. Now, with saving on, it saves at the next step boundary and
exits 143 with a line saying where, and a restart continues bit-exactly; a second signal, or no save within
ckpt.save_on_signal_timeout_s, exits at once; with saving off it says nothing was saved.

Real processes where the point is one (the signal, the exit code); the reference and the restart run in-process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faults.test_processes import child_env
from helpers import tiny_config_text
from spindle.cli import main

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
SAVED = re.compile(r"stopped by (SIG\w+): checkpoint of step (\d+) saved to (\S+); "
                   r"a restart (?:with ckpt.auto_resume=True )?resumes from it \(exit code (\d+)\)")


def config(tmp_path: Path, name: str, total_steps: int, **ckpt) -> Path:
    """The tiny run with its LR schedule fixed (lr_scheduler.total_steps), so that runs of different lengths
    train the same steps the same way."""
    path = tmp_path / f"{name}.py"
    path.write_text(tiny_config_text(tmp_path / name, JOB_NAME="run", data={"total_steps": total_steps},
                                     lr_scheduler={"total_steps": 1000, "warmup_ratio": 0.0},
                                     ckpt={"enable_save_ckpt": True, **ckpt}))
    return path


class Run:
    """`spindle train` in a child process, its output read as it comes."""

    def __init__(self, cfg: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "spindle.cli", "train", "--config", str(cfg), *args],
                                     cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if re.search(pattern, self.text):
                return
            assert self.proc.poll() is None, self.text[-3000:]
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s: {self.text[-3000:]}")

    def finish(self, timeout_s: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)
        return rc


def losses(run_folder: Path) -> dict[int, float]:
    records = (run_folder / "run" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, records)}


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_the_restart_continues_bit_exactly(tmp_path):
    run = Run(config(tmp_path, "cut", 100000))
    run.wait_for(r"step=2,")  # training, past its first steps, no checkpoint yet
    t_signal = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    rc = run.finish()
    took = time.monotonic() - t_signal
    found = SAVED.search(run.text)
    assert found and rc == 143 == int(found[4]) and found[1] == "SIGTERM", (rc, run.text[-3000:])
    assert "SIGTERM received: saving a checkpoint at the end of this step" in run.text, run.text[-3000:]
    step = int(found[2])
    saved = Path(found[3])
    assert saved.name == str(step) and (saved.parent / f"{step}.step").is_file(), os.listdir(saved.parent)  # marked
    assert "Traceback" not in run.text and "sample (" not in run.text, run.text[-3000:]

    total = step + 3
    assert main(["train", "--config", str(config(tmp_path, "whole", total))]) == 0  # uninterrupted reference
    assert main(["train", "--config", str(config(tmp_path, "cut", total))]) == 0  # the restart, auto_resume
    reference, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(reference) == list(range(total)) and set(cut) == set(reference), (sorted(cut), total)
    assert cut == reference  # bit-exact: the steps before the signal and the steps after the restart
    print(f"\nFIGURES sigterm_save: saved step {step}, exit {rc} {took:.1f} s after SIGTERM; "
          f"restart matched {total - step} later steps exactly")


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_a_checkpoint(tmp_path):
    """Slurm's early warning (USR1) then its SIGTERM, both before the step ends: the process is stopped while
    both arrive, so they are taken in order (USR1, then TERM) before the step can finish."""
    run = Run(config(tmp_path, "cut", 100000, save_on_signals=("SIGUSR1", "SIGTERM")))
    run.wait_for(r"step=2,")
    run.proc.send_signal(signal.SIGSTOP)
    run.proc.send_signal(signal.SIGUSR1)
    run.proc.send_signal(signal.SIGTERM)
    run.proc.send_signal(signal.SIGCONT)
    rc = run.finish()
    assert rc == 143, (rc, run.text[-3000:])
    assert "SIGUSR1 received: saving a checkpoint at the end of this step" in run.text, run.text[-3000:]
    assert ("a second signal (SIGTERM) while saving for SIGUSR1: exiting at once, without a checkpoint"
            in run.text), run.text[-3000:]
    ckpt = tmp_path / "cut" / "run" / "ckpt"
    assert not SAVED.search(run.text) and not list(ckpt.glob("*.step")), run.text[-3000:]


def test_with_saving_off_sigterm_says_nothing_was_saved(tmp_path):
    run = Run(config(tmp_path, "cut", 100000, enable_save_ckpt=False))
    run.wait_for(r"step=2,")
    run.proc.send_signal(signal.SIGTERM)
    rc = run.finish()
    assert rc == -signal.SIGTERM, (rc, run.text[-3000:])  # ended by the signal, as before
    assert "spindle: SIGTERM received: saving is off (ckpt.enable_save_ckpt=False), so nothing was saved; exiting" \
        in run.text, run.text[-3000:]
    assert not (tmp_path / "cut" / "run" / "ckpt").exists()


# a step that never ends, under the handler as the trainer installs it
NEVER_ENDING_STEP = """
import sys, time
from spindle.train.signals import SignalSave
save = SignalSave(("SIGTERM",), float(sys.argv[1]), saving=True, rank=0, distributed=False).install()
print("step 0", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("case", ["second_sigterm", "timeout"])
def test_a_step_that_does_not_end_second_sigterm_or_timeout_exit_at_once(case):
    timeout_s = 60.0 if case == "second_sigterm" else 1.0
    proc = subprocess.Popen([sys.executable, "-c", NEVER_ENDING_STEP, str(timeout_s)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline() == "step 0\n"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        first = proc.stdout.readline()
        assert first.startswith("spindle: SIGTERM received: saving a checkpoint at the end of this step"), first
        if case == "second_sigterm":
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 143, (rc, rest)
    if case == "second_sigterm":
        assert rest == ("spindle: a second signal (SIGTERM) while saving for SIGTERM: exiting at once, without a "
                        "checkpoint\n") and took < 10, (rest, took)
    else:
        assert rest == ("spindle: no checkpoint within ckpt.save_on_signal_timeout_s=1 s of SIGTERM (the step or "
                        "the save did not finish): exiting without one\n") and 1 <= took < 10, (rest, took)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank processes")
def test_under_torchrun_one_ranks_sigterm_saves_every_rank_at_the_same_step(tmp_path):
    """The signal reaches rank 1 only (a preemption notice can reach one node first): rank 0 learns it in the
    step's agreement, both save the same step (the save is collective: a disagreement would hang it)."""
    from faults.test_processes import Job

    job = Job(tmp_path, "ckpt.enable_save_ckpt=True")
    ranks = {}
    try:
        ranks = job.wait_for_steps(2)
        os.kill(ranks[1], signal.SIGTERM)
        rc = job.proc.wait(timeout=120)
    finally:
        job.close(ranks)
    job.reader.join(timeout=10)
    found = SAVED.search(job.text)  # rank 0's line: it was never signalled itself
    assert rc != 0 and found and found[1] == "SIGTERM" and found[4] == "143", (rc, job.text[-3000:])
    assert "spindle: rank 1: SIGTERM received: saving a checkpoint at the end of this step" in job.text
    assert "rank 0: SIGTERM received" not in job.text, job.text[-3000:]
    step, saved = int(found[2]), Path(found[3])
    assert (saved.parent / f"{step}.step").is_file(), os.listdir(saved.parent)
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == step
