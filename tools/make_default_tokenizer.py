"""Train the default tokenizer that ships in the package (spindle/assets/tokenizer/tokenizer.model).

A sentencepiece BPE model, vocabulary 1024, byte fallback, trained on the Python standard
library's own .py files (tests excluded) — text every Python installation has, so the demo needs
no download and this script reproduces the shipped file from what is already on the machine.

    python tools/make_default_tokenizer.py [--vocab-size 1024] [--out spindle/assets/tokenizer]
"""

import argparse
import io
import sys
import sysconfig
from pathlib import Path

import sentencepiece as spm

EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not EXCLUDED_PARTS & set(p.relative_to(root).parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "spindle" / "assets" / "tokenizer"))
    args = ap.parse_args(argv)
    lines = []
    for path in stdlib_files():
        lines.extend(l for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=args.vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True,
        # keep code's whitespace: indentation carries meaning in Python
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=2, input_sentence_size=400_000,
        shuffle_input_sentence=False, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    print(f"wrote {out / 'tokenizer.model'} ({len(model.getvalue())} bytes) from {len(lines)} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
