"""A checkpoint folder on a local or network filesystem: every file written whole through
`spindle.fileio` (private sibling, fsync, rename; never through a planted symbolic link)."""

from __future__ import annotations

import os
import shutil

from spindle.checkpoint.storage.base import Storage, StorageNotFound, _clean_rel, _walk_files
from spindle.errors import SpindleError
from spindle.fileio import TMP_MARK, disk_error, fsync_dir, safe_join, write_atomic, write_atomic_stream


def _make_parent(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as exc:
        raise disk_error("writing", path, exc) from None


class LocalStorage(Storage):
    """A folder on a local or network filesystem."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = f"local:{self.root}"

    def _path(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def local_path(self, rel: str) -> str:
        return self._path(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        _make_parent(path)
        write_atomic(path, data)

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StorageNotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise disk_error("reading", path, exc) from exc

    def exists(self, rel: str) -> bool:
        path = self._path(rel)
        if os.path.isdir(path):
            return True
        return os.path.isfile(path) and TMP_MARK not in os.path.basename(path)

    def list_dirs(self, rel_prefix: str = "") -> list[str]:
        path = self._path(rel_prefix)
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise disk_error("listing", path, exc) from exc

    def list_files(self, rel_prefix: str = "") -> list[str]:
        path = self._path(rel_prefix)
        if not os.path.isdir(path):
            return []
        return [rel for _, rel in _walk_files(path)]

    def file_sizes(self, rel_prefix: str = "") -> dict[str, int]:
        path = self._path(rel_prefix)
        if not os.path.isdir(path):
            return {}
        return {rel: os.stat(full).st_size for full, rel in _walk_files(path)}

    def move(self, src: str, dest: str) -> None:
        src_path, dest_path = self._path(src), self._path(dest)
        if os.path.lexists(dest_path):
            raise SpindleError(f"cannot move {src_path} to {dest_path}: the target exists")
        try:
            os.makedirs(os.path.dirname(dest_path), exist_ok=True)
            os.rename(src_path, dest_path)
        except OSError as exc:
            raise disk_error("moving", src_path, exc) from exc
        fsync_dir(os.path.dirname(src_path))
        fsync_dir(os.path.dirname(dest_path))

    def upload_dir(self, local_dir: str, rel_prefix: str) -> None:
        dest_root = self._path(rel_prefix)
        if not os.path.isdir(local_dir):
            raise StorageNotFound(f"cannot upload {local_dir}: not a folder")
        if os.path.realpath(local_dir) == os.path.realpath(dest_root):
            return  # staged in place (the manager wrote through local_path)
        for src, rel in _walk_files(local_dir):
            self._copy_in(src, os.path.join(dest_root, *rel.split("/")))

    def download_dir(self, rel_prefix: str, local_dir: str) -> None:
        src_root = self._path(rel_prefix)
        files = self.list_files(rel_prefix)
        if not files:
            raise StorageNotFound(f"nothing to download: {src_root} has no files")
        if os.path.realpath(local_dir) == os.path.realpath(src_root):
            return
        # the names come from a listing: checked before anything is copied (none may leave local_dir)
        pairs = [(os.path.join(src_root, *rel.split("/")), str(safe_join(local_dir, rel, f"file in {src_root}")))
                 for rel in files]
        for src, dest in pairs:
            self._copy_in(src, dest)

    @staticmethod
    def _copy_in(src: str, dest: str) -> None:
        try:
            with open(src, "rb") as fsrc:
                _make_parent(dest)
                write_atomic_stream(dest, lambda f: shutil.copyfileobj(fsrc, f, 16 << 20))
        except FileNotFoundError:
            raise StorageNotFound(f"{src} disappeared while copying it") from None
        except OSError as exc:  # errors opening the source; write errors are already converted
            raise disk_error("reading", src, exc) from exc

    def delete_prefix(self, rel_prefix: str) -> None:
        if not _clean_rel(rel_prefix):
            raise SpindleError(f"refusing to delete the whole checkpoint folder {self.url}")
        path = self._path(rel_prefix)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        except FileNotFoundError:
            pass  # a concurrent delete got there first: the outcome is the same
        except OSError as exc:
            raise disk_error("deleting", path, exc) from exc

    def _ping_ops(self, rel: str, payload: bytes) -> None:
        super()._ping_ops(rel, payload)
        try:  # leave no empty pings/ folder behind; other hosts may still be using it
            os.rmdir(os.path.dirname(self._path(rel)))
        except OSError:
            pass
