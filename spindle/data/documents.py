"""Raw inputs -> documents: which files an input names, and how a file becomes documents
(read in batches by the main process of `spindle prepare`, split into documents in its workers).

Document units (the seed's rules, reference/internevo.md §1.2):
- `.txt`: every non-empty stripped line is one document;
- `.json`: a top-level list of records, `.jsonl`: one record per line; the `text_key` field is
  the document (`raw_json_line=True` tokenizes the whole JSON text like InternEvo does);
- `.parquet`: the `text_key` column;
- any other extension (source code, markdown, ...) or `doc_per_file=True`: one file = one document.
`.gz` variants of all of these are read transparently.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from spindle.data.files import unique_files, walk_files
from spindle.data.hub import is_hub_dataset, split_files
from spindle.errors import SpindleError
from spindle.extras import require

LINE_FORMATS = (".txt", ".json", ".jsonl", ".parquet")
LINE_FORMATS_KINDS = tuple(ext[1:] for ext in LINE_FORMATS)
# Per worker task: large enough to amortise IPC, small enough that the last tasks do not leave a
# core idle (1 MiB tasks: an 8 MB input ran 9 tasks on 2 workers, one alone at the end; 256 KiB
# measured 7 % faster, docs/LOG.md)
BATCH_BYTES = 1 << 18


@dataclass
class Batch:
    """A unit of work: raw items from one file, with the line/record number of the first."""

    path: str
    first: int  # 1-based line (txt/jsonl) or record index (json/parquet) of items[0]
    mode: str  # "docs": items is a list of documents; "txt" / "jsonl" / "jsonl_raw": raw bytes
    items: list | bytes
    nbytes: int


def input_kind(path: str, doc_per_file: bool = False) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if doc_per_file or ext not in LINE_FORMATS:
        return "file"
    return ext[1:]


def expand_inputs(inputs: Sequence[str], split: str | None = None, subset: str | None = None,
                  taken: dict | None = None) -> list[str]:
    """Files as given, folders walked recursively (sorted; hidden files and `*.lock` skipped; each
    real file once, however the folders link into themselves or each other).

    A folder downloaded from the Hub (spindle.data.hub.is_hub_dataset), or any folder when
    `split` / `subset` are given, contributes the files of one split (default "train") of one
    config instead: never its card, its other splits or configs. `taken[folder] = (split, files)`
    records what was chosen there, for the user to see."""
    out = []
    for p in inputs:
        p = os.fspath(p)
        if os.path.isdir(p) and (split is not None or subset is not None or is_hub_dataset(p)):
            files = split_files(p, split or "train", subset)
            odd = [f for f in files if input_kind(f) not in LINE_FORMATS_KINDS]
            if odd:
                raise SpindleError(f"{odd[0]}: split {split or 'train'!r} of {p} is in a format prepare does not "
                                   f"read (it reads {', '.join(LINE_FORMATS)}, optionally .gz)")
            out.extend(files)
            if taken is not None:
                taken[p] = (split or "train", files)
        elif os.path.isdir(p):
            out.extend(walk_files(p, skip_hidden=True, keep=lambda f: not f.endswith(".lock")))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise SpindleError(f"{p}: input not found")
    if not out:
        raise SpindleError(f"no input files in {', '.join(map(str, inputs))}")
    return unique_files(out)  # the same file named twice (or a folder and a file in it) is read once


def _open_binary(path: str):
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise SpindleError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode(path: str, data: bytes, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise SpindleError(f"{path}: line {line}: invalid UTF-8 ({e.reason} at byte {col} of the line)") from None


def _iter_byte_blocks(path: str, block: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(first line number, raw bytes) over a text file, in blocks cut after a newline. The main
    process only reads and counts newlines; decoding and splitting happen in the workers."""
    block = block or BATCH_BYTES
    line_no = 1
    tail = b""
    try:
        with _open_binary(path) as f:
            while True:
                data = f.read(block)
                if not data:
                    break
                data = tail + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    tail = data
                    continue
                data, tail = data[:cut], data[cut:]
                yield line_no, data
                line_no += data.count(b"\n")
            if tail:
                yield line_no, tail
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SpindleError(f"{path}: cannot read ({e})") from None


