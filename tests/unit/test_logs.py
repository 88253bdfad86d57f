"""spindle.logs: the "spindle" loggers reach rank 0's console, every rank's log file, and stderr for warnings,
inside `logging_to` only; nothing is left behind after it."""

import logging
import re

import pytest

from spindle.errors import SpindleError
from spindle.logs import ConsoleHandler, RankFileHandler, default_console, logging_to, quiet

log = logging.getLogger("spindle.some.module")  # any module's logger under the package
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d rank(\d+) (.*)$")


class Lines:
    def __init__(self):
        self.lines = []

    def write_line(self, line):
        self.lines.append(line)


def ours():
    return [h for h in logging.getLogger("spindle").handlers if isinstance(h, (ConsoleHandler, RankFileHandler))]


def test_rank0_prints_the_bare_message_on_stdout(capsys):
    with logging_to(0):
        log.info("model: 1,234 parameters")
        log.debug("not shown")
    out = capsys.readouterr()
    assert out.out == "model: 1,234 parameters\n" and out.err == ""


def test_other_ranks_print_only_warnings_to_stderr(capsys):
    with logging_to(3):
        log.info("rank 0 says this")
        log.warning("s3: attempt 1/5 failed; retrying")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "s3: attempt 1/5 failed; retrying\n"
    with logging_to(0):
        log.warning("on rank 0 too")
    assert capsys.readouterr().err == "on rank 0 too\n"


def test_the_rank_file_gets_every_rank_s_lines_with_time_and_rank(capsys):
    for rank in (0, 2):
        sink = Lines()
        with logging_to(rank, rank_file=sink):
            log.info("checkpoint saved: runs/x/ckpt/4")
            log.warning("a warning")
        assert [LINE.match(x).groups() for x in sink.lines] == [(str(rank), "checkpoint saved: runs/x/ckpt/4"),
                                                                (str(rank), "a warning")]
    assert capsys.readouterr().out == "checkpoint saved: runs/x/ckpt/4\n"  # rank 0's console only


def test_a_line_the_file_cannot_keep_is_not_printed_and_reaches_the_caller(capsys):
    class Full:
        def write_line(self, line):
            raise SpindleError("runs/x/logs/rank0.log: No space left on device while writing it")

    with logging_to(0, rank_file=Full()):
        with pytest.raises(SpindleError, match="No space left"):
            log.info("tflops=1.0,step=3")
        # a background thread (the lease refresh, the uploader) logging into the full file must not die of it:
        # the loop's thread meets the error at its next line
        import threading

        died = []
        worker = threading.Thread(target=lambda: log.info("lease refreshed"))
        worker.run = (lambda run: lambda: (died.append(False), run(), died.pop()))(worker.run)
        worker.start()
        worker.join()
        assert died == [], "the background thread's log line raised"
    assert "tflops" not in capsys.readouterr().out  # the loop's line is not printed (the thread's may be)


def test_the_real_rank_log_file(tmp_path):
    from spindle.train.metrics import LineFile

    sink = LineFile(tmp_path / "rank1.log")
    try:
        with logging_to(1, rank_file=sink):
            log.info("alert: x: posted to https://user:hunter22@example.com/hook")
    finally:
        sink.close()
    (line,) = (tmp_path / "rank1.log").read_text().splitlines()
    rank, message = LINE.match(line).groups()
    assert rank == "1" and "hunter22" not in message and message.startswith("alert: x: posted to https://")


def test_console_goes_through_the_given_printer(capsys):
    printed = []
    with logging_to(0, console=printed.append):
        log.info("through the progress bar")
    assert printed == ["through the progress bar"] and capsys.readouterr().out == ""


def test_the_innermost_block_wins_and_everything_is_put_back(capsys):
    spindle = logging.getLogger("spindle")
    before = (list(spindle.handlers), spindle.level)
    mine = logging.NullHandler()  # an application's own handler stays throughout
    spindle.addHandler(mine)
    try:
        outer = []
        with logging_to(0, console=outer.append):
            inner, sink = [], Lines()
            with logging_to(0, console=inner.append, rank_file=sink):
                log.info("during the fit")
                assert mine in spindle.handlers
            log.info("after the fit")
        assert (outer, inner, len(sink.lines)) == (["after the fit"], ["during the fit"], 1)
        assert ours() == [] and mine in spindle.handlers
    finally:
        spindle.removeHandler(mine)
    assert (list(spindle.handlers), spindle.level) == before
    log.info("outside: no handler of ours")
    assert capsys.readouterr().out == ""


def test_records_still_reach_the_root_logger(caplog):
    with caplog.at_level(logging.INFO, logger="spindle"), logging_to(5):
        log.info("seen by an application's logging too")
    assert [r.getMessage() for r in caplog.records] == ["seen by an application's logging too"]


def test_an_exception_leaves_nothing_behind():
    spindle = logging.getLogger("spindle")
    level = spindle.level
    with pytest.raises(RuntimeError):
        with logging_to(0, rank_file=Lines()):
            raise RuntimeError("the fit failed")
    assert ours() == [] and spindle.level == level


def test_library_use_prints_rank0_lines_unless_a_block_is_in_force(capsys):
    """What a Trainer built in a script shows (it runs inside default_console): rank 0's lines on stdout, as its
    old log=print did; another rank's stay off; a block already in force (the command's, quiet()) is kept."""
    with default_console(0):
        log.info("checkpoint: auto_resume: continuing from x")
    with default_console(1):
        log.info("rank 1's line")
    with logging_to(0, console=lambda line: print("cli:", line)), default_console(0):
        log.info("routed")
    with quiet(), default_console(0):
        log.info("silenced")
        log.warning("a warning still shows")
    captured = capsys.readouterr()
    assert captured.out == "checkpoint: auto_resume: continuing from x\ncli: routed\n", captured.out
    assert captured.err == "a warning still shows\n" and ours() == []
