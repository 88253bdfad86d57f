"""Where checkpoint bytes live: a local folder or an S3-compatible object store.

Paths use InternEvo's prefixes so existing configs keep working:

    local:/some/dir            a folder on this machine (a bare path means the same)
    boto3:s3://bucket/prefix   an S3 bucket; endpoint and keys from arguments or the environment
    boto3:s3://bucket.10.1.2.3:9000/prefix
                               the same, with the endpoint written after the bucket name

Everything here is plain IO (no torch import), so the checkpoint manager can stage files with
torch and hand folders to this layer, and tests of this layer stay fast.

Addresses inside a storage are relative POSIX paths ("100/model.pt"); "" is the storage root.
Every failure a user can cause or meet (missing file, full disk, unreachable endpoint, bad keys)
is a `SpindleError` whose message names the place, and never contains a secret key.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import posixpath
import random
import re
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from spindle.errors import SpindleError

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncUploader",
    "LocalStorage",
    "S3Location",
    "S3Storage",
    "Storage",
    "StorageNotFound",
    "open_storage",
    "parse_s3_url",
]

# Temp files of in-flight atomic writes carry this marker so listings can hide them and a crashed
# writer's leftovers are recognisable.
_TMP_MARK = ".spindle-tmp-"

# Seeds (InternEvo) accept these prefixes; we name them in the error rather than silently treating
# "volc:vc://..." as a local folder called "volc:vc:".
_UNSUPPORTED_PREFIXES = ("volc:", "oss2:")

_ENDPOINT_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_ACCESS_KEY_ENV = ("S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
_SECRET_KEY_ENV = ("S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
_REGION_ENV = ("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")

# "bucket.10.1.2.3", "bucket.10.1.2.3:9000", "bucket.localhost:5000", "bucket.s3.lan:9000":
# an endpoint embedded after the first dot. A dotted name without a port that is not an IPv4
# address ("my.bucket") stays a bucket name, because dots are legal in bucket names.
_IPV4 = r"\d{1,3}(?:\.\d{1,3}){3}"
_EMBEDDED_ENDPOINT_RE = re.compile(
    rf"^(?P<bucket>[^.]+)\.(?P<host>{_IPV4}|localhost|[A-Za-z0-9.-]+(?=:\d+$))(?::(?P<port>\d+))?$"
)


class StorageNotFound(SpindleError, FileNotFoundError):
    """A file or folder that should be in the storage is not there.

    Also a FileNotFoundError so callers probing for optional files can catch the usual type.
    """


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _clean_rel(rel: str) -> str:
    """Normalise a storage-relative path; refuse anything that would escape the storage root."""
    rel = (rel or "").replace("\\", "/")
    if rel.startswith("/"):
        raise SpindleError(f"storage path {rel!r} must be relative to the checkpoint folder")
    norm = posixpath.normpath(rel) if rel else ""
    if norm in (".", ""):
        return ""
    if norm == ".." or norm.startswith("../"):
        raise SpindleError(f"storage path {rel!r} points outside the checkpoint folder")
    return norm


def _join_rel(*parts: str) -> str:
    return _clean_rel(posixpath.join(*[p for p in parts if p]))


def _walk_files(local_dir: str) -> Iterator[tuple[str, str]]:
    """(absolute path, POSIX path relative to local_dir) of every file below local_dir, sorted."""
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        for name in sorted(filenames):
            if _TMP_MARK in name:
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


# --------------------------------------------------------------------------------------------
# Local folder
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    # The rename itself lives in the directory entry; without this a power loss can forget it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems (and platforms) do not allow opening directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(action: str, path: str, exc: OSError) -> SpindleError:
    if exc.errno == errno.ENOSPC:
        return SpindleError(
            f"no space left on device while {action} {path}; the previous version of the file "
            "(if any) is intact. Free some space or point the checkpoint folder elsewhere."
        )
    if exc.errno == errno.EDQUOT:
        return SpindleError(f"disk quota exceeded while {action} {path}; previous files are intact")
    return SpindleError(f"{action} {path} failed: {exc.strerror or exc}")


def _atomic_write(dest: str, fill: Callable[[object], None]) -> None:
    """Write `dest` via a temp file in the same folder + fsync + os.replace.

    Same folder because os.replace is only atomic within one filesystem. On any failure the temp
    file is removed and `dest` keeps its previous content.
    """
    folder = os.path.dirname(dest) or "."
    tmp = os.path.join(folder, f".{os.path.basename(dest)}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _os_error("writing", dest, exc) from exc
    _fsync_dir(folder)


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
        _atomic_write(self._path(rel), lambda f: f.write(data))

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StorageNotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise _os_error("reading", path, exc) from exc

    def exists(self, rel: str) -> bool:
        path = self._path(rel)
        if os.path.isdir(path):
            return True
        return os.path.isfile(path) and _TMP_MARK not in os.path.basename(path)

    def list_dirs(self, rel_prefix: str = "") -> list[str]:
        path = self._path(rel_prefix)
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _os_error("listing", path, exc) from exc

    def list_files(self, rel_prefix: str = "") -> list[str]:
        path = self._path(rel_prefix)
        if not os.path.isdir(path):
            return []
        return [rel for _, rel in _walk_files(path)]

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
        for rel in files:
            self._copy_in(os.path.join(src_root, *rel.split("/")),
                          os.path.join(local_dir, *rel.split("/")))

    @staticmethod
    def _copy_in(src: str, dest: str) -> None:
        try:
            with open(src, "rb") as fsrc:
                _atomic_write(dest, lambda f: shutil.copyfileobj(fsrc, f, 16 << 20))
        except FileNotFoundError:
            raise StorageNotFound(f"{src} disappeared while copying it") from None
        except OSError as exc:  # errors opening the source; write errors are already converted
            raise _os_error("reading", src, exc) from exc

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
            raise _os_error("deleting", path, exc) from exc

    def _ping_ops(self, rel: str, payload: bytes) -> None:
        super()._ping_ops(rel, payload)
        try:  # leave no empty pings/ folder behind; other hosts may still be using it
            os.rmdir(os.path.dirname(self._path(rel)))
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# S3 (boto3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading/trailing slashes; "" for the bucket root
    endpoint_url: str | None  # only when embedded in the URL

    @property
    def url(self) -> str:
        return f"boto3:s3://{self.bucket}/{self.prefix}" if self.prefix else f"boto3:s3://{self.bucket}"


def parse_s3_url(url: str) -> S3Location:
    """Parse `boto3:s3://bucket[.host[:port]]/prefix` (the `boto3:` part is optional)."""
    rest = url[len("boto3:"):] if url.startswith("boto3:") else url
    if not rest.startswith("s3://"):
        raise SpindleError(f"{url!r} is not an S3 path; expected boto3:s3://bucket/prefix")
    body = rest[len("s3://"):]
    head, _, prefix = body.partition("/")
    if not head:
        raise SpindleError(f"{url!r} has no bucket name; expected boto3:s3://bucket/prefix")
    endpoint = None
    match = _EMBEDDED_ENDPOINT_RE.match(head)
    if match:
        head = match.group("bucket")
        endpoint = f"http://{match.group('host')}"
        if match.group("port"):
            endpoint += f":{match.group('port')}"
    return S3Location(bucket=head, prefix=prefix.strip("/"), endpoint_url=endpoint)


# Error codes S3 and S3-compatible stores (Ceph, MinIO, OSS gateways) use for "try again later".
_TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestTimeout",
    "RequestTimeTooSkewed", "TooManyRequests", "RequestLimitExceeded", "InternalError",
    "ServiceUnavailable", "BadGateway", "GatewayTimeout", "ProvisionedThroughputExceededException",
})
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        # s3transfer's RetriesExceededError keeps the real error in `last_exception`
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "last_exception", None)


def _client_error_info(exc: BaseException) -> tuple[str, int] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(exc: BaseException) -> bool:
    from botocore import exceptions as bexc

    for e in _exception_chain(exc):
        if isinstance(e, (bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError,
                          ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in ("RetriesExceededError", "ResponseStreamingError"):
            return True
        info = _client_error_info(e)
        if info is not None:
            code, status = info
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return False


def _is_not_found(exc: BaseException) -> bool:
    for e in _exception_chain(exc):
        info = _client_error_info(e)
        if info is not None:
            return info[0] in _NOT_FOUND_CODES or info[1] == 404
    return False


class S3Storage(Storage):
    """A prefix in an S3 (or S3-compatible) bucket.

    Every remote call is retried with exponential backoff on transient errors (connection
    failures, 5xx, throttling); botocore's own retries are switched off so `retries` is the one
    knob and the error can say how many attempts were made.
    """

    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 120.0,
        max_backoff_s: float = 30.0,
        file_workers: int = 4,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if retries < 0:
            raise SpindleError(f"retries must be >= 0, got {retries}")
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.url = location.url
        self.endpoint_url = endpoint_url
        self.region = region
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.file_workers = max(1, file_workers)
        # S3's own cap for one listing page and one DeleteObjects call; tests lower it to cover
        # the continuation paths without creating thousands of objects.
        self._page_size = 1000
        # Kept only to scrub them from error text; excluded from repr.
        self._redact = tuple(s for s in (secret_key, access_key) if s and len(s) >= 4)
        # A per-instance generator: jitter must not touch (or depend on) the global random state.
        self._rng = random.Random()

        proxies = [name for name in _PROXY_ENV if os.environ.get(name)]
        if proxies:
            logger.warning("%s is set; requests to %s%s go through the proxy", proxies[0], self.url,
                           f" ({endpoint_url})" if endpoint_url else "")

        config_kwargs = dict(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": 1},
            signature_version="s3v4",
            max_pool_connections=max(10, 2 * self.file_workers + 2),
        )
        if endpoint_url:
            # Custom endpoints (Ceph, MinIO, IP addresses) rarely support virtual-host addressing,
            # and many reject the CRC checksums newer botocore sends by default.
            config_kwargs["s3"] = {"addressing_style": "path"}
            config_kwargs["request_checksum_calculation"] = "when_required"
            config_kwargs["response_checksum_validation"] = "when_required"
        try:
            config = Config(**config_kwargs)
        except TypeError:  # botocore older than 1.36 has no checksum options
            config_kwargs.pop("request_checksum_calculation", None)
            config_kwargs.pop("response_checksum_validation", None)
            config = Config(**config_kwargs)

        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or "us-east-1",
        )
        try:
            self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except ValueError as exc:  # e.g. a malformed endpoint URL
            raise SpindleError(f"cannot use S3 endpoint {endpoint_url!r} for {self.url}: {exc}") from None
        self._transfer_config = TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint_url={self.endpoint_url!r})"

    def local_path(self, rel: str) -> None:
        return None

    # -- addressing --

    def _key(self, rel: str) -> str:
        return _join_rel(self.prefix, _clean_rel(rel))

    def _dir_key(self, rel: str) -> str:
        key = self._key(rel)
        return key + "/" if key else ""

    def _where(self, key: str) -> str:
        where = f"s3://{self.bucket}/{key}"
        return f"{where} (endpoint {self.endpoint_url})" if self.endpoint_url else where

    # -- retry core --

    def _reason(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for e in _exception_chain(exc):  # prefer the server's own code and message
            info = _client_error_info(e)
            if info is not None:
                code, status = info
                message = e.response.get("Error", {}).get("Message", "")  # type: ignore[attr-defined]
                text = f"{code} (HTTP {status})" + (f": {message}" if message else "")
                break
        for secret in self._redact:
            text = text.replace(secret, "***")
        return text

    def _call(self, what: str, fn: Callable[[], object], *, retries: int | None = None,
              backoff_s: float | None = None) -> object:
        """Run fn, retrying transient failures; raise SpindleError("{what} failed ...") at the end."""
        from botocore import exceptions as bexc

        retries = self.retries if retries is None else retries
        backoff_s = self.backoff_s if backoff_s is None else backoff_s
        attempts = retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except SpindleError:
                raise
            except bexc.NoCredentialsError:
                raise SpindleError(
                    f"{what} failed: no S3 credentials; set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY "
                    "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as SpindleError
                if _is_not_found(exc):
                    raise StorageNotFound(f"{what} failed: {self._reason(exc)}") from None
                if not _is_transient(exc):
                    raise SpindleError(f"{what} failed: {self._reason(exc)}") from None
                if attempt == attempts:
                    raise SpindleError(
                        f"{what} failed after {attempts} attempts: {self._reason(exc)}") from None
                delay = min(self.max_backoff_s, backoff_s * (2 ** (attempt - 1)))
                delay *= 0.5 + 0.5 * self._rng.random()  # jitter: ranks must not retry in lockstep
                logger.warning("%s: attempt %d/%d failed (%s); retrying in %.2fs",
                               what, attempt, attempts, self._reason(exc), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- single objects --

    def write_bytes(self, rel: str, data: bytes, *, retries: int | None = None,
                    backoff_s: float | None = None) -> None:
        key = self._key(rel)
        # A single PUT is atomic in S3: readers see the old object or the new one, never a mix.
        self._call(f"write of {self._where(key)}",
                   lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data)),
                   retries=retries, backoff_s=backoff_s)

    def read_bytes(self, rel: str, *, retries: int | None = None,
                   backoff_s: float | None = None) -> bytes:
        key = self._key(rel)

        def read() -> bytes:  # the body is read inside the retry so a dropped stream is retried
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        return self._call(f"read of {self._where(key)}", read, retries=retries, backoff_s=backoff_s)

    def exists(self, rel: str) -> bool:
        key = self._key(rel)
        if key:
            try:
                self._call(f"lookup of {self._where(key)}",
                           lambda: self._client.head_object(Bucket=self.bucket, Key=key))
                return True
            except StorageNotFound:
                pass
        return bool(self._list(self._dir_key(rel), max_keys=1))

    # -- listings --

    def _list(self, key_prefix: str, *, delimiter: str | None = None,
              max_keys: int | None = None) -> list[dict]:
        """All pages of list_objects_v2: Contents entries, plus CommonPrefixes as {'Prefix': ..}."""
        def run() -> list[dict]:
            out: list[dict] = []
            kwargs = {"Bucket": self.bucket, "Prefix": key_prefix,
                      "MaxKeys": max_keys or self._page_size}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            while True:
                page = self._client.list_objects_v2(**kwargs)
                out.extend(page.get("Contents", []))
                out.extend(page.get("CommonPrefixes", []))
                if max_keys or not page.get("IsTruncated"):
                    return out
                kwargs["ContinuationToken"] = page["NextContinuationToken"]

        return self._call(f"listing of {self._where(key_prefix)}", run)

    def list_dirs(self, rel_prefix: str = "") -> list[str]:
        base = self._dir_key(rel_prefix)
        entries = self._list(base, delimiter="/")
        names = {e["Prefix"][len(base):].rstrip("/") for e in entries if "Key" not in e}
        return sorted(n for n in names if n)

    def list_files(self, rel_prefix: str = "") -> list[str]:
        base = self._dir_key(rel_prefix)
        return sorted(e["Key"][len(base):] for e in self._list(base)
                      if "Key" in e and not e["Key"].endswith("/"))

    # -- folders --

    def _upload_file(self, src: str, key: str) -> None:
        self._call(f"upload of {src} to {self._where(key)}",
                   lambda: self._client.upload_file(src, self.bucket, key,
                                                    Config=self._transfer_config))

    def _download_file(self, key: str, dest: str) -> None:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        # download_file writes to a temp name and renames, so a failed download leaves no stub.
        self._call(f"download of {self._where(key)} to {dest}",
                   lambda: self._client.download_file(self.bucket, key, dest,
                                                      Config=self._transfer_config))

    def _run_all(self, jobs: list[Callable[[], None]]) -> None:
        """Run file transfers on a few threads; stop scheduling after the first failure."""
        if len(jobs) <= 1 or self.file_workers == 1:
            for job in jobs:
                job()
            return
        failed = threading.Event()

        def guarded(job: Callable[[], None]) -> None:
            if not failed.is_set():
                try:
                    job()
                except BaseException:
                    failed.set()
                    raise

        with ThreadPoolExecutor(max_workers=self.file_workers,
                                thread_name_prefix="spindle-s3-file") as pool:
            futures = [pool.submit(guarded, job) for job in jobs]
        for fut in futures:  # first failure in submission order, for a stable message
            fut.result()

    def upload_dir(self, local_dir: str, rel_prefix: str) -> None:
        if not os.path.isdir(local_dir):
            raise StorageNotFound(f"cannot upload {local_dir}: not a folder")
        base = self._key(rel_prefix)
        self._run_all([
            (lambda s=src, k=_join_rel(base, rel): self._upload_file(s, k))
            for src, rel in _walk_files(local_dir)
        ])

    def download_dir(self, rel_prefix: str, local_dir: str) -> None:
        files = self.list_files(rel_prefix)
        if not files:
            raise StorageNotFound(f"nothing to download: {self._where(self._dir_key(rel_prefix))} has no files")
        base = self._key(rel_prefix)
        self._run_all([
            (lambda k=_join_rel(base, rel), d=os.path.join(local_dir, *rel.split("/")):
                self._download_file(k, d))
            for rel in files
        ])

    def delete_prefix(self, rel_prefix: str) -> None:
        key = self._key(rel_prefix)
        if not _clean_rel(rel_prefix):
            raise SpindleError(f"refusing to delete the whole checkpoint folder {self.url}")
        keys = [e["Key"] for e in self._list(key + "/") if "Key" in e]
        keys.append(key)  # the object named exactly rel_prefix, if any; deleting a missing key is OK
        step = self._page_size
        for i in range(0, len(keys), step):
            batch = [{"Key": k} for k in keys[i:i + step]]

            def delete(batch: list[dict] = batch) -> None:
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                errors = resp.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise SpindleError(f"deleting {self._where(first.get('Key', '?'))} failed: "
                                       f"{first.get('Code')}: {first.get('Message')}")

            self._call(f"delete of {self._where(key)}", delete)

    def _ping_ops(self, rel: str, payload: bytes) -> None:
        # One quick retry only: ping runs at start-up, where a dead endpoint should fail in
        # seconds, not after the full backoff schedule meant for saves.
        quick = dict(retries=min(self.retries, 1), backoff_s=min(self.backoff_s, 0.2))
        self.write_bytes(rel, payload, **quick)
        if self.read_bytes(rel, **quick) != payload:
            raise SpindleError(f"{self._where(self._key(rel))} read back different bytes")
        self.delete_prefix(rel)


# --------------------------------------------------------------------------------------------
# Opening a storage from a path string
# --------------------------------------------------------------------------------------------


def open_storage(
    url: str,
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    retries: int = 5,
    backoff_s: float = 0.5,
    connect_timeout_s: float = 3.0,
) -> Storage:
    """Open `local:/dir`, a bare path, or `boto3:s3://bucket[.host[:port]]/prefix`.

    S3 endpoint and keys come from the arguments, else the URL (endpoint only), else the
    environment: S3_ENDPOINT_URL / AWS_ENDPOINT_URL, S3_ACCESS_KEY_ID / AWS_ACCESS_KEY_ID,
    S3_SECRET_ACCESS_KEY / AWS_SECRET_ACCESS_KEY; with no keys anywhere boto3's usual chain
    (profiles, instance roles) applies. Nothing is contacted here; call `ping()` for that.

    retries: how often a transient S3 failure (connection error, 5xx, throttling) is retried, so
    an operation makes up to retries + 1 attempts, sleeping backoff_s * 2**k seconds (jittered,
    capped at 30 s) between them. connect_timeout_s bounds each TCP connect, which is what makes
    a dead endpoint fail in seconds. These three are ignored for local folders.
    """
    if not url:
        raise SpindleError("checkpoint path is empty")
    for prefix in _UNSUPPORTED_PREFIXES:
        if url.startswith(prefix):
            raise SpindleError(f"checkpoint path {url!r}: the {prefix} backend is not supported; "
                               "use local:/path or boto3:s3://bucket/prefix")
    if url.startswith("boto3:") or url.startswith("s3://"):
        location = parse_s3_url(url)
        if endpoint_url and location.endpoint_url and endpoint_url.rstrip("/") != location.endpoint_url:
            # Two different endpoints for one path: guessing which one is meant could write a
            # checkpoint to the wrong cluster.
            raise SpindleError(f"checkpoint path {url!r} names endpoint {location.endpoint_url} but "
                               f"endpoint_url={endpoint_url!r} was also given; keep one")
        return S3Storage(
            location,
            endpoint_url=endpoint_url or location.endpoint_url or _first_env(_ENDPOINT_ENV),
            access_key=access_key or _first_env(_ACCESS_KEY_ENV),
            secret_key=secret_key or _first_env(_SECRET_KEY_ENV),
            region=region or _first_env(_REGION_ENV),
            retries=retries,
            backoff_s=backoff_s,
            connect_timeout_s=connect_timeout_s,
        )
    path = url[len("local:"):] if url.startswith("local:") else url
    if not path:
        raise SpindleError(f"checkpoint path {url!r} has no folder after 'local:'")
    return LocalStorage(path)


# --------------------------------------------------------------------------------------------
# Background uploads
# --------------------------------------------------------------------------------------------


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
               *, remove_local: bool = False) -> Future:
        """Start uploading `local_dir` to `rel_prefix`; returns at once.

        remove_local deletes the staging folder after a successful upload (it is kept on failure
        so nothing is lost and the upload can be retried).
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
            self._pending.append((f"{local_dir} -> {self.storage.url}/{rel_prefix}", future))
        return future

    def pending(self) -> int:
        """How many submitted uploads have not finished yet."""
        with self._lock:
            return sum(not f.done() for _, f in self._pending)

    def wait(self) -> None:
        """Block until every submitted upload finishes; raise the first failure as SpindleError.

        Failures are reported once: after wait() raises, the uploader is usable again.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        failures: list[tuple[str, BaseException]] = []
        for what, future in pending:
            exc = future.exception()  # blocks until done
            if exc is not None:
                failures.append((what, exc))
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
