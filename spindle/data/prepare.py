"""Raw text -> token files: `spindle prepare` (binary shards) and the engine of tools/tokenizer.py.

Pipeline: the main process reads inputs and cuts them into ~256 KiB batches of raw documents
(or raw JSON lines, spindle.data.documents); a pool of worker processes, each with its own
tokenizer, extracts the text, batch-encodes it, wraps each document (`Tokenizer.document`) and
returns ready-to-write bytes (numpy tokens, or rendered JSON lines); the main process writes
results in input order. JSON parsing and output rendering happen in the workers because on short
documents they cost as much as tokenization itself.
"""

from __future__ import annotations

import collections
import functools
import itertools
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from spindle.data.documents import Batch, all_batches, expand_inputs, extract_documents
from spindle.outputs import StagedFolder, check_output
from spindle.data.shard_writers import ShardWriter, write_manifest
from spindle.data.shards import IDX_EXT, MANIFEST, MASK_EXT, TOKENS_EXT, token_dtype
from spindle.data.tokenizer import Tokenizer, load_tokenizer
from spindle.data.tokenizer_identity import SIDECAR_SUFFIX, write_sidecar
from spindle.errors import SpindleError

MAX_SHARD_MB = 1 << 20  # 1 TiB
MAX_TOKENS = (1 << 31) - 1


# ------------------------------------------------------------------------------ encode workers


@dataclass
class EncodeOptions:
    tokenizer_spec: str
    text_key: str = "text"
    output: str = "shards"  # "shards": numpy tokens; "json": rendered InternEvo lines
    min_length: int = 0
    num_threads: int = 1


@dataclass
class Encoded:
    nbytes: int  # input bytes consumed (progress)
    lengths: np.ndarray  # tokens per kept document (BOS/EOS included)
    tokens: np.ndarray | None  # shards: all kept documents back to back
    lines: bytes | None  # json: the rendered lines of the kept documents, back to back
    line_bytes: np.ndarray | None  # json: byte length of each of those lines
    dropped: int  # documents shorter than min_length


def encode_batch(tok: Tokenizer, opts: EncodeOptions, batch: Batch) -> Encoded:
    docs = extract_documents(batch, opts.text_key)
    # Encode each distinct text once: short-line corpora (code, logs, chat) repeat many lines,
    # and hashing a string is far cheaper than tokenizing it. Exact: same ids either way.
    uniq = list(dict.fromkeys(docs))
    ids = tok.encode_batch(uniq, num_threads=opts.num_threads) if uniq else []
    if len(uniq) < len(docs):
        by_text = dict(zip(uniq, ids))
        ids = [by_text[d] for d in docs]
    bos, eos = tok.bos_id, tok.eos_id
    extra = 1 if bos is None else 2  # the wrapping of Tokenizer.document: [BOS] ids [EOS], no BOS without one
    if opts.min_length > 0:
        kept = [x for x in ids if len(x) + extra >= opts.min_length]
        dropped, ids = len(ids) - len(kept), kept
    else:
        dropped = 0
    inner = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    lengths = inner + extra
    # Lay out Tokenizer.document(ids) back to back with vectorised writes rather than per-document lists.
    dtype = token_dtype(tok.vocab_size)
    total = int(lengths.sum())
    flat = np.empty(total, dtype=dtype)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    body = np.ones(total, dtype=bool)
    body[ends - 1] = False
    flat[ends - 1] = eos
    if bos is not None:
        body[starts] = False
        flat[starts] = bos
    flat[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(inner.sum()))
    if opts.output == "json":
        blob, line_bytes = render_json_lines(flat, lengths, tok.vocab_size)
        return Encoded(batch.nbytes, lengths, None, blob, line_bytes, dropped)
    return Encoded(batch.nbytes, lengths, flat, None, None, dropped)


_JSON_HEAD = np.frombuffer(b'{"tokens": [', dtype=np.uint8)


