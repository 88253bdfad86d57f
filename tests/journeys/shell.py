"""A user's shell for the journeys: a fresh folder holding what a user of the seed has (train.py,
configs/, tools/), and the commands they type run there as subprocesses, one thread per process.

Every command's output is checked for tracebacks from our code: a journey that ends in a Python
traceback has failed even when it exits 0."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# the demo's corpus, cut so the one-time tokenization and each step stay short
SMALL = ("data.max_text_bytes=200000", "trainer.log_every=1", "trainer.sample_tokens=8")


def env() -> dict:
    # PYTHONPATH: this checkout's spindle, also for torchrun's workers and the `spindle` script
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def user_folder(path: Path) -> Path:
    """What a user has after cloning: the seed entry point, the configs and the data tools, nothing else."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "train.py", path / "train.py")
    shutil.copytree(ROOT / "configs", path / "configs")
    shutil.copytree(ROOT / "tools", path / "tools")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program(word: str) -> list[str]:
    """`spindle`, `python`, `torchrun` as the user's PATH would resolve them (the venv's)."""
    if word == "python":
        return [sys.executable]
    if word == "spindle" and not (BIN / "spindle").exists():
        return [sys.executable, "-m", "spindle.cli"]
    if word == "torchrun":
        # a free port instead of 29500, so journeys can share the machine with other torchrun jobs
        return [str(BIN / "torchrun"), f"--master_port={free_port()}"]
    return [str(BIN / word)]


def sh(line: str, cwd: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command line as typed (its first word resolved by `program`), with `extra` arguments after it."""
    words = shlex.split(line)
    r = subprocess.run([*program(words[0]), *words[1:], *extra], cwd=cwd, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    r.out = r.stdout + r.stderr
    return r


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.out, r.out[-3000:]
    return r


def seed_launch(cwd: Path, *sets: str) -> subprocess.CompletedProcess:
    """The seed's launch line, word for word, on the demo config; `sets` shorten it."""
    return sh('torchrun --nnodes=1 --nproc_per_node=2 train.py --config ./configs/demo.py --launcher "torch"',
              cwd, "--set", *SMALL, *sets)


def steps(out: str) -> list[int]:
    return [int(l.split(",step=")[1].split(",")[0]) for l in out.splitlines() if l.startswith("tflops=")]


def closing_sample(stdout: str, tokens: int = 8) -> str:
    """The run ends with its summary, the sample header and the sample (as one process ends); returns the sample:
    the demo's prompt and a continuation that is not empty (an empty generation echoes the prompt alone)."""
    lines = stdout.splitlines(keepends=True)
    header = max(i for i, l in enumerate(lines) if l.startswith("sample ("))
    assert lines[header - 1].startswith(("done: ", "already at data.total_steps=")), lines[header - 1:]
    assert f"{tokens} tokens;" in lines[header], lines[header]
    return generated("".join(lines[header + 1:]), "import ")


def generated(stdout: str, prompt: str) -> str:
    """What `spindle generate` and the closing sample print: the prompt, the continuation, one newline."""
    text = stdout.removesuffix("\n")
    assert text.startswith(prompt), text[:200]
    assert len(text) > len(prompt), f"nothing generated after the prompt {prompt!r}"
    return text
