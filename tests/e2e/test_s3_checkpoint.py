"""Checkpoints on a real S3-protocol server (moto_server on 127.0.0.1): save (sync and async upload),
auto_resume from S3, snapshots, failed uploads, unreachable endpoint at start, no secrets printed.

Run as a script to measure the training step time during a background upload against without:
    .venv/bin/python tests/e2e/test_s3_checkpoint.py
"""

import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import tiny_cfg  # noqa: E402
from s3server import MotoServer, find_moto_server, free_port  # noqa: E402

from spindle.checkpoint.discovery import scan_completed  # noqa: E402
from spindle.errors import SpindleError  # noqa: E402
from spindle.parallel.mesh import ParallelEnv  # noqa: E402
from spindle.train.trainer import Trainer  # noqa: E402

ACCESS, SECRET = "AKIDSPINDLETEST", "spindle-very-secret-key-do-not-print"


def s3_env(monkeypatch, endpoint):
    for k, v in (("S3_ENDPOINT_URL", endpoint), ("S3_ACCESS_KEY_ID", ACCESS), ("S3_SECRET_ACCESS_KEY", SECRET)):
        monkeypatch.setenv(k, v)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(k, raising=False)


def make_bucket(endpoint):
    import boto3

    name = f"spindle-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


def cfg(tmp_path, folder, total=4, model=None, **ckpt):
    """The tiny config (tests/helpers.py) saving to `folder`, staging uploads under tmp_path/stage."""
    return tiny_cfg(tmp_path, JOB_NAME="s3", data={"total_steps": total}, model=model or {},
                    lr_scheduler={"total_steps": 6},  # the same schedule whatever total_steps a run stops at
                    ckpt={"enable_save_ckpt": True, "save_ckpt_folder": folder,
                          "async_upload_tmp_folder": str(tmp_path / "stage"), **ckpt})


def losses(result):
    return [h["loss"] for h in result["history"]]


@pytest.mark.parametrize("async_upload", [False, True])
def test_save_and_auto_resume_from_s3(moto_server, tmp_path, monkeypatch, capsys, async_upload):
    s3_env(monkeypatch, moto_server.endpoint)
    url = f"boto3:s3://{make_bucket(moto_server.endpoint)}/run"
    full = losses(Trainer(cfg(tmp_path / "ref", None, total=6, auto_resume=False), ParallelEnv()).fit())

    first = Trainer(cfg(tmp_path, url, checkpoint_every=2, oss_snapshot_freq=3, async_upload=async_upload),
                    ParallelEnv())
    a = losses(first.fit())
    files = first.ckpt_manager.storage.list_files("")
    assert {"2.step", "4.step", "snapshot/0/3.step", "4/.metadata", "4/trainer_state.json"} <= set(files)
    assert not list((tmp_path / "stage").rglob("*.distcp"))  # staging removed after upload

    second = Trainer(cfg(tmp_path, url, total=6, checkpoint_every=2, async_upload=async_upload), ParallelEnv())
    assert second.state.step == 4
    assert a + losses(second.fit()) == full
    out = capsys.readouterr().out
    assert "auto_resume: continuing from boto3:s3://" in out
    assert SECRET not in out and ACCESS not in out

    # eval / export read remote checkpoints too
    from spindle.eval.load import load_model_for_eval

    model, _ = load_model_for_eval(url)
    assert torch.equal(model.tok_embeddings.weight, second.raw_model.tok_embeddings.weight)


def test_failed_upload_keeps_training_stays_staged_and_is_uploaded_by_the_next_run(moto_server, tmp_path,
                                                                                    monkeypatch, spindle_lines):
    from botocore.exceptions import EndpointConnectionError

    s3_env(monkeypatch, moto_server.endpoint)
    url = f"boto3:s3://{make_bucket(moto_server.endpoint)}/run"
    lines = spindle_lines
    tr = Trainer(cfg(tmp_path, url, total=4, checkpoint_every=2, async_upload=True), ParallelEnv())
    st = tr.ckpt_manager.storage
    calls = []
    real = st._client.upload_file

    def down(*a, **kw):
        calls.append(a[2])
        raise EndpointConnectionError(endpoint_url=moto_server.endpoint)

    st._client.upload_file = down
    with pytest.raises(SpindleError, match=r"checkpoint step 2, 4 could not be uploaded.*stays staged") as err:
        tr.fit()
    assert SECRET not in str(err.value)
    assert tr.state.step == 4  # the failed upload of step 2 did not stop the run at the save of step 4
    assert any("upload of step 2" in ln and "retried in the background" in ln for ln in lines)
    assert len(calls) >= 3 and not st.exists("2.step") and not st.exists("4.step")
    stage = tmp_path / "stage"
    roots = list(stage.glob("spindle-*"))
    assert len(roots) == 1 and (roots[0] / "4" / ".metadata").is_file()  # kept: the only copy

    # the next run on the folder (another process: here, a pid that is gone) uploads what was staged
    roots[0].rename(stage / (roots[0].name.rsplit("-", 1)[0] + "-999999"))
    st._client.upload_file = real
    lines.clear()
    second = Trainer(cfg(tmp_path, url, total=6, checkpoint_every=2, async_upload=True), ParallelEnv())
    assert any("uploaded step 4, left staged" in ln for ln in lines)
    assert second.state.step == 4 and [r.step for r in scan_completed(second.ckpt_manager.storage)] == [2, 4]
    assert not list(stage.glob("*-999999"))  # nothing left behind in the staging folder
    second.fit()


