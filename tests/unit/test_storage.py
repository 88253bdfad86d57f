"""Checkpoint storage: local folders and a real S3 endpoint (moto_server)."""

from __future__ import annotations

import errno
import os
import threading
import time
import traceback
import uuid

import pytest

from s3server import MotoServer, find_moto_server, free_port
from spindle.checkpoint.storage import (
    AsyncUploader,
    LocalStorage,
    S3Settings,
    S3Storage,
    StorageNotFound,
    open_storage,
    parse_s3_url,
)
from spindle.checkpoint.storage.s3_address import _is_transient
from spindle.errors import SpindleError

ACCESS = "AKIASPINDLETEST0001"
SECRET = "sEcReT/never-print-this+0123456789abcdef"

_S3_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID",
           "S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "S3_REGION", "AWS_REGION",
           "AWS_DEFAULT_REGION", "AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
           "https_proxy")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Tests decide the endpoint and keys; the developer's shell must not leak in."""
    for name in _S3_ENV:
        monkeypatch.delenv(name, raising=False)


def _tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    return out


def _make_staging(tmp_path, files):
    staging = tmp_path / f"staging-{uuid.uuid4().hex[:6]}"
    for rel, data in files.items():
        p = staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(staging)


def _no_secret(text: str) -> None:
    assert SECRET not in text
    assert SECRET[:12] not in text


# ------------------------------------------------------------------------------------------
# URL parsing and opening
# ------------------------------------------------------------------------------------------


def test_open_local_forms(tmp_path, monkeypatch):
    a = open_storage(f"local:{tmp_path}/ckpt")
    b = open_storage(str(tmp_path / "ckpt"))
    assert isinstance(a, LocalStorage) and isinstance(b, LocalStorage)
    assert a.root == b.root == str(tmp_path / "ckpt")
    assert a.url == f"local:{tmp_path}/ckpt"
    monkeypatch.chdir(tmp_path)
    rel = open_storage("local:runs/ckpt")
    assert rel.root == str(tmp_path / "runs" / "ckpt")  # resolved once, immune to later chdir


@pytest.mark.parametrize("url, bucket, prefix, endpoint", [
    ("boto3:s3://bkt/a/b/", "bkt", "a/b", None),
    ("s3://bkt", "bkt", "", None),
    ("boto3:s3://bkt.10.1.2.3/ckpt", "bkt", "ckpt", "http://10.1.2.3"),
    ("boto3:s3://bkt.10.1.2.3:9000/ckpt/7b", "bkt", "ckpt/7b", "http://10.1.2.3:9000"),
    ("boto3:s3://bkt.localhost:5000/x", "bkt", "x", "http://localhost:5000"),
    ("boto3:s3://bkt.s3.lan:9000/x", "bkt", "x", "http://s3.lan:9000"),
    ("boto3:s3://my.dotted.bucket/x", "my.dotted.bucket", "x", None),  # dots are legal in buckets
])
def test_parse_s3_url(url, bucket, prefix, endpoint):
    loc = parse_s3_url(url)
    assert (loc.bucket, loc.prefix, loc.endpoint_url) == (bucket, prefix, endpoint)


def test_open_errors():
    with pytest.raises(SpindleError, match="volc"):
        open_storage("volc:vc://bucket/x")
    with pytest.raises(SpindleError, match="no bucket"):
        open_storage("boto3:s3:///x")
    with pytest.raises(SpindleError, match="keep one"):
        open_storage("boto3:s3://b.10.0.0.1:9000/x", endpoint_url="http://10.0.0.2:9000")
    with pytest.raises(SpindleError):
        open_storage("")


# ------------------------------------------------------------------------------------------
# Local storage
# ------------------------------------------------------------------------------------------


