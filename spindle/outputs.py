"""Folders a command writes (`prepare --out`, `tokenizer train --out`, `convert ... OUT`, `eval --out`,
the text cache): refused when they would overwrite what a user saved, published only when complete.

One rule for every command: an existing non-empty target needs `--overwrite`; a target that is one of
the command's inputs, lies inside one or holds one is refused even then; the new content is written
into a hidden sibling folder and moved into place only when it is complete, so a failed or interrupted
command leaves the previous output as it was.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable

from spindle.errors import SpindleError


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(out: str, inputs: Iterable, overwrite: bool, option: str) -> None:
    """Refuse an output that would overwrite what a user saved or mix with what it reads: an existing
    non-empty folder (or an existing file) without `overwrite`; the input itself, a path inside one of
    the input folders, or a folder holding one of the inputs (even with `overwrite`)."""
    real_out = os.path.realpath(out)
    for inp in inputs:
        real_in = os.path.realpath(os.fspath(inp))
        if real_in == real_out:
            raise SpindleError(f"{option} {out}: is the input {inp} itself; write the output elsewhere "
                               "(not even --overwrite writes there)")
        if os.path.isdir(real_in) and _inside(real_out, real_in):
            raise SpindleError(f"{option} {out}: is inside the input folder {inp}; write the output elsewhere")
        if _inside(real_in, real_out):
            raise SpindleError(f"{option} {out}: holds the input {inp}; write the output elsewhere")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SpindleError(f"{option} {out}: already exists and is not empty; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out) and not overwrite:
        raise SpindleError(f"{option} {out}: already exists; pass --overwrite to replace it")


class StagedFolder:
    """Write an output folder next to its target and publish it when complete:

        with StagedFolder(out, replaces=lambda name: name.endswith(".tokens")) as tmp:
            ... write into tmp ...

    On success a missing target becomes the staged folder (one `os.replace`); an existing one loses
    the entries `replaces(name)` names (the previous output of the same command) and receives the new
    ones; anything else a user keeps there stays. On failure the staged folder is removed."""

    def __init__(self, out: str, replaces: Callable[[str], bool]):
        self.out, self.replaces = os.path.abspath(out), replaces
        parent, name = os.path.split(self.out)
        self.tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")

    def __enter__(self) -> str:
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise SpindleError(f"{self.out}: exists and is not a folder")
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by an earlier process with this pid
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if not os.path.isdir(self.out):
                    os.replace(self.tmp, self.out)
                    return
                for name in os.listdir(self.out):
                    path = os.path.join(self.out, name)
                    if self.replaces(name) or name in os.listdir(self.tmp):
                        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
                for name in os.listdir(self.tmp):
                    os.replace(os.path.join(self.tmp, name), os.path.join(self.out, name))
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