def test_unreachable_endpoint_fails_at_start(tmp_path, monkeypatch):
    # a closed port on 127.0.0.1: connection refused, never any other address
    s3_env(monkeypatch, f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(SpindleError, match="checkpoint storage boto3:s3://bucket/run is not usable") as err:
        Trainer(cfg(tmp_path, "boto3:s3://bucket/run"), ParallelEnv())
    assert time.monotonic() - t0 < 30
    assert SECRET not in str(err.value) and ACCESS not in str(err.value)
    assert not (tmp_path / "s3" / "metrics.jsonl").exists()  # no training happened


def test_endpoint_that_accepts_but_never_answers_fails_at_start_within_the_timeouts(tmp_path, monkeypatch):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_stay_silent():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    s3_env(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
    t0 = time.monotonic()
    try:
        with pytest.raises(SpindleError, match=r"boto3:s3://bucket/run is not usable.*[Rr]ead timeout") as err:
            Trainer(cfg(tmp_path, "boto3:s3://bucket/run", s3_connect_timeout_s=1, s3_read_timeout_s=1),
                    ParallelEnv())
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert held, "the client never connected"
    assert time.monotonic() - t0 < 15  # two tries of a 1 s read timeout (+ backoff), not minutes
    assert "\n" not in str(err.value) and SECRET not in str(err.value)


# ----------------------------------------------------------------------------- measurement


def measure(steps_per_phase: int = 12) -> dict:
    """Step time with no upload vs during a background upload of a ~60 MB checkpoint."""
    import tempfile

    exe = find_moto_server()
    with MotoServer(exe) as server, tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.update(S3_ENDPOINT_URL=server.endpoint, S3_ACCESS_KEY_ID=ACCESS, S3_SECRET_ACCESS_KEY=SECRET)
        url = f"boto3:s3://{make_bucket(server.endpoint)}/bench"
        model = {"hidden_size": 256, "num_attention_heads": 4, "num_kv_attention_heads": 4, "num_layers": 4,
                 "vocab_size": 8192, "multiple_of": 64, "max_position_embeddings": 128}
        out = {}
        for mode in ("async", "sync"):
            c = cfg(Path(tmp) / mode, url + "-" + mode, total=1000, model=model, async_upload=mode == "async")
            c.data.seq_len, c.data.micro_bsz = 128, 4
            tr = Trainer(c, ParallelEnv())
            batches = [tr.loader.next_step(i) for i in range(4)]
            for b in batches[:2]:
                tr.train_step(b)  # warm-up
            base = []
            for i in range(steps_per_phase):
                t = time.perf_counter()
                tr.train_step(batches[i % 4])
                base.append(time.perf_counter() - t)
            t = time.perf_counter()
            tr.save()
            blocking = time.perf_counter() - t
            during, n = [], 0
            up = tr.ckpt_manager.uploader
            t_up = time.perf_counter()
            while up is not None and up.pending():
                t = time.perf_counter()
                tr.train_step(batches[n % 4])
                during.append(time.perf_counter() - t)
                n += 1
            if up is not None:
                upload_s = time.perf_counter() - t_up
                tr.ckpt_manager.wait()
            else:
                upload_s = blocking
            size = sum(f.stat().st_size for f in Path(tmp, mode).rglob("*") if f.is_file())
            files = tr.ckpt_manager.storage.list_files("")
            out[mode] = {
                "step_s_no_upload_median": round(statistics.median(base), 4),
                "step_s_during_upload_median": round(statistics.median(during), 4) if during else None,
                "steps_during_upload": len(during),
                "save_call_blocking_s": round(blocking, 3),
                "upload_wall_s": round(upload_s, 3),
                "marked": "1000.step" in files or any(f.endswith(".step") for f in files),
                "staging_bytes_left": size,
            }
            tr.ckpt_manager.close()
        out["checkpoint_mb"] = round(sum(p.numel() * 4 * 3 for p in tr.raw_model.parameters()) / 1e6, 1)
        out["torch_threads"] = torch.get_num_threads()
        return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