def test_local_round_trip(tmp_path):
    st = open_storage(f"local:{tmp_path}/ckpt")
    st.write_bytes("100/model.pt", b"m100")
    st.write_bytes("100/sub/opt.pt", b"o100")
    st.write_bytes("1000/model.pt", b"m1000")
    st.write_bytes("100.step", b"")
    assert st.read_bytes("100/model.pt") == b"m100"
    assert st.exists("100/model.pt") and st.exists("100") and st.exists("100.step")
    assert not st.exists("200") and not st.exists("100/nope.pt")
    assert st.list_dirs() == ["100", "1000"]
    assert st.list_dirs("100") == ["sub"]
    assert st.list_dirs("missing") == []
    assert st.list_files("100") == ["model.pt", "sub/opt.pt"]
    assert st.list_files("missing") == []
    assert st.local_path("100/model.pt") == str(tmp_path / "ckpt" / "100" / "model.pt")

    st.delete_prefix("100")  # must not touch 1000/ nor 100.step
    assert st.list_dirs() == ["1000"]
    assert st.exists("100.step") and st.read_bytes("1000/model.pt") == b"m1000"
    st.delete_prefix("100.step")
    st.delete_prefix("does/not/exist")
    assert not st.exists("100.step")

    with pytest.raises(StorageNotFound) as ei:
        st.read_bytes("100/model.pt")
    assert isinstance(ei.value, SpindleError) and isinstance(ei.value, FileNotFoundError)
    assert "model.pt" in str(ei.value)
    with pytest.raises(SpindleError, match="outside"):
        st.read_bytes("../escape")
    with pytest.raises(SpindleError, match="relative"):
        st.write_bytes("/etc/passwd", b"x")
    with pytest.raises(SpindleError, match="whole"):
        st.delete_prefix("")


def test_local_atomic_write_leaves_no_temp(tmp_path):
    st = LocalStorage(str(tmp_path))
    st.write_bytes("a/x.bin", b"old")
    st.write_bytes("a/x.bin", b"new")
    assert st.read_bytes("a/x.bin") == b"new"
    assert os.listdir(tmp_path / "a") == ["x.bin"]


def test_local_full_disk_keeps_previous_file(tmp_path, monkeypatch):
    st = LocalStorage(str(tmp_path))
    st.write_bytes("10/model.pt", b"previous")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SpindleError) as ei:
        st.write_bytes("10/model.pt", b"x" * 1000)
    msg = str(ei.value)
    assert "no space left" in msg and str(tmp_path / "10" / "model.pt") in msg
    monkeypatch.undo()
    assert st.read_bytes("10/model.pt") == b"previous"
    assert os.listdir(tmp_path / "10") == ["model.pt"]  # the temp file was cleaned up


def test_local_upload_download_dir(tmp_path):
    files = {"model.pt": b"m" * 100, "sub/deep/opt.pt": b"o" * 50}
    staging = _make_staging(tmp_path, files)
    st = LocalStorage(str(tmp_path / "store"))
    st.upload_dir(staging, "20")
    assert st.list_files("20") == ["model.pt", "sub/deep/opt.pt"]
    st.upload_dir(st.local_path("20"), "20")  # staged in place: a no-op, not a self-copy
    st.download_dir("20", str(tmp_path / "back"))
    assert _tree(tmp_path / "back") == files
    with pytest.raises(StorageNotFound):
        st.download_dir("nope", str(tmp_path / "back2"))


def test_local_ping(tmp_path):
    st = LocalStorage(str(tmp_path / "new" / "ckpt"))
    st.ping()
    assert os.listdir(tmp_path / "new" / "ckpt") == []  # pings/ cleaned up
    (tmp_path / "afile").write_bytes(b"")
    bad = LocalStorage(str(tmp_path / "afile" / "ckpt"))  # parent is a file: cannot be created
    with pytest.raises(SpindleError) as ei:
        bad.ping()
    assert bad.url in str(ei.value)


def test_async_uploader_local(tmp_path):
    st = LocalStorage(str(tmp_path / "store"))
    done = []
    with AsyncUploader(st) as up:
        for step in (1, 2, 3):
            staging = _make_staging(tmp_path, {"model.pt": bytes([step]) * 10})
            up.submit(staging, str(step),
                      on_done=lambda s=step: st.write_bytes(f"{s}.step", b""), remove_local=True)
        up.wait()
        assert sorted(st.list_files("")) == ["1.step", "1/model.pt", "2.step", "2/model.pt",
                                             "3.step", "3/model.pt"]
        fut = up.submit(str(tmp_path / "missing-staging"), "4", on_done=lambda: done.append(4))
        with pytest.raises(SpindleError, match="missing-staging"):
            up.wait()
        assert fut.done() and done == [] and not st.exists("4")
        up.wait()  # a failure is reported once
    assert not any(p.name.startswith("staging-") for p in tmp_path.iterdir())
    with pytest.raises(SpindleError, match="closed"):
        up.submit(str(tmp_path), "5")


