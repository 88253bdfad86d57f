"""What the GPU check imports besides torch, as pip requirements read from pyproject.toml.

    python3 bench/gpu_deps.py          those this Python cannot import (prints nothing when all are there)
    python3 bench/gpu_deps.py --all    all of them (what bench/gpu_wheels.sh downloads)

CUDA images come with torch and numpy, not always with pydantic (the lent H200s' image has none), and some
reach no package index: bench/gpu.sh installs what this prints, from .whl/ when it is there, else from PyPI.
Standard library only: it runs before anything is installed.
"""

import importlib.util
import re
import sys
from pathlib import Path

# distribution name in pyproject.toml -> the module the check imports
IMPORTS = {"numpy": "numpy", "pydantic": "pydantic"}


def requirements() -> dict:
    """{distribution: its requirement in pyproject.toml, version range included}."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    found = {}
    for name in IMPORTS:
        m = re.search(rf'"({re.escape(name)}\s*[<>=!~][^"]*|{re.escape(name)})"', text)
        if m is None:
            raise SystemExit(f"bench/gpu_deps.py: pyproject.toml lists no dependency {name!r}")
        found[name] = m.group(1)
    return found


def main(argv) -> int:
    every = "--all" in argv
    wanted = [req for name, req in requirements().items() if every or importlib.util.find_spec(IMPORTS[name]) is None]
    print(" ".join(wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
