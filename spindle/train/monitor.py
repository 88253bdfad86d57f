"""Run monitoring: webhook alerts, a light-monitor heartbeat, a stuck-step watchdog, SIGTERM alerts.

Keys (the seed's `monitor.alert`, see spindle/config.py `AlertConfig`):
  enable_feishu_alert + feishu_alert_address   the webhook alerts go to (`webhook_format`:
                                               "feishu" `{"msg_type": "text", "content": {"text": ...}}`,
                                               "slack" `{"text": ...}`, "json" a flat record)
  light_monitor_address                        heartbeat POSTs (JSON) every `heartbeat_every` steps
  alert_file_path                              every alert is also appended here as one JSON line
  loss_spike_ratio                             alert when loss > ratio x the previous finite loss
  stuck_timeout_s                              a step running longer: every thread's stack is dumped
                                               to {run_dir}/stacks/ and an alert is sent

What is alerted: an exception escaping the loop, SIGTERM, loss spikes, non-finite (skipped) steps,
stuck steps. Alerts are POSTed with urllib (no extra dependency) and a short timeout; a failing or
absent endpoint is logged once and never raises into training. In-loop alerts go through a
background sender thread, so a slow webhook cannot slow a step; fatal alerts (exception, SIGTERM)
are sent synchronously before the process goes on dying. Webhook URLs carry tokens: they are never
printed (only scheme, host and port), and every alert text is logged, written and sent with its secrets
hidden (spindle.config.redact: URLs' tokens, credential-named pairs, and the values of credential-named
environment variables).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Optional

from spindle.config.redact import is_credential_name, redact_destination, redact_text

logger = logging.getLogger(__name__)
SEND_TIMEOUT_S = 3.0


def mask_secrets(text: str, environ=None) -> str:
    """Hide the values of credential-named environment variables (8+ characters: S3_SECRET_ACCESS_KEY, HF_TOKEN)
    and every secret redact_text finds by itself."""
    environ = os.environ if environ is None else environ
    return redact_text(text, [value for name, value in environ.items() if len(value) >= 8 and is_credential_name(name)])


def _normalise_address(addr: str) -> str:
    return addr if "://" in addr else f"http://{addr}"


def payload(fmt: str, text: str, record: dict) -> dict:
    if fmt == "feishu":
        return {"msg_type": "text", "content": {"text": text}}
    if fmt == "slack":
        return {"text": text}
    return dict(record, text=text)


def post_json(url: str, body: dict, timeout: float = SEND_TIMEOUT_S) -> int:
    """POST one JSON body; returns the HTTP status. Raises OSError (URLError/HTTPError/timeout)."""
    data = json.dumps(body, default=str).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - address from the config
        resp.read()
        return resp.status


class Monitor:
    """One per process. `start()` once, then per step `step_started(step)` / `step_finished(record)`,
    `exception(exc)` when the loop dies, `close()` at the end."""

    def __init__(self, alert_cfg, run_dir: Path, job_name: str = "spindle", rank: int = 0, is_main: bool = True,
                 send_timeout_s: float = SEND_TIMEOUT_S):
        self.cfg, self.run_dir, self.job, self.rank, self.is_main = alert_cfg, Path(run_dir), job_name, rank, is_main
        self.timeout = send_timeout_s
        self.host = socket.gethostname()
        self.webhook = (_normalise_address(alert_cfg.feishu_alert_address)
                        if alert_cfg.enable_feishu_alert and alert_cfg.feishu_alert_address else None)
        self.heartbeat_url = (_normalise_address(alert_cfg.light_monitor_address)
                              if alert_cfg.light_monitor_address and is_main else None)
        self.alert_file = Path(alert_cfg.alert_file_path) if alert_cfg.alert_file_path else None
        # the addresses as configured and as used, longest first: a message naming one shows its host only
        self._addresses = sorted({a for a in (alert_cfg.feishu_alert_address, alert_cfg.light_monitor_address,
                                              self.webhook, self.heartbeat_url) if a}, key=len, reverse=True)
        self.sent: list[dict] = []  # every alert raised (for tests and the end-of-run summary)
        self.failures = 0
        self._warned: set[str] = set()
        self._queue: "queue.Queue[Optional[tuple[str, dict]]]" = queue.Queue()
        self._sender: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._step: Optional[int] = None
        self._step_t0: Optional[float] = None
        self._stuck_reported: Optional[int] = None
        self._prev_loss: Optional[float] = None
        self._stop = threading.Event()
        self._watchdog: Optional[threading.Thread] = None
        self._prev_sigterm = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def sends(self) -> bool:
        return bool(self.webhook or self.heartbeat_url)

    def start(self) -> "Monitor":
        if self._started:
            return self
        self._started = True
        if self.sends:
            self._sender = threading.Thread(target=self._send_loop, name="spindle-monitor-sender", daemon=True)
            self._sender.start()
        self._watchdog = threading.Thread(target=self._watch, name="spindle-watchdog", daemon=True)
        self._watchdog.start()
        if threading.current_thread() is threading.main_thread():
            try:
                self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            except (ValueError, OSError):
                self._prev_sigterm = None
        return self

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Stop the watchdog, send what is queued (bounded wait), restore the SIGTERM handler."""
        self._stop.set()
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                    signal.signal(signal.SIGTERM, self._prev_sigterm)
            except (ValueError, OSError):
                pass
            self._prev_sigterm = None
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join(timeout=flush_timeout_s)
            self._sender = None
        if self._watchdog is not None:
            self._watchdog.join(timeout=2.0)
            self._watchdog = None
        self._started = False

    # ------------------------------------------------------------------ per step

    def step_started(self, step: int) -> None:
        with self._lock:
            self._step, self._step_t0 = step, time.monotonic()

    def step_finished(self, record: Optional[dict] = None) -> None:
        with self._lock:
            step, self._step_t0 = self._step, None
        if not record:
            return
        step = record.get("step", step)
        loss, gnorm = record.get("loss"), record.get("grad_norm")
        finite = all(v is None or math.isfinite(v) for v in (loss, gnorm))
        if not finite and self.is_main:  # loss and norm are global: one alert, from rank 0
            self.alert("non_finite", f"step {step}: non-finite loss {loss} / grad norm {gnorm}; update skipped "
                                     f"(inf_nan_skip_batches={record.get('inf_nan_skip_batches')}, "
                                     f"loss_scale={record.get('loss_scale')})", step=step)
        elif self._prev_loss is not None and self.is_main and loss > self.cfg.loss_spike_ratio * self._prev_loss:
            self.alert("loss_spike", f"step {step}: loss {loss:.4f} > {self.cfg.loss_spike_ratio} x previous "
                                     f"step's {self._prev_loss:.4f}", step=step)
        if finite:
            self._prev_loss = loss
        if self.heartbeat_url and step is not None and (step + 1) % self.cfg.heartbeat_every == 0:
            beat = {"job": self.job, "rank": self.rank, "host": self.host, "step": step, "time": time.time(),
                    "loss": loss, "tgs": record.get("tgs (tokens/gpu/second)"),
                    "inf_nan_skip_batches": record.get("inf_nan_skip_batches")}
            self._enqueue(self.heartbeat_url, beat)

    # ------------------------------------------------------------------ alerts

    def alert(self, kind: str, message: str, step: Optional[int] = None, sync: bool = False) -> dict:
        """Record, log, append to alert_file_path and POST (queued, or now when `sync`). Never raises."""
        try:
            message = self.scrub(message)
            text = f"[spindle] job {self.job}, rank {self.rank} on {self.host}: {kind}: {message}"
            rec = {"kind": kind, "job": self.job, "rank": self.rank, "host": self.host,
                   "step": self._step if step is None else step, "time": time.time(), "message": message}
            self.sent.append(rec)
            try:
                logger.info(f"alert: {kind}: {message}")
            except Exception:  # noqa: BLE001 - a closed console must not stop the alert
                pass
            if self.alert_file is not None:
                try:
                    self.alert_file.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.alert_file, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                except OSError as exc:
                    self._warn_once("file", f"monitor: cannot append to alert file {self.alert_file}: {exc.strerror}")
            if self.webhook:
                body = payload(self.cfg.webhook_format, text, rec)
                if sync:
                    self._post(self.webhook, body)
                else:
                    self._enqueue(self.webhook, body)
            return rec
        except Exception:  # noqa: BLE001 - monitoring never breaks training
            return {}

    def exception(self, exc: BaseException) -> None:
        if isinstance(exc, (SystemExit, GeneratorExit)):
            return
        kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else "exception"
        tb = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.alert(kind, f"training stopped at step {self._step}: {tb}", sync=True)

    def _on_sigterm(self, signum, frame) -> None:
        self.alert("sigterm", f"received SIGTERM at step {self._step}; exiting", sync=True)
        prev, self._prev_sigterm = self._prev_sigterm, None
        if callable(prev):
            prev(signum, frame)
            return
        signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the usual exit (default action: terminated by SIGTERM)

    # ------------------------------------------------------------------ watchdog

    def _watch(self) -> None:
        limit = float(self.cfg.stuck_timeout_s)
        poll = min(1.0, max(0.05, limit / 10))
        while not self._stop.wait(poll):
            with self._lock:
                step, t0 = self._step, self._step_t0
            if t0 is None or step == self._stuck_reported:
                continue
            waited = time.monotonic() - t0
            if waited > limit:
                self._stuck_reported = step
                where = self.dump_stacks(step)
                self.alert("stuck", f"step {step} has run {waited:.0f} s (> stuck_timeout_s={limit:g}); "
                                    f"stacks of every thread in {where}", step=step)

    def dump_stacks(self, step) -> str:
        """Every thread's stack (Python frames with names, then faulthandler's view) into one file."""
        folder = self.run_dir / "stacks"
        path = folder / f"rank{self.rank}_step{step}_{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            names = {t.ident: t.name for t in threading.enumerate()}
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"# step {step} stuck on rank {self.rank} (pid {os.getpid()}, host {self.host})\n")
                for ident, frame in sys._current_frames().items():
                    f.write(f"\n--- thread {names.get(ident, '?')} ({ident})\n")
                    f.write("".join(traceback.format_stack(frame)))
                f.write("\n--- faulthandler\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            return str(path)
        except OSError as exc:
            return f"<no dump: {exc.strerror}>"

    # ------------------------------------------------------------------ sending

    def _enqueue(self, url: str, body: dict) -> None:
        if self._sender is None:  # not started (or closed): send now
            self._post(url, body)
        else:
            self._queue.put((url, body))

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._post(*item)

    def _post(self, url: str, body: dict) -> bool:
        try:
            post_json(url, body, self.timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, timeouts, bad URLs alike
            self.failures += 1
            reason = getattr(exc, "reason", None) or exc
            self._warn_once(url, f"monitor: cannot reach {redact_destination(url)} ({type(exc).__name__}: "
                                 f"{self.scrub(str(reason))[:200]}); alerts keep being tried, training goes on")
            return False

    def scrub(self, text: str) -> str:
        """`text` as it may be logged, written to the alert file and sent: no token of ours or of anyone."""
        for address in self._addresses:
            text = text.replace(address, redact_destination(address))
        return mask_secrets(text)

    def _warn_once(self, key: str, msg: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        try:
            logger.info(msg)
        except Exception:  # noqa: BLE001
            pass


def build_monitor(cfg, run_dir: Path, rank: int = 0, is_main: bool = True) -> Monitor:
    """A Monitor from the whole SpindleConfig."""
    return Monitor(cfg.monitor.alert, run_dir, cfg.JOB_NAME, rank, is_main)