def test_async_uploader_runs_in_background_and_on_done_failure_counts(tmp_path):
    gate = threading.Event()

    class SlowStorage(LocalStorage):
        def upload_dir(self, local_dir, rel_prefix):
            assert gate.wait(10)
            super().upload_dir(local_dir, rel_prefix)

    st = SlowStorage(str(tmp_path / "store"))
    staging = _make_staging(tmp_path, {"m": b"1"})
    up = AsyncUploader(st, max_workers=1)
    t0 = time.monotonic()
    fut = up.submit(staging, "1", on_done=lambda: st.write_bytes("1.step", b""))
    assert time.monotonic() - t0 < 0.5 and not fut.done() and up.pending() == 1  # caller is free
    gate.set()
    up.wait()
    assert st.exists("1.step") and up.pending() == 0

    def broken_marker():
        raise OSError("marker write failed")

    up.submit(staging, "2", on_done=broken_marker)
    up.submit(str(tmp_path / "gone"), "3")
    with pytest.raises(SpindleError, match="marker write failed.*1 more"):
        up.close()
    assert os.path.isdir(staging)  # kept: nothing asked to remove it


# ------------------------------------------------------------------------------------------
# S3 (moto_server)
# ------------------------------------------------------------------------------------------


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS,
                 aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=bucket)


@pytest.fixture
def bucket(moto_server):
    name = f"spindle-{uuid.uuid4().hex[:10]}"
    _create_bucket(moto_server.endpoint, name)
    return name


def _s3(moto_server, bucket, prefix="ckpt", **kw):
    kw.setdefault("max_attempts", 2)
    return open_storage(f"boto3:s3://{bucket}/{prefix}", endpoint_url=moto_server.endpoint,
                        access_key=ACCESS, secret_key=SECRET, settings=S3Settings(**kw))


def test_s3_round_trip(moto_server, bucket, tmp_path):
    st = _s3(moto_server, bucket)
    assert isinstance(st, S3Storage) and st.url == f"boto3:s3://{bucket}/ckpt"
    assert st.local_path("x") is None
    assert st.list_dirs() == [] and st.list_files() == [] and not st.exists("100")

    st.write_bytes("100/model.pt", b"m100")
    st.write_bytes("100/sub/opt.pt", b"o100")
    st.write_bytes("1000/model.pt", b"m1000")
    st.write_bytes("100.step", b"")
    assert st.read_bytes("100/model.pt") == b"m100"
    assert st.read_bytes("100.step") == b""
    assert st.exists("100/model.pt") and st.exists("100") and st.exists("100.step")
    assert not st.exists("10") and not st.exists("100/nope")
    assert st.list_dirs() == ["100", "1000"]
    assert st.list_dirs("100") == ["sub"]
    assert st.list_files("100") == ["model.pt", "sub/opt.pt"]

    st.delete_prefix("100")
    assert st.list_dirs() == ["1000"] and st.exists("100.step")
    st.delete_prefix("100.step")
    assert not st.exists("100.step")
    with pytest.raises(StorageNotFound):
        st.read_bytes("100/model.pt")

    files = {"model.pt": os.urandom(1000), "a/b/c.bin": b"c", "empty": b""}
    st.upload_dir(_make_staging(tmp_path, files), "200")
    assert st.list_files("200") == ["a/b/c.bin", "empty", "model.pt"]
    st.download_dir("200", str(tmp_path / "back"))
    assert _tree(tmp_path / "back") == files
    with pytest.raises(StorageNotFound):
        st.download_dir("300", str(tmp_path / "nothing"))

    # A second storage on a sibling prefix of the same bucket sees none of it.
    other = _s3(moto_server, bucket, prefix="ckpt2")
    assert other.list_dirs() == []
    st.ping()
    assert not st.exists("pings")


def test_s3_pagination(moto_server, bucket):
    st = _s3(moto_server, bucket)
    st._page_size = 2  # force several listing pages and DeleteObjects batches
    for step in range(5):
        st.write_bytes(f"{step}/a", b"a")
        st.write_bytes(f"{step}/b/c", b"c")
    st.write_bytes("keep/x", b"x")
    assert st.list_dirs() == ["0", "1", "2", "3", "4", "keep"]
    assert st.list_files("3") == ["a", "b/c"]
    assert len(st.list_files()) == 11
    for step in range(5):
        st.delete_prefix(str(step))
    assert st.list_files() == ["keep/x"]


