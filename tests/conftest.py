"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ helpers (s3server.py) are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from s3server import MotoServer, find_moto_server  # noqa: E402


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 endpoint (moto_server on 127.0.0.1, free port) shared by the whole session.

    Tests that stop/restart a server should start their own MotoServer instead.
    """
    exe = find_moto_server()
    if exe is None:
        pytest.skip("moto_server executable not found next to sys.executable or on PATH "
                    "(pip install 'moto[server]')")
    server = MotoServer(exe)
    server.start()
    try:
        yield server
    finally:
        server.stop()
