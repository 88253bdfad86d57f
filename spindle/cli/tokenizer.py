"""`spindle tokenizer train FILES --vocab-size N --out DIR` and `spindle tokenizer info SPEC`."""

from __future__ import annotations

import json
from typing import Optional, Sequence

from spindle.cli import options
from spindle.data.tokenizer import load_tokenizer


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`spindle tokenizer train FILES --vocab-size N --out DIR [--kind sentencepiece|bpe] [--overwrite]`
    and `spindle tokenizer info SPEC`."""
    from spindle.data.tokenizer_train import MAX_VOCAB, MIN_VOCAB, train_tokenizer

    ap = options.OneLineParser(prog="spindle tokenizer", description="Train or inspect tokenizers.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a tokenizer on text files")
    tr.add_argument("files", nargs="+", type=options.path)
    tr.add_argument("--vocab-size", type=options.int_in(MIN_VOCAB, MAX_VOCAB), required=True)
    tr.add_argument("--out", required=True, type=options.path)
    tr.add_argument("--kind", choices=["sentencepiece", "bpe"], default="sentencepiece")
    tr.add_argument("--overwrite", action="store_true", help="replace the tokenizer files of an existing folder")
    info = sub.add_parser("info", help="print a tokenizer's identity")
    info.add_argument("spec", type=options.path)

    def run(args) -> int:
        if args.cmd == "train":
            tok = train_tokenizer(args.files, args.vocab_size, args.out, kind=args.kind, overwrite=args.overwrite)
        else:
            tok = load_tokenizer(args.spec)
        print(json.dumps(tok.identity(), indent=2))
        return 0

    return run(ap.parse_args(argv))
