"""Seed-compatible: raw text -> InternEvo `.bin` + `.bin.meta`.

    python tools/tokenizer.py --text_input_path raw.txt --bin_output_path data/train/en/raw.bin

Byte layout as InternEvo's tool (one `json.dumps({"tokens": ids}) + "\\n"` per document, BOS/EOS
around every document), with four deliberate differences: the meta is int64 (the seed's int32
overflows past 2 GiB), `.json`/`.jsonl` take the `--text_key` field (`--raw_json_line` restores the
seed's whole-record tokenization), an existing output is never appended to silently, and the tokenizer's
identity (kind, file, SHA-256, vocabulary) goes beside the output as `NAME.bin.tokenizer.json`, so that training,
`convert to-hf` and `generate` know which tokenizer made the ids.
"""

from __future__ import annotations

import os
import sys

try:
    import spindle  # noqa: F401
except ImportError:  # run by path from a checkout: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spindle.cli import guarded, options  # noqa: E402
from spindle.outputs import check_output  # noqa: E402
from spindle.data.prepare import write_json_bin  # noqa: E402
from spindle.data.tokenizer_identity import sidecar_path  # noqa: E402
from spindle.errors import SpindleError  # noqa: E402


def main(argv=None) -> int:
    ap = options.OneLineParser(prog="tools/tokenizer.py",
                               description="Tokenize raw text into InternEvo .bin/.bin.meta files.")
    ap.add_argument("--text_input_path", required=True, type=options.path,
                    help="input .txt, .json, .jsonl (or .gz of those), or a folder")
    ap.add_argument("--bin_output_path", required=True, type=options.path, help="output path ending in .bin")
    ap.add_argument("--tokenizer", default="default", type=options.path,
                    help="'default', 'byte', or a tokenizer path (.model / tokenizer.json / folder)")
    ap.add_argument("--text_key", default="text", type=options.name,
                    help="field holding the text in .json/.jsonl records")
    ap.add_argument("--raw_json_line", action="store_true", help="tokenize whole JSON records, as InternEvo does")
    options.workers_option(ap)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")

    def run(args) -> int:
        out = args.bin_output_path
        if not out.endswith(".bin"):
            raise SpindleError(f"--bin_output_path {out}: must end in .bin")
        for p in (out, out + ".meta", sidecar_path(out)):
            check_output(p, [args.text_input_path], args.overwrite, "--bin_output_path")
        res = write_json_bin([args.text_input_path], out, args.tokenizer, text_key=args.text_key,
                             raw_json_line=args.raw_json_line, workers=args.workers)
        print(f"{res['documents']:,} documents, {res['tokens']:,} tokens -> {out} (+ .meta) in {res['seconds']:.1f} s; "
              f"tokenizer recorded in {os.path.basename(res['tokenizer_record'])}")
        return 0

    return guarded(lambda: run(ap.parse_args(argv)), "--debug" in (sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
