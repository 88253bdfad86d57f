"""The S3 connection settings, declared once: the `ckpt.s3_*` config keys take their defaults from here, and
spindle.checkpoint.storage opens every bucket with an `S3Settings` (the config's values, or these defaults
where no config is at hand, e.g. `spindle eval --ckpt boto3:s3://...`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Settings:
    # an endpoint that is down fails within the connect timeout; one that accepts connections but never
    # answers, within the read timeout (each try; start-up makes two)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    # a transient failure (connection error, 5xx, throttling) is retried `retries` times, sleeping
    # backoff_s * 2**k seconds (jittered) between tries, at most max_backoff_s
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
