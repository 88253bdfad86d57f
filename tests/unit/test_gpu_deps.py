"""bench/gpu_deps.py: what bench/gpu.sh installs besides torch on a GPU machine's own Python, with the version
ranges of pyproject.toml (one place for them), and only what that Python cannot import."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_deps", ROOT / "bench" / "gpu_deps.py")
gpu_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_deps)


def test_requirements_carry_pyproject_ranges():
    reqs = gpu_deps.requirements()
    assert reqs == {"numpy": "numpy>=1.24", "pydantic": "pydantic>=2.5,<3"}
    assert all(f'"{r}"' in (ROOT / "pyproject.toml").read_text() for r in reqs.values())
    assert "torch" not in reqs  # a CUDA image's own torch is never replaced


def test_prints_only_what_cannot_be_imported(monkeypatch, capsys):
    gpu_deps.main([])
    assert capsys.readouterr().out.strip() == ""  # this venv has both
    monkeypatch.setitem(gpu_deps.IMPORTS, "pydantic", "pydantic_not_installed_here")
    gpu_deps.main([])
    assert capsys.readouterr().out.strip() == "pydantic>=2.5,<3"
    gpu_deps.main(["--all"])
    assert capsys.readouterr().out.strip() == "numpy>=1.24 pydantic>=2.5,<3"


def test_runs_without_spindle_or_its_dependencies():
    # -S -I: no site-packages, no PYTHONPATH: the standard library alone, as before anything is installed
    r = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "bench" / "gpu_deps.py")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["numpy>=1.24", "pydantic>=2.5,<3"], r.stderr
