"""Staging checkpoints for a remote save folder: written locally first, then uploaded.

Each rank writes its DCP files into `{async_upload_tmp_folder}/spindle-{folder hash}-{pid}/{step}/`
(`/dev/shm` by default: RAM, so the training step waits only for memory copies) and uploads them, in
the background with `async_upload=True`. A staged checkpoint leaves the staging area only when its
upload is confirmed; a failed upload stays staged and is retried. When the run ends with an upload
still failing, the staged folder is kept and the next run on the same save folder uploads it
(`recover`); staging folders of runs that are gone are never left to fill `/dev/shm`.

The staging disk is shared (`/dev/shm` is writable by every user), so anyone can plant a folder named like
a run's: staging folders are made mode 0700, and one that is not this user's own private folder (another
owner, a symbolic link, writable by others) is never written into, uploaded or resumed, and never deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional

from spindle.checkpoint.dcp_io import read_metadata
from spindle.checkpoint.discovery import MARKER_RE, CkptRef
from spindle.checkpoint.lock import _alive
from spindle.checkpoint.storage import AsyncUploader, Storage
from spindle.config import CkptConfig
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)


def _complete(folder: Path) -> bool:
    """Every file the checkpoint's DCP metadata refers to, and its JSON files, are staged."""
    if not all((folder / n).is_file() for n in (".metadata", "trainer_state.json", "config.json", ".owner.json")):
        return False
    try:
        names = {getattr(v, "relative_path", None) for v in read_metadata(folder).storage_data.values()}
    except SpindleError:
        return False
    return all((folder / n).is_file() for n in names if n)


def _not_private(folder: Path) -> Optional[str]:
    """Why `folder` is not this user's own private staging folder (None when it is): its entry itself, as
    lstat sees it, so a planted link is not followed to a folder that would pass."""
    try:
        info = os.lstat(folder)
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.getuid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    if info.st_mode & 0o022:
        return f"can be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


class Staging:
    def __init__(self, storage: Storage, ckpt: CkptConfig):
        self.storage = storage
        self.base = Path(ckpt.async_upload_tmp_folder or tempfile.gettempdir())
        self.key = hashlib.sha256(storage.url.encode()).hexdigest()[:12]
        self.root = self.base / f"spindle-{self.key}-{os.getpid()}"
        self.uploader = AsyncUploader(storage) if ckpt.async_upload else None

    def folder(self, rel: str, need_bytes: int = 0) -> Path:
        """An empty staging folder for `rel`; refused (one line) when the staging disk lacks the space."""
        self._make_root()
        free = shutil.disk_usage(self.root).free
        if need_bytes and free < need_bytes:
            raise SpindleError(f"{self.base}: {free / 2**20:.0f} MiB free for staging a checkpoint of about "
                               f"{need_bytes / 2**20:.0f} MiB; set ckpt.async_upload_tmp_folder to a folder "
                               "with room")
        path = self.root / rel
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def _make_root(self) -> None:
        """This process's staging folder, private (0700), or one line when its name is taken by a folder
        that is not ours (planted before this pid came up: never written into)."""
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            self.root.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpindleError(f"cannot create the staging folder {self.root}: {exc.strerror}; set "
                               "ckpt.async_upload_tmp_folder to a folder of yours") from None
        why = _not_private(self.root)
        if why is not None:
            raise SpindleError(f"staging folder {self.root} {why}: not used (it may have been planted); remove "
                               "it or set ckpt.async_upload_tmp_folder to a folder of yours")
        os.chmod(self.root, 0o700)  # mkdir's mode is cut by the umask, and an older run's folder may be 0755

    def submit(self, ref: CkptRef, on_done: Callable[[], None] | None = None) -> None:
        """Upload in the background; `on_done` runs in the upload thread once every file landed."""
        self.uploader.submit(str(self.root / ref.rel), ref.rel, on_done=on_done, tag=ref.rel)

    def upload_now(self, ref: CkptRef) -> None:
        self.storage.upload_dir(str(self.root / ref.rel), ref.rel)
        self.remove(ref)

    def settle(self) -> dict[str, str]:
        """Wait for the background uploads; {rel: reason} of those that failed."""
        if self.uploader is None:
            return {}
        return {rel: f"{type(exc).__name__}: {exc}" if not isinstance(exc, SpindleError) else str(exc)
                for rel, exc in self.uploader.settle().items() if exc is not None}

    def remove(self, ref: CkptRef) -> None:
        shutil.rmtree(self.root / ref.rel, ignore_errors=True)

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.settle()
            self.uploader.close()
        if _not_private(self.root) is None and not any(p.is_file() for p in self.root.rglob("*")):
            shutil.rmtree(self.root, ignore_errors=True)

    def recover(self, commit: Callable[[CkptRef], None]) -> None:
        """Staging folders of this save folder left by runs that are gone: a complete staged checkpoint
        the remote does not have yet is uploaded and marked; the rest is removed."""
        for root in sorted(self.base.glob(f"spindle-{self.key}-*")) if self.base.is_dir() else []:
            pid = root.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid), None):
                continue
            why = _not_private(root)
            if why is not None:  # someone else's (or planted): neither trusted nor deleted
                logger.info(f"checkpoint: staging folder {root} {why}; not uploaded or resumed, left alone")
                continue
            for folder in sorted(p for p in root.rglob("*") if p.is_dir() and (p / ".metadata").exists()):
                rel = folder.relative_to(root).as_posix()
                if not MARKER_RE.match(f"{rel}.step"):
                    continue
                ref = CkptRef(int(rel.rsplit("/", 1)[-1]), rel)
                if _complete(folder) and not self.storage.exists(ref.marker):
                    self.storage.upload_dir(str(folder), rel)
                    commit(ref)
                    logger.info(f"checkpoint: uploaded step {ref.step}, left staged in {root} by a run that is "
                                f"gone, to {self.storage.url}/{rel}")
            shutil.rmtree(root, ignore_errors=True)
