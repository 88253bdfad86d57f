"""`spindle prepare INPUTS --out DIR`: raw text, JSON lines, parquet or a Hub dataset folder into binary
shards, on all cores."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from spindle.cli import options
from spindle.cli.options import OneLineParser
from spindle.data.prepare import MAX_SHARD_MB, MAX_TOKENS, prepare


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = OneLineParser(prog="spindle prepare", description="Tokenize raw text into Spindle binary shards.")
    ap.add_argument("inputs", nargs="+", type=options.path,
                    help="files or folders: txt, json, jsonl, parquet (optionally .gz); "
                         "other files = one document each")
    ap.add_argument("--out", required=True, type=options.path, help="output folder (shards + manifest.json)")
    ap.add_argument("--tokenizer", default="default", type=options.path, help="'default', 'byte', or a tokenizer path")
    ap.add_argument("--text-key", default="text", type=options.name)
    options.workers_option(ap)
    ap.add_argument("--shard-size-mb", type=options.float_in(0, MAX_SHARD_MB, lo_open=True), default=256,
                    help=f"shard size in MiB, (0, {MAX_SHARD_MB}]")
    ap.add_argument("--min-length", type=options.int_in(0, MAX_TOKENS), default=0,
                    help="drop documents with fewer tokens (BOS/EOS included)")
    ap.add_argument("--doc-per-file", action="store_true", help="every input file is one document")
    ap.add_argument("--raw-json-line", action="store_true", help="tokenize whole JSON records (InternEvo's behaviour)")
    ap.add_argument("--split", type=options.relative_name, default=None,
                    help="Hub dataset folders: the split to take (default: train)")
    ap.add_argument("--subset", type=options.relative_name, default=None,
                    help="Hub dataset folders: the config (README configs:) or sub-folder to take")
    ap.add_argument("--overwrite", action="store_true", help="replace the token files of an existing output folder")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")

    def run(args) -> int:
        s = prepare(args.inputs, args.out, args.tokenizer, text_key=args.text_key, workers=args.workers,
                    shard_size_mb=args.shard_size_mb, min_length=args.min_length, overwrite=args.overwrite,
                    doc_per_file=args.doc_per_file, raw_json_line=args.raw_json_line, split=args.split,
                    subset=args.subset)
        for folder, (split, files) in s["taken"].items():
            names = [os.path.relpath(f, folder) for f in files]
            print(f"{folder}: split {split!r}, {len(files)} file(s): {', '.join(names[:4])}"
                  + (f" (+{len(names) - 4} more)" if len(names) > 4 else ""))
        print(f"{s['documents']:,} documents, {s['tokens']:,} tokens in {s['shards']} shard(s) -> {s['out_dir']} "
              f"({s['seconds']:.1f} s, {s['docs_per_s']:,.0f} docs/s)"
              + (f"; {s['dropped_short']:,} dropped by --min-length" if s["dropped_short"] else ""))
        return 0

    return run(ap.parse_args(argv))
