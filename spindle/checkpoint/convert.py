"""`spindle convert`: Spindle checkpoints to and from Hugging Face folders and InternEvo checkpoints.

    spindle convert to-hf CKPT OUT [--overwrite]
    spindle convert from-hf HF_DIR OUT [--overwrite]
    spindle convert from-internevo SRC OUT [--overwrite]

Nothing is written over what a user saved: OUT must not exist or be an empty folder (`--overwrite`
replaces a non-empty one), and never, not even with `--overwrite`, may OUT be the source, lie inside
it or contain it. The result is written into a hidden sibling folder first and moved to OUT only
when it is complete, so a failed conversion leaves OUT as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from spindle.errors import SpindleError


def _local(path: str) -> Path:
    return Path(path[len("local:"):] if path.startswith("local:") else path).expanduser().absolute()


def _is_remote(path: str) -> bool:
    return path.startswith(("boto3:", "s3://"))


def check_target(source: str, out: str, overwrite: bool) -> Path:
    """The output folder, after refusing a target that could destroy the source or existing files."""
    if _is_remote(out):
        raise SpindleError(f"OUT {out}: conversions write to a local folder")
    target = _local(out).resolve()
    if not _is_remote(source):
        src = _local(source).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise SpindleError(f"OUT {target} is, lies inside or contains the source {src}; choose another folder "
                               "(not even --overwrite writes there)")
    if target.exists() and not target.is_dir():
        raise SpindleError(f"OUT {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SpindleError(f"OUT {target} exists and is not empty; pass --overwrite to replace it")
    return target


@contextlib.contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """A hidden sibling folder to write into; moved to `target` only when the block succeeds."""
    stage = target.parent / f".{target.name}.converting-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if target.exists():  # empty, or --overwrite: keep the old one until the new one is in place
        old = target.parent / f".{target.name}.replaced-{os.getpid()}"
        target.rename(old)
        stage.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(target)


def _print_training_hint(path: Path, out: Path) -> None:
    from spindle.config import ModelConfig

    model = json.loads((path / "config.json").read_text())["model"]
    defaults = ModelConfig().model_dump()
    derived = ModelConfig.model_validate({k: v for k, v in model.items() if k != "head_dim"}).head_dim
    keep = {k: v for k, v in model.items() if v != defaults.get(k) and not (k == "head_dim" and v == derived)}
    print(f"wrote {out / path.name} (+ {path.name}.step)")
    print("train from it with, in your config:")
    print(f"  ckpt = dict(load_ckpt_info=dict(path={str(out)!r}, content=('model',)))")
    print("  model = dict(" + ", ".join(f"{k}={v!r}" for k, v in keep.items()) + ")")


class _Parser(argparse.ArgumentParser):
    """Bad options are one line (spindle: error: ...) and exit code 2, like every other bad input."""

    def error(self, message: str):
        raise SpindleError(f"{self.prog}: {message}")


def convert_main(argv) -> int:
    ap = _Parser(prog="spindle convert", description="Convert checkpoints to and from Hugging Face and InternEvo.")
    sub = ap.add_subparsers(dest="direction", required=True)
    commands = {
        "to-hf": ("Spindle checkpoint -> Hugging Face folder (Llama, Mistral, Qwen2 or Qwen3 class)", "ckpt",
                  "checkpoint folder, save folder (latest), local: or boto3:s3://..."),
        "from-hf": ("Hugging Face folder -> Spindle checkpoint (model only, step 0)", "hf_dir",
                    "Llama / Mistral / Qwen2 / Qwen3 / InternLM / InternLM2 folder"),
        "from-internevo": ("InternEvo checkpoint folder (model_tp*_pp*.pt) -> Spindle checkpoint", "src",
                           "the step folder holding model_tp{t}_pp{p}.pt and model_config.pt"),
    }
    for name, (help_text, source, source_help) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument(source, help=source_help)
        p.add_argument("out", help="a new (or empty) local folder")
        p.add_argument("--overwrite", action="store_true", help="replace OUT when it is a non-empty folder")
        p.add_argument("--debug", action="store_true")
    args = ap.parse_args(list(argv))
    source = getattr(args, {"to-hf": "ckpt", "from-hf": "hf_dir", "from-internevo": "src"}[args.direction])
    target = check_target(source, args.out, args.overwrite)
    if args.direction == "to-hf":
        from spindle.checkpoint.hf import export_hf

        with staged_output(target) as stage:
            notes = export_hf(source, stage)
        print("\n".join(n.replace(str(stage), str(target)) for n in notes))
        return 0
    if args.direction == "from-hf":
        from spindle.checkpoint.hf import import_hf as write
    else:
        from spindle.checkpoint.internevo import import_internevo as write
    with staged_output(target) as stage:
        path = write(source, stage)
    _print_training_hint(target / path.name, target)
    return 0
