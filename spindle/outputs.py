"""Folders a command writes (`prepare --out`, `tokenizer train --out`, `convert ... OUT`, `eval --out`,
the text cache): never over what a user saved, published whole or not at all, one writer at a time.

The rules, the same for every command:

- **Refused outright**, even with `--overwrite` (`check_output`): a target that is one of the command's
  inputs, lies inside one or holds one; a target that is or lies inside a checkpoint (a step folder
  `N/` beside its `N.step` record or holding DCP's `.metadata`, or a save folder holding `N.step`
  records): no command writes into checkpoints, whose folders only the checkpoint manager writes.
- **`--overwrite` is scoped**: an existing non-empty target needs it, and it replaces only what the
  command writes: the entries named like those of its new output, and those its `replaces(name)` rule
  names (its own earlier output: stale shards, an old weight index). Every other entry of OUT (a
  README, notes, another model's folder) is kept: it is carried into the new folder as hard links (the
  same files, not copies; a copy only where the file system refuses a link).
- **One writer at a time**: a `.{name}.lock` file beside OUT is `flock`ed from staging to publishing;
  a second command on the same output is refused in one line naming the pid and command holding it,
  and the non-empty check is repeated under the lock (a rival may have published since).
- **Published by one rename**: the new output is written into `.{name}.partial-{pid}-{token}` beside
  OUT; when it is complete, Linux's renameat2(RENAME_EXCHANGE) swaps it with OUT in one step and the
  old output (now under the hidden name) is removed. Without that call (another system, a file system
  that refuses it) OUT is renamed to `.{name}.old-{pid}-{token}` and the new folder renamed in. A kill
  at any instant leaves OUT whole, old or new; in the fallback's one gap OUT is missing with the old
  folder aside, and the next command on that output renames it back.
- **Leftovers**: hidden partial / old folders of dead processes are removed (or restored, above) by the
  next command on that output; those of live processes are left alone.
- **A full disk** (ENOSPC, EDQUOT, EFBIG, also as Rust writers report them) while staging or publishing
  is one line; the previous output is untouched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import sys
import uuid
from typing import Callable, Iterable, Optional

from spindle.errors import SpindleError
from spindle.fileio import disk_error, disk_full_errno, fsync_tree, open_nofollow

STEP_RECORD_RE = re.compile(r"^([0-9]+)\.step$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
# errnos with which renameat2 says "not here" (old kernel, file system without exchange): fall back
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_checkpoint_folder(folder: str) -> bool:
    """A step folder (`N/` beside `N.step`, or holding DCP's `.metadata`) or a folder of checkpoints
    (a save folder, a snapshot slot: an `N.step` record beside its `N/`)."""
    if not os.path.isdir(folder):
        return False
    name, parent = os.path.basename(folder), os.path.dirname(folder)
    if re.fullmatch(r"[0-9]+", name) and (os.path.isfile(os.path.join(parent, f"{name}.step"))
                                          or os.path.isfile(os.path.join(folder, ".metadata"))):
        return True
    try:
        names = os.listdir(folder)
    except OSError:
        return False  # an unreadable ancestor (/home on some systems) holds no checkpoint we could write into
    return any(m and os.path.isdir(os.path.join(folder, m.group(1))) for m in map(STEP_RECORD_RE.match, names))


def checkpoint_around(path: str) -> Optional[str]:
    """The checkpoint folder `path` is or lies inside (resolved), or None."""
    current = os.path.realpath(path)
    while True:
        if _is_checkpoint_folder(current):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def refuse_checkpoint(path: str, option: str) -> None:
    """One line when `path` is or lies inside a checkpoint folder (module docstring)."""
    found = checkpoint_around(path)
    if found is not None:
        where = "is" if found == os.path.realpath(path) else "lies inside"
        raise SpindleError(f"{option} {path}: {where} the checkpoint folder {found}; no command writes into "
                           "checkpoints, write the output elsewhere")


def check_output(out: str, inputs: Iterable, overwrite: bool, option: str) -> None:
    """Refuse an output that would overwrite what a user saved or mix with what it reads: an existing
    non-empty folder (or an existing file) without `overwrite`; the input itself, a path inside one of
    the input folders, or a folder holding one of the inputs, and a path in a checkpoint (even with
    `overwrite`); one that another command is writing now. What a killed command left is put back first."""
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
    refuse_checkpoint(out, option)
    recover(out, option)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SpindleError(f"{option} {out}: already exists and is not empty; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out) and not overwrite:
        raise SpindleError(f"{option} {out}: already exists; pass --overwrite to replace it")


def _exchange(a: str, b: str) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); False where this system or file
    system has no such call, so that the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), b)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _remove_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
            raise
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(os.lstat(src).st_mode):
        shutil.copy2(src, dst)
    else:
        raise SpindleError(f"{src}: a special file this file system will not link; move it out of the output "
                           "folder so that it can be kept")


def _raise(exc: OSError) -> None:
    raise exc  # os.walk skips unreadable folders silently: one not carried over would be deleted


def _carry(src: str, dst: str) -> None:
    """`dst` as the same entries as `src`: folders re-created, everything else hard-linked."""
    if not os.path.isdir(src) or os.path.islink(src):
        _link_or_copy(src, dst)
        return
    folders = [(src, dst)]
    os.mkdir(dst)
    for root, dirs, files in os.walk(src, onerror=_raise):
        target = os.path.join(dst, os.path.relpath(root, src))
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                _link_or_copy(os.path.join(root, name), os.path.join(target, name))
            else:
                os.mkdir(os.path.join(target, name))
                folders.append((os.path.join(root, name), os.path.join(target, name)))
        for name in files:
            _link_or_copy(os.path.join(root, name), os.path.join(target, name))
    for old, new in reversed(folders):  # modes last: a read-only folder is filled first
        shutil.copymode(old, new)


class WriterLock:
    """`.{name}.lock` beside an output, `flock`ed while one command writes it; removed when released."""

    def __init__(self, out: str, shown: str, option: str, command: str):
        self.path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")
        self.shown, self.option, self.command = shown, option, command
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        for _ in range(5):  # the holder removes the file when it finishes: lock the file that is there now
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().replace("\n", " ")
                os.close(fd)
                raise SpindleError(f"{self.option} {self.shown}: another command is writing it now "
                                   f"({holder or 'holder unknown'}; lock {self.path}); wait for it to finish "
                                   "or write elsewhere") from None
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}: {self.command}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)
        raise SpindleError(f"{self.option} {self.shown}: its lock {self.path} keeps changing; another command "
                           "is writing it, write elsewhere")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiter then finds the file gone and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _recover(out: str) -> None:
    """Leftovers of earlier commands on the (resolved) output `out`, whose lock the caller holds: a dead
    process's old folder comes back when OUT is missing; the other hidden folders of dead processes go."""
    parent, name = os.path.split(out)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-([0-9]+)(?:-[0-9a-f]+)?$")
    stale = []
    for entry in os.listdir(parent):
        found = pattern.match(entry)
        # our own pid: an earlier failed cleanup of this process (two writers here would share the lock)
        if found and (int(found.group(2)) == os.getpid() or _pid_gone(int(found.group(2)))):
            stale.append((found.group(1), os.path.join(parent, entry)))
    olds = sorted((p for kind, p in stale if kind == "old"), key=lambda p: os.lstat(p).st_mtime_ns)
    if olds and not os.path.lexists(out):
        os.rename(olds[-1], out)  # killed between the fallback's two renames: the old output returns
        stale.remove(("old", olds[-1]))
    for _, path in stale:
        _remove_tree(path)


def recover(out: str, option: str = "output") -> None:
    """`_recover` under the output's lock (refused in one line while another command writes it); nothing
    to do where the parent folder does not exist or cannot be written."""
    real = os.path.realpath(out)
    if not os.path.isdir(os.path.dirname(real)):
        return
    lock = WriterLock(real, out, option, "spindle: recovering a killed command's output")
    try:
        lock.acquire()
    except OSError:
        return  # a read-only parent: the command will say so when it writes
    try:
        _recover(real)
    except OSError as exc:
        raise disk_error("recovering", out, exc) from None
    finally:
        lock.release()


class StagedFolder:
    """Write an output folder next to its target and publish it when complete (module docstring):

        with StagedFolder(out, replaces=is_my_output, overwrite=args.overwrite, option="--out",
                          command="spindle prepare") as tmp:
            ... write into tmp ...

    On success the target becomes the staged folder in one rename, holding the new entries and every
    entry of the old target that is neither named like a new one nor `replaces(name)`. On failure the
    staged folder is removed and the target is as it was; a full disk is one line."""

    def __init__(self, out: str, replaces: Optional[Callable[[str], bool]] = None, *, overwrite: bool = False,
                 option: str = "output", command: str = "a spindle command"):
        self.shown, self.option, self.overwrite = out, option, overwrite
        self.replaces = replaces or (lambda name: False)
        absolute = os.path.abspath(out)
        if os.path.islink(absolute) and not os.path.exists(absolute):
            raise SpindleError(f"{option} {out}: is a symbolic link to nothing; remove it or write elsewhere")
        self.out = os.path.realpath(absolute)  # a link to a folder: the folder it points to is the output
        self.parent, self.name = os.path.split(self.out)
        self.tmp = self._hidden("partial")
        self.lock = WriterLock(self.out, out, option, command)

    def _hidden(self, kind: str) -> str:
        return os.path.join(self.parent, f".{self.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> str:
        try:
            os.makedirs(self.parent, exist_ok=True)
            self.lock.acquire()
        except OSError as exc:
            raise disk_error("preparing", self.shown, exc) from None
        try:
            _recover(self.out)
            if os.path.lexists(self.out) and not os.path.isdir(self.out):
                raise SpindleError(f"{self.option} {self.shown}: exists and is not a folder")
            if not self.overwrite and os.path.isdir(self.out) and os.listdir(self.out):
                raise SpindleError(f"{self.option} {self.shown}: already exists and is not empty; pass --overwrite "
                                   "to replace it")
            os.mkdir(self.tmp)
        except OSError as exc:
            self.lock.release()
            raise disk_error("preparing", self.shown, exc) from None
        except BaseException:
            self.lock.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._publish()
            elif not isinstance(exc, SpindleError) and disk_full_errno(exc) is not None:
                code = disk_full_errno(exc)
                raise disk_error("writing", self.shown, OSError(code, os.strerror(code))) from None
        finally:
            _remove_tree(self.tmp)
            self.lock.release()

    def _publish(self) -> None:
        try:
            fsync_tree(self.tmp)
            if not os.path.lexists(self.out):
                os.rename(self.tmp, self.out)
                return
            new_names = set(os.listdir(self.tmp))
            for name in os.listdir(self.out):
                if name not in new_names and not self.replaces(name):
                    _carry(os.path.join(self.out, name), os.path.join(self.tmp, name))
            shutil.copymode(self.out, self.tmp)
            if _exchange(self.tmp, self.out):
                return  # self.tmp now holds the old output; __exit__ removes it
            aside = self._hidden("old")
            os.rename(self.out, aside)
            try:
                os.rename(self.tmp, self.out)
            except OSError:
                os.rename(aside, self.out)
                raise
            _remove_tree(aside)
        except OSError as exc:
            raise disk_error("publishing", self.shown, exc) from None
