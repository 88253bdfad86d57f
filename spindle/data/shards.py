"""Token files on disk: InternEvo `.bin`/`.bin.meta` and Spindle binary shards, one reader interface.

InternEvo `.bin` (docs/formats, reference/internevo.md §1.2): UTF-8 JSON lines
`{"tokens": [...]}` + `.bin.meta`, an `.npy` (N, 2) of (byte offset, token count); int32 in the
seed's tokenizer, int64 in its alpaca tool and in what we write. Negative ids mean "no loss"
(InternEvo SFT): readers return abs(ids) and a loss mask.

Spindle binary shard `NAME`:
- `NAME.tokens`   raw little-endian uint16 (vocab <= 65535) or uint32 token ids, documents back to back;
- `NAME.idx.npy`  int64 offsets (N+1) in tokens, offsets[0] == 0, offsets[-1] == token count;
- `NAME.mask`     optional, SFT only: np.packbits(loss_mask, bitorder="little") over all tokens;
- `manifest.json` one per folder: format version, tokenizer identity, dtype, per-shard counts.

Loss-mask semantics everywhere: mask[j] is True when token j is a *target* (its prediction
from token j-1 counts in the loss); `None` means every token counts.

Every check runs when a file is opened, so a bad file stops a run before training starts
rather than crashing a data-loader worker hours in.
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Sequence

import numpy as np

from spindle.data.files import walk_files
from spindle.errors import SpindleError

FORMAT_NAME = "spindle-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_EXT = ".tokens"
IDX_EXT = ".idx.npy"
MASK_EXT = ".mask"
JSON_EXT = ".bin"
META_EXT = ".bin.meta"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class WatchedFile:
    """A token file read by offset (`os.pread`), never memory-mapped: a file truncated under an
    mmap kills the process with SIGBUS on the next access, while a short or changed read here is
    an error that names the file. Every read opens the file and compares what it finds with the
    (device, inode, size, mtime) of the first open, so a file truncated, rewritten in place or
    replaced while a run trains stops the run with one message (3.8 us per read against 0.6 us
    for an mmap slice, docs/LOG.md). No descriptor stays open: a folder of thousands of files
    does not run into the open-file limit."""

    def __init__(self, path: str):
        self.path = path
        fd = self._open()
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.size = st.st_size
        self._sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise SpindleError(f"{self.path}: token file disappeared while this run reads it") from None
        except OSError as e:
            raise SpindleError(f"{self.path}: cannot read ({e.strerror})") from None

    def read(self, offset: int, nbytes: int) -> bytes:
        fd = self._open()
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._sig:
                what = "truncated" if st.st_size < self.size else "rewritten or replaced"
                raise SpindleError(f"{self.path}: token file {what} while this run reads it "
                                   f"({self.size} -> {st.st_size} bytes); data must not change under a running job")
            data = os.pread(fd, nbytes, offset)
        except OSError as e:
            raise SpindleError(f"{self.path}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        if len(data) != nbytes:
            raise SpindleError(f"{self.path}: token file truncated while this run reads it "
                               f"(read {len(data)} of {nbytes} bytes at {offset})")
        return data

    def blocks(self, block: int = 1 << 24):
        """(offset, bytes) over the whole file in `block`-sized reads (flat memory for big files)."""
        for off in range(0, self.size, block):
            yield off, self.read(off, min(block, self.size - off))


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SpindleError(f"{path}: missing (every token file needs its index)") from None
    except Exception as e:  # noqa: BLE001 - a damaged header raises SyntaxError/TokenError/... inside numpy (fuzz)
        raise SpindleError(f"{path}: not a readable .npy index ({type(e).__name__}: {e})") from None


class DocumentSource:
    """Random access to tokenized documents.

    `src[i] -> (tokens int64 array, loss_mask bool array or None)`; `len(src)`; `src.lengths`
    (int64 token counts, aligned with indices); `src.path`; `src.skipped` (documents dropped by
    `on_error="skip"`); `src.num_tokens`.
    """

    path: str
    lengths: np.ndarray
    skipped: int = 0
    has_loss_mask: bool = False

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, docs={len(self)}, skipped={self.skipped})"


def _fail_or_count(on_error: str, msg: str) -> None:
    if on_error == "raise":
        raise SpindleError(msg)


class BinaryShard(DocumentSource):
    """Spindle binary shard. A document is one `pread` of its token range (WatchedFile), read
    with `np.frombuffer` (no np.memmap: besides SIGBUS, its subclass overhead makes per-document
    slicing as slow as JSON, cpu-baselines.md §4)."""

    def __init__(self, path: str, vocab_size: int | None = None, on_error: str = "raise"):
        base = path[: -len(TOKENS_EXT)] if path.endswith(TOKENS_EXT) else path
        self.path = base + TOKENS_EXT
        idx_path = base + IDX_EXT
        if not os.path.exists(self.path):
            raise SpindleError(f"{self.path}: shard not found")
        offsets = _load_npy(idx_path)
        if offsets.ndim != 1 or offsets.size < 1 or offsets.dtype.kind not in "iu":
            raise SpindleError(f"{idx_path}: expected a 1-D integer offsets array, got {offsets.dtype} {offsets.shape}")
        offsets = offsets.astype(np.int64, copy=False)
        self._file = WatchedFile(self.path)
        size = self._file.size
        total = int(offsets[-1])
        if size == 0 or total == 0:
            raise SpindleError(f"{self.path}: empty shard (no tokens)")
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise SpindleError(f"{idx_path}: offsets must start at 0 and never decrease")
        manifest_dtype = self._manifest_dtype(os.path.dirname(self.path), os.path.basename(base))
        # The dtype follows from the sizes alone; the manifest, when present, must agree.
        if size % total or size // total not in (2, 4):
            raise SpindleError(f"{self.path}: size {size} bytes does not fit {total} tokens of 2 or 4 bytes "
                               f"(index {idx_path} disagrees)")
        self.dtype = np.dtype("<u2") if size // total == 2 else np.dtype("<u4")
        if manifest_dtype is not None and np.dtype(manifest_dtype) != self.dtype:
            raise SpindleError(f"{self.path}: manifest says {manifest_dtype} but size implies {self.dtype}")
        self._mask_file = None
        mask_path = base + MASK_EXT
        if os.path.exists(mask_path):
            self._mask_file = WatchedFile(mask_path)
            need = (total + 7) // 8
            if self._mask_file.size != need:
                raise SpindleError(f"{mask_path}: loss mask has {self._mask_file.size} bytes, expected {need}")
            self.has_loss_mask = True
        keep = np.ones(len(offsets) - 1, dtype=bool)
        if vocab_size is not None:
            # One vectorised pass over the file: cheap compared with training on bad ids.
            bad_pos, first_bad = self._ids_out_of_range(vocab_size)
            if len(bad_pos):
                bad_docs = np.unique(np.searchsorted(offsets, bad_pos, side="right") - 1)
                _fail_or_count(on_error, f"{self.path}: {len(bad_docs)} document(s) hold token ids "
                               f">= vocab size {vocab_size} "
                               f"(first: document {int(bad_docs[0])}, id {first_bad})")
                keep[bad_docs] = False
        self.offsets = offsets
        self.skipped = int((~keep).sum())
        self._index = None if keep.all() else np.flatnonzero(keep)
        self.lengths = np.diff(offsets) if self._index is None else np.diff(offsets)[self._index]

    def _ids_out_of_range(self, vocab_size: int) -> tuple[np.ndarray, int]:
        """Token positions holding ids >= vocab_size, and the first such id (-1 if none)."""
        bad, first = [], -1
        for off, data in self._file.blocks():
            arr = np.frombuffer(data, dtype=self.dtype)
            if int(arr.max()) >= vocab_size:
                pos = np.flatnonzero(arr >= vocab_size)
                first = int(arr[pos[0]]) if first < 0 else first
                bad.append(pos + off // self.dtype.itemsize)
        return (np.concatenate(bad) if bad else np.zeros(0, np.int64)), first

    @staticmethod
    def _manifest_dtype(folder: str, name: str) -> str | None:
        mpath = os.path.join(folder, MANIFEST)
        if not os.path.exists(mpath):
            return None
        man = read_manifest(folder)
        dtype = man.get("dtype")
        for shard in man.get("shards", []):
            if isinstance(shard, dict) and shard.get("name") == name:
                dtype = shard.get("dtype", dtype)
                break
        if dtype is not None and dtype not in ("<u2", "<u4", "uint16", "uint32"):
            raise SpindleError(f"{mpath}: token dtype {dtype!r} is not one Spindle writes (<u2 or <u4)")
        return dtype

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._index is not None:
            i = self._index[i]
        a = self.offsets[i]
        b = self.offsets[i + 1]
        a, b = int(a), int(b)
        size = self.dtype.itemsize
        tokens = np.frombuffer(self._file.read(a * size, (b - a) * size), dtype=self.dtype).astype(np.int64)
        if self._mask_file is None:
            return tokens, None
        lo, hi = a >> 3, (b + 7) >> 3
        bits = np.unpackbits(np.frombuffer(self._mask_file.read(lo, hi - lo), dtype=np.uint8), bitorder="little")
        return tokens, bits[a & 7 : (a & 7) + (b - a)].astype(bool)


class JsonBin(DocumentSource):
    """InternEvo `.bin` + `.bin.meta`. Opening parses every line once (validation); a read is then
    one `pread` of the line (WatchedFile) + json.loads, like InternEvo's JsonlDataset."""

    def __init__(self, path: str, vocab_size: int | None = None, on_error: str = "raise"):
        self.path = path
        meta_path = path + ".meta"
        if not os.path.exists(path):
            raise SpindleError(f"{path}: file not found")
        meta = _load_npy(meta_path)
        if meta.ndim != 2 or meta.shape[1] != 2 or meta.dtype.kind not in "iu":
            raise SpindleError(f"{meta_path}: expected an integer (N, 2) array of (byte offset, token count), "
                               f"got {meta.dtype} {meta.shape}")
        meta = meta.astype(np.int64, copy=False)
        self._file = WatchedFile(path)
        size = self._file.size
        if size == 0 or len(meta) == 0:
            raise SpindleError(f"{path}: empty file (no documents)")
        # Full parse: line starts, token counts, negative ids (SFT masks), vocab range.
        starts, counts, has_neg, bad_lines = self._scan(vocab_size, on_error)
        line_ends = starts[1:] + [size]
        line_no = {int(s): n for n, s in enumerate(starts, 1)}
        bad_starts = {int(starts[n - 1]) for n in bad_lines}
        keep = []
        for row, (off, cnt) in enumerate(meta.tolist()):
            n = line_no.get(off)
            if off < 0 or off >= size:
                _fail_or_count(on_error, f"{meta_path}: row {row} points at byte {off}, outside {path} ({size} bytes)")
            elif n is None:
                _fail_or_count(on_error, f"{meta_path}: row {row} offset {off} is not the start of a line in {path}")
            elif off in bad_starts:
                pass  # already reported / counted by _scan
            elif counts[n - 1] != cnt:
                _fail_or_count(on_error, f"{meta_path}: row {row} says {cnt} tokens "
                               f"but {path} line {n} holds {counts[n - 1]}")
            else:
                keep.append(row)
                continue
        self.skipped = len(meta) - len(keep)
        if not keep:
            raise SpindleError(f"{path}: no valid documents ({self.skipped} skipped)")
        meta = meta[keep]
        self._offsets = meta[:, 0].tolist()
        self._ends = [line_ends[line_no[off] - 1] for off in self._offsets]
        self.lengths = meta[:, 1].copy()
        self.has_loss_mask = has_neg

    def _scan(self, vocab_size, on_error):
        starts, counts, bad = [], [], []
        has_neg = False
        pos, n = 0, 0
        with open(self.path, "rb") as f:  # buffered reads: a file cut short here ends the scan, no SIGBUS
            for line in f:
                n += 1
                starts.append(pos)
                pos += len(line)
                problem = None
                try:
                    obj = json.loads(line)
                    toks = obj.get("tokens") if isinstance(obj, dict) else None  # no KeyError on {"x": ..} (fuzz)
                    if not isinstance(toks, list) or not all(type(t) is int for t in toks):
                        problem = 'expected {"tokens": [int, ...]}'
                        toks = []
                except ValueError as e:
                    problem, toks = f"malformed JSON ({e})", []
                counts.append(len(toks))
                if problem is None and toks:
                    lo, hi = min(toks), max(toks)
                    if lo < 0:
                        has_neg = True
                    if vocab_size is not None and max(hi, -lo) >= vocab_size:
                        problem = f"token id {max(hi, -lo)} >= vocab size {vocab_size}"
                if problem is not None:
                    _fail_or_count(on_error, f"{self.path}: line {n}: {problem}")
                    bad.append(n)
        self._file.read(0, 0)  # the file must still be the one opened
        return starts, counts, has_neg, bad

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        # pread at an offset: no shared file position, so thread-safe.
        off = self._offsets[i]
        line = self._file.read(off, self._ends[i] - off)
        try:
            toks = np.array(json.loads(line)["tokens"], dtype=np.int64)
        except (ValueError, KeyError, TypeError):  # the scan at open parsed this line: the file changed since
            raise SpindleError(f"{self.path}: byte {off} no longer holds the document read at start; "
                               f"data must not change under a running job") from None
        if not self.has_loss_mask:
            return toks, None
        # InternEvo's collate maps labels <= 0 to -100, so id 0 is masked in SFT files too.
        return np.abs(toks), toks > 0


