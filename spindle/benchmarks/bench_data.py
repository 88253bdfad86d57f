"""Data-layer benchmark: tokenization docs/s and random-access reads, ours vs a seed-style tool.

    spindle bench data --out runs/bench_data.json [--mb 8] [--reps 3] [--tokenizer PATH]

Corpus: the Python standard library's own .py files (no test folders), one stripped non-empty line
per document (the seed's .txt rule), cut to --mb megabytes. Tokenizer: the packaged default
sentencepiece model, or one trained on the fly with `train_tokenizer` when it is missing.

Variants, run interleaved with the order rotated per repetition, all in this process:
  seed     sentencepiece `encode(line, add_bos, add_eos)` per line, `json.dumps` lines to .bin, then
           the seed's `prepare_meta` (re-read, json.loads each line, int32 (N,2) meta) — the logic
           of InternEvo's tools/tokenizer.py with raw sentencepiece (cpu-baselines.md §3 "seed_sp");
  tool     our tools/tokenizer.py (`main(argv)`): same .bin bytes, int64 meta;
  prepare  `spindle prepare` into a uint16 binary shard.
Reads: the same 100k random document indices from the binary shard and the JSON .bin through
`open_documents` (plus the seed reader's mmap+seek+readline+json.loads for reference).
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time

import numpy as np

from spindle.data.prepare import prepare, write_json_bin  # noqa: E402
from spindle.data.shards import open_documents  # noqa: E402
from spindle.data.tokenizer import DEFAULT_TOKENIZER_PATH  # noqa: E402
from spindle.data.tokenizer_train import train_tokenizer  # noqa: E402


def build_corpus(path: str, max_bytes: int) -> int:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip)
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                with open(os.path.join(d, f), "rb") as fh:
                    text = fh.read().decode("utf-8", "replace")
                for line in text.splitlines():
                    line = line.strip()
                    if line:
                        out.write(line + "\n")
                        n += 1
                if out.tell() >= max_bytes:
                    return n
    return n


def seed_tool(sp, txt: str, bin_path: str) -> int:
    """InternEvo tools/tokenizer.py logic (text2bin + prepare_meta) with raw sentencepiece."""
    with open(txt, encoding="utf-8") as fin, open(bin_path, "ab") as fout:
        for line in fin:
            line = line.strip()
            if not line:
                continue
            tokens = sp.encode(line, add_bos=True, add_eos=True)
            fout.write((json.dumps({"tokens": tokens}) + "\n").encode())
    meta, cur = [], 0
    with open(bin_path, "rb") as f:
        for line in f:
            meta.append((cur, len(json.loads(line)["tokens"])))
            cur += len(line)
    np.save(bin_path + ".meta", np.array(meta, dtype=np.int32))
    os.replace(bin_path + ".meta.npy", bin_path + ".meta")
    return len(meta)


def seed_read(bin_path: str, idx: np.ndarray) -> float:
    meta = np.load(bin_path + ".meta", allow_pickle=False)
    offsets = meta[:, 0].tolist()
    with open(bin_path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    t = time.perf_counter()
    for i in idx.tolist():
        mm.seek(offsets[i])
        json.loads(mm.readline().decode())["tokens"]
    return time.perf_counter() - t


def ours_read(src, idx: np.ndarray) -> float:
    t = time.perf_counter()
    for i in idx.tolist():
        src[i]
    return time.perf_counter() - t


def summarize(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "all": xs}


def main(argv=None) -> int:
    from spindle.cli import options

    ap = options.OneLineParser(prog="spindle bench data")
    ap.add_argument("--out", default="runs/bench_data.json", help="results JSON path")
    ap.add_argument("--mb", type=options.float_in(0, 1 << 20, lo_open=True), default=8.0, help="corpus size in MB")
    ap.add_argument("--reps", type=options.int_in(1, 1000), default=3)
    ap.add_argument("--reads", type=options.int_in(1, 10**9), default=100_000)
    ap.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the packaged one)")
    ap.add_argument("--workers", type=options.int_in(0, options.MAX_WORKERS), default=0)
    args = ap.parse_args(argv)
    import sentencepiece as spm


    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        ndocs = build_corpus(corpus, int(args.mb * (1 << 20)))
        nbytes = os.path.getsize(corpus)
        tok_path = args.tokenizer or (str(DEFAULT_TOKENIZER_PATH) if DEFAULT_TOKENIZER_PATH.exists() else None)
        if tok_path is None:
            tok_path = train_tokenizer([corpus], 8000, os.path.join(tmp, "tok")).path
        sp = spm.SentencePieceProcessor(model_file=tok_path)
        print(f"corpus: {nbytes / 1e6:.1f} MB, {ndocs:,} documents; tokenizer {tok_path} (vocab {sp.vocab_size()}); "
              f"{os.cpu_count()} CPUs", flush=True)

        def run_seed(r):
            p = os.path.join(tmp, f"seed{r}.bin")
            return seed_tool(sp, corpus, p)

        def run_tool(r):
            p = os.path.join(tmp, f"tool{r}.bin")
            write_json_bin([corpus], p, tok_path, workers=args.workers or None)  # what tools/tokenizer.py runs
            return ndocs

        def run_prepare(r):
            s = prepare([corpus], os.path.join(tmp, f"prep{r}"), tok_path, workers=args.workers, progress=False)
            return s["documents"]

        variants = {"seed": run_seed, "tool": run_tool, "prepare": run_prepare}
        times: dict[str, list[float]] = {k: [] for k in variants}
        # CPU seconds (this process + reaped worker processes): robust to other load on the host,
        # which slows the 2-process variants more than the 1-process seed in wall time.
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.reps):
            order = names[r % 3:] + names[: r % 3]
            for name in order:
                c0 = os.times()
                t = time.perf_counter()
                n = variants[name](r)
                times[name].append(time.perf_counter() - t)
                c1 = os.times()
                cpu[name].append(sum(c1[:4]) - sum(c0[:4]))
                assert n == ndocs, (name, n, ndocs)
        # Correctness: all three hold the same tokens.
        seed_src = open_documents(os.path.join(tmp, "seed0.bin"))
        tool_bytes = open(os.path.join(tmp, "tool0.bin"), "rb").read()
        same_bin = tool_bytes == open(os.path.join(tmp, "seed0.bin"), "rb").read()
        shard = open_documents(os.path.join(tmp, "prep0"))
        check = np.random.default_rng(1).integers(0, ndocs, 2000)
        same_shard = all(np.array_equal(seed_src[i][0], shard[i][0]) for i in check.tolist())

        # Random access.
        idx = np.random.default_rng(0).integers(0, ndocs, args.reads)
        json_src = open_documents(os.path.join(tmp, "tool0.bin"))
        reads: dict[str, list[float]] = {"shard": [], "json_ours": [], "json_seed_reader": []}
        for r in range(max(3, args.reps)):
            reads["shard"].append(ours_read(shard, idx))
            reads["json_ours"].append(ours_read(json_src, idx))
            reads["json_seed_reader"].append(seed_read(os.path.join(tmp, "seed0.bin"), idx))

    res = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "corpus": {"bytes": nbytes, "documents": ndocs, "source": "stdlib .py, one stripped line per document"},
        "tokenizer": tok_path,
        "reps": args.reps,
        "tokenize_seconds": {k: summarize(v) for k, v in times.items()},
        "tokenize_cpu_seconds": {k: summarize(v) for k, v in cpu.items()},
        "load_average_at_end": os.getloadavg(),
        "tokenize_docs_per_s": {k: ndocs / statistics.median(v) for k, v in times.items()},
        "speedup_vs_seed": {k: statistics.median(times["seed"]) / statistics.median(v) for k, v in times.items()},
        "tool_bin_identical_to_seed": same_bin,
        "shard_tokens_identical_to_seed": same_shard,
        "read_seconds_per_100k": {k: summarize([x * 100_000 / args.reads for x in v]) for k, v in reads.items()},
        "read_speedup_shard_vs_json_seed_reader": (statistics.median(reads["json_seed_reader"])
                                                   / statistics.median(reads["shard"])),
    }
    print(f"\n{'variant':<10}{'s median':>10}{'s min':>9}{'docs/s':>12}{'MB/s':>8}"
          f"{'vs seed':>9}{'vs seed(min)':>13}{'CPU s':>8}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:<10}{m:>10.2f}{min(v):>9.2f}{ndocs / m:>12,.0f}{nbytes / m / 1e6:>8.2f}"
              f"{res['speedup_vs_seed'][k]:>8.2f}x"
              f"{min(times['seed']) / min(v):>12.2f}x{statistics.median(cpu[k]):>8.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f} (other processes on the host skew the parallel variants)")
    print(f"tool .bin byte-identical to seed: {same_bin}; shard tokens identical: {same_shard}")
    print(f"\n{'random reads':<18}{'s/100k med':>11}{'min':>8}{'us/doc':>8}{'docs/s':>11}")
    for k, v in reads.items():
        m = statistics.median(v) * 100_000 / args.reads
        print(f"{k:<18}{m:>11.3f}{min(v) * 100_000 / args.reads:>8.3f}{m * 10:>8.2f}{100_000 / m:>11,.0f}")
    print(f"shard vs seed JSON reader: {res['read_speedup_shard_vs_json_seed_reader']:.1f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"results -> {args.out}")
    return 0


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
