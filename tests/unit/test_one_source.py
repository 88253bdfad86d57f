"""Knowledge kept in one place (issue 26 point 3): durable writes, the compute dtypes, the RoPE registry and
the S3 settings each have one module, and the rest of the package reads it instead of keeping a copy."""

import ast
from pathlib import Path

SPINDLE = Path(__file__).resolve().parents[2] / "spindle"


def _calls(attr: str):
    """(file, line) of every call `<something>.<attr>(...)` in the package."""
    for path in sorted(SPINDLE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                yield str(path.relative_to(SPINDLE)), node.lineno


def test_fsync_only_in_fileio():
    # the lock's owner record is rewritten in place on the locked descriptor: part of the lock protocol
    allowed = {"fileio.py", "checkpoint/lock.py"}
    elsewhere = [f"spindle/{f}:{line}" for f, line in _calls("fsync") if f not in allowed]
    assert not elsewhere, "fsync outside spindle/fileio.py (use write_atomic / write_durable / fsync_dir / " \
                          "fsync_tree):\n" + "\n".join(elsewhere)


def test_s3_timeouts_and_retries_are_the_configs_everywhere():
    from spindle.checkpoint.discovery import open_ckpt_storage
    from spindle.checkpoint.storage import open_storage
    from spindle.config.schema import CkptConfig

    def timeouts(storage):  # what botocore's client was opened with
        c = storage._client.meta.config
        return c.connect_timeout, c.read_timeout, c.retries["mode"], c.retries["total_max_attempts"]

    ckpt = CkptConfig()
    defaults = (ckpt.s3_connect_timeout_s, ckpt.s3_read_timeout_s, ckpt.s3_retry_mode, ckpt.s3_max_attempts)
    assert timeouts(open_storage("boto3:s3://bucket/run")) == defaults  # no config at hand: the same defaults
    assert timeouts(open_ckpt_storage("boto3:s3://bucket/run")) == defaults
    set_ = CkptConfig(s3_connect_timeout_s=1.5, s3_read_timeout_s=7.0, s3_retry_mode="adaptive", s3_max_attempts=3)
    assert timeouts(open_ckpt_storage("boto3:s3://bucket/run", set_)) == (1.5, 7.0, "adaptive", 3)


def _literals_naming(names: set, least: int):
    """(file, line) of each tuple / set / dict literal outside spindle/dtypes.py holding `least` or more of
    `names` as strings: a private copy of a table."""
    for path in sorted(SPINDLE.rglob("*.py")):
        rel = str(path.relative_to(SPINDLE))
        for node in ast.walk(ast.parse(path.read_text())):
            elts = node.keys if isinstance(node, ast.Dict) else \
                node.elts if isinstance(node, (ast.Tuple, ast.Set, ast.List)) else []
            held = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
            if len(held) >= least:
                yield rel, node.lineno


def test_compute_dtypes_are_one_table():
    import torch

    from spindle.config import ModelConfig
    from spindle.dtypes import COMPUTE_DTYPES, compute_dtype
    from spindle.hardware import lookup_peak_tflops

    for name, d in COMPUTE_DTYPES.items():
        assert ModelConfig(dtype=name).dtype == name == compute_dtype(name.removeprefix("torch.")).name
        assert isinstance(d.torch_dtype, torch.dtype)
        assert d.half == (d.torch_dtype in (torch.bfloat16, torch.float16))
        assert d.loss_scaling == (d.torch_dtype == torch.float16)
        assert d.tf32 == (name == "torch.tf32")
        assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", d.peak_key) is not None
    copies = [f"spindle/{f}:{line}" for f, line in _literals_naming(set(COMPUTE_DTYPES), 2) if f != "dtypes.py"]
    assert not copies, "tables of compute dtypes outside spindle/dtypes.py:\n" + "\n".join(copies)
