"""Attention over packed rows vs one dense document: time and peak memory of a training step.

    spindle bench attention [--quick] [--lengths 4096,16384,65536] [--cases ...]
        [--reps 3] [--threads 1] [--device cpu|cuda] [--out runs/bench_attention.json]
    spindle bench attention [same flags]

Every measurement is one child process (so its peak memory is its own): a 1-layer model (hidden 128,
4 heads, 2 KV heads, vocabulary 1024; fp32 on CPU, bf16 on CUDA) takes warm-up steps, then timed
forward + backward steps (fused head and loss, as training runs it) on one row of L tokens:

    dense        one document of L tokens
    packed       L / 1024 documents of 1024 tokens, the kernel `choose_kernel` picks (CPU: per-document SDPA)
    masked       the same row through the (1, 1, L, L) block-diagonal mask (the packed path before)
    mix          documents drawn from a real length distribution, the Python standard library's .py
                 files read as bytes (the demo's corpus), packed as training packs them (cut mode)
    mix_masked   the same mix through the mask
    dense_repeat, packed_repeat   as dense / packed with the grouped KV heads repeated instead of
                 passed to SDPA with enable_gqa (the GQA measurement)

Repetitions are interleaved (rep 1 of every case, then rep 2, ...), so a change in the machine's load
hits all cases alike. Time: the fastest timed step of a child, median over repetitions. Peak memory:
CPU, the peak resident set minus the resident set just before the first step; CUDA, the peak allocated
minus the allocated before the first step. The masked cases are skipped above 16K tokens by default
(the L x L mask alone is 4 GiB at 64K, and SDPA expands it). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

logger = logging.getLogger(__name__)
DOC = 1024  # document length of the `packed` cases
MASKED = ("masked", "mix_masked")
CASES = ("dense", "packed", "masked", "mix", "mix_masked", "dense_repeat", "packed_repeat")
DEFAULT_CASES = ("dense", "packed", "masked", "mix", "mix_masked")
QUICK_CASES = ("dense", "packed", "masked")


def stdlib_lengths() -> list[int]:
    """Byte lengths (+1 for BOS) of the standard library's .py files outside test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages"}
    return sorted(p.stat().st_size + 1 for p in root.rglob("*.py")
                  if not skip & set(p.relative_to(root).parts) and p.stat().st_size > 0)


class LengthDocs:
    """Documents of given lengths with seeded random tokens (what packing needs; values do not matter here)."""

    def __init__(self, lengths, vocab: int):
        import numpy as np

        self.lengths, self.vocab = np.asarray(lengths, dtype=np.int64), vocab

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        import numpy as np

        return np.random.default_rng(i).integers(0, self.vocab, int(self.lengths[i])), None


def make_row(case: str, length: int, vocab: int):
    """(input_ids, position_ids, labels, cu_seqlens) of one row for `case`, as torch tensors (1, L)."""
    import torch

    from spindle.data.packing import PackedDocuments

    if case.startswith("mix"):
        pack = PackedDocuments(LengthDocs(stdlib_lengths(), vocab), length, 1, seed=0)[0]
        ids, pos, labels = (torch.from_numpy(x) for x in (pack.input_ids, pack.position_ids, pack.labels))
        return ids, pos, labels, document_boundaries(pos)
    doc = length if case.startswith("dense") else min(DOC, length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, length + 1), generator=g)
    pos = torch.arange(length).remainder(doc)[None]
    labels = ids[:, 1:].clone()
    labels[pos.roll(-1, 1) == 0] = -100  # no loss across a document's end
    return ids[:, :-1].contiguous(), pos, labels, document_boundaries(pos)


