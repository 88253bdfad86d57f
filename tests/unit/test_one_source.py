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


def test_s3_timeouts_are_the_configs_everywhere():
    from spindle.checkpoint.discovery import open_ckpt_storage
    from spindle.checkpoint.storage import open_storage
    from spindle.config.schema import CkptConfig

    def timeouts(storage):
        c = storage._client.meta.config
        return c.connect_timeout, c.read_timeout

    ckpt = CkptConfig()
    defaults = (ckpt.s3_connect_timeout_s, ckpt.s3_read_timeout_s)
    assert timeouts(open_storage("boto3:s3://bucket/run")) == defaults  # no config at hand: the same defaults
    assert timeouts(open_ckpt_storage("boto3:s3://bucket/run")) == defaults
    set_ = CkptConfig(s3_connect_timeout_s=1.5, s3_read_timeout_s=7.0)
    assert timeouts(open_ckpt_storage("boto3:s3://bucket/run", set_)) == (1.5, 7.0)
