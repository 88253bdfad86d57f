"""Tokenizers behind one interface: sentencepiece `.model`, Hugging Face `tokenizer.json`, bytes.

Contract shared by every implementation:
- `encode(text)` returns the ids of the text only. BOS/EOS are added by the caller (the data
  preparation tools wrap each document), and text that *looks* like a special token ("<s>") is
  encoded as ordinary text. The seed's transformers wrapper turned literal "<s>" in raw data into
  BOS (cpu-baselines.md §3); data must never be able to inject control tokens.
- `identity()` is what manifests record, so a shard can be checked against the tokenizer that
  reads or trains on it (same file hash, same vocab size).
- A text longer than PIECE_CHARS goes a piece at a time (`text_pieces`): sentencepiece takes ~40 bytes
  per character of one string (~5 GB for a 100 MB single-line document) on top of the ids returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from spindle.data.hub_tokenizer import UNSET, FolderConfig, is_tiktoken, read_folder_config, tiktoken_error
from spindle.errors import SpindleError

# The tokenizer shipped with the package (created by tools/make_default_tokenizer.py).
DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "tokenizer.model"

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"

PIECE_CHARS = 1 << 20  # characters of one text a tokenizer is handed at once (about 1 MB of text)
# Pieces after the first are tokenized behind it (its ids then cut off): else a dummy prefix (sentencepiece's
# add_dummy_prefix, Metaspace's prepend) starts each ("\nb" -> "▁", "\n", "b" where the whole gave "\n", "b").
CONTEXT_PROBE = "x"


def _cut(text: str, lo: int, hi: int) -> int:
    """Where a piece of text[lo:hi] ends: at the start of the last whitespace run holding a newline, else a
    space; else at `hi`. Tokenizers start a token there (sentencepiece splits before its whitespace mark,
    byte-level BPE's pattern before each whitespace run), so the pieces' ids are the whole text's."""
    for sep in ("\n", " "):
        i = text.rfind(sep, lo, hi)
        while i > lo and text[i - 1].isspace():
            i -= 1
        if i > lo:
            return i
    return hi  # no whitespace in half a piece (a base64 blob, text without spaces): cut anywhere


def text_pieces(text: str, bound: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `bound` characters, each cut before whitespace in its second half."""
    start = 0
    while len(text) - start > bound:
        end = _cut(text, start + bound // 2, start + bound)
        yield text[start:end]
        start = end
    yield text[start:]


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
    chat_template: str | None = None  # the folder's Jinja chat template, if it ships one

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """The id that starts every document, or None when the model has no BOS (Qwen2)."""

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int:
        # Padding positions never carry loss, so any valid id works; EOS is always present.
        return self.eos_id

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """`encode` of a text of at most PIECE_CHARS characters."""

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS; special-token text is treated as plain text. A long text goes a
        piece at a time (`text_pieces`): the same ids, except around a cut where half a piece held no
        whitespace (half a megabyte without a space or newline), whose sides are tokenized as two texts."""
        if len(text) <= PIECE_CHARS:
            return self._encode(text)
        ids: list[int] = []
        for i, piece in enumerate(text_pieces(text, PIECE_CHARS)):
            ids += self._encode(piece) if i == 0 else self._encode_after_text(piece)
        return ids

    def _encode_after_text(self, piece: str) -> list[int]:
        """Ids of `piece` as they are inside a text: tokenized behind CONTEXT_PROBE, whose ids are then cut
        off (when they are unchanged, i.e. no token spans the seam; else the piece alone)."""
        probe = self._encode(CONTEXT_PROBE)
        ids = self._encode(CONTEXT_PROBE + piece)
        return ids[len(probe):] if ids[:len(probe)] == probe else self._encode(piece)

    def _long_apart(self, texts: Sequence[str], encode_short: Callable[[list[str]], list[list[int]]]):
        """A batch: texts up to PIECE_CHARS through `encode_short` (one call), longer ones through `encode`."""
        long = {i for i, t in enumerate(texts) if len(t) > PIECE_CHARS}
        if not long:
            return encode_short(list(texts))
        short = iter(encode_short([t for i, t in enumerate(texts) if i not in long]))
        return [self.encode(t) if i in long else next(short) for i, t in enumerate(texts)]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def token_text(self, i: int) -> str:
        """The text of one token (how a chat template writes it)."""

    def special_tokens(self) -> dict[str, int]:
        """Control tokens a chat template may write (text -> id); text that only *looks* like one in data stays text."""
        return {}

    def document(self, ids: Sequence[int]) -> list[int]:
        """A document as training sees it: [BOS] ids [EOS], without BOS when the model has none."""
        head = [] if self.bos_id is None else [self.bos_id]
        return head + list(ids) + [self.eos_id]

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "path": os.path.abspath(self.path) if self.path else None,  # found again from any folder
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


def _pick_specials(cfg: FolderConfig, lookup, bos_fallback, eos_fallback, where: str) -> tuple[int | None, int]:
    """(BOS or None, EOS) from what the folder declares; `lookup(text)` -> id or None. A declared
    token must exist; an undeclared one falls back to the model's own (`*_fallback()`)."""
    def named(key: str, text: str) -> int:
        tid = lookup(text)
        if tid is None:
            raise SpindleError(f"{where}: {key} {text!r} of tokenizer_config.json is not in the vocabulary")
        return tid

    if cfg.bos is None or cfg.add_bos is False:
        bos = None  # "bos_token": null, or "add_bos_token": false: documents start without one
    else:
        bos = named("bos_token", cfg.bos) if cfg.bos != UNSET else bos_fallback()
    eos = named("eos_token", cfg.eos) if cfg.eos not in (UNSET, None) else eos_fallback()
    if eos is None:
        raise SpindleError(f"{where}: no EOS token (tried {', '.join(_EOS_CANDIDATES)}); name one as eos_token "
                           f"in tokenizer_config.json")
    return bos, eos


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, cfg: FolderConfig | None = None):
        import sentencepiece as spm

        self.path = str(path)
        if is_tiktoken(self.path):
            raise tiktoken_error(self.path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise SpindleError(f"{self.path}: not a readable sentencepiece model ({e})") from None
        cfg = cfg or FolderConfig()
        self.chat_template = cfg.chat_template
        n = self._sp.GetPieceSize()
        self._added = {t: i for t, i in cfg.added.items() if i < n and self._sp.IdToPiece(i) == t}
        self._bos, self._eos = _pick_specials(
            cfg, self._piece_id, lambda: self._sp.bos_id() if self._sp.bos_id() >= 0 else None,
            lambda: self._sp.eos_id() if self._sp.eos_id() >= 0 else None, self.path)

    def _piece_id(self, text: str) -> int | None:
        i = self._sp.PieceToId(text)
        return i if self._sp.IdToPiece(i) == text else None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def _encode(self, text: str) -> list[int]:
        # Raw sentencepiece never matches control symbols (<s>, </s>) inside text.
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # One C++ call for the whole batch: per-call Python overhead dominates on short documents.
        return self._long_apart(texts, lambda short: self._sp.encode(short, num_threads=max(1, int(num_threads))))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_text(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def special_tokens(self) -> dict[str, int]:
        control = {self._sp.IdToPiece(i): i for i in range(self.vocab_size) if self._sp.IsControl(i)}
        return control | self._added

    def save(self, out_dir: str | os.PathLike) -> str:
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, "tokenizer.model")
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        return dst


# Names under which BOS/EOS appear in common tokenizer.json files, tried in order when no
# tokenizer_config.json names them. Chat markers (<|im_start|>) are not BOS: a model without a
# BOS (Qwen2) gets none rather than a turn marker at the start of every document.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str | os.PathLike, cfg: FolderConfig | None = None):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        try:
            self._tok = _HFTok.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for parse errors
            raise SpindleError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        # Special tokens in text are encoded as plain text (no injection from data).
        self._tok.encode_special_tokens = True
        cfg = cfg if cfg is not None else read_folder_config(os.path.dirname(self.path))
        self.chat_template = cfg.chat_template

        def first(names):
            return next((i for i in map(self._tok.token_to_id, names) if i is not None), None)

        self._bos, self._eos = _pick_specials(cfg, self._tok.token_to_id, lambda: first(_BOS_CANDIDATES),
                                              lambda: first(_EOS_CANDIDATES), self.path)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # tokenizers picks its thread count from RAYON_NUM_THREADS; num_threads is advisory here.
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return self._long_apart(texts, lambda short: [e.ids for e in fast(short, add_special_tokens=False)])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_text(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def save(self, out_dir: str | os.PathLike) -> str:
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, "tokenizer.json")
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        bos = None if self._bos is None else self._tok.id_to_token(self._bos)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": bos, "eos_token": self._tok.id_to_token(self._eos)}
                      | ({"chat_template": self.chat_template} if self.chat_template else {}), f)
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

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in (int(x) for x in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_text(self, i: int) -> str:
        return {256: "<s>", 257: "</s>"}.get(int(i)) or bytes([int(i)]).decode("latin-1")

    def save(self, out_dir: str | os.PathLike) -> str:
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, BYTE_TOKENIZER_FILE)
        with open(dst, "w", encoding="utf-8") as f:
            json.dump({"kind": "byte", "vocab_size": 258, "bos_id": 256, "eos_id": 257}, f)
        return dst


def _load_folder(p: Path) -> Tokenizer:
    """A tokenizer folder as the Hub ships it: a sentencepiece `tokenizer.model` wins (the original
    of Llama-2-family folders that ship both), a tiktoken one does not (Llama 3's original/)."""
    cfg = read_folder_config(str(p))
    model, js = p / "tokenizer.model", p / "tokenizer.json"
    if model.is_file() and not (is_tiktoken(str(model)) and js.is_file()):
        return SentencePieceTokenizer(model, cfg)
    if js.is_file():
        return HFTokenizer(js, cfg)
    if (p / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    models = sorted(p.glob("*.model"))
    if len(models) == 1:
        return SentencePieceTokenizer(models[0], cfg)
    hint = ""
    if (p / "vocab.json").is_file() or (p / "merges.txt").is_file():
        hint = (" (vocab.json + merges.txt alone are the slow format: "
                "save the tokenizer with transformers to get tokenizer.json)")
    elif (p / "original" / "tokenizer.model").is_file():
        hint = f" ({p / 'original'} holds a tiktoken model, which Spindle does not read)"
    raise SpindleError(f"{p}: folder holds no tokenizer.model, tokenizer.json or {BYTE_TOKENIZER_FILE}{hint}")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """`spec`: "default" (the packaged sentencepiece model), "byte", a `.model` file, a `tokenizer.json`, or a folder
    holding one of those with its Hub config files (spindle.data.hub_tokenizer). No code from the folder ever runs."""
    spec_s = str(spec)
    if spec_s == "byte":
        return ByteTokenizer()
    if spec_s == "default":
        if not DEFAULT_TOKENIZER_PATH.exists():
            raise SpindleError(f"{DEFAULT_TOKENIZER_PATH}: the packaged default tokenizer is missing "
                               "(run tools/make_default_tokenizer.py)")
        return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)
    p = Path(spec_s).expanduser()
    if p.is_dir():
        return _load_folder(p)
    if not p.exists():
        raise SpindleError(f"{p}: tokenizer not found (expected a path, 'default' or 'byte')")
    if not os.access(p, os.R_OK):
        raise SpindleError(f"{p}: tokenizer file is not readable")
    if p.suffix == ".json":
        if p.name == BYTE_TOKENIZER_FILE:
            return ByteTokenizer()
        return HFTokenizer(p)
    return SentencePieceTokenizer(p, read_folder_config(str(p.parent)))
