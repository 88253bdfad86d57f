"""The one place for how Spindle writes and names files it is handed a path for.

- `write_atomic`: a whole file via a private sibling (created with O_EXCL | O_NOFOLLOW), fsync, one
  `os.replace`. The rename replaces a symbolic link at `path` instead of writing through it, so a
  planted link never redirects a write into a user's file, and a kill leaves the old or the new
  content, never a mix.
- `write_durable` / `fsync_dir` / `fsync_tree`: the other durable writes (a file written in place in a
  folder of its own, the directory entry of a rename, a staged output folder), fsync'd here and only here.
- `open_nofollow`: an `os.open` that refuses to follow a symbolic link in the last component (locks,
  append-only logs), with one line naming the path.
- `safe_relpath` / `safe_join`: a name read from a file, a bucket listing or a config (an S3 key, a
  step folder, `JOB_NAME`) is a relative path of plain components, checked before it is joined to
  the folder it must stay in.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

from spindle.errors import SpindleError

PathLike = Union[str, os.PathLike]


def check_path_text(value: str, what: str) -> str:
    """A path-like value a user or a file gave: refused (one line naming `what`) when it holds a NUL
    byte or a line break, which no file system name should and which break logs and launch lines."""
    if "\x00" in value:
        raise SpindleError(f"{what}: {value!r} holds a NUL byte; expected a path")
    if "\n" in value or "\r" in value:
        raise SpindleError(f"{what}: {value!r} holds a line break; expected a path on one line")
    return value


def safe_relpath(rel: str, what: str) -> str:
    """`rel` as a relative path of plain components ('a/b/c'), or one line naming `what`: no absolute
    path, no '..' or '.', no empty component, no NUL, no line break, no backslash."""
    check_path_text(rel, what)
    if rel.startswith("/") or "\\" in rel:
        raise SpindleError(f"{what}: {rel!r} is not a relative path inside its folder")
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise SpindleError(f"{what}: {rel!r} must be a relative path of plain names (no '..', '.', or empty part)")
    return rel


def safe_join(root: PathLike, rel: str, what: str) -> Path:
    """`root / rel` after `safe_relpath`, and checked once more after resolving: a component of the
    folder that is a symbolic link pointing outside `root` is refused too."""
    safe_relpath(rel, what)
    base = Path(os.path.realpath(os.fspath(root)))
    target = Path(os.path.realpath(os.path.join(base, rel)))
    if target != base and base not in target.parents:
        raise SpindleError(f"{what}: {rel!r} would land outside {root}")
    return Path(os.fspath(root)) / rel


def open_nofollow(path: PathLike, flags: int, mode: int = 0o644) -> int:
    """`os.open` that never follows a symbolic link at `path` itself (one line when one is there)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpindleError(f"{path}: is a symbolic link; Spindle does not write through links "
                               "(remove it or point the folder elsewhere)") from None
        raise


def fsync_dir(folder: PathLike) -> None:
    """fsync a folder: a rename lives in the directory entry, and without this a power loss can forget it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """fsync every file and folder under `folder` (links skipped), so that a rename publishing it never
    publishes files a power loss would empty."""
    for root, _dirs, files in os.walk(folder):
        for name in [*files, "."]:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # a link or an unopenable entry: nothing of ours to sync
            try:
                os.fsync(fd)
            except OSError:
                pass  # file systems that cannot fsync a folder
            finally:
                os.close(fd)


def write_durable(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` in place and fsync it: for a folder no reader sees before it is complete (a
    checkpoint's step folder; the caller fsyncs the folder once after its files). O_NOFOLLOW: a link planted
    there never redirects the write into someone's file."""
    with os.fdopen(open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def disk_error(action: str, path: PathLike, exc: OSError) -> SpindleError:
    """One line for an OSError while writing: full disk and quota named as such."""
    if exc.errno == errno.ENOSPC:
        return SpindleError(f"no space left on device while {action} {path}; what was there before is intact. "
                            "Free some space or write elsewhere")
    if exc.errno == errno.EDQUOT:
        return SpindleError(f"disk quota exceeded while {action} {path}; what was there before is intact")
    if exc.errno == errno.EFBIG:
        return SpindleError(f"file too large for this file system or the file size limit (ulimit -f) while {action} "
                            f"{path}; what was there before is intact")
    return SpindleError(f"{action} {path} failed: {exc.strerror or exc}")


def disk_full_errno(exc: BaseException) -> Optional[int]:
    """ENOSPC / EDQUOT / EFBIG when `exc` is a full disk, a quota or a file size limit: an OSError's errno,
    or the '(os error N)' that Rust-backed writers (safetensors, tokenizers) put in their message; else None."""
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else None


# in the name of every sibling `write_atomic` writes, so listings (checkpoint storage) can hide a write in
# flight and a killed writer's leftovers are recognisable
TMP_MARK = ".spindle-tmp-"


def write_atomic(path: PathLike, data: bytes, durable: bool = True, mode: int = 0o644) -> None:
    """Write `data` to `path` through a private sibling and one rename (module docstring). On failure the
    sibling is removed and `path` keeps what it held; a full disk is one line."""
    write_atomic_stream(path, lambda f: f.write(data), durable, mode)


def write_atomic_stream(path: PathLike, fill: Callable[[BinaryIO], object], durable: bool = True,
                        mode: int = 0o644) -> None:
    """`write_atomic` of what `fill(file)` writes: a copy streamed from another file never sits in memory."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise disk_error("writing", path, exc) from None
    if durable:
        fsync_dir(folder)
