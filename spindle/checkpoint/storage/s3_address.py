"""S3 addresses (`boto3:s3://bucket[.host[:port]]/prefix`) and how S3 errors are classified."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from spindle.errors import SpindleError
from spindle.extras import require
from spindle.fileio import safe_relpath

S3_FOLDERS = "an S3 checkpoint folder (boto3:s3://)"

# "bucket.10.1.2.3", "bucket.10.1.2.3:9000", "bucket.localhost:5000", "bucket.s3.lan:9000":
# an endpoint embedded after the first dot. A dotted name without a port that is not an IPv4
# address ("my.bucket") stays a bucket name, because dots are legal in bucket names.
_IPV4 = r"\d{1,3}(?:\.\d{1,3}){3}"
_EMBEDDED_ENDPOINT_RE = re.compile(
    rf"^(?P<bucket>[^.]+)\.(?P<host>{_IPV4}|localhost|[A-Za-z0-9.-]+(?=:\d+$))(?::(?P<port>\d+))?$"
)




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
    prefix = prefix.strip("/")
    if prefix:  # keys are names, not paths: 'a/../b' would be read as 'b' but listed as 'a/../b'
        safe_relpath(prefix, f"{url}: the key prefix")
    return S3Location(bucket=head, prefix=prefix, endpoint_url=endpoint)


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


def _attempts_made(exc: BaseException, attempts: int) -> int:
    """How many attempts botocore made: the server's error says how many retries it took; a connection error
    or timeout carries no answer, and botocore retries those until the attempts are spent."""
    for e in _exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            retried = response.get("ResponseMetadata", {}).get("RetryAttempts")
            return int(retried) + 1 if isinstance(retried, int) else attempts
    return attempts


def _is_transient(exc: BaseException) -> bool:
    bexc = require("botocore.exceptions", "s3", S3_FOLDERS)

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
