"""A rank's LauncherWatch (spindle/parallel/launch.py) belongs to the rank alone: processes forked from it
(the worker pool of spindle.data.prepare when a rank builds its text cache) keep the default SIGTERM."""

import multiprocessing as mp
import os
import signal
import sys

import pytest

from spindle.parallel.launch import LauncherWatch


def sigterm_is_the_default() -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watch arms on Linux only")
def test_a_forked_worker_does_not_keep_the_launcher_watch():
    """With the rank's handler a pool worker took Pool.terminate()'s SIGTERM for its launcher's death (it printed
    'rank 1: its launcher ... exited') and could outlive it: the rank then waited for it forever (the seed's
    launch line under two pipeline stages hung building its text cache, or at exit, about 1 run in 3)."""
    previous = signal.getsignal(signal.SIGTERM)
    watch = LauncherWatch(os.getppid(), rank=0).arm()
    try:
        assert signal.getsignal(signal.SIGTERM) == watch._on_sigterm  # armed in this process ...
        with mp.get_context("fork").Pool(1) as pool:
            assert pool.apply(sigterm_is_the_default)  # ... not in the worker it forks
    finally:
        watch.disarm()
    assert signal.getsignal(signal.SIGTERM) == previous
