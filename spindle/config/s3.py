"""The S3 connection settings, declared once: the `ckpt.s3_*` config keys take their defaults from here, and
spindle.checkpoint.storage opens every bucket with an `S3Settings` (the config's values, or these defaults
where no config is at hand, e.g. `spindle eval --ckpt boto3:s3://...`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class S3Settings:
    # an endpoint that is down fails within the connect timeout; one that accepts connections but never
    # answers, within the read timeout (each attempt; the start-up check makes two)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    # botocore's own retries (Config(retries={"mode": ..., "total_max_attempts": ...})): "standard" retries connection
    # errors, 5xx, throttling and timeouts with jittered exponential backoff (at most 20 s a wait); "adaptive"
    # also slows this client down while the server throttles (SlowDown). Every request makes at most
    # max_attempts attempts, the first one included (botocore's own "max_attempts" counts only the retries).
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 6
