"""The tests' one tiny training config: a 1-layer, 32-wide model on 16-token random rows, 4 steps, saving off,
quiet, one thread. A test states only what it needs different:

    tiny_cfg(tmp_path, data={"total_steps": 6}, model={"num_layers": 2}, ckpt={"enable_save_ckpt": True})

A dict merges into its section (a key given None is dropped, for a default that must not be set); anything
else replaces the top-level key (JOB_NAME="t", cudnn_benchmark=True, or a section given None is dropped).
`tiny_config_text` writes the same as a Python config file, for tests that run `spindle train --config`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Iterator, Optional

TINY = {
    "JOB_NAME": "tiny",
    "data": {"seq_len": 16, "micro_bsz": 2, "micro_num": 1, "total_steps": 4},
    "model": {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 1,
              "vocab_size": 64, "multiple_of": 16, "max_position_embeddings": 16},
    "adam": {"lr": 1e-2},
    "trainer": {"tensorboard": False, "progress_bar": False, "seed": 5, "num_threads": 1},
}


def merge(raw: dict, **sections) -> dict:
    """`raw` with `sections` merged in, in place: a dict into its section, anything else replacing the key
    (None values are kept: tiny_raw drops them last)."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = copy.deepcopy(value)
    return raw


def tiny_raw(run_folder: Optional[Path] = None, **sections) -> dict:
    """The tiny config as a dict, `sections` merged in; run_folder sets trainer.run_folder."""
    raw = merge(copy.deepcopy(TINY), **sections)
    if run_folder is not None:
        raw["trainer"] = {**raw.get("trainer", {}), "run_folder": str(run_folder)}
    return {key: {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
            for key, value in raw.items() if value is not None}


def tiny_cfg(run_folder: Optional[Path] = None, **sections):
    """The tiny config, validated (spindle.config.validate_config)."""
    from spindle.config import validate_config

    return validate_config(tiny_raw(run_folder, **sections))


def tiny_config_text(run_folder: Optional[Path] = None, **sections) -> str:
    """The tiny config as the text of a Python config file (`KEY = value` lines)."""
    return "".join(f"{key} = {value!r}\n" for key, value in tiny_raw(run_folder, **sections).items())


def step_cfg(run_folder: Path, **sections):
    """The tiny config of the training-step tests (tests/unit/test_trainer.py, test_host_syncs.py): 2 micro-batches
    per step, 2 layers, 6 steps, no warmup, torch's own thread count."""
    return tiny_cfg(run_folder, **merge(dict(JOB_NAME="t", data={"micro_num": 2, "total_steps": 6},
                                             model={"num_layers": 2}, lr_scheduler={"warmup_ratio": 0.0},
                                             trainer={"seed": 7, "num_threads": None}), **sections))


def micro_batch(ids, labels):
    """One micro-batch of whole rows (each row one document from position 0, source 0)."""
    import torch

    from spindle.data.batch import Batch

    b, length = ids.shape
    return Batch(ids, labels, torch.arange(length).expand(b, length).contiguous(),
                 torch.zeros(b, length, dtype=torch.long))


def tokenizer_tool():
    """tools/tokenizer.py as a module of its own name (a plain `import tokenizer` could find another one)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("spindle_tools_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokenize(src: Path, out: Path, *options: str) -> None:
    """`python tools/tokenizer.py --text_input_path SRC --bin_output_path OUT` in this process (its main())."""
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        rc = tokenizer_tool().main(["--text_input_path", str(src), "--bin_output_path", str(out), "--workers", "1",
                                    *options])
    assert rc == 0, said.getvalue()


def run_cli(*args: str, cwd: Optional[Path] = None):
    """`spindle ARGS...` through spindle.cli.main in this process (no interpreter start-up), with the result a
    subprocess.run would give: .returncode, .stdout, .stderr. A real process is for what only one shows
    (signals, launchers, the installed script); each exit path keeps one such test."""
    import contextlib
    import io
    import subprocess

    from spindle.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or Path.cwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(["spindle", *map(str, args)], rc, out.getvalue(), err.getvalue())


class _Lines(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:  # what the log= callbacks received; warnings go to stderr as before
            self.lines.append(record.getMessage())


@contextlib.contextmanager
def collecting(lines: list) -> Iterator[list]:
    """The "spindle" loggers' INFO lines appended to `lines` inside the block, whatever else prints them."""
    logger, handler = logging.getLogger("spindle"), _Lines(lines)
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
