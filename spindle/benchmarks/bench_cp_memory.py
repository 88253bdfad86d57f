"""Peak resident memory per rank of training steps on long packed rows, with and without context parallelism.

    python -m spindle.benchmarks.bench_cp_memory [--lengths 16384,32768] [--contexts 1,2] [--steps 2]

Each (length, context size) trains `--steps` steps of the demo-sized model (d256, 4 layers, 4 heads, 2 KV
heads, byte vocabulary 258, fp32) in a fresh `torchrun` with `parallel.context` ranks, one thread per rank,
on one packed row of `length` tokens of seeded random documents (lengths 16 .. 512, InternEvo's random
data with `data.fixed_random_dataset_seqlen=False`): the Trainer's own path, optimizer and loader
included. Every rank reports the RSS after the trainer is built (the base) and its peak RSS
(`ru_maxrss`) after the steps; the table gives the largest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spindle.logs import quiet

DEMO_MODEL = dict(hidden_size=256, num_attention_heads=4, num_kv_attention_heads=2, num_layers=4, vocab_size=258,
                  multiple_of=64, max_position_embeddings=256, dtype="torch.float32")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(length: int, steps: int, folder: str) -> None:
    import torch.distributed as dist

    from spindle.config import validate_config
    from spindle.parallel.mesh import init_distributed, shutdown
    from spindle.train.trainer import Trainer

    env = init_distributed("torch", "gloo", None, "cpu")
    cp = env.world_size
    cfg = validate_config({
        "JOB_NAME": f"cp{cp}_{length}",
        "data": {"seq_len": length, "micro_bsz": 1, "micro_num": 1, "total_steps": steps, "train_folder": None,
                 "fixed_random_dataset_seqlen": False},
        "model": DEMO_MODEL, "parallel": {"context": cp, "zero1": 1},
        "trainer": {"run_folder": folder, "tensorboard": False, "progress_bar": False, "num_threads": 1},
    })
    with quiet(env.rank):  # the trainer's start-up lines are not the benchmark's output
        trainer = Trainer(cfg, env)
    base = rss_bytes()
    t = time.perf_counter()
    hist = trainer.fit()["history"]
    row = {"rank": env.rank, "base_rss": base, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "seconds_per_step": (time.perf_counter() - t) / steps, "loss": hist[-1]["loss"]}
    rows = [None] * env.world_size if env.distributed else [row]
    if env.distributed:
        dist.all_gather_object(rows, row)
    if env.is_main:
        print(json.dumps(rows))
    shutdown()


def measure(length: int, cp: int, steps: int) -> dict:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    with tempfile.TemporaryDirectory() as folder:
        cmd = [torchrun, "--standalone", f"--nproc_per_node={cp}", "-m", __spec__.name, "--child", str(length),
               "--steps", str(steps), "--folder", folder]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"length {length}, context {cp} failed:\n{out.stdout[-1500:]}\n{out.stderr[-2500:]}")
    ranks = json.loads(out.stdout.strip().splitlines()[-1])
    top = max(ranks, key=lambda r: r["peak_rss"])
    return {"length": length, "context": cp, "ranks": ranks, "peak_rss": top["peak_rss"], "base_rss": top["base_rss"],
            "seconds_per_step": max(r["seconds_per_step"] for r in ranks), "loss": ranks[0]["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_cp_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--contexts", default="1,2")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.child, args.steps, args.folder)
        return 0
    print(f"# bench_cp_memory — {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cpus, "
          f"1 thread per rank, {args.steps} steps; demo-sized model, one packed row of random documents")
    print("| tokens | parallel.context | peak RSS per rank MiB (largest) | base RSS MiB | peak - base MiB | "
          "s / step | loss |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for cp in (int(x) for x in args.contexts.split(",")):
            r = measure(length, cp, args.steps)
            rows.append(r)
            print(f"| {length:,} | {cp} | {r['peak_rss'] / 2**20:,.0f} | {r['base_rss'] / 2**20:,.0f} | "
                  f"{(r['peak_rss'] - r['base_rss']) / 2**20:,.0f} | {r['seconds_per_step']:.1f} | {r['loss']:.4f} |",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