def _split_lines(path: str, data: bytes, first_line: int) -> list[str]:
    """Lines of a block with universal newlines (\r\n, \r, \n), like a text-mode file."""
    text = _decode(path, data, first_line)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _chunks(path: str, first: int, mode: str, items: list, size_of) -> Iterator[Batch]:
    start, nbytes = 0, 0
    for j, it in enumerate(items):
        nbytes += size_of(it)
        if nbytes >= BATCH_BYTES:
            yield Batch(path, first + start, mode, items[start : j + 1], nbytes)
            start, nbytes = j + 1, 0
    if start < len(items):
        yield Batch(path, first + start, mode, items[start:], nbytes)


def _read_whole(path: str) -> bytes:
    with _open_binary(path) as f:
        try:
            return f.read()
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise SpindleError(f"{path}: cannot read ({e})") from None


def iter_batches(path: str, text_key: str = "text", raw_json_line: bool = False,
                 doc_per_file: bool = False) -> Iterator[Batch]:
    """Cut one input file into batches of raw documents (see the module docstring for units)."""
    kind = input_kind(path, doc_per_file)
    if kind == "file":
        data = _read_whole(path)
        text = _decode(path, data, 1)
        if text.strip():
            yield Batch(path, 1, "docs", [text], len(data))
    elif kind == "txt":
        for first, data in _iter_byte_blocks(path):
            yield Batch(path, first, "txt", data, len(data))
    elif kind == "jsonl":
        for first, data in _iter_byte_blocks(path):
            yield Batch(path, first, "jsonl_raw" if raw_json_line else "jsonl", data, len(data))
    elif kind == "json":
        data = _read_whole(path)
        try:
            records = json.loads(_decode(path, data, 1))
        except ValueError as e:
            raise SpindleError(f"{path}: malformed JSON ({e})") from None
        if not isinstance(records, list):
            raise SpindleError(f"{path}: expected a top-level JSON list of records, got {type(records).__name__}")
        if raw_json_line:
            docs = [json.dumps(r) for r in records]
        else:
            docs = [_field(path, "record", i, r, text_key) for i, r in enumerate(records)]
        yield from _chunks(path, 0, "docs", docs, len)
    elif kind == "parquet":
        yield from _parquet_batches(path, text_key)


def _parquet_batches(path: str, text_key: str) -> Iterator[Batch]:
    pa = require("pyarrow", "hf", "reading parquet files")
    pq = require("pyarrow.parquet", "hf", "reading parquet files")

    try:
        src = pa.BufferReader(gzip.open(path).read()) if path.endswith(".gz") else path
        pf = pq.ParquetFile(src)
    except (OSError, pa.ArrowException) as e:
        raise SpindleError(f"{path}: not a readable parquet file ({e})") from None
    if text_key not in pf.schema_arrow.names:
        raise SpindleError(f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for rb in pf.iter_batches(batch_size=16384, columns=[text_key]):
        col = rb.column(0).to_pylist()
        for i, v in enumerate(col):
            if not isinstance(v, str):
                raise SpindleError(f"{path}: row {row + i}: column {text_key!r} is {type(v).__name__}, "
                                   "expected a string")
        yield from _chunks(path, row, "docs", col, len)
        row += len(col)


def _field(path: str, unit: str, n: int, record, key: str) -> str:
    if not isinstance(record, dict) or key not in record:
        raise SpindleError(f"{path}: {unit} {n}: no {key!r} field (use --text_key / --text-key, or --raw_json_line)")
    v = record[key]
    if not isinstance(v, str):
        raise SpindleError(f"{path}: {unit} {n}: field {key!r} is {type(v).__name__}, expected a string")
    return v


def extract_documents(batch: Batch, text_key: str) -> list[str]:
    """The documents of a batch (runs in the workers: decoding and JSON parsing parallelise)."""
    if batch.mode == "docs":
        return batch.items
    lines = _split_lines(batch.path, batch.items, batch.first)
    if batch.mode == "txt":
        return [s for s in (x.strip() for x in lines) if s]
    if batch.mode == "jsonl_raw":
        # InternEvo tokenizes the raw line, trailing newline included.
        return [x + "\n" for x in lines if x.strip()]
    docs = []
    for n, line in enumerate(lines, batch.first):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise SpindleError(f"{batch.path}: line {n}: malformed JSON ({e})") from None
        docs.append(_field(batch.path, "line", n, rec, text_key))
    return docs


def all_batches(files: list[str], text_key: str, raw_json_line: bool, doc_per_file: bool) -> Iterator[Batch]:
    for f in files:
        yield from iter_batches(f, text_key, raw_json_line, doc_per_file)
