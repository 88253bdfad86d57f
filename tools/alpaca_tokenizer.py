"""Seed-compatible SFT data tool: Alpaca JSON (or chat JSONL) -> InternEvo `.bin` + `.bin.meta`.

    python tools/alpaca_tokenizer.py ALPACA_JSON OUT_DIR TOKENIZER --split_ratio 0.1

Writes OUT_DIR/train/en/dataset.bin(.meta) and OUT_DIR/valid/en/dataset.bin(.meta).

Loss masking uses InternEvo's convention, so InternEvo reads these files too: prompt tokens are
stored negated, trained tokens positive (reference/internevo.md §1.4). Spindle's reader turns
that back into abs(ids) + a loss mask. A tokenizer with a chat template (Qwen2, Llama 3, InternLM2
folders) renders every record with it, an Alpaca record as one user turn and one answer, and only
what the assistant writes is trained (spindle.data.chat). Without a template, per record:

    alpaca: [BOS] -ids("<|User|>:{instruction}\\n{input}\\n") -ids("<|Bot|>:") +ids("{output}\\n") [EOS]
    chat:   [BOS] then per message: system/user turns fully negated; assistant turns
            -ids("<|Bot|>:") +ids("{content}\\n"); [EOS] at the end

(InternEvo's InternLM-v1 <eoh>/<eoa> ids are model-specific and left out; EOS closes the answer.)
Sequences are cut to --max_length tokens with EOS kept last, as the seed does. Differences from
the seed, on purpose: the validation split is drawn *without* replacement (the seed's
np.random.choice with replacement gives fewer validation records than the ratio), the split
is O(n), and token id 0 cannot be negated, so a prompt containing id 0 keeps it trainable —
sentencepiece's id 0 is <unk>, which byte-fallback models never emit.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

try:
    import spindle  # noqa: F401
except ImportError:  # run by path from a checkout: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spindle.cli import guarded, options  # noqa: E402
from spindle.data.chat import alpaca_messages, check_messages, conversation_tokens  # noqa: E402
from spindle.outputs import check_output  # noqa: E402
from spindle.data.prepare import MAX_TOKENS  # noqa: E402
from spindle.data.shard_writers import JsonBinWriter  # noqa: E402
from spindle.data.tokenizer_identity import write_sidecar  # noqa: E402
from spindle.data.tokenizer import load_tokenizer  # noqa: E402
from spindle.errors import SpindleError  # noqa: E402

def read_records(path: str) -> list[dict]:
    """A JSON list, or JSON lines (one object per line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpindleError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpindleError(f"{path}: line {line}: invalid UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            recs = json.loads(text)
        except ValueError as e:
            raise SpindleError(f"{path}: malformed JSON ({e})") from None
        return recs
    recs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except ValueError as e:
                raise SpindleError(f"{path}: line {n}: malformed JSON ({e})") from None
    return recs


def detect_format(recs: list, path: str) -> str:
    first = next((r for r in recs if isinstance(r, dict)), None)
    if first is None:
        raise SpindleError(f"{path}: no records")
    return "chat" if "messages" in first else "alpaca"


def conversations(recs: list, fmt: str, path: str) -> list[list[dict]]:
    """Each record as a checked conversation (an Alpaca record is one user turn and one answer)."""
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise SpindleError(f"{where}: expected an object, got {type(r).__name__}")
        out.append(alpaca_messages(r, where) if fmt == "alpaca" else check_messages(r.get("messages"), where))
    return out


def tokenize(tok, convs: list[list[dict]], max_length: int, path: str) -> list[list[int]]:
    """InternEvo's SFT ids: trained tokens positive, the rest negated; cut to max_length with EOS last."""
    seqs = []
    for i, msgs in enumerate(convs):
        ids, trained = conversation_tokens(tok, msgs, f"{path}: record {i}")
        seq = [t if m else -t for t, m in zip(ids, trained)]
        if len(seq) > max_length:
            seq = seq[: max_length - 1] + [tok.eos_id]
        seqs.append(seq)
    return seqs


def main(argv=None) -> int:
    ap = options.OneLineParser(prog="tools/alpaca_tokenizer.py",
                               description="Tokenize Alpaca / chat data into InternEvo .bin files with loss masks.")
    ap.add_argument("dataset_path", type=options.path, help="Alpaca JSON list, or chat JSONL with {'messages': [...]}")
    ap.add_argument("output_path", type=options.path, help="output folder (train/en, valid/en are created)")
    ap.add_argument("tokenizer_path", type=options.path, help="tokenizer path, 'default' or 'byte'")
    ap.add_argument("--split_ratio", type=options.float_in(0, 1, hi_open=True), default=0.1,
                    help="fraction of records for validation, [0, 1)")
    ap.add_argument("--format", choices=["auto", "alpaca", "chat"], default="auto")
    ap.add_argument("--max_length", type=options.int_in(2, MAX_TOKENS), default=2048,
                    help="tokens per record at most (EOS kept last)")
    ap.add_argument("--seed", type=options.int_in(0, 2**63 - 1), default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace the .bin files of an existing output folder")
    ap.add_argument("--debug", action="store_true")
    return guarded(lambda: run(ap.parse_args(argv)), "--debug" in (sys.argv[1:] if argv is None else argv))


def run(args) -> int:
    check_output(args.output_path, [args.dataset_path], args.overwrite, "output_path")
    outs = {s: os.path.join(args.output_path, s, "en", "dataset.bin") for s in ("train", "valid")}
    tok = load_tokenizer(args.tokenizer_path)
    recs = read_records(args.dataset_path)
    fmt = detect_format(recs, args.dataset_path) if args.format == "auto" else args.format
    seqs = tokenize(tok, conversations(recs, fmt, args.dataset_path), args.max_length, args.dataset_path)
    n = len(seqs)
    # Without replacement, seeded: exactly int(n * ratio) validation records.
    perm = np.random.default_rng(args.seed).permutation(n)
    is_valid = np.zeros(n, dtype=bool)
    is_valid[perm[: int(n * args.split_ratio)]] = True
    counts = {}
    for split, want in (("train", False), ("valid", True)):
        w = JsonBinWriter(outs[split])
        for i in np.flatnonzero(is_valid == want).tolist():
            w.add(seqs[i])
        counts[split] = w.close()["documents"]
        write_sidecar(outs[split], tok.identity())  # which tokenizer made these ids (spindle.data.tokenizer_identity)
    print(f"{fmt}: {counts['train']:,} train / {counts['valid']:,} valid records -> {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
