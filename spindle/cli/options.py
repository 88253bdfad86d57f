"""Command-line options of every command: values checked for type and range by argparse, every
mistake one line naming the option.

argparse prints a usage block and exits on a bad option; here a bad option raises SpindleError,
which `spindle.cli.guarded` prints as one `spindle: error: ...` line with exit code 2, like any other
bad input.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from spindle.errors import SpindleError
from spindle.fileio import check_path_text

MAX_WORKERS = 1024


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are SpindleErrors (one line) instead of usage + SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SpindleError(f"{self.prog}: {message}")


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {value}")
        return value

    return parse


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the interval between lo and hi (open ends as asked)."""
    span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}") from None
        ok = (math.isfinite(value) and (lo < value if lo_open else lo <= value)
              and (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text}")
        return value

    return parse


def name(text: str) -> str:
    """argparse type: a non-empty name (a column, a split, a config)."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a non-empty name, got {text!r}")
    return text


def relative_name(text: str) -> str:
    """argparse type: a non-empty name that stays inside a folder (no absolute path, no '..')."""
    name(text)
    if os.path.isabs(text) or ".." in text.replace("\\", "/").split("/"):
        raise argparse.ArgumentTypeError(f"expected a name inside the dataset folder, got {text!r}")
    return text


def path(text: str) -> str:
    """argparse type of every path option (a file, a folder, a checkpoint or bucket URL, a glob): not empty,
    no NUL byte (which the OS refuses later with a traceback) and no line break (spindle.fileio)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    try:
        return check_path_text(text, "path")
    except SpindleError as exc:  # argparse names the option
        raise argparse.ArgumentTypeError(str(exc).removeprefix("path: ")) from None


def workers_option(ap: argparse.ArgumentParser, flag: str = "--workers") -> None:
    ap.add_argument(flag, type=int_in(1, MAX_WORKERS), default=None,
                    help=f"tokenizer processes, 1..{MAX_WORKERS} (default: all cores)")


def number_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """argparse type: a comma-separated list of `item`s."""

    def parse(text: str) -> list:
        values = [item(x) for x in text.replace(" ", "").split(",") if x]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
        return values

    return parse
