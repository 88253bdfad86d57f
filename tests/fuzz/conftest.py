"""The fuzz targets' scratch folder."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def work():
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # memory-backed: thousands of file writes per target
    d = Path(tempfile.mkdtemp(prefix="spindle-fuzz-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)
