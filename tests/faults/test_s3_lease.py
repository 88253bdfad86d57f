"""The save-folder lease on S3 through conditional writes (spindle/checkpoint/lock.py), against the local S3
server: moto honours If-None-Match and If-Match on PUT, so the conditional path is the one these runs take;
the fallback (write, wait a second, read back) is forced by stripping the headers, as a server that ignores
them would."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from spindle.checkpoint import lock as lock_module
from spindle.checkpoint.lock import LOCK_FILE, FolderLock, owner_info
from spindle.checkpoint.storage import S3Settings, open_storage
from spindle.errors import SpindleError

KEYS = dict(access_key="AKIASPINDLETEST0002", secret_key="secret-of-the-lease-test")


@pytest.fixture
def folder(moto_server, monkeypatch):
    """A function that opens the same S3 save folder as a new storage each call (one per run)."""
    import boto3

    for name in ("AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1", aws_access_key_id=KEYS[
        "access_key"], aws_secret_access_key=KEYS["secret_key"]).create_bucket(Bucket=bucket)
    return lambda: open_storage(f"boto3:s3://{bucket}/ckpt", endpoint_url=moto_server.endpoint,
                                settings=S3Settings(max_attempts=2), **KEYS)


def _strip_conditions(storage) -> None:
    """The storage's PUTs go out without If-None-Match / If-Match: a server that ignores them."""
    def strip(request, **_):
        for name in ("If-None-Match", "If-Match"):
            if name in request.headers:
                del request.headers[name]
    storage._client.meta.events.register("before-sign.s3.PutObject", strip)


def test_of_two_runs_one_gets_the_lease_at_once_and_the_other_is_refused(folder):
    t0 = time.monotonic()
    first = FolderLock(folder(), "first").acquire()
    try:
        assert time.monotonic() - t0 < 1.0  # no write-sleep-read: the conditional create decided
        assert first._version is not None
        with pytest.raises(SpindleError, match=r"in use by job 'first'"):
            FolderLock(folder(), "second").acquire()
        assert json.loads(folder().read_bytes(LOCK_FILE))["job"] == "first"
    finally:
        first.release()
    assert not folder().exists(LOCK_FILE)


def test_a_stale_lease_taken_over_by_another_run_first_is_not_written_over(folder):
    stale = {**owner_info("crashed"), "host": "elsewhere", "refreshed": time.time() - 3600}
    folder().write_bytes(LOCK_FILE, json.dumps(stale).encode())
    late = folder()
    real_read = late.read_versioned
    other: list[FolderLock] = []

    def read_then_lose_the_race(rel):
        seen = real_read(rel)  # `late` judges the lease stale from this read...
        if not other:  # ...and another run takes it over first (once: the refusal reads the lease again)
            other.append(FolderLock(folder(), "quick").acquire())
        return seen

    late.read_versioned = read_then_lose_the_race
    try:
        with pytest.raises(SpindleError, match=r"in use by job 'quick'"):
            FolderLock(late, "late").acquire()
        assert json.loads(folder().read_bytes(LOCK_FILE))["job"] == "quick"
    finally:
        for held in other:
            held.release()


def test_a_run_whose_lease_was_taken_over_leaves_it_to_the_new_owner(folder, monkeypatch, caplog):
    monkeypatch.setattr(lock_module, "LEASE_REFRESH_S", 0.05)
    mine = FolderLock(folder(), "stalled").acquire()
    usurper = {**owner_info("usurper"), "host": "elsewhere"}
    folder().write_bytes(LOCK_FILE, json.dumps(usurper).encode())  # as a run that judged the lease stale
    deadline = time.monotonic() + 10
    while not mine._lost and time.monotonic() < deadline:
        time.sleep(0.02)
    mine.release()
    assert mine._lost
    assert json.loads(folder().read_bytes(LOCK_FILE))["job"] == "usurper"  # not refreshed over, not deleted
    said = [r.getMessage() for r in caplog.records]  # the refresh thread's warning
    assert any("was taken over by job 'usurper'" in line and "left to that run" in line for line in said), said


def test_a_server_that_ignores_the_conditions_gets_the_read_back(folder):
    ignoring = folder()
    _strip_conditions(ignoring)
    t0 = time.monotonic()
    first = FolderLock(ignoring, "first").acquire()
    try:
        assert time.monotonic() - t0 >= 1.0 and first._version is None  # the probes found the conditions ignored
        second = folder()
        _strip_conditions(second)
        with pytest.raises(SpindleError, match=r"in use by job 'first'"):
            FolderLock(second, "second").acquire()
    finally:
        first.release()