class ConcatSource(DocumentSource):
    """Several sources seen as one (a folder of shards)."""

    def __init__(self, path: str, sources: Sequence[DocumentSource]):
        self.path = path
        self.sources = list(sources)
        self.lengths = np.concatenate([s.lengths for s in self.sources]) if self.sources else np.zeros(0, np.int64)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources]).tolist()
        self.skipped = sum(s.skipped for s in self.sources)
        self.has_loss_mask = any(s.has_loss_mask for s in self.sources)

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        return self.sources[k][i - self._starts[k]]


def find_token_files(folder: str) -> list[str]:
    """All `.bin` and `.tokens` files under `folder` (recursive, following links, each real file
    once however the folder links into itself; sorted)."""
    if os.path.isfile(folder):
        return [folder]
    if not os.path.isdir(folder):
        raise SpindleError(f"{folder}: data folder not found")
    return sorted(walk_files(folder, keep=lambda f: f.endswith((JSON_EXT, TOKENS_EXT))))


def open_documents(path: str | os.PathLike, vocab_size: int | None = None, on_error: str = "raise") -> DocumentSource:
    """Open a `.bin`, a `.tokens` shard (or its base name), or a folder of them."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        files = find_token_files(path)
        if not files:
            raise SpindleError(f"{path}: no .bin or .tokens files found")
        return ConcatSource(path, [open_documents(f, vocab_size, on_error) for f in files])
    if path.endswith(JSON_EXT):
        return JsonBin(path, vocab_size, on_error)
    if path.endswith(TOKENS_EXT) or os.path.exists(path + TOKENS_EXT):
        return BinaryShard(path, vocab_size, on_error)
    if not os.path.exists(path):
        raise SpindleError(f"{path}: not found")
    raise SpindleError(f"{path}: not a token file (expected .bin or .tokens)")


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError:
        raise SpindleError(f"{path}: manifest not found") from None
    except (OSError, ValueError) as e:
        raise SpindleError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        raise SpindleError(f"{path}: not a {FORMAT_NAME} manifest")
    version = man.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SpindleError(f"{path}: \"version\" must be an integer, not {version!r}")
    if version > FORMAT_VERSION:
        raise SpindleError(f"{path}: format version {man.get('version')} is newer than this Spindle reads "
                           f"({FORMAT_VERSION})")
    return man
