"""One writer per save folder: a lock on `{folder}/.spindle.lock`, held for the whole run.

Local and network folders: `fcntl.flock` on the lock file, held by an open file descriptor. The
kernel drops it when its owner exits, however it exits (SIGKILL included), so a dead owner never
blocks the next run; the file's content (host, pid, job, start time) names the owner to the run
that is refused. flock is honoured across hosts on NFSv4 and on CephFS / Lustre mounted with
`flock`; on file systems that refuse it (ENOLCK / EOPNOTSUPP), the content of the file is the lock:
a live owner on this host refuses the run, a dead one (no such pid, or the pid was reused by a
process that started later) is taken over, an owner on another host cannot be checked and refuses
the run with the command that releases it.

S3 has no locks: the lock is a lease object the owner rewrites every `LEASE_REFRESH_S` seconds from
a background thread. A lease not refreshed for `stale_after_s` belongs to a dead run and is taken
over; so is, at once, a lease whose owner ran on this machine (same host name, boot and process
namespace) and whose process is gone — a SIGKILLed run restarted on the same host does not wait.
The lease is written with S3's conditional writes: created with If-None-Match: * (only if there is
none), taken over and refreshed with If-Match: the version read (only if no other run wrote it since),
so of two runs starting in the same instant exactly one gets it, and a run that lost its lease to
another never writes over it. A server that has no conditional writes (it says 501, or it ignores the
conditions: two probes after the lease is written tell) gets the old way: the run reads its lease back
one second after writing it, so at most one of two runs keeps it — on a store with read-after-write
consistency.

The lock file is opened without following a symbolic link and must be a plain file with one name:
a `.spindle.lock` planted as a link to (or a hard link of) a user's file would otherwise be
truncated when the lock is taken.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time
from typing import Optional

from spindle.checkpoint.storage import Storage, StorageNotFound, WriteConflict
from spindle.errors import SpindleError
from spindle.fileio import open_nofollow

logger = logging.getLogger(__name__)

LOCK_FILE = ".spindle.lock"
LEASE_REFRESH_S = 60.0
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def _process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _machine() -> Optional[str]:
    """This boot of this machine and this process namespace: where a pid and its start time mean the same
    process (a host name alone is shared by containers with separate pid namespaces). None off Linux."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _not_plain(fd: int) -> Optional[str]:
    """Why the open lock file is not a plain file of its own, None when it is."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_nlink != 1:
        return f"is one of {info.st_nlink} names of the same file (a hard link)"
    return None


def owner_info(job: str) -> dict:
    return {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "job": job, "started": time.time(), "refreshed": time.time()}


def _gone_from_this_machine(owner: dict) -> bool:
    """The owner ran here (same host, boot and pid namespace) and its process no longer runs."""
    here = _machine()
    if here is None or owner.get("machine") != here or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False
    start = owner.get("pid_start")
    return not _alive(pid, start if isinstance(start, int) else None)


def describe_owner(owner: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"job {owner.get('job', '?')!r}, pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {when}"


def _parse_owner(data: bytes) -> Optional[dict]:
    try:
        owner = json.loads(data)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


class FolderLock:
    """`acquire()` at start (before anything is written), `release()` at the end."""

    def __init__(self, storage: Storage, job: str, stale_after_s: float = 600.0):
        self.storage, self.job, self.stale_after_s = storage, job, stale_after_s
        self.local = storage.local_path("")
        self._fd: Optional[int] = None
        self._by_content = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._owner = owner_info(job)
        self._version: Optional[str] = None  # the lease's version (ETag) while conditional writes guard it
        self._lost = False  # another run took the lease over: it is not this run's to delete

    @property
    def where(self) -> str:
        return f"{self.storage.url.rstrip('/')}/{LOCK_FILE}"

    def _refuse(self, owner: Optional[dict], extra: str = "") -> SpindleError:
        who = describe_owner(owner) if owner else "another run"
        return SpindleError(f"{self.storage.url}: this save folder is in use by {who} ({self.where}); one run "
                            f"writes a save folder at a time — wait for it, stop it, or use another "
                            f"ckpt.save_ckpt_folder{extra}")

    # -- local folders

    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(self.local, exist_ok=True)
        path = os.path.join(self.local, LOCK_FILE)
        try:
            fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpindleError(f"{path}: cannot open the save folder's lock file: {exc.strerror}") from None
        odd = _not_plain(fd)
        if odd:
            os.close(fd)
            raise SpindleError(f"{path}: {odd}; Spindle does not lock (and empty) it: remove it or point the "
                               "folder elsewhere")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _parse_owner(os.pread(fd, 4096, 0))
            os.close(fd)
            raise self._refuse(owner) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in NO_FLOCK:
                raise SpindleError(f"{path}: cannot lock the save folder: {exc.strerror}") from None
            self._acquire_by_content(path)
            return
        self._fd = fd
        self._write_owner_fd()

    def _write_owner_fd(self) -> None:
        data = json.dumps(self._owner).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _acquire_by_content(self, path: str) -> None:
        """No flock here: the file's content is the lock (see the module docstring)."""
        owner = _parse_owner(open(path, "rb").read()) if os.path.exists(path) else None
        if owner and owner.get("pid"):
            if owner.get("host") != self._owner["host"]:
                raise self._refuse(owner, f"; if that run is gone, delete {path}")
            if _alive(int(owner["pid"]), owner.get("pid_start")) and owner["pid"] != os.getpid():
                raise self._refuse(owner)
            logger.info(f"checkpoint: taking over the lock of a run that is gone ({describe_owner(owner)})")
        self.storage.write_bytes(LOCK_FILE, json.dumps(self._owner).encode())
        self._by_content = True

    # -- S3

    def _read_lease(self) -> tuple[Optional[dict], Optional[str]]:
        try:
            data, version = self.storage.read_versioned(LOCK_FILE)
        except StorageNotFound:
            return None, None
        return _parse_owner(data), version

    def _acquire_lease(self) -> None:
        owner, version = self._read_lease()
        if owner and _gone_from_this_machine(owner):
            logger.info(f"checkpoint: taking over the lease of a run that is gone ({describe_owner(owner)}: "
                        "no such process on this host)")
        elif owner and owner.get("refreshed", 0) > time.time() - self.stale_after_s:
            raise self._refuse(owner, f" (a lease not refreshed for {self.stale_after_s:.0f} s is taken over)")
        elif owner:
            logger.info(f"checkpoint: taking over a lease not refreshed for {self.stale_after_s:.0f} s "
                        f"({describe_owner(owner)})")
        mine = json.dumps(self._owner).encode()
        try:  # only if the lease is still what was read: absent, or the very version judged stale above
            self._version = self.storage.write_if(LOCK_FILE, mine, version=version)
        except WriteConflict:
            raise self._refuse(self._read_lease()[0]) from None
        if self._version is None or not self._conditions_hold(mine):
            self._version = None
            self._confirm_by_reading_back(mine)
        self._thread = threading.Thread(target=self._refresh_loop, name="spindle-lock-lease", daemon=True)
        self._thread.start()

    def _conditions_hold(self, mine: bytes) -> bool:
        """Whether the server honours both conditions: each probe, on the lease now there, must be refused
        (an S3-compatible server may accept the headers and ignore them, which looks like success)."""
        for version in (None, '"spindle-probe"'):
            try:
                self._version = self.storage.write_if(LOCK_FILE, mine, version=version)
            except WriteConflict:
                continue
            return False
        return True

    def _confirm_by_reading_back(self, mine: bytes) -> None:
        """Without conditional writes: write, wait a second, read back; of two runs writing in the same
        instant, the one whose lease is not there any more gives up."""
        self.storage.write_bytes(LOCK_FILE, mine)
        time.sleep(1.0)
        back = _parse_owner(self.storage.read_bytes(LOCK_FILE))
        if not back or (back.get("host"), back.get("pid"), back.get("started")) != \
                (self._owner["host"], self._owner["pid"], self._owner["started"]):
            raise self._refuse(back)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_S):
            self._owner["refreshed"] = time.time()
            mine = json.dumps(self._owner).encode()
            try:
                if self._version is None:
                    self.storage.write_bytes(LOCK_FILE, mine)
                else:
                    self._version = self.storage.write_if(LOCK_FILE, mine, version=self._version)
            except WriteConflict:  # another run took the lease over (this one stalled past stale_after_s)
                try:
                    owner = self._read_lease()[0]
                except SpindleError:  # who it is only goes into the line
                    owner = None
                logger.warning(f"checkpoint: the save-folder lease {self.where} was taken over by "
                               f"{describe_owner(owner) if owner else 'another run'}; it is left to that run")
                self._lost = True
                return
            except SpindleError as exc:  # the next refresh tries again; the lease outlives one miss
                logger.info(f"checkpoint: could not refresh the save-folder lease: {exc}")

    # -- both

    def acquire(self) -> "FolderLock":
        if self.local is not None:
            self._acquire_local()
        else:
            self._acquire_lease()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                if not self._lost:
                    self.storage.delete_prefix(LOCK_FILE)
            except SpindleError:
                pass  # a stale lease is taken over by the next run
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the file stays (another run may already have it open); empty = free
            os.close(self._fd)
            self._fd = None
        if self._by_content:
            self.storage.write_bytes(LOCK_FILE, b"")
            self._by_content = False
