"""`spindle rope`: the scaling-law calculator (spindle/ropelaws.py) on the command line."""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from spindle.cli.options import OneLineParser
from spindle.ropelaws import format_rope_report, rope_report


def _build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="spindle rope",
        description="Predicted RoPE extrapolation bounds (critical dimension, critical base, "
        "small-base thresholds) from the scaling laws of Liu et al. (arXiv 2310.05209).",
    )
    p.add_argument("--head-dim", type=int, required=True, help="attention head dimension d")
    p.add_argument("--train-len", type=int, required=True, help="pre-training context length T_train")
    p.add_argument("--base-pre", type=float, default=10000.0, help="pre-training rotary base (default 10000)")
    p.add_argument("--tune-len", type=int, default=None, help="continued-training length T_tune (default T_train)")
    p.add_argument("--target-len", type=int, default=None, help="recommend the smallest base reaching this length")
    p.add_argument("--base", type=float, nargs="+", action="extend", default=None, dest="bases",
                   help="bases to tabulate (default: a sweep)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`spindle rope ...`: parse argv, print the report, return the exit code (0).

    Raises SpindleError on bad arguments (the CLI prints it and exits 2).
    """
    args = _build_parser().parse_args(argv)
    report = rope_report(args.head_dim, args.train_len, args.base_pre, args.tune_len, args.target_len, args.bases)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_rope_report(report))
    return 0
