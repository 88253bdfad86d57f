"""`spindle` command line: one subcommand per module of this package, each a thin call into the library.

    spindle train [--config FILE] [--set KEY=VALUE ...] [--dry-run [--nproc N]] [--launcher torch|slurm]
    spindle prepare INPUTS... --out DIR [--tokenizer default|PATH]
    spindle tokenizer train FILES... --vocab-size N --out DIR
    spindle rope --head-dim 128 --train-len 4096 [--tune-len N] [--target-len N]
    spindle generate --ckpt DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    spindle convert to-hf | from-hf | from-internevo SRC OUT
    spindle eval ppl | passkey --ckpt DIR ...
    spindle bench train | data | memory | attention | gpu

Bad input prints one line naming what is wrong and exits with code 2 (`guarded`, for every command);
`--debug` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Callable, Optional, Sequence

from spindle.errors import SpindleError
from spindle.logs import logging_to

# subcommand -> (module of this package, help); a module is imported only when used, so `spindle -h` is fast
COMMANDS = {
    "train": ("train", "train (default: the embedded demo config)"),
    "generate": ("generate", "generate text from a checkpoint"),
    "prepare": ("prepare", "tokenize raw text into binary shards"),
    "tokenizer": ("tokenizer", "train or inspect a tokenizer"),
    "convert": ("convert", "checkpoints to and from Hugging Face and InternEvo"),
    "eval": ("eval", "long-context evaluation: ppl, passkey"),
    "rope": ("rope", "RoPE scaling-law calculator"),
    "bench": ("bench", "benchmarks: train, data, memory, attention, gpu"),
}


SILENT_RANK_GRACE_S = 3.0


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun: RANK, Slurm: SLURM_PROCID), 0 alone or when the
    value is not a number (spindle.parallel.launch refuses it; the error must still be printed)."""
    text = (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def guarded(fn: Callable[[], int], debug: bool) -> int:
    """Run `fn`; a SpindleError becomes one line on stderr and exit code 2 (traceback with --debug).
    Under a launcher every rank meets the same bad input, so rank 0 alone says it, except for errors of a
    rank's own (`every_rank`: its launch variables, a peer that stopped answering it)."""
    try:
        return fn()
    except SpindleError as exc:
        if debug:
            raise
        if launch_rank() == 0 or getattr(exc, "every_rank", False):
            print(f"spindle: error: {exc}", file=sys.stderr)
        elif os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_STEP_ID"):
            # a silent rank leaves after rank 0 has said it: torchrun stops the other workers at the first exit
            # it sees, and a rank 0 that was slower here (a loaded machine) was killed before its line
            time.sleep(SILENT_RANK_GRACE_S)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spindle: interrupted", file=sys.stderr)
        return 130


def print_redacted(line: str) -> None:
    """Every command's console lines (spindle.logs): a batch job keeps them in a file, so no secret in them."""
    from spindle.config.redact import redact_text

    print(redact_text(line), flush=True)


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: spindle COMMAND [options]   (spindle COMMAND -h for its options)\n\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"spindle: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"spindle.cli.{COMMANDS[argv[0]][0]}")
    with logging_to(launch_rank(), console=print_redacted):  # the library's log lines: rank 0's stdout
        return guarded(lambda: module.main(argv[1:]), "--debug" in argv)
