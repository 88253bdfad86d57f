"""`spindle generate`: text from a checkpoint, streamed as it is produced."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spindle.cli import options
from spindle.cli.options import OneLineParser, int_in


def build_parser() -> argparse.ArgumentParser:
    g = OneLineParser(prog="spindle generate", description="Generate text from a checkpoint.")
    g.add_argument("--ckpt", required=True, type=options.path,
                   help="a Spindle checkpoint, or a Hugging Face / InternEvo folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int_in(0, 10**7), default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    g.add_argument("--rope-scaling", default=None, help="none | dynamic | ntk:FACTOR | linear:FACTOR | yarn:FACTOR")
    g.add_argument("--tokenizer", default=None, type=options.path)
    g.add_argument("--device", default="cpu")
    g.add_argument("--debug", action="store_true")
    return g


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.load import checkpoint_tokenizer
    from spindle.eval.generate import complete_text, padded_vocab_note, validate_generate_options
    from spindle.eval.load import load_model_for_eval

    args = build_parser().parse_args(argv)
    validate_generate_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    model, cfg = load_model_for_eval(args.ckpt, rope_scaling=args.rope_scaling, device=args.device)
    # the tokenizer the checkpoint records (its training data's) before its config's, before the packaged one
    tok = load_tokenizer(args.tokenizer or checkpoint_tokenizer(args.ckpt) or cfg.data.tokenizer_path or "default")
    note = padded_vocab_note(model, tok)
    if note:
        print(note, file=sys.stderr)
    print(args.prompt, end="", flush=True)
    complete_text(model, tok, args.prompt, args.max_new_tokens, stream=lambda p: print(p, end="", flush=True),
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print()
    return 0
