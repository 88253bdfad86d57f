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

import os

from spindle.checkpoint.storage.base import Storage, StorageNotFound, WriteConflict
from spindle.checkpoint.storage.local import LocalStorage
from spindle.checkpoint.storage.s3 import S3Storage
from spindle.checkpoint.storage.s3_address import S3Location, parse_s3_url
from spindle.checkpoint.storage.uploader import AsyncUploader
from spindle.config.s3 import S3Settings
from spindle.errors import SpindleError

__all__ = [
    "AsyncUploader",
    "LocalStorage",
    "S3Location",
    "S3Settings",
    "S3Storage",
    "Storage",
    "StorageNotFound",
    "WriteConflict",
    "open_storage",
    "parse_s3_url",
]

# Seeds (InternEvo) accept these prefixes; we name them in the error rather than silently treating
# "volc:vc://..." as a local folder called "volc:vc:".
_UNSUPPORTED_PREFIXES = ("volc:", "oss2:")

_ENDPOINT_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_ACCESS_KEY_ENV = ("S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
_SECRET_KEY_ENV = ("S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
_REGION_ENV = ("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def open_storage(
    url: str,
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    settings: S3Settings = S3Settings(),
) -> Storage:
    """Open `local:/dir`, a bare path, or `boto3:s3://bucket[.host[:port]]/prefix`.

    S3 endpoint and keys come from the arguments, else the URL (endpoint only), else the
    environment: S3_ENDPOINT_URL / AWS_ENDPOINT_URL, S3_ACCESS_KEY_ID / AWS_ACCESS_KEY_ID,
    S3_SECRET_ACCESS_KEY / AWS_SECRET_ACCESS_KEY; with no keys anywhere boto3's usual chain
    (profiles, instance roles) applies. Nothing is contacted here; call `ping()` for that.

    settings: the timeouts and botocore's retries (spindle/config/s3.py, the config's `ckpt.s3_*` values where
    a run opens it: `CkptConfig.s3_settings()`). A request makes up to max_attempts attempts; connect_timeout_s
    is what makes a dead endpoint fail in seconds, read_timeout_s one that accepts connections but never
    answers. Ignored for local folders. S3 needs the [s3] extra (boto3): one line names it when it is missing.
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
            settings=settings,
        )
    path = url[len("local:"):] if url.startswith("local:") else url
    if not path:
        raise SpindleError(f"checkpoint path {url!r} has no folder after 'local:'")
    return LocalStorage(path)
