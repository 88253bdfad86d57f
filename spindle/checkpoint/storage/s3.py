"""A checkpoint folder as a prefix in an S3 (or S3-compatible) bucket, through boto3 (the [s3] extra).

Every failure a user can cause or meet (missing object, unreachable endpoint, bad keys) is a
`SpindleError` whose message names the place, and never contains a secret key.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from spindle.checkpoint.storage.base import (
    Storage, StorageNotFound, WriteConflict, _clean_rel, _join_rel, _walk_files,
)
from spindle.checkpoint.storage.s3_address import (
    S3_FOLDERS, S3Location, _attempts_made, _client_error_info, _exception_chain, _is_not_found, _is_transient,
)
from spindle.config.redact import REDACTED
from spindle.config.s3 import S3Settings
from spindle.errors import SpindleError
from spindle.extras import require
from spindle.fileio import safe_join

logger = logging.getLogger(__name__)

_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
# what servers answer to a conditional PUT: 412 when the condition fails, 409 while another conditional
# write of the same key is in flight (AWS); 501 where the server has no conditional writes at all
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_UNSUPPORTED_CODES = frozenset({"NotImplemented"})


class S3Storage(Storage):
    """A prefix in an S3 (or S3-compatible) bucket.

    Retries are botocore's own (Config(retries={"mode": settings.retry_mode, "total_max_attempts": ...})): a
    transient failure (connection error, 5xx, throttling, a timeout) is retried inside the client with its
    jittered backoff; what is left when the attempts are spent is one SpindleError naming the place and the
    attempts made. Large files go through boto3's transfer manager, which also re-reads a download whose
    stream broke.
    """

    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        settings: S3Settings = S3Settings(),
        file_workers: int = 4,
    ):
        boto3 = require("boto3", "s3", S3_FOLDERS)
        transfer = require("boto3.s3.transfer", "s3", S3_FOLDERS)
        self._config_type = require("botocore.config", "s3", S3_FOLDERS).Config

        if settings.max_attempts < 1:
            raise SpindleError(f"max_attempts must be >= 1, got {settings.max_attempts}")
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.url = location.url
        self.endpoint_url = endpoint_url
        self.region = region
        self.settings = settings
        self.file_workers = max(1, file_workers)
        # S3's own cap for one listing page and one DeleteObjects call; tests lower it to cover
        # the continuation paths without creating thousands of objects.
        self._page_size = 1000
        # Kept only to scrub them from error text; excluded from repr.
        self._redact = tuple(s for s in (secret_key, access_key) if s and len(s) >= 4)

        proxies = [name for name in _PROXY_ENV if os.environ.get(name)]
        if proxies:
            logger.warning("%s is set; requests to %s%s go through the proxy", proxies[0], self.url,
                           f" ({endpoint_url})" if endpoint_url else "")

        config_kwargs = dict(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
            signature_version="s3v4",
            max_pool_connections=max(10, 2 * self.file_workers + 2),
        )
        if endpoint_url:
            # Custom endpoints (Ceph, MinIO, IP addresses) rarely support virtual-host addressing,
            # and many reject the CRC checksums newer botocore sends by default.
            config_kwargs["s3"] = {"addressing_style": "path"}
            config_kwargs["request_checksum_calculation"] = "when_required"
            config_kwargs["response_checksum_validation"] = "when_required"
        self._config = self._config_type(**config_kwargs)
        self._session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or "us-east-1",
        )
        self._client = self._open_client(self._config)
        self._quick: Optional[object] = None  # the start-up check's client (`_ping_ops`), made when first used
        self._transfer_config = transfer.TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4,
        )

    def _open_client(self, config):
        try:
            return self._session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except ValueError as exc:  # e.g. a malformed endpoint URL
            raise SpindleError(f"cannot use S3 endpoint {self.endpoint_url!r} for {self.url}: {exc}") from None

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

    # -- errors --

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
            text = text.replace(secret, REDACTED)
        return text

    def _failure(self, what: str, exc: BaseException, attempts: int) -> SpindleError:
        """The one line for a request that failed: botocore has already retried what was transient."""
        if isinstance(exc, require("botocore.exceptions", "s3", S3_FOLDERS).NoCredentialsError):
            return SpindleError(
                f"{what} failed: no S3 credentials; set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY "
                "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        if _is_not_found(exc):
            return StorageNotFound(f"{what} failed: {self._reason(exc)}")
        if _is_transient(exc):
            made = _attempts_made(exc, attempts)
            return SpindleError(f"{what} failed after {made} attempt{'s' if made != 1 else ''}: {self._reason(exc)}")
        return SpindleError(f"{what} failed: {self._reason(exc)}")

    def _call(self, what: str, fn: Callable[[], object], attempts: Optional[int] = None) -> object:
        """Run fn (its requests retried by botocore); raise SpindleError("{what} failed ...") when it fails."""
        try:
            return fn()
        except SpindleError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified by _failure, re-raised as SpindleError
            raise self._failure(what, exc, attempts or self.settings.max_attempts) from None

    # -- single objects --

    def write_bytes(self, rel: str, data: bytes) -> None:
        key = self._key(rel)
        # A single PUT is atomic in S3: readers see the old object or the new one, never a mix.
        self._call(f"write of {self._where(key)}",
                   lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data)))

    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)

        def read() -> bytes:  # through the transfer manager, which reads a broken stream again
            buf = io.BytesIO()
            self._client.download_fileobj(self.bucket, key, buf, Config=self._transfer_config)
            return buf.getvalue()

        return self._call(f"read of {self._where(key)}", read)

    def read_versioned(self, rel: str) -> tuple[bytes, Optional[str]]:
        key = self._key(rel)

        def read() -> tuple[bytes, Optional[str]]:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response.get("ETag")

        return self._call(f"read of {self._where(key)}", read)

    def write_if(self, rel: str, data: bytes, *, version: Optional[str] = None) -> Optional[str]:
        """A PUT with If-None-Match: * (create) or If-Match: version (replace), S3's conditional writes."""
        key = self._key(rel)
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), **condition)
        except Exception as exc:  # noqa: BLE001 - a refused condition is an answer, not a failure
            info = next(filter(None, map(_client_error_info, _exception_chain(exc))), None)
            # 404 on a replace: the version read is gone, which is a change too
            if info is not None and (info[0] in _CONFLICT_CODES or info[1] == 412 or (version and _is_not_found(exc))):
                raise WriteConflict(f"{self._where(key)} was written by someone else ({self._reason(exc)})") from None
            if info is not None and (info[0] in _UNSUPPORTED_CODES or info[1] == 501):
                return None
            raise self._failure(f"write of {self._where(key)}", exc, self.settings.max_attempts) from None
        return response.get("ETag")

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

    def file_sizes(self, rel_prefix: str = "") -> dict[str, int]:
        base = self._dir_key(rel_prefix)
        return {e["Key"][len(base):]: int(e.get("Size", 0)) for e in self._list(base)
                if "Key" in e and not e["Key"].endswith("/")}

    def move(self, src: str, dest: str) -> None:
        src_key, dest_key = self._key(src), self._key(dest)
        if self.exists(dest):
            raise SpindleError(f"cannot move {self._where(src_key)} to {self._where(dest_key)}: the target exists")
        keys = [e["Key"] for e in self._list(src_key + "/") if "Key" in e]
        try:
            self._call(f"lookup of {self._where(src_key)}",
                       lambda: self._client.head_object(Bucket=self.bucket, Key=src_key))
            keys.append(src_key)
        except StorageNotFound:
            pass
        for key in keys:  # every copy lands before any original goes
            target = dest_key + key[len(src_key):]
            self._call(f"copy of {self._where(key)} to {self._where(target)}",
                       lambda k=key, t=target: self._client.copy_object(
                           Bucket=self.bucket, Key=t, CopySource={"Bucket": self.bucket, "Key": k}))
        self.delete_prefix(src)

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
        # a bucket lists whatever keys were put in it: each is checked to stay inside local_dir before any
        # download starts, and downloaded under its own name (never a normalised one)
        where = f"key in {self._where(self._dir_key(rel_prefix))}"
        targets = [(f"{base}/{rel}" if base else rel, str(safe_join(local_dir, rel, where))) for rel in files]
        self._run_all([(lambda k=key, d=dest: self._download_file(k, d)) for key, dest in targets])

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
        # Two attempts only: the check runs at start-up, where a dead endpoint should fail in seconds, not
        # after the whole retry schedule meant for saves.
        attempts = min(2, self.settings.max_attempts)
        if self._quick is None:
            self._quick = self._open_client(self._config.merge(self._config_type(
                retries={"mode": self.settings.retry_mode, "total_max_attempts": attempts})))
        client, key = self._quick, self._key(rel)
        self._call(f"write of {self._where(key)}",
                   lambda: client.put_object(Bucket=self.bucket, Key=key, Body=payload), attempts)
        back = self._call(f"read of {self._where(key)}",
                          lambda: client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), attempts)
        if back != payload:
            raise SpindleError(f"{self._where(key)} read back different bytes")
        self._call(f"delete of {self._where(key)}", lambda: client.delete_object(Bucket=self.bucket, Key=key),
                   attempts)
