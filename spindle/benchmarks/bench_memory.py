"""Peak resident memory of a long-context evaluation against the length: it should grow linearly.

    spindle bench memory [--lengths 4096,16384,65536] [--quick] [--out runs/bench_memory.json]
    spindle bench memory [same flags]

Each length runs in a fresh child process (so `ru_maxrss`, the peak resident set, belongs to that
length alone). The child builds a model with the demo's dimensions (d256, 4 heads, 2 KV heads,
vocab 1024; `--layers`, default 2, to keep the 64K pass about a minute), draws one random window
of L tokens and runs `spindle.eval.perplexity.token_losses` on it — the code path of
`spindle eval ppl`: chunked prefill (1024-token chunks) with the KV cache, where each chunk attends
to the cache through a (chunk x T) mask. It reports the RSS after building the model (the base),
the peak RSS, and the time. Linear growth means (peak - base) / L is about constant; the report
gives the bytes per token between consecutive lengths and the KV cache's own bytes per token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time

logger = logging.getLogger(__name__)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(length: int, layers: int, chunk: int, threads: int) -> dict:
    import torch

    from spindle.config import ModelConfig
    from spindle.eval.perplexity import token_losses
    from spindle.model.llama import build_model

    torch.set_num_threads(threads)
    cfg = ModelConfig(hidden_size=256, num_attention_heads=4, num_kv_attention_heads=2, num_layers=layers,
                      vocab_size=1024, multiple_of=64, max_position_embeddings=256, dtype="torch.float32")
    model = build_model(cfg.to_args(), "cpu", seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    base = rss_bytes()
    t = time.perf_counter()
    with torch.no_grad():
        nll, _ = token_losses(model, ids, chunk=chunk)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    kv = layers * 2 * cfg.kv_heads * cfg.head_dim * 4  # bytes per token of the fp32 KV cache
    return {"length": length, "base_rss": base, "peak_rss": peak, "seconds": seconds,
            "mean_nll": float(nll.mean()), "kv_bytes_per_token": kv}


def run(lengths, layers: int, chunk: int, threads: int) -> dict:
    rows = []
    for n in lengths:
        cmd = [sys.executable, "-m", __spec__.name, "--child", str(n), "--layers", str(layers),
               "--chunk", str(chunk), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory child for length {n} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["load"] = [round(x, 2) for x in os.getloadavg()]
        rows.append(row)
        logger.info(f"length {n:>6}: base {row['base_rss'] / 2**20:.0f} MiB, peak {row['peak_rss'] / 2**20:.0f} MiB, "
                    f"growth {(row['peak_rss'] - row['base_rss']) / 2**20:.0f} MiB, {row['seconds']:.1f} s, "
                    f"load {row['load'][0]}")
    for a, b in zip(rows, rows[1:]):
        b["bytes_per_token_since_prev"] = (b["peak_rss"] - a["peak_rss"]) / (b["length"] - a["length"])
    return {"rows": rows, "layers": layers, "chunk": chunk}


def format_report(res: dict, meta: dict) -> str:
    lines = [f"# bench memory — {meta['date']}, {meta['machine']}, torch {meta['torch']}; "
             f"model d256 L{res['layers']} H4 KV2 V1024, chunk {res['chunk']}",
             "| tokens | base RSS MiB | peak RSS MiB | peak - base MiB | (peak - base) / token | "
             "peak growth / token since previous | s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        g = r["peak_rss"] - r["base_rss"]
        since = r.get("bytes_per_token_since_prev")
        lines.append(f"| {r['length']:,} | {r['base_rss'] / 2**20:.0f} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{g / 2**20:.0f} | {g / r['length'] / 1024:.1f} KiB | "
                     f"{'' if since is None else f'{since / 1024:.1f} KiB'} | {r['seconds']:.1f} | {r['load'][0]} |")
    kv = res["rows"][0]["kv_bytes_per_token"] if res["rows"] else 0
    lines.append(f"fp32 KV cache alone: {kv / 1024:.1f} KiB per token")
    return "\n".join(lines)


def main(argv=None) -> int:
    from spindle.cli import options

    ap = options.OneLineParser(prog="spindle bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default=None, help="comma list of token counts (default 4096,16384,65536)")
    ap.add_argument("--quick", action="store_true", help="lengths 1024,4096,16384")
    ap.add_argument("--layers", type=options.int_in(1, 4096), default=2)
    ap.add_argument("--chunk", type=options.int_in(1, 1 << 24), default=1024)
    ap.add_argument("--threads", type=options.int_in(1, 4096), default=2)
    ap.add_argument("--out", default="runs/bench_memory.json")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.layers, args.chunk, args.threads)))
        return 0
    spec = args.lengths or ("1024,4096,16384" if args.quick else "4096,16384,65536")
    lengths = sorted(int(x) for x in spec.split(","))
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {platform.machine()} "
            f"{os.cpu_count()} cpus", "torch": torch.__version__, "load_before": list(os.getloadavg())}
    res = run(lengths, args.layers, args.chunk, args.threads)
    meta["load_after"] = list(os.getloadavg())
    print(format_report(res, meta))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, **res}, f, indent=1)
    return 0


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
