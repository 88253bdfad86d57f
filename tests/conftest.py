"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/ helpers (s3server.py) are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from s3server import MotoServer, find_moto_server  # noqa: E402


# The fast tier, `pytest -m "not slow"` (README): every unit test and every in-process end-to-end path. Real
# multi-process launches (dist) and the user journeys (each a chain of real commands) are slow by their mark.
SLOW_BY_MARK = ("dist", "journeys")


# The README's full run takes two pytest-xdist workers (`-n 2 --dist loadgroup`): the tests that read the shared
# layout launches (tests/distributed/layout_runs.py, `@pytest.mark.runs`) stay on one worker, so each world size is
# still launched once; every other module's tests stay together on one worker (module fixtures are made once, and
# the docs commands run in the order a reader types them), the modules spread over both.
LAYOUT_GROUP = "layout_runs"


def pytest_configure(config):
    config.addinivalue_line("markers", "runs(*names): the jobs of tests/distributed/layout_runs.py this test reads "
                            "(each launched once per session, one launch per world size)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: one torch thread each (threads beyond the cores spin and slow all ~10x)
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # and for the processes a test starts without saying


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads xdist_group to name the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(mark) for mark in SLOW_BY_MARK):
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(LAYOUT_GROUP if item.get_closest_marker("runs") else item.path.name))
    unit = [item.nodeid for item in items if item.nodeid.startswith("tests/unit/") and item.get_closest_marker("slow")]
    if unit:
        raise pytest.UsageError(f"tests/unit is the fast tier whole; these are marked slow: {unit[:5]}")


@pytest.hookimpl(trylast=True)  # after xdist's hook: its groups must show in the node ids, or both workers launch
def pytest_collection_finish(session):
    if session.config.getoption("loadgroup", default=False) and session.items and "@" not in session.items[0].nodeid:
        raise pytest.UsageError("--dist loadgroup: pytest-xdist did not group the tests (this pytest / pytest-xdist "
                                "pair ignores xdist_group; pyproject.toml's test extra names a working pair)")


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


@pytest.fixture(scope="session")
def tiny_trained_ckpt(tmp_path_factory):
    """A 2-layer byte-level model trained 4 steps on a few text files, shared by the eval / generate tests:
    (its folder, whose text/ holds the training files, and the checkpoint folder)."""
    from helpers import tiny_cfg
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("evalcli")
    text = tmp / "text"
    text.mkdir()
    for i in range(4):
        (text / f"doc{i}.txt").write_text("def f(x):\n    return x + 1\n" * (40 + 10 * i))
    cfg = tiny_cfg(tmp / "runs", ckpt={"enable_save_ckpt": True, "auto_resume": False},
                   data={"type": "text", "train_folder": str(text), "text_glob": "*.txt", "tokenizer_path": "byte",
                         "seq_len": 32, "micro_bsz": 4, "micro_num": None, "pack_sample_into_one": True},
                   model={"num_attention_heads": 2, "num_layers": 2, "vocab_size": 258, "max_position_embeddings": 32,
                          "init_std": 0.5},  # large weights: positions (and so RoPE options) change the outputs
                   adam=None, trainer={"seed": None, "num_threads": None})
    tr = Trainer(cfg, ParallelEnv())
    tr.fit()
    return tmp, tr.save_dir



@pytest.fixture
def spindle_lines():
    """The "spindle" loggers' INFO lines during the test, in order, as a list that fills as they come: what a test
    reads where it once passed `log=lines.append` (spindle/logs.py; helpers.collecting)."""
    from helpers import collecting

    lines: list[str] = []
    with collecting(lines):
        yield lines