def test_s3_embedded_endpoint_and_env_credentials(moto_server, bucket, monkeypatch):
    monkeypatch.setenv("S3_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", SECRET)
    st = open_storage(f"boto3:s3://{bucket}.127.0.0.1:{moto_server.port}/emb", settings=S3Settings(max_attempts=1))
    assert st.endpoint_url == moto_server.endpoint
    assert st.url == f"boto3:s3://{bucket}/emb"
    st.write_bytes("x", b"hello")

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)  # endpoint from the environment
    st2 = open_storage(f"boto3:s3://{bucket}/emb", settings=S3Settings(max_attempts=1))
    assert st2.read_bytes("x") == b"hello"
    for text in (repr(st), str(st), repr(st2), st2.url, str(st2.location)):
        _no_secret(text)


def test_s3_missing_bucket_fails_without_retry(moto_server):
    st = open_storage("boto3:s3://no-such-bucket-spindle/x", endpoint_url=moto_server.endpoint,
                      access_key=ACCESS, secret_key=SECRET, settings=S3Settings(max_attempts=4))
    t0 = time.monotonic()
    with pytest.raises(SpindleError) as ei:
        st.write_bytes("a", b"1")
    assert time.monotonic() - t0 < 1.0  # not retried: a wrong bucket does not heal by waiting
    assert "NoSuchBucket" in str(ei.value) and "attempts" not in str(ei.value)
    _no_secret(str(ei.value))


def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def ce(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert _is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert _is_transient(ce("InternalError", 500))
    assert _is_transient(ce("ServiceUnavailable", 503))
    assert _is_transient(ce("SlowDown", 503))
    assert _is_transient(ce("Throttling", 400))
    assert not _is_transient(ce("AccessDenied", 403))
    assert not _is_transient(ce("NoSuchBucket", 404))
    try:  # the way boto3's upload_file wraps a ClientError
        try:
            raise ce("InternalError", 500)
        except ClientError:
            raise RuntimeError("Failed to upload")
    except RuntimeError as wrapped:
        assert _is_transient(wrapped)


def test_ping_unreachable_fails_fast_without_secret():
    port = free_port()  # nothing listens here
    st = open_storage("boto3:s3://bkt/ckpt", endpoint_url=f"http://127.0.0.1:{port}",
                      access_key=ACCESS, secret_key=SECRET)  # default retries/backoff
    t0 = time.monotonic()
    with pytest.raises(SpindleError) as ei:
        st.ping()
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, elapsed
    msg = str(ei.value)
    assert st.url in msg and f"127.0.0.1:{port}" in msg
    _no_secret(msg)
    _no_secret(repr(ei.value))
    _no_secret("".join(traceback.format_exception(ei.value)))


def test_async_upload_retries_then_recovers_after_restart(tmp_path):
    exe = find_moto_server()
    if exe is None:
        pytest.skip("moto_server executable not found next to sys.executable or on PATH")
    server = MotoServer(exe)  # a private server: this test stops it
    server.start()
    try:
        bucket = "retry-bucket"
        _create_bucket(server.endpoint, bucket)
        st = open_storage(f"boto3:s3://{bucket}/ckpt", endpoint_url=server.endpoint,
                          access_key=ACCESS, secret_key=SECRET,
                          settings=S3Settings(max_attempts=3))
        sends = []
        st._client.meta.events.register("before-send.s3", lambda **kw: sends.append(1))
        staging = _make_staging(tmp_path, {"model.pt": b"weights"})
        done = []
        st.write_bytes("probe", b"ok")  # the server works before it goes away
        sends.clear()

        server.stop()
        with AsyncUploader(st) as up:
            fut = up.submit(staging, "10", on_done=lambda: done.append("marker"))
            with pytest.raises(SpindleError) as ei:
                up.wait()
            msg = str(ei.value)
            assert "after 3 attempts" in msg and "upload of" in msg
            assert f"s3://{bucket}/ckpt/10/model.pt" in msg
            assert len(sends) == 3  # max_attempts=3: botocore's retries, one HTTP request per attempt
            assert done == [] and fut.exception() is not None
            _no_secret(msg)

            server.start()  # moto restarts empty
            _create_bucket(server.endpoint, bucket)
            up.submit(staging, "10", on_done=lambda: done.append("marker"))
            up.wait()
        assert done == ["marker"]
        assert st.read_bytes("10/model.pt") == b"weights"
    finally:
        server.stop()