def document_boundaries(position_ids):
    """The flat (int32) offsets where the row's documents start, and its end: the masked path's input."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)


def child(case: str, length: int, device: str, threads: int, steps: int, warmup: int) -> dict:
    import torch

    from spindle.config import ModelConfig
    from spindle.model import attention as A
    from spindle.model.llama import build_model

    torch.set_num_threads(threads)
    dtype = "torch.bfloat16" if device == "cuda" else "torch.float32"
    cfg = ModelConfig(hidden_size=128, num_attention_heads=4, num_kv_attention_heads=2, num_layers=1,
                      vocab_size=1024, multiple_of=64, max_position_embeddings=length, dtype=dtype)
    model = build_model(cfg.to_args(), device, seed=0)
    if dtype != "torch.float32":
        model = model.to(torch.bfloat16)
    ids, pos, labels, cu = (t.to(device) for t in make_row(case, length, cfg.vocab_size))
    layout = A.document_layout(pos)
    kernel = A.choose_kernel(torch.device(device).type, model.tok_embeddings.weight.dtype, layout)
    if case in MASKED:
        mask = A.packed_causal_mask(cu, 1, length)
        kernel = A.Kernel("masked", False)
        for block in model.layers.values():
            block.attention.kernel = lambda q, k, v, layout, p=0.0: A.masked_attention(q, k, v, mask, p)
    elif case.endswith("_repeat"):
        kernel = kernel._replace(native_gqa=False)
        for block in model.layers.values():
            block.attention.kernel = lambda q, k, v, layout, p=0.0: A.KERNELS[kernel.name](
                q, A.repeat_kv(k, 2), A.repeat_kv(v, 2), layout, p)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    times, loss = [], None
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        out = model(ids, pos, labels=labels)
        out.loss_sum.backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        loss = float(out.loss_sum) / int((labels != -100).sum())
        model.zero_grad(set_to_none=True)
        del out
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "length": length, "seconds": min(times), "peak_mib": (peak - base) / 2**20,
            "kernel": kernel.name, "native_gqa": kernel.native_gqa, "loss": loss, "documents": len(layout.lengths),
            "longest": max(layout.lengths)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(lengths, cases, reps: int, device: str, threads: int, steps: int, warmup: int, max_masked: int) -> list[dict]:
    rows = []
    for rep in range(reps):
        for n in lengths:
            for case in cases:
                if case in MASKED and n > max_masked:
                    continue
                cmd = [sys.executable, "-m", __spec__.name, "--child", case, "--lengths", str(n),
                       "--device", device, "--threads", str(threads), "--steps", str(steps), "--warmup", str(warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{case} at {n} tokens failed:\n{out.stderr[-2000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1]) | {"rep": rep, "load": os.getloadavg()[0]}
                rows.append(row)
                logger.info(f"  rep {rep} {case:<13} {n:>6}: {row['seconds']:.3f} s, {row['peak_mib']:.0f} MiB, "
                            f"{row['kernel']}, load {row['load']:.1f}")
    return rows


def summarize(rows: list[dict]) -> dict:
    """(length, case) -> median seconds, median peak MiB, kernel, documents."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["length"], r["case"]), []).append(r)
    return {key: {"seconds": statistics.median(r["seconds"] for r in rs),
                  "peak_mib": statistics.median(r["peak_mib"] for r in rs), "kernel": rs[0]["kernel"],
                  "documents": rs[0]["documents"], "longest": rs[0]["longest"], "loss": rs[0]["loss"], "reps": len(rs)}
            for key, rs in out.items()}


def ratio_lines(summary: dict) -> list[str]:
    lines = []
    for n in sorted({n for n, _ in summary}):
        dense = summary.get((n, "dense"))
        if dense is None:
            continue
        for case, label in (("packed", "packed"), ("masked", "masked"), ("mix", "mix"), ("mix_masked", "mix masked"),
                            ("dense_repeat", "dense repeat-kv"), ("packed_repeat", "packed repeat-kv")):
            r = summary.get((n, case))
            if r is not None:
                lines.append(f"{n:>6} tokens: {label}/dense time ratio {r['seconds'] / dense['seconds']:.2f}, "
                             f"memory ratio {r['peak_mib'] / dense['peak_mib']:.2f}")
    return lines


def format_table(summary: dict) -> str:
    lines = ["| tokens | case | kernel | documents (longest) | time s | peak MiB | reps |",
             "|---|---|---|---|---|---|---|"]
    for (n, case), r in sorted(summary.items(), key=lambda kv: (kv[0][0], CASES.index(kv[0][1]))):
        lines.append(f"| {n:,} | {case} | {r['kernel']} | {r['documents']} ({r['longest']}) | {r['seconds']:.3f} | "
                     f"{r['peak_mib']:.0f} | {r['reps']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from spindle.cli import options

    ap = options.OneLineParser(prog="spindle bench attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4K and 16K tokens; dense, packed, masked; one repetition")
    ap.add_argument("--lengths", default=None, help="comma list of row lengths (default 4096,16384,65536)")
    ap.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--reps", type=options.int_in(1, 1000), default=None,
                    help="interleaved repetitions (default 3; --quick 1)")
    ap.add_argument("--steps", type=options.int_in(1, 10**6), default=1, help="timed steps per child")
    ap.add_argument("--warmup", type=options.int_in(0, 10**6), default=1,
                    help="untimed steps per child before the timed ones")
    ap.add_argument("--threads", type=options.int_in(1, 4096), default=1)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--max-masked", type=options.int_in(2, 1 << 24), default=16384,
                    help="longest row the masked cases run at")
    ap.add_argument("--out", default=None, help="write the rows and the summary as JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, int(args.lengths), args.device, args.threads, args.steps, args.warmup)))
        return 0
    lengths = [int(x) for x in (args.lengths or ("4096,16384" if args.quick else "4096,16384,65536")).split(",")]
    cases = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else DEFAULT_CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown or min(lengths) < 2 or args.threads < 1 or args.steps < 1 or args.warmup < 0:
        from spindle.errors import SpindleError

        raise SpindleError(f"bench attention: unknown cases {unknown}" if unknown else
                           "bench attention: lengths >= 2, --threads and --steps >= 1, --warmup >= 0")
    reps = args.reps or (1 if args.quick else 3)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {platform.machine()} "
            f"{os.cpu_count()} cpus", "torch": torch.__version__, "device": args.device, "threads": args.threads,
            "load_before": os.getloadavg()[0]}
    print(f"bench attention — {meta['date']}, {meta['machine']}, torch {meta['torch']}, {args.device}, "
          f"{args.threads} thread(s); 1 layer, hidden 128, 4 heads / 2 KV heads, fwd + bwd")
    rows = run(lengths, cases, reps, args.device, args.threads, args.steps, args.warmup, args.max_masked)
    summary = summarize(rows)
    meta["load_after"] = os.getloadavg()[0]
    print(format_table(summary))
    print("\n".join(ratio_lines(summary)))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows,
                       "summary": [{"length": n, "case": c, **r} for (n, c), r in summary.items()]}, f, indent=1)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
