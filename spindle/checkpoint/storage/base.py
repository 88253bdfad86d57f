"""The storage interface of checkpoint folders: relative POSIX addresses, one error type for "missing".

Addresses inside a storage are relative POSIX paths ("100/model.pt"); "" is the storage root.
Everything here is plain IO (no torch import).
"""

from __future__ import annotations

import abc
import os
import posixpath
import socket
import time
from typing import Iterator, Optional

from spindle.errors import SpindleError
from spindle.fileio import TMP_MARK  # in the names of in-flight atomic writes: listings hide them


class StorageNotFound(SpindleError, FileNotFoundError):
    """A file or folder that should be in the storage is not there.

    Also a FileNotFoundError so callers probing for optional files can catch the usual type.
    """


class WriteConflict(SpindleError):
    """A conditional write found the object there (create) or changed since it was read (replace)."""


def _clean_rel(rel: str) -> str:
    """Normalise a storage-relative path; refuse anything that would escape the storage root, and any '..'
    at all: a name from a listing ('snapshot/0/x/../../2.step') must never reach another entry."""
    rel = (rel or "").replace("\\", "/")
    if rel.startswith("/"):
        raise SpindleError(f"storage path {rel!r} must be relative to the checkpoint folder")
    if ".." in rel.split("/"):
        raise SpindleError(f"storage path {rel!r} points outside the checkpoint folder or its place in it ('..')")
    norm = posixpath.normpath(rel) if rel else ""
    if norm in (".", ""):
        return ""
    return norm


def _join_rel(*parts: str) -> str:
    return _clean_rel(posixpath.join(*[p for p in parts if p]))


def _walk_files(local_dir: str) -> Iterator[tuple[str, str]]:
    """(absolute path, POSIX path relative to local_dir) of every file below local_dir, sorted."""
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        for name in sorted(filenames):
            if TMP_MARK in name:
                continue
            full = os.path.join(dirpath, name)
            yield full, os.path.relpath(full, local_dir).replace(os.sep, "/")


class Storage(abc.ABC):
    """A checkpoint folder. All `rel` arguments are POSIX paths relative to its root."""

    url: str  # display form, safe to print: never contains credentials

    @abc.abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Store `data` at `rel`, replacing any previous content; readers never see half a file."""

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Content of the file at `rel`; StorageNotFound if missing."""

    def read_versioned(self, rel: str) -> tuple[bytes, Optional[str]]:
        """Content of the file at `rel` and its version (an S3 ETag) for `write_if`; None where there are none."""
        return self.read_bytes(rel), None

    def write_if(self, rel: str, data: bytes, *, version: Optional[str] = None) -> Optional[str]:
        """Store `data` at `rel` only if nothing is there (version None) or the file is still at `version`;
        the new version, or WriteConflict. None, having written nothing, where the storage has no conditional
        writes: the caller falls back on what works without them."""
        return None

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """True if `rel` is a file or a non-empty folder."""

    @abc.abstractmethod
    def list_dirs(self, rel_prefix: str = "") -> list[str]:
        """Sorted names of the immediate sub-folders of `rel_prefix` ([] if it does not exist)."""

    @abc.abstractmethod
    def list_files(self, rel_prefix: str = "") -> list[str]:
        """Sorted paths (relative to `rel_prefix`) of all files below it, recursively."""

    @abc.abstractmethod
    def file_sizes(self, rel_prefix: str = "") -> dict[str, int]:
        """Size in bytes of every file below `rel_prefix`, keyed by the paths `list_files` gives."""

    @abc.abstractmethod
    def move(self, src: str, dest: str) -> None:
        """Move the file and/or folder `src` to `dest`, which must not exist yet. Nothing is lost: on a
        store without rename every object is copied before any original is deleted."""

    @abc.abstractmethod
    def upload_dir(self, local_dir: str, rel_prefix: str) -> None:
        """Copy every file below the local folder `local_dir` to `rel_prefix`."""

    @abc.abstractmethod
    def download_dir(self, rel_prefix: str, local_dir: str) -> None:
        """Copy every file below `rel_prefix` into the local folder `local_dir`."""

    @abc.abstractmethod
    def delete_prefix(self, rel_prefix: str) -> None:
        """Delete the file `rel_prefix` and/or everything in the folder `rel_prefix`.

        "100" deletes "100" and "100/..." but never "1000/...". Deleting what is not there is fine.
        """

    @abc.abstractmethod
    def local_path(self, rel: str) -> str | None:
        """The real filesystem path of `rel` if the storage is a local folder, else None."""

    def ping(self) -> None:
        """Check at start-up that the storage can be written, read and cleaned (InternEvo's
        try_ping_storage), so a bad path or endpoint fails now instead of at the first save."""
        rel = f"pings/{socket.gethostname()}.ping"
        payload = f"{socket.gethostname()} {os.getpid()} {time.time()}".encode()
        try:
            self._ping_ops(rel, payload)
        except SpindleError as exc:
            raise SpindleError(f"checkpoint storage {self.url} is not usable: {exc}") from exc

    def _ping_ops(self, rel: str, payload: bytes) -> None:
        self.write_bytes(rel, payload)
        if self.read_bytes(rel) != payload:
            raise SpindleError(f"{rel} read back different bytes than were written")
        self.delete_prefix(rel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
