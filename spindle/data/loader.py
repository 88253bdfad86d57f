"""From the `data` config section to batches: sources, packing, the global sampler, prefetch.

Sources: `train_folder/{cn,en,code,...}/**` holds token files (InternEvo `.bin`/`.bin.meta` or
Spindle binary shards); each top-level folder is one source whose type id is its index in the
sorted folder names. Token files placed directly in `train_folder` form a single source.
`train_folder=None` trains on seeded random documents, as InternEvo does. `type="text"` takes a
folder of raw text files, tokenizes it once into a cache of binary shards and reads those.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from spindle.config import DataConfig, parse_rampup
from spindle.data.files import check_fingerprints, fingerprint, relative_glob, tokenizer_key
from spindle.outputs import StagedFolder
from spindle.data.packing import PackedDocuments, RandomDocuments, collate, pack_of_spans
from spindle.data.sampler import GlobalSampler, TokenOrder, micro_num_at
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)


@dataclass
class Source:
    name: str
    type_id: int
    docs: object
    fingerprint: Optional[dict] = None  # files, sizes, manifests, tokenizer (None: generated data)


def _open_source(name: str, type_id: int, root: str, files: list[str], vocab_size: Optional[int]) -> Source:
    from spindle.data.shards import ConcatSource, open_documents

    tokenizers = _manifest_tokenizers(files)
    docs = ConcatSource(root, [open_documents(f, vocab_size=vocab_size) for f in files])
    ident = next(iter(tokenizers.values()), None)
    return Source(name, type_id, docs, fingerprint(name, root, files, ident))


def _manifest_tokenizers(files: list[str]) -> dict[str, dict]:
    """where -> tokenizer identity, for every manifest folder and `.bin` tokenizer record among `files`."""
    from spindle.data.tokenizer_identity import recorded_identities

    return recorded_identities(files)


def refuse_mixed_tokenizers(files: list[str], key: str) -> None:
    """Token files prepared with different tokenizers mean different things by the same id."""
    first: dict = {}
    for folder, ident in _manifest_tokenizers(files).items():
        tk = json.dumps(tokenizer_key(ident), sort_keys=True)
        first.setdefault(tk, folder)
        if len(first) > 1:
            (a, ka), (b, kb) = [(f, json.loads(k)) for k, f in first.items()]
            raise SpindleError(f"{key}: {a} and {b} were prepared with different tokenizers ({ka} vs {kb}); "
                               f"prepare every source with the same tokenizer")


def discover_sources(folder: str, vocab_size: Optional[int] = None) -> list[Source]:
    """Top-level sub-folders of `folder` are sources (sorted names -> type ids)."""
    from spindle.data.shards import find_token_files

    root = Path(folder)
    if not root.is_dir():
        raise SpindleError(f"data folder not found: {folder}")
    files = find_token_files(str(root))  # one walk: a file reachable from two sources belongs to one
    refuse_mixed_tokenizers(files, "data.train_folder")
    by_top: dict[str, list[str]] = {}
    for f in files:
        rel = Path(f).relative_to(root)
        by_top.setdefault("" if len(rel.parts) == 1 else rel.parts[0], []).append(f)
    groups = [(name, root / name, by_top[name]) for name in sorted(n for n in by_top if n)]
    if "" in by_top:  # token files directly in the folder: one more source, first
        groups.insert(0, (root.name, root, by_top[""]))
    if not groups:
        raise SpindleError(f"{folder}: no token files (.bin with .bin.meta, or Spindle shards) found")
    return [_open_source(name, i, str(src_root), fs, vocab_size) for i, (name, src_root, fs) in enumerate(groups)]


def leaf_sources(folder: str, vocab_size: Optional[int] = None) -> list[Source]:
    """One source per leaf folder holding token files (validation sets, named by the folder)."""
    from spindle.data.shards import find_token_files

    files = find_token_files(folder)
    if not files:
        raise SpindleError(f"{folder}: no token files found for validation")
    refuse_mixed_tokenizers(files, "data.valid_folder")
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(str(Path(f).parent), []).append(f)
    dirs = sorted(by_dir)
    names = [Path(d).name for d in dirs]
    # two leaves with the same folder name (a/en, b/en) would overwrite each other's metrics:
    # those are named by their path under `folder` instead (a_en, b_en)
    names = [n if names.count(n) == 1 else str(Path(d).relative_to(folder)).replace(os.sep, "_")
             for n, d in zip(names, dirs)]
    return [_open_source(name, 0, d, by_dir[d], vocab_size) for name, d in zip(names, dirs)]


def text_split(data: DataConfig) -> tuple[list[str], list[str]]:
    """(training files, held-out files) of a `type="text"` folder: `text_glob` minus `text_exclude`; the
    last files up to `text_valid_bytes` are held out (never trained on), the rest are trained on up to
    `max_text_bytes`."""
    root = Path(data.train_folder)
    if not root.is_dir():
        raise SpindleError(f"data.train_folder: text folder not found: {root}")
    files = [f for f in relative_glob(str(root), data.text_glob)
             if not any(part in data.text_exclude for part in Path(f).relative_to(root).parts)]
    held: list[str] = []
    if data.text_valid_bytes:
        total = 0
        while files and total + os.path.getsize(files[-1]) <= data.text_valid_bytes:
            total += os.path.getsize(files[-1])
            held.insert(0, files.pop())
        if not held:
            raise SpindleError(f"data.text_valid_bytes={data.text_valid_bytes}: the last file under {root} is "
                               f"larger ({os.path.getsize(files[-1]) if files else 0} bytes); raise it")
    if data.max_text_bytes is not None:
        kept, total = [], 0
        for f in files:
            size = os.path.getsize(f)
            if total + size > data.max_text_bytes:
                break
            kept.append(f)
            total += size
        files = kept
    if not files:
        raise SpindleError(f"data.train_folder: no files match {data.text_glob!r} under {root}"
                           + (" besides the held-out ones (data.text_valid_bytes)" if held else ""))
    return files, held


def text_files(data: DataConfig) -> list[str]:
    """The raw-text files trained on (`text_split`)."""
    return text_split(data)[0]


def text_cache(data: DataConfig, cache_root: Path, held_out: bool = False) -> str:
    """Tokenize a raw-text folder once into binary shards under `cache_root`; return the shard folder.

    The cache is keyed by the content of the files (path, size, mtime_ns of each) and the
    tokenizer's, so an edited file or another tokenizer re-tokenizes. Ranks that start together
    share one build: whoever takes the lock file builds into a staged folder and publishes it
    with one `os.replace` (files.StagedFolder); the others wait on the lock and find the published manifest. A file
    lock, not a barrier, so single-process runs and unrelated runs sharing a cache work the same.
    """
    from spindle.data.prepare import prepare
    from spindle.data.shards import MANIFEST
    from spindle.data.tokenizer import load_tokenizer

    files = text_split(data)[1 if held_out else 0]
    identity = load_tokenizer(data.tokenizer_path or "default").identity()
    content = [(f, st.st_size, st.st_mtime_ns) for f, st in ((f, os.stat(f)) for f in files)]
    key = hashlib.sha256(json.dumps([content, tokenizer_key(identity), identity.get("bos_id"),
                                     identity.get("eos_id")]).encode()).hexdigest()[:16]
    out = Path(cache_root) / f"text-{key}"
    name = "held_out" if held_out else "text"
    source_dir = out / name  # one source
    if (source_dir / MANIFEST).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"text-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (source_dir / MANIFEST).is_file():
            # DEBUG: a training run has always built its cache without a console line
            logger.debug("data: tokenizing %d text file(s) into %s", len(files), out)
            shutil.rmtree(out, ignore_errors=True)  # a cache folder without a manifest: an older crashed build
            with StagedFolder(str(out), replaces=lambda name: True) as tmp:
                prepare(files, os.path.join(tmp, name), data.tokenizer_path or "default", doc_per_file=True,
                        progress=False)
    return str(out)


class TrainLoader:
    """Yields the micro-batches of each step for one data-parallel rank; state = global position."""

    def __init__(self, sources: list[Source], data: DataConfig, dp_rank: int = 0, dp_size: int = 1,
                 prefetch: bool = True):
        self.data, self.dp_rank, self.dp_size = data, dp_rank, dp_size
        self.sources = sources
        self.packed = [
            PackedDocuments(s.docs, data.seq_len, data.micro_bsz, type_id=s.type_id,
                            seed=data.seed + 17 * s.type_id,
                            min_length=data.min_length_dict.get(s.name, data.min_length),
                            pack_into_one=data.pack_sample_into_one)
            for s in sources
        ]
        sizes = [len(p) for p in self.packed]
        if sum(sizes) == 0:
            if not any(len(p.order) for p in self.packed) and any(len(s.docs) for s in sources):
                longest = max(int(s.docs.lengths.max()) for s in sources if len(s.docs))
                raise SpindleError(f"data.min_length={data.min_length} (min_length_dict {data.min_length_dict}) drops "
                                   f"every document (the longest has {longest} tokens)")
            raise SpindleError(
                f"the training data holds fewer tokens than one pack (micro_bsz * seq_len = {data.packed_length})")
        weights = None
        if data.source_weights:
            unknown = set(data.source_weights) - {s.name for s in sources}
            if unknown:
                raise SpindleError(f"data.source_weights: no source named {sorted(unknown)}; "
                                   f"sources are {[s.name for s in sources]}")
            weights = [data.source_weights.get(s.name, 0.0) for s in sources]
        self.weights = weights
        self.sampler = GlobalSampler(sizes, seed=data.seed, weights=weights)
        self.by_tokens: Optional[TokenOrder] = None  # set by a resume that changed the pack size
        self.source_names = [s.name for s in sources]
        # generated sources (random data) have nothing on disk to check
        self.fingerprint = None if any(s.fingerprint is None for s in sources) else [s.fingerprint for s in sources]
        self.rampup = parse_rampup(data.rampup_batch_size)
        self.position = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spindle-data") if prefetch else None
        self._pending: Optional[tuple[int, int, Future]] = None
        self._lock = threading.Lock()

    # -- state
    def state_dict(self) -> dict:
        state = {"position": self.position}
        if self.by_tokens is not None:  # the order of packs of `order_tokens` tokens, read on by tokens
            state |= {"tokens": self.by_tokens.tokens, "order_tokens": self.by_tokens.unit}
        if self.fingerprint is None:
            return state
        return state | {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """`order_tokens`: the pack size the saved order is made of (default this run's); when it is not this
        run's, or `tokens` falls inside a pack, packs are cut from that order by tokens (sampler.TokenOrder)."""
        check_fingerprints(state.get("fingerprint"), self.fingerprint)
        self.position = int(state["position"])
        self._pending = None
        unit = int(state.get("order_tokens", self.data.packed_length))
        tokens = int(state.get("tokens", self.position * unit))
        self.by_tokens = None
        if tokens and (unit != self.data.packed_length or tokens % unit):  # at 0: this run's own order
            sampler = GlobalSampler([p.total_tokens // unit for p in self.packed], seed=self.data.seed,
                                    weights=self.weights)
            self.by_tokens = TokenOrder(sampler, unit, tokens)

    # -- batches
    def _pack(self, global_index: int):
        src = int(np.searchsorted(self.sampler.offsets, global_index, side="right")) - 1
        return self.packed[src][global_index - int(self.sampler.offsets[src])]

    def _build(self, position: int, micro_num: int):
        if self.by_tokens is not None:  # `position` counts tokens of the saved order
            size, d = self.data.packed_length, self.data
            first = position + self.dp_rank * micro_num * size
            return collate([pack_of_spans([self.packed[src].span(at, n) for src, at, n in
                                           self.by_tokens.spans(first + j * size, size)],
                                          d.seq_len, d.micro_bsz, d.pack_sample_into_one) for j in range(micro_num)])
        first = position + self.dp_rank * micro_num
        return collate([self._pack(self.sampler.index(first + j)) for j in range(micro_num)])

    def _cursor(self) -> int:
        return self.position if self.by_tokens is None else self.by_tokens.tokens

    def next_step(self, step: int) -> list[dict]:
        """The micro-batches of `step` for this rank; advances the global position."""
        micro_num = micro_num_at(step, self.data.micro_num, self.rampup)
        if self._pending is not None and self._pending[:2] == (self._cursor(), micro_num):
            batch = self._pending[2].result()
        else:
            batch = self._build(self._cursor(), micro_num)
        if self.by_tokens is None:
            self.position += micro_num * self.dp_size
        else:
            self.by_tokens.tokens += micro_num * self.dp_size * self.data.packed_length
            self.position = self.by_tokens.tokens // self.by_tokens.unit
        if self._pool is not None:  # build the next step's batch while this one trains
            nxt = micro_num_at(step + 1, self.data.micro_num, self.rampup)
            self._pending = (self._cursor(), nxt, self._pool.submit(self._build, self._cursor(), nxt))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            # wait for a batch being built (milliseconds): no torch work left in a thread while the
            # process group and the interpreter are torn down (a C++ abort at exit was seen once, dp2_cp2)
            self._pool.shutdown(wait=True, cancel_futures=True)


def build_train_loader(data: DataConfig, vocab_size: int, cache_root: Path, dp_rank: int = 0, dp_size: int = 1,
                       prefetch: bool = True) -> TrainLoader:
    """The training loader of this data-parallel rank (a StreamingLoader for type='streaming',
    which offers the same next_step / state_dict / load_state_dict / source_names / close)."""
    if data.type == "streaming":
        from spindle.data.streaming import StreamingLoader

        return StreamingLoader(data, vocab_size, dp_rank, dp_size, prefetch)
    if data.train_folder is None or data.type == "dummy":
        fixed = data.seq_len if data.fixed_random_dataset_seqlen else None
        sources = [Source("random", 0, RandomDocuments(vocab_size, seed=data.seed, fixed_len=fixed))]
    elif data.type == "text":
        sources = discover_sources(text_cache(data, cache_root), vocab_size)
    else:
        sources = discover_sources(data.train_folder, vocab_size)
    return TrainLoader(sources, data, dp_rank, dp_size, prefetch)


def _holds_token_files(folder: Optional[str]) -> bool:
    from spindle.data.shards import find_token_files

    return bool(folder) and os.path.isdir(folder) and bool(find_token_files(folder))


def build_valid_sets(data: DataConfig, vocab_size: int, cache_root: Optional[Path] = None) -> dict:
    """name -> `spindle.data.validation.ValidSet`: every token of that validation set (unshuffled packs),
    or its first `valid_max_tokens`. Token folders: one set per leaf folder of `valid_folder`. Streaming:
    a split of a dataset folder (`valid_split`, default "validation", of `valid_folder`, default the
    training dataset). Raw text: the held-out files (`text_valid_bytes`), tokenized into the cache under
    `cache_root`."""
    from spindle.data.validation import valid_set

    held_out = bool(data.text_valid_bytes) and data.type == "text"
    if not data.valid_every or not (data.valid_folder or data.valid_split or held_out):
        return {}
    if data.type == "streaming" and not _holds_token_files(data.valid_folder):
        from spindle.data.streaming import streamed_valid_set

        found = streamed_valid_set(data, vocab_size)
        sets = {found.name: found}
    else:
        folder = data.valid_folder
        if held_out:
            folder = text_cache(data, Path(cache_root), held_out=True)
        sets = {src.name: valid_set(src.name, src.docs, data.seq_len, data.micro_bsz, data.pack_sample_into_one,
                                    data.valid_max_tokens) for src in leaf_sources(folder, vocab_size)}
    for name, found in sets.items():
        if found.count == 0:
            raise SpindleError(f"validation set {name!r} of {data.valid_folder or data.train_folder} holds no tokens")
    return sets