@functools.lru_cache(maxsize=4)  # a pure function of vocab_size, built once per process
def _json_pieces(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every id's bytes in a JSON line, by position: [middle, first, last, only] x vocab rows of a
    fixed width, zero-padded (ids have no zero bytes), and their lengths (4, vocab)."""
    head = '{"tokens": ['
    forms = [("", ", "), (head, ", "), ("", "]}\n"), (head, "]}\n")]
    width = len(head) + len(str(vocab_size - 1)) + 3
    table = np.zeros((4, vocab_size, width), dtype=np.uint8)
    sizes = np.zeros((4, vocab_size), dtype=np.int64)
    for f, (pre, post) in enumerate(forms):
        for i in range(vocab_size):
            b = (pre + str(i) + post).encode("ascii")
            table[f, i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
            sizes[f, i] = len(b)
    return table, sizes


def render_json_lines(flat: np.ndarray, lengths: np.ndarray, vocab_size: int) -> tuple[bytes, np.ndarray]:
    """InternEvo's `.bin` lines for documents laid out back to back in `flat` (lengths per document,
    each >= 1): the bytes of `json.dumps({"tokens": doc}) + "\n"` for every document, concatenated,
    and each line's byte length.

    Vectorised: each token becomes a fixed-width, zero-padded record of its bytes (its id with
    ", ", or with the line's head / tail when it is first / last), and the padding is dropped in
    one pass. Replaces Python `str`/`join` per token (docs/LOG.md).
    """
    table, sizes = _json_pieces(vocab_size)
    tokens = flat.astype(np.int64)
    ends = np.cumsum(lengths)
    form = np.zeros(len(tokens), dtype=np.int64)  # 0 middle, 1 first, 2 last, 3 only
    form[ends - lengths] += 1
    form[ends - 1] += 2
    records = table[form, tokens]
    kept = records.ravel()
    line_bytes = np.add.reduceat(sizes[form, tokens], ends - lengths) if len(lengths) else np.zeros(0, np.int64)
    return kept[kept != 0].tobytes(), line_bytes


class _WorkerState:
    """Per-worker-process tokenizer, created once by the pool initializer. This is process-local
    by construction (each worker is its own process); nothing else reads it."""

    tok: Tokenizer | None = None
    opts: EncodeOptions | None = None


def _init_worker(opts: EncodeOptions) -> None:
    _WorkerState.opts = opts
    _WorkerState.tok = load_tokenizer(opts.tokenizer_spec)


def _work(batch: Batch) -> Encoded:
    return encode_batch(_WorkerState.tok, _WorkerState.opts, batch)


def run_encode(batches: Iterator[Batch], opts: EncodeOptions, workers: int,
               tok: Tokenizer | None = None) -> Iterator[Encoded]:
    """Encode batches in input order. workers <= 1 runs inline (no process start-up cost);
    otherwise a pool with a bounded window of in-flight tasks, so memory stays flat however
    large the input is."""
    if workers <= 1:
        tok = tok or load_tokenizer(opts.tokenizer_spec)
        for b in batches:
            yield encode_batch(tok, opts, b)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
        window: collections.deque = collections.deque()
        for b in batches:
            window.append(pool.apply_async(_work, (b,)))
            if len(window) >= 2 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


def _progress(total_bytes: int, label: str):
    """A rich progress bar on a terminal; a no-op elsewhere (logs, pipes, tests)."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    prog = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=None, transient=False)
    return prog


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def is_prepare_output(name: str) -> bool:
    """Files a `spindle prepare` output folder holds (replaced by `--overwrite`)."""
    return name == MANIFEST or name.endswith((TOKENS_EXT, IDX_EXT, MASK_EXT, ".bin", ".bin.meta",
                                              ".bin" + SIDECAR_SUFFIX))


def prepare(
    inputs: Sequence[str],
    out_dir: str,
    tokenizer_spec: str = "default",
    text_key: str = "text",
    workers: int | None = None,
    shard_size_mb: float = 256,
    min_length: int = 0,
    overwrite: bool = False,
    doc_per_file: bool = False,
    raw_json_line: bool = False,
    progress: bool = True,
    split: str | None = None,
    subset: str | None = None,
) -> dict:
    """Tokenize `inputs` (files or folders) into binary shards + manifest.json in `out_dir`.
    Returns a summary dict (documents, tokens, shards, dropped, seconds, rates, and `taken`: the
    split chosen in each Hub dataset folder, see `expand_inputs`)."""
    t0 = time.perf_counter()
    taken: dict = {}
    files = expand_inputs(inputs, split, subset, taken)
    check_output(out_dir, inputs, overwrite, "--out")
    tok = load_tokenizer(tokenizer_spec)
    workers = default_workers() if not workers else workers
    with StagedFolder(out_dir, replaces=is_prepare_output, overwrite=overwrite, option="--out",
                      command="spindle prepare") as staging:
        summary = _prepare_into(staging, files, tok, str(tokenizer_spec), text_key, workers, shard_size_mb,
                                min_length, doc_per_file, raw_json_line, progress, inputs)
    secs = time.perf_counter() - t0
    docs, toks = summary["documents"], summary["tokens"]
    return summary | {
        "taken": taken,
        "out_dir": out_dir,
        "manifest": os.path.join(out_dir, MANIFEST),
        "seconds": secs,
        "docs_per_s": docs / secs if secs else 0.0,
        "tokens_per_s": toks / secs if secs else 0.0,
    }


def _prepare_into(out_dir: str, files: list[str], tok: Tokenizer, tokenizer_spec: str, text_key: str, workers: int,
                  shard_size_mb: float, min_length: int, doc_per_file: bool, raw_json_line: bool, progress: bool,
                  inputs: Sequence[str]) -> dict:
    opts = EncodeOptions(tokenizer_spec, text_key=text_key, output="shards", min_length=min_length)
    total_bytes = sum(os.path.getsize(f) for f in files)
    shard_bytes = max(1, int(shard_size_mb * (1 << 20)))
    shards: list[dict] = []
    writer: ShardWriter | None = None
    dropped = 0
    prog = _progress(total_bytes, "prepare") if progress else None
    task = prog.add_task("prepare", total=total_bytes) if prog else None
    if prog:
        prog.start()
    try:
        for enc in run_encode(all_batches(files, text_key, raw_json_line, doc_per_file), opts, workers, tok):
            dropped += enc.dropped
            if len(enc.lengths):
                if writer is None:
                    writer = ShardWriter(out_dir, f"shard-{len(shards):05d}", tok.vocab_size)
                writer.add_many(enc.lengths, enc.tokens)
                if writer.nbytes >= shard_bytes:
                    shards.append(writer.close())
                    writer = None
            if prog:
                prog.update(task, advance=enc.nbytes)
        if writer is not None:
            shards.append(writer.close())
    finally:
        if prog:
            prog.stop()
    if not shards:
        raise SpindleError(f"no documents found in {', '.join(map(str, inputs))}"
                           + (f" ({dropped} shorter than --min-length)" if dropped else ""))
    write_manifest(out_dir, tok.identity(), shards, bos_eos=True,
                   sources=[os.path.abspath(f) for f in files], min_length=min_length)
    return {
        "files": len(files),
        "input_bytes": total_bytes,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": len(shards),
        "dropped_short": dropped,
        "workers": workers,
    }


def write_json_bin(
    inputs: Sequence[str],
    bin_path: str,
    tokenizer_spec: str = "default",
    text_key: str = "text",
    raw_json_line: bool = False,
    workers: int | None = None,
    doc_per_file: bool = False,
) -> dict:
    """InternEvo `.bin` + int64 `.bin.meta` + the tokenizer's identity in `.bin.tokenizer.json` (the engine of
    tools/tokenizer.py)."""
    from spindle.data.shard_writers import JsonBinWriter

    t0 = time.perf_counter()
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer_spec)
    opts = EncodeOptions(str(tokenizer_spec), text_key=text_key, output="json")
    w = JsonBinWriter(bin_path)
    try:
        for enc in run_encode(all_batches(files, text_key, raw_json_line, doc_per_file), opts,
                              default_workers() if not workers else workers, tok):
            w.add_lines(enc.lines, enc.line_bytes, enc.lengths)
    except BaseException:
        w._f.close()
        os.remove(bin_path + ".tmp")
        raise
    res = w.close()
    res["tokenizer_record"] = write_sidecar(bin_path, tok.identity())  # beside the seed's bytes, not in them
    res["seconds"] = time.perf_counter() - t0
    return res
