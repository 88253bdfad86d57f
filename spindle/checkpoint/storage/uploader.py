"""Background uploads of staged checkpoint folders while training continues."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from spindle.checkpoint.storage.base import Storage
from spindle.errors import SpindleError



class AsyncUploader:
    """Upload staged checkpoint folders in background threads while training continues.

    Typical use: save into a staging folder, `submit(staging, "100", on_done=write_marker)`,
    keep training, and `wait()` before the next save and at the end. `on_done` runs (in the
    worker thread) only after every file of that folder is uploaded, so a completion marker
    written there can never point at a partial checkpoint; a failed upload never calls it.
    """

    def __init__(self, storage: Storage, max_workers: int = 2):
        self.storage = storage
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_workers),
                                        thread_name_prefix="spindle-upload")
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Future]] = []
        self._closed = False

    def submit(self, local_dir: str, rel_prefix: str, on_done: Callable[[], None] | None = None,
               *, remove_local: bool = False, tag: str | None = None) -> Future:
        """Start uploading `local_dir` to `rel_prefix`; returns at once.

        remove_local deletes the staging folder after a successful upload (it is kept on failure
        so nothing is lost and the upload can be retried). `tag` names the upload in `settle()`.
        """
        def task() -> None:
            self.storage.upload_dir(local_dir, rel_prefix)
            if on_done is not None:
                on_done()
            if remove_local:
                shutil.rmtree(local_dir, ignore_errors=True)

        with self._lock:
            if self._closed:
                raise SpindleError("AsyncUploader is closed; cannot submit more uploads")
            future = self._pool.submit(task)
            self._pending.append((tag or f"{local_dir} -> {self.storage.url}/{rel_prefix}", future))
        return future

    def pending(self) -> int:
        """How many submitted uploads have not finished yet."""
        with self._lock:
            return sum(not f.done() for _, f in self._pending)

    def settle(self) -> dict[str, BaseException | None]:
        """Block until every submitted upload finishes; the outcome of each (tag -> exception or None).
        Each outcome is reported once."""
        with self._lock:
            pending, self._pending = self._pending, []
        return {what: future.exception() for what, future in pending}  # exception() blocks until done

    def wait(self) -> None:
        """Block until every submitted upload finishes; raise the first failure as SpindleError.

        Failures are reported once: after wait() raises, the uploader is usable again.
        """
        failures = [(what, exc) for what, exc in self.settle().items() if exc is not None]
        if not failures:
            return
        what, first = failures[0]
        more = f" ({len(failures) - 1} more uploads also failed)" if len(failures) > 1 else ""
        if isinstance(first, SpindleError):
            raise SpindleError(f"{first}{more}") from first
        raise SpindleError(f"upload {what} failed: {type(first).__name__}: {first}{more}") from first

    def close(self) -> None:
        """Wait for pending uploads, stop the worker threads, and raise any failure."""
        with self._lock:
            self._closed = True
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "AsyncUploader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
