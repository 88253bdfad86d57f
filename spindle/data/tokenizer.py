"""Tokenizers behind one interface: sentencepiece `.model`, Hugging Face `tokenizer.json`, bytes.

Contract shared by every implementation:
- `encode(text)` returns the ids of the text only. BOS/EOS are added by the caller (the data
  preparation tools wrap each document), and text that *looks* like a special token ("<s>") is
  encoded as ordinary text. The seed's transformers wrapper turned literal "<s>" in raw data into
  BOS (cpu-baselines.md §3); data must never be able to inject control tokens.
- `identity()` is what manifests record, so a shard can be checked against the tokenizer that
  reads or trains on it (same file hash, same vocab size).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Sequence

from spindle.errors import SpindleError

# The tokenizer shipped with the package (created by tools/make_default_tokenizer.py).
DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "tokenizer.model"

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer(ABC):
    """What the data layer, the trainer and generation need from a tokenizer."""

    kind: str = ""
    path: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int:
        # Padding positions never carry loss, so any valid id works; EOS is always present.
        return self.eos_id

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS; special-token text is treated as plain text."""

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "sha256": _sha256(self.path) if self.path else None,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    @abstractmethod
    def save(self, out_dir: str | os.PathLike) -> str:
        """Write the files that `load_tokenizer(out_dir)` reads back; returns the main file path."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise SpindleError(f"{self.path}: not a readable sentencepiece model ({e})") from None
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise SpindleError(f"{self.path}: sentencepiece model has no BOS/EOS pieces (train it with bos_id/eos_id >= 0)")

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        # Raw sentencepiece never matches control symbols (<s>, </s>) inside text.
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # One C++ call for the whole batch: per-call Python overhead dominates on short documents.
        return self._sp.encode(list(texts), num_threads=max(1, int(num_threads)))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, out_dir: str | os.PathLike) -> str:
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, "tokenizer.model")
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        return dst


# Names under which BOS/EOS appear in common tokenizer.json files, tried in order when no
# tokenizer_config.json says otherwise.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|im_start|>", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        try:
            self._tok = _HFTok.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for parse errors
            raise SpindleError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        # Special tokens in text are encoded as plain text (no injection from data).
        self._tok.encode_special_tokens = True
        self._bos, self._eos = self._find_specials()

    def _find_specials(self) -> tuple[int, int]:
        names: dict[str, str] = {}
        cfg = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.exists(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise SpindleError(f"{cfg}: unreadable tokenizer config ({e})") from None
            for key in ("bos_token", "eos_token"):
                val = data.get(key)
                if isinstance(val, dict):
                    val = val.get("content")
                if isinstance(val, str):
                    names[key] = val

        def pick(key: str, candidates: tuple[str, ...]) -> int:
            for name in ([names[key]] if key in names else []) + list(candidates):
                tid = self._tok.token_to_id(name)
                if tid is not None:
                    return tid
            raise SpindleError(f"{self.path}: cannot find a {key} (tried {', '.join(candidates)}); add it to tokenizer_config.json")

        return pick("bos_token", _BOS_CANDIDATES), pick("eos_token", _EOS_CANDIDATES)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # tokenizers picks its thread count from RAYON_NUM_THREADS; num_threads is advisory here.
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, out_dir: str | os.PathLike) -> str:
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, "tokenizer.json")
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": self._tok.id_to_token(self._bos), "eos_token": self._tok.id_to_token(self._eos)}, f)
        return dst


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, BOS=256, EOS=257: needs no files, good for tests and tiny demos."""

    kind = "byte"
    path = None

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def bos_id(self) -> int:
        return 256

    @property
    def eos_id(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in (int(x) for x in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, out_dir: str | os.PathLike) -> str:
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, BYTE_TOKENIZER_FILE)
        with open(dst, "w", encoding="utf-8") as f:
            json.dump({"kind": "byte", "vocab_size": 258, "bos_id": 256, "eos_id": 257}, f)
        return dst


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """`spec`: "default" (the packaged sentencepiece model), "byte", a `.model` file, a
    `tokenizer.json`, or a folder holding one of those (a sentencepiece `tokenizer.model` wins,
    since it is the original of Llama-family HF folders that ship both)."""
    spec_s = str(spec)
    if spec_s == "byte":
        return ByteTokenizer()
    if spec_s == "default":
        if not DEFAULT_TOKENIZER_PATH.exists():
            raise SpindleError(f"{DEFAULT_TOKENIZER_PATH}: the packaged default tokenizer is missing (run tools/make_default_tokenizer.py)")
        return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)
    p = Path(spec_s).expanduser()
    if p.is_dir():
        for name, cls in (("tokenizer.model", SentencePieceTokenizer), ("tokenizer.json", HFTokenizer)):
            if (p / name).is_file():
                return cls(p / name)
        if (p / BYTE_TOKENIZER_FILE).is_file():
            return ByteTokenizer()
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0])
        raise SpindleError(f"{p}: folder holds no tokenizer.model, tokenizer.json or {BYTE_TOKENIZER_FILE}")
    if not p.exists():
        raise SpindleError(f"{p}: tokenizer not found (expected a path, 'default' or 'byte')")
    if not os.access(p, os.R_OK):
        raise SpindleError(f"{p}: tokenizer file is not readable")
    if p.suffix == ".json":
        if p.name == BYTE_TOKENIZER_FILE:
            return ByteTokenizer()
        return HFTokenizer(p)
    return SentencePieceTokenizer(p)


