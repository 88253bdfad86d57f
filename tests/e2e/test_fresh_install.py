"""`pip install spindle` as a user does it, without extras, in a new virtual environment: the wheel's declared
dependencies are enough for the demo, and a path that needs an extra says which one (tests/unit/test_extras.py
checks every such path in-process).

Slow (the install unpacks torch): it builds the wheel from a copy of the sources, makes the environment
without pip of its own (this interpreter's pip installs into it, `--python`), and installs with `--no-compile`.
torch is pinned to the running one's version, the same wheel pip took for the test environment (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from unit.test_extras import FEATURES

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("transformers", "datasets", "boto3", "botocore", "lm_eval", "wandb", "mlflow", "pyarrow")


def _run(cmd, timeout, **kw):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_without_extras_runs_the_demo_and_names_the_extra_it_lacks(tmp_path):
    t0 = time.monotonic()
    src = tmp_path / "src"  # a copy: two builds at once (test_wheel.py) must not share build/ in the checkout
    shutil.copytree(ROOT / "spindle", src / "spindle", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          src], 300)
    wheel = next((tmp_path / "dist").glob("spindle-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], 120)
    python = venv / "bin" / "python"
    pinned = torch.__version__.split("+")[0]
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile", "--no-input",
          f"torch=={pinned}", wheel], 900)
    installed = time.monotonic() - t0

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    probe = _run([python, "-c", "import importlib.util, sys, torch; print(torch.__version__); print(','.join("
                  "n for n in sys.argv[1:] if importlib.util.find_spec(n)))", *OPTIONAL], 120, env=env)
    version, present = probe.stdout.split("\n")[:2]
    assert version == torch.__version__, f"pip installed torch {version}, not {torch.__version__}"
    assert present == "", f"installed without being asked for: {present}"

    user = tmp_path / "user"  # outside the checkout: the wheel's own files, nothing of the sources
    user.mkdir()
    demo = _run([venv / "bin" / "spindle", "train", "--set", "data.total_steps=2", "data.max_text_bytes=200000",
                 "trainer.sample_tokens=4"], 600, cwd=user, env=env)
    assert "done: 2 steps" in demo.stdout and (user / "runs" / "demo" / "ckpt" / "2.step").is_file(), demo.stdout

    s3 = subprocess.run([venv / "bin" / "spindle", "train", "--set", "data.total_steps=2", "data.max_text_bytes=200000",
                         "ckpt.save_ckpt_folder=boto3:s3://bucket/run"], cwd=user, env=env, capture_output=True,
                        text=True, timeout=300)
    assert s3.returncode == 2, s3.stderr[-3000:]
    assert s3.stderr.strip().splitlines()[-1].endswith("pip install 'spindle[s3]'"), s3.stderr[-3000:]
    assert "Traceback" not in s3.stderr
    print(f"\nFIGURES fresh_install: install={installed:.0f}s total={time.monotonic() - t0:.0f}s")


# what a fresh interpreter does with every optional package missing: each spindle module imports, except the
# ones whose whole point is an extra (they raise the one line)
IMPORT_ALL = """
import importlib, json, pkgutil, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
import spindle
from spindle.errors import SpindleError
out = {}
for info in pkgutil.walk_packages(spindle.__path__, "spindle."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except SpindleError as exc:
        out[info.name] = str(exc)
    except BaseException as exc:
        out[info.name] = f"BROKEN {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_module_imports_without_the_extras():
    optional = sorted({p for packages, _ in FEATURES.values() for p in packages})  # tests/unit/test_extras.py
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL, ",".join(optional)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    # the lm-eval model: importing it registers the model with lm-eval, so it is all [eval]
    assert set(failed) == {"spindle.eval.harness"}, failed
    assert "pip install 'spindle[eval]'" in failed["spindle.eval.harness"]
