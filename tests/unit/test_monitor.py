"""Monitor: webhook alerts (Feishu / Slack / generic JSON), heartbeat, watchdog stack dumps, SIGTERM and
exception alerts — all received by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import helpers
from spindle.config import AlertConfig
from spindle.config.redact import redact_destination
from spindle.parallel.mesh import ParallelEnv
from spindle.train.monitor import Monitor, mask_secrets
from spindle.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


class Hook:
    """A local webhook: records every POST (path, JSON body)."""

    def __init__(self, status: int = 200):
        self.received: list[tuple[str, dict]] = []
        self.status = status
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append((self.path, json.loads(body)))
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.received if p == path]

    def wait_for(self, path: str, n: int = 1, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.bodies(path)) < n:
            time.sleep(0.02)
        return self.bodies(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook(monkeypatch):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    h = Hook()
    yield h
    h.close()


def alert_cfg(hook, fmt="feishu", **kw):
    return AlertConfig(enable_feishu_alert=True, feishu_alert_address=f"{hook.url}/hook/tok123",
                       light_monitor_address=f"{hook.url}/beat", webhook_format=fmt, **kw)


def tiny_cfg(tmp_path, alert: dict, **over):
    """The tiny config (tests/helpers.py), 6 steps, with these alert keys."""
    return helpers.tiny_cfg(tmp_path, **helpers.merge(
        dict(JOB_NAME="mon", data={"total_steps": 6}, trainer={"seed": 3}, monitor={"alert": alert}), **over))


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["feishu", "slack", "json"])
def test_alert_payload_formats(hook, tmp_path, fmt):
    mon = Monitor(alert_cfg(hook, fmt), tmp_path, "job1").start()
    try:
        mon.alert("loss_spike", "step 3: loss went up", step=3)
    finally:
        mon.close()
    (body,) = hook.wait_for("/hook/tok123")
    if fmt == "feishu":
        assert body["msg_type"] == "text" and set(body["content"]) == {"text"}
        text = body["content"]["text"]
    elif fmt == "slack":
        assert set(body) == {"text"}
        text = body["text"]
    else:
        assert body["kind"] == "loss_spike" and body["step"] == 3 and body["job"] == "job1"
        text = body["text"]
    assert "job1" in text and "loss_spike" in text and "loss went up" in text


def test_spike_nonfinite_and_heartbeat(hook, tmp_path):
    alerts_file = tmp_path / "alerts" / "a.jsonl"
    mon = Monitor(alert_cfg(hook, "json", heartbeat_every=2, alert_file_path=str(alerts_file)), tmp_path).start()
    losses = [4.0, 3.0, 3.5, 9.0, float("nan"), 3.0]
    for step, loss in enumerate(losses):
        mon.step_started(step)
        mon.step_finished({"step": step, "loss": loss, "grad_norm": 1.0, "inf_nan_skip_batches": int(step >= 4)})
    mon.close()
    kinds = [(a["kind"], a["step"]) for a in hook.wait_for("/hook/tok123", 2)]
    assert kinds == [("loss_spike", 3), ("non_finite", 4)]  # 3.5 < 1.5 x 3.0; 9.0 > 1.5 x 3.5
    beats = hook.wait_for("/beat", 3)
    assert [b["step"] for b in beats] == [1, 3, 5] and beats[0]["job"] == "spindle"
    assert [json.loads(l)["kind"] for l in alerts_file.read_text().splitlines()] == ["loss_spike", "non_finite"]


def test_watchdog_dumps_every_thread_and_alerts(hook, tmp_path):
    mon = Monitor(alert_cfg(hook, "slack", stuck_timeout_s=0.3), tmp_path).start()
    release = threading.Event()
    side = threading.Thread(target=release.wait, name="side-worker", daemon=True)
    side.start()
    mon.step_started(7)
    time.sleep(1.2)  # "stuck"
    mon.step_finished(None)
    release.set()
    mon.close()
    (body,) = hook.wait_for("/hook/tok123")
    assert "stuck" in body["text"] and "step 7" in body["text"]
    dumps = list((tmp_path / "stacks").glob("rank0_step7_*.txt"))
    assert len(dumps) == 1  # one dump per stuck step
    text = dumps[0].read_text()
    assert "side-worker" in text and "MainThread" in text and "test_watchdog_dumps_every_thread" in text
    assert "faulthandler" in text


def test_unreachable_webhook_never_raises_and_hides_the_token(tmp_path, spindle_lines):
    from s3server import free_port  # tests/ is on sys.path (conftest)

    hook_port, beat_port = free_port(), free_port()  # closed ports on 127.0.0.1
    lines = spindle_lines
    cfg = AlertConfig(enable_feishu_alert=True, feishu_alert_address=f"http://127.0.0.1:{hook_port}/hook/SECRETTOKEN",
                      light_monitor_address=f"127.0.0.1:{beat_port}", heartbeat_every=1)
    mon = Monitor(cfg, tmp_path, send_timeout_s=0.5).start()
    t0 = time.monotonic()
    for step in range(3):
        mon.step_started(step)
        mon.step_finished({"step": step, "loss": float("inf"), "grad_norm": 1.0})
    assert time.monotonic() - t0 < 0.5  # queued: the loop is not slowed by a dead webhook
    mon.exception(RuntimeError("boom"))  # synchronous, still must not raise
    mon.close()
    assert mon.failures >= 7  # 3 alerts + the exception to the webhook, 3 heartbeats
    assert not any("SECRETTOKEN" in l for l in lines)
    for port in (hook_port, beat_port):  # warned once per address, however often it failed
        assert sum("cannot reach" in l and f":{port}" in l for l in lines) == 1, (port, lines)


def test_secrets_masked_and_urls_redacted(monkeypatch):
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "very-secret-value-123")
    assert mask_secrets("error: key very-secret-value-123 refused") == "error: key <redacted> refused"
    assert redact_destination("https://open.feishu.cn/open-apis/bot/v2/hook/abc-123") == \
        "https://open.feishu.cn/<redacted>"


# ----------------------------------------------------------------------------- in the trainer


def test_trainer_alerts_nonfinite_step_and_heartbeat(hook, tmp_path):
    alert = {"enable_feishu_alert": True, "feishu_alert_address": f"{hook.url}/hook/x", "webhook_format": "json",
             "light_monitor_address": f"{hook.url}/beat", "heartbeat_every": 3}
    tr = Trainer(tiny_cfg(tmp_path, alert), ParallelEnv())
    def nan_at_step_2(module, inputs, out):  # NaN final hidden states, hence a NaN loss, at step 2
        return out * float("nan") if tr.state.step == 2 else out

    tr.raw_model.norm.register_forward_hook(nan_at_step_2)
    res = tr.fit()
    assert res["state"]["inf_nan_skip_batches"] == 1
    alerts = hook.wait_for("/hook/x")
    assert [(a["kind"], a["step"]) for a in alerts] == [("non_finite", 2)]
    assert [b["step"] for b in hook.wait_for("/beat", 2)] == [2, 5]


def test_trainer_exception_is_alerted_and_reraised(hook, tmp_path):
    alert = {"enable_feishu_alert": True, "feishu_alert_address": f"{hook.url}/hook/x"}
    tr = Trainer(tiny_cfg(tmp_path, alert), ParallelEnv())
    real = tr.train_step

    def broken(mbs):
        if tr.state.step == 2:
            raise RuntimeError("disk on fire")
        return real(mbs)

    tr.train_step = broken
    with pytest.raises(RuntimeError, match="disk on fire"):
        tr.fit()
    (body,) = hook.wait_for("/hook/x")
    text = body["content"]["text"]
    assert "exception" in text and "disk on fire" in text and "step 2" in text
    assert signal.getsignal(signal.SIGTERM) != tr.monitor._on_sigterm  # handler restored after fit


def test_trainer_stuck_step_dumps_stacks(hook, tmp_path):
    alert = {"enable_feishu_alert": True, "feishu_alert_address": f"{hook.url}/hook/x", "stuck_timeout_s": 0.4,
             "webhook_format": "slack"}
    tr = Trainer(tiny_cfg(tmp_path, alert, data={"seq_len": 16, "micro_bsz": 2, "micro_num": 1, "total_steps": 3}),
                 ParallelEnv())
    real = tr.train_step

    def slow(mbs):
        if tr.state.step == 1:
            time.sleep(1.5)
        return real(mbs)

    tr.train_step = slow
    tr.fit()
    (body,) = hook.wait_for("/hook/x")
    assert "stuck" in body["text"] and "step 1" in body["text"]
    (dump,) = (tmp_path / "mon" / "stacks").glob("rank0_step1_*.txt")
    assert "in slow" in dump.read_text()  # the stuck frame is in the dump


SIGTERM_CHILD = """
import sys, time
from pathlib import Path
from spindle.config import AlertConfig
from spindle.train.monitor import Monitor
mon = Monitor(AlertConfig(enable_feishu_alert=True, feishu_alert_address=sys.argv[1], webhook_format="slack"),
              Path(sys.argv[2]), "termjob").start()
mon.step_started(5)
print("ready", flush=True)
time.sleep(60)
"""


def test_sigterm_alerts_then_exits_as_usual(hook, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(k, None)
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, f"{hook.url}/hook/t", str(tmp_path)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM  # the default exit, after the alert
    finally:
        if child.poll() is None:
            child.kill()
    (body,) = hook.wait_for("/hook/t")
    assert "sigterm" in body["text"] and "step 5" in body["text"] and "termjob" in body["text"]
