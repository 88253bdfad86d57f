"""Where Spindle's log lines go: the standard `logging` hierarchy under "spindle", routed by rank.

Every module logs with `logger = logging.getLogger(__name__)`; nothing is printed through callbacks.
What the lines reach is decided by whoever runs the job, for the duration of a `with logging_to(...)`:

- the console: INFO lines on rank 0 only, as the bare message, through `console` (default: print to the
  current sys.stdout, flushed); the command line passes a printer that redacts secrets, the trainer the
  progress bar's. Warnings and errors go to the current sys.stderr on every rank, as the bare message: what
  Python's last-resort handler did for them before any handler existed here.
- the rank's log file (`logs/rank{r}.log` in the run folder, during a fit): every line of every rank as
  "YYYY-mm-dd HH:MM:SS rank{r} message", through `rank_file.write_line`. The file object is the caller's
  (spindle.train.metrics.LineFile: whole lines, redacted, a full disk raised as RunFolderFull): an error
  writing it reaches the code that logged, as it did when the trainer printed through the file itself.

The innermost `with` wins: the handlers of an enclosing one are set aside and put back on exit, so a fit
inside a command does not print its lines twice (handlers an application added itself stay). On exit the
"spindle" logger is as it was found (handlers and level): tests run many trainings in one process.
Records still propagate to the root logger, so an application's own logging configuration (or pytest's
caplog) sees them too.

Library use (a Trainer built in a script or a test, no block in force) still prints rank 0's lines on stdout as
the old `log=print` default did: the trainer runs inside `default_console(rank)`, which opens `logging_to(rank)`
only where no block is in force. To silence those lines, run inside `quiet()` (warnings still reach stderr; a fit
inside still prints its step lines through its progress bar, as it always did).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import sys
from typing import Callable, Iterator, Optional, Protocol

ROOT = "spindle"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class LineSink(Protocol):
    def write_line(self, line: str) -> None: ...


def _print_line(line: str) -> None:
    print(line, flush=True)  # sys.stdout as it is now (pytest's capsys replaces it per test)


class ConsoleHandler(logging.Handler):
    """INFO and below on rank 0 through `console`; WARNING and above on every rank to sys.stderr."""

    def __init__(self, rank: int, console: Optional[Callable[[str], None]] = None):
        super().__init__(logging.INFO)
        self.rank = rank
        self.console = console or _print_line

    def emit(self, record: logging.LogRecord) -> None:
        # no try/except: a console that cannot be written stops the caller, as print did
        line = self.format(record)
        if record.levelno >= logging.WARNING:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        elif self.rank == 0:
            self.console(line)


class RankFileHandler(logging.Handler):
    """Every record as "time rank{r} message", one line of `sink` each."""

    def __init__(self, rank: int, sink: LineSink):
        super().__init__(logging.INFO)
        self.sink = sink
        self.owner = threading.get_ident()  # the thread that runs the loop and handles a full disk
        self.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(message)s", TIME_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write_line(self.format(record))
        except Exception:
            # the loop's own thread handles the error (a full disk stops the run with one line); a background
            # thread (the lease refresh, the uploader) must not die of it: the loop meets it at its next line
            if threading.get_ident() == self.owner:
                raise


@contextlib.contextmanager
def logging_to(rank: int = 0, console: Optional[Callable[[str], None]] = None,
               rank_file: Optional[LineSink] = None) -> Iterator[logging.Logger]:
    """Route the "spindle" loggers' INFO and above to this rank's console (and `rank_file`) inside the block.
    The file comes first: a line it could not keep is not printed either."""
    logger = logging.getLogger(ROOT)
    found_level = logger.level
    outer = [h for h in logger.handlers if isinstance(h, (ConsoleHandler, RankFileHandler))]  # an enclosing block's
    handlers: list[logging.Handler] = [RankFileHandler(rank, rank_file)] if rank_file is not None else []
    handlers.append(ConsoleHandler(rank, console))
    for handler in outer:
        logger.removeHandler(handler)
    for handler in handlers:
        logger.addHandler(handler)
    if found_level == logging.NOTSET or found_level > logging.INFO:  # a DEBUG asked for elsewhere stays
        logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        for handler in outer:
            logger.addHandler(handler)
        logger.setLevel(found_level)


def routed() -> bool:
    """Whether a `logging_to` block is in force (the command line's, `quiet()`, an application's)."""
    return any(isinstance(h, ConsoleHandler) for h in logging.getLogger(ROOT).handlers)


def default_console(rank: int = 0) -> contextlib.AbstractContextManager:
    """`logging_to(rank)` where no block is in force, else nothing: what a library caller that set nothing up sees
    is what `log=print` showed (rank 0's lines on stdout), and a caller's own block is kept."""
    return contextlib.nullcontext() if routed() else logging_to(rank)


def _discard(line: str) -> None:
    """The console of `quiet()`: INFO lines go nowhere."""


def quiet(rank: int = 0) -> contextlib.AbstractContextManager:
    """The "spindle" loggers' INFO lines kept off the console inside the block (benchmarks, tests); warnings still
    reach stderr."""
    return logging_to(rank, console=_discard)
