"""The package's layers (DESIGN.md, "Layers"): each imports only from the layers below it, lazy imports
inside functions included, so there is no cycle between packages."""

import ast
from pathlib import Path

SPINDLE = Path(__file__).resolve().parents[2] / "spindle"
# bottom to top; a module may import its own layer and those before it
LAYERS = [
    {"errors", "fileio", "logs", "dtypes", "extras"},
    {"outputs", "ropelaws", "hardware"},
    {"config"},
    {"model"},
    {"data"},
    {"parallel"},
    {"checkpoint"},
    {"interop"},  # foreign formats, read and written through spindle.checkpoint
    {"eval"},
    {"train"},
    {"cli", "benchmarks", "configs", "__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def imported_layers(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "spindle" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_import_points_down():
    upward = []
    for path in sorted(SPINDLE.rglob("*.py")):
        rel = path.relative_to(SPINDLE)
        mine = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert mine in RANK, f"spindle/{rel}: its package {mine!r} has no layer here; add it to LAYERS"
        for line, other in imported_layers(path):
            assert other in RANK, f"spindle/{rel}:{line} imports spindle.{other}, which has no layer here"
            if RANK[other] > RANK[mine]:
                upward.append(f"spindle/{rel}:{line} ({mine}) imports spindle.{other}")
    assert not upward, "imports that point up a layer (a package cycle):\n" + "\n".join(upward)
