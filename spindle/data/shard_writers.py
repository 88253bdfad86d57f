"""Writing token files: Spindle binary shards + manifest, and InternEvo `.bin` + `.bin.meta`
(formats in spindle.data.shards, which reads them)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from spindle.data.shards import FORMAT_NAME, FORMAT_VERSION, IDX_EXT, MANIFEST, MASK_EXT, TOKENS_EXT, token_dtype
from spindle.errors import SpindleError


def save_npy(file, array: np.ndarray) -> None:
    """`np.save(file, array)`, byte for byte, through Python's own file writes: numpy's `tofile` reports a
    full disk as an OSError without an errno ("N requested and M written"), which reads as a bug instead
    of the one line a full disk gets (spindle.outputs)."""
    array = np.ascontiguousarray(array)
    fmt = np.lib.format
    with open(file, "wb") if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as f:
        fmt.write_array_header_1_0(f, fmt.header_data_from_array_1_0(array))
        if array.size:  # (a view of no bytes cannot be cast)
            f.write(memoryview(array.reshape(-1)).cast("B"))


class ShardWriter:
    """Appends documents to one binary shard; `close()` writes the index and returns the shard's
    manifest entry. Data goes to `NAME.tokens.tmp` first so a crash never leaves a shard that
    looks complete."""

    def __init__(self, folder: str, name: str, vocab_size: int, with_loss_mask: bool = False):
        self.folder, self.name = folder, name
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.base = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)
        self._f = open(self.base + TOKENS_EXT + ".tmp", "wb")
        self._lengths: list[np.ndarray] = []
        self._masks: list[np.ndarray] | None = [] if with_loss_mask else None
        self.num_tokens = 0
        self.num_docs = 0

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize

    def add(self, tokens: Sequence[int] | np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        tokens = np.asarray(tokens)
        self.add_many(np.array([len(tokens)], np.int64), tokens, loss_mask)

    def add_many(self, lengths: np.ndarray, flat_tokens: np.ndarray, flat_mask: np.ndarray | None = None) -> None:
        """Append many documents at once: `flat_tokens` holds them back to back."""
        flat = np.asarray(flat_tokens)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise SpindleError(f"{self.base}{TOKENS_EXT}: token id out of range [0, {self.vocab_size})")
        if self._masks is not None:
            if flat_mask is None:
                flat_mask = np.ones(flat.size, dtype=bool)
            self._masks.append(np.asarray(flat_mask, dtype=bool))
        elif flat_mask is not None:
            raise ValueError("this shard was opened without a loss mask")
        self._f.write(flat.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.num_tokens += int(flat.size)
        self.num_docs += len(lengths)

    def close(self) -> dict:
        self._f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if int(offsets[-1]) != self.num_tokens:
            raise AssertionError("document lengths disagree with tokens written")
        save_npy(self.base + IDX_EXT, offsets)
        if self._masks is not None:
            mask = np.concatenate(self._masks) if self._masks else np.zeros(0, bool)
            with open(self.base + MASK_EXT, "wb") as f:
                f.write(np.packbits(mask, bitorder="little").tobytes())
        os.replace(self.base + TOKENS_EXT + ".tmp", self.base + TOKENS_EXT)
        return {
            "name": self.name,
            "file": self.name + TOKENS_EXT,
            "dtype": self.dtype.str,
            "documents": self.num_docs,
            "tokens": self.num_tokens,
            "loss_mask": self._masks is not None,
        }


def write_manifest(folder: str, tokenizer_identity: dict | None, shards: list[dict], **extra) -> str:
    """One manifest per output folder (atomic write)."""
    dtypes = sorted({s["dtype"] for s in shards})
    man = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer_identity,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        **extra,
    }
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(man, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def json_line(tokens: Iterable[int]) -> bytes:
    """Exactly `json.dumps({"tokens": tokens}) + "\\n"` (default separators), built without
    json.dumps because this is the hot loop of writing `.bin` files."""
    return ('{"tokens": [' + ", ".join(map(str, tokens)) + "]}\n").encode("ascii")


class JsonBinWriter:
    """Writes InternEvo `.bin` + int64 `.bin.meta` (int64 so offsets past 2 GiB survive).
    The meta is built from the bytes written, without re-reading the file."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path + ".tmp", "wb")
        self._rows: list[np.ndarray] = []  # (n, 2) blocks of (byte offset, token count)
        self._pos = 0

    def add(self, tokens: Sequence[int]) -> None:
        line = json_line(tokens)
        self._f.write(line)
        self._rows.append(np.array([[self._pos, len(tokens)]], dtype=np.int64))
        self._pos += len(line)

    def add_lines(self, blob: bytes, line_bytes: np.ndarray, counts: np.ndarray) -> None:
        """Append pre-rendered `json_line`s (rendered in worker processes): their bytes back to
        back, each line's byte length and token count."""
        ends = self._pos + np.cumsum(line_bytes, dtype=np.int64)
        self._rows.append(np.stack([ends - line_bytes, np.asarray(counts, dtype=np.int64)], axis=1))
        self._f.write(blob)
        self._pos = int(ends[-1]) if len(ends) else self._pos

    @property
    def num_docs(self) -> int:
        return sum(len(r) for r in self._rows)

    def close(self) -> dict:
        self._f.close()
        meta = np.concatenate(self._rows) if self._rows else np.zeros((0, 2), dtype=np.int64)
        with open(self.path + ".meta.tmp", "wb") as f:
            save_npy(f, meta)
        os.replace(self.path + ".tmp", self.path)
        os.replace(self.path + ".meta.tmp", self.path + ".meta")
        return {"path": self.path, "documents": len(meta), "tokens": int(meta[:, 1].sum()) if len(meta) else 0}
