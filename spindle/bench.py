"""`spindle bench train|data|memory|attention|gpu`: run one of the benchmark scripts in the repository's bench/ folder.

The benchmarks compare Spindle with outside baselines (transformers, a hand-written loop, a seed-style
tokenizer), so they live next to the package, not in it; this entry point finds them from a source
checkout and runs their `main(argv)`. Figures and commands: docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence

from spindle.errors import SpindleError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = {
    "train": ("bench_train.py", "training step: Spindle vs transformers vs a hand-written loop, MFU"),
    "data": ("bench_data.py", "tokenization docs/s and random-access reads vs a seed-style tool"),
    "memory": ("bench_memory.py", "peak RSS of a long-context evaluation at 4K/16K/64K tokens"),
    "attention": ("bench_attention.py", "packed vs dense attention: time and peak memory of a step (--quick: 4K/16K)"),
    "gpu": ("gpu_train.py", "~1B model, bf16, fused AdamW, compile, on one GPU (tokens/s, MFU)"),
}


def load_script(name: str):
    file = BENCH_DIR / SCRIPTS[name][0]
    if not file.is_file():
        raise SpindleError(f"benchmark script {file} not found: `spindle bench` runs from a source checkout")
    spec = importlib.util.spec_from_file_location(f"spindle_bench_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SCRIPTS:
        print("usage: spindle bench {" + ",".join(SCRIPTS) + "} [options]   (spindle bench NAME -h for options)")
        for k, (_, what) in SCRIPTS.items():
            print(f"  {k:<9} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SpindleError(f"unknown benchmark {argv[0]!r}; choose one of {', '.join(SCRIPTS)}")
        return 0
    return int(load_script(argv[0]).main(argv[1:]) or 0)
