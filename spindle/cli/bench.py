"""`spindle bench train|data|memory|attention|gpu|moe`: run one of the benchmarks of spindle/benchmarks/.

They compare Spindle with outside baselines (transformers, a hand-written loop, a seed-style tokenizer);
the baselines' libraries come with `pip install spindle[test]`. Figures and commands: docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

from spindle.errors import SpindleError

SCRIPTS = {
    "train": ("bench_train", "training step: Spindle vs transformers vs a hand-written loop, MFU"),
    "data": ("bench_data", "tokenization docs/s and random-access reads vs a seed-style tool"),
    "memory": ("bench_memory", "peak RSS of a long-context evaluation at 4K/16K/64K tokens"),
    "attention": ("bench_attention", "packed vs dense attention: time and peak memory of a step (--quick: 4K/16K)"),
    "gpu": ("gpu_train", "~1B model, bf16, fused AdamW, compile, on one GPU (tokens/s, MFU)"),
    "moe": ("bench_moe", "MoE step vs a dense model of the same active parameters; router share, EP2 all-to-all"),
}


def load_script(name: str):
    """The benchmark module behind `spindle bench NAME`."""
    try:
        return importlib.import_module(f"spindle.benchmarks.{SCRIPTS[name][0]}")
    except ModuleNotFoundError as exc:  # a baseline's library (transformers, ...) is not installed
        raise SpindleError(f"spindle bench {name}: needs the package {exc.name!r} "
                           "(pip install 'spindle[test]')") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SCRIPTS:
        print("usage: spindle bench {" + ",".join(SCRIPTS) + "} [options]   (spindle bench NAME -h for options)")
        for k, (_, what) in SCRIPTS.items():
            print(f"  {k:<9} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SpindleError(f"unknown benchmark {argv[0]!r}; choose one of {', '.join(SCRIPTS)}")
        return 0
    return int(load_script(argv[0]).main(argv[1:]) or 0)