# What a tokenizer folder holds; `spindle tokenizer train --overwrite` replaces these (and only these).
TOKENIZER_FILES = {"tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", BYTE_TOKENIZER_FILE}


MIN_VOCAB, MAX_VOCAB = 300, 1 << 24


def check_vocab_size(vocab_size, option: str) -> int:
    """A vocabulary size sentencepiece and tokenizers can train: checked before calling them
    (sentencepiece takes an int32 and aborts the process on some values)."""
    if type(vocab_size) is not int or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise SpindleError(f"{option}: expected an integer in [{MIN_VOCAB}, {MAX_VOCAB}] (byte fallback + specials "
                           f"need {MIN_VOCAB}), got {vocab_size!r}")
    return vocab_size


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    kind: str = "sentencepiece",
    num_threads: int | None = None,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a tokenizer on text files into `out_dir` (see `_train_into`). An existing non-empty
    `out_dir` is refused without `overwrite`, and so is one that holds an input; the files are
    written next to it and moved in when training succeeded."""
    from spindle.data.files import StagedFolder, check_output

    files = [str(f) for f in files]
    if not files:
        raise SpindleError("train_tokenizer: no input files")
    for f in files:
        if not os.path.isfile(f) or not os.access(f, os.R_OK):
            raise SpindleError(f"{f}: training file not found or not readable")
    if kind not in ("sentencepiece", "bpe"):
        raise SpindleError(f"unknown tokenizer kind {kind!r} (expected 'sentencepiece' or 'bpe')")
    check_vocab_size(vocab_size, "--vocab-size")
    check_output(str(out_dir), files, overwrite, "--out")
    with StagedFolder(str(out_dir), replaces=TOKENIZER_FILES.__contains__) as staging:
        _train_into(files, vocab_size, staging, kind, num_threads)
    return load_tokenizer(out_dir)


def _train_into(files: list[str], vocab_size: int, out_dir: str, kind: str, num_threads: int | None) -> None:
    """Train a tokenizer on text files (one sentence per line for sentencepiece) into `out_dir`.

    sentencepiece: BPE with byte fallback, identity normalisation and no dummy prefix, so any
    text (code indentation, newlines via byte pieces) round-trips through encode/decode exactly.
    bpe: Hugging Face byte-level BPE with <s>, </s>, <pad> specials.
    """
    threads = num_threads or os.cpu_count() or 1
    if kind == "sentencepiece":
        import sentencepiece as spm

        try:
            spm.SentencePieceTrainer.train(
                input=files,
                model_prefix=os.path.join(str(out_dir), "tokenizer"),
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                # No implicit leading space: encode(a) + encode(b) decodes to a + b exactly,
                # which SFT prompt/answer segments and code rely on.
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                character_coverage=0.9995,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                num_threads=threads,
                max_sentence_length=1 << 16,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except (RuntimeError, ValueError) as e:
            raise SpindleError(f"sentencepiece training failed on {', '.join(files)}: {e}") from None
        return
    if kind == "bpe":
        from tokenizers import Tokenizer as _HFTok, decoders, models, pre_tokenizers, trainers

        tok = _HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        try:
            tok.train(files, trainer)
        except Exception as e:
            raise SpindleError(f"BPE training failed on {', '.join(files)}: {e}") from None
        path = os.path.join(str(out_dir), "tokenizer.json")
        tok.save(path)
        with open(os.path.join(str(out_dir), "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)


def tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """`spindle tokenizer train FILES --vocab-size N --out DIR [--kind sentencepiece|bpe] [--overwrite]`
    and `spindle tokenizer info SPEC`."""
    from spindle.data import options

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

    return options.run_command(run, ap, argv)
