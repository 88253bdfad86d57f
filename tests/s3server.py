"""A real S3 endpoint for tests: `moto_server` in a subprocess on 127.0.0.1.

A real HTTP server (rather than moto's in-process mock) exercises what production meets:
endpoints, connection errors, timeouts, and a server that goes away and comes back.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def find_moto_server() -> str | None:
    """The moto_server executable next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / "moto_server"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("moto_server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """One moto_server process that can be stopped and started again on the same port.

    moto keeps its state in memory, so a restart comes back empty (buckets included).
    """

    def __init__(self, executable: str, port: int | None = None):
        self.executable = executable
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        env = dict(os.environ)
        # moto's server must not try to reach anything through a proxy.
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [self.executable, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {err[-2000:]}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout_s}s")

    def _answers(self) -> bool:
        # moto's reset endpoint is cheap and always there; any HTTP answer means it is serving.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.endpoint}/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> "MotoServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
