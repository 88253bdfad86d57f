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
