"""From the `data` config section to batches: sources, packing, the global sampler, prefetch.

Sources: `train_folder/{cn,en,code,...}/**` holds token files (InternEvo `.bin`/`.bin.meta` or
Spindle binary shards); each top-level folder is one source whose type id is its index in the
sorted folder names. Token files placed directly in `train_folder` form a single source.
`train_folder=None` trains on seeded random documents, as InternEvo does. `type="text"` takes a
folder of raw text files, tokenizes it once into a cache of binary shards and reads those.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from spindle.config import DataConfig, parse_rampup
from spindle.data.packing import PackedDocuments, RandomDocuments, collate
from spindle.data.sampler import GlobalSampler, micro_num_at
from spindle.errors import SpindleError


@dataclass
class Source:
    name: str
    type_id: int
    docs: object


def discover_sources(folder: str, vocab_size: Optional[int] = None) -> list[Source]:
    """Top-level sub-folders of `folder` are sources (sorted names -> type ids)."""
    from spindle.data.shards import ConcatSource, find_token_files, open_documents

    root = Path(folder)
    if not root.is_dir():
        raise SpindleError(f"data folder not found: {folder}")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and find_token_files(str(p)))
    groups: list[tuple[str, list[str]]] = [(name, find_token_files(str(root / name))) for name in subdirs]
    direct = [f for f in find_token_files(str(root)) if Path(f).parent == root]
    if direct:
        groups.insert(0, (root.name, direct))
    if not groups:
        raise SpindleError(f"{folder}: no token files (.bin with .bin.meta, or Spindle shards) found")
    return [
        Source(name, i, ConcatSource(str(root / name), [open_documents(f, vocab_size=vocab_size) for f in files]))
        for i, (name, files) in enumerate(groups)
    ]


def leaf_sources(folder: str, vocab_size: Optional[int] = None) -> list[Source]:
    """One source per leaf folder holding token files (validation sets, named by the folder)."""
    from spindle.data.shards import ConcatSource, find_token_files, open_documents

    files = find_token_files(folder)
    if not files:
        raise SpindleError(f"{folder}: no token files found for validation")
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(str(Path(f).parent), []).append(f)
    dirs = sorted(by_dir)
    names = [Path(d).name for d in dirs]
    # two leaves with the same folder name (a/en, b/en) would overwrite each other's metrics:
    # those are named by their path under `folder` instead (a_en, b_en)
    names = [n if names.count(n) == 1 else str(Path(d).relative_to(folder)).replace(os.sep, "_")
             for n, d in zip(names, dirs)]
    return [
        Source(name, 0, ConcatSource(d, [open_documents(f, vocab_size=vocab_size) for f in by_dir[d]]))
        for name, d in zip(names, dirs)
    ]


def text_cache(data: DataConfig, cache_root: Path) -> str:
    """Tokenize a raw-text folder once into binary shards under `cache_root`; return the shard folder."""
    from spindle.data.prepare import prepare

    root = Path(data.train_folder)
    if not root.is_dir():
        raise SpindleError(f"data.train_folder: text folder not found: {root}")
    files = sorted(
        str(p) for p in root.glob(data.text_glob)
        if p.is_file() and not any(part in data.text_exclude for part in p.relative_to(root).parts)
    )
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
        raise SpindleError(f"data.train_folder: no files match {data.text_glob!r} under {root}")
    from spindle.data.tokenizer import load_tokenizer

    # the cache is keyed by the files and the tokenizer's content, so a changed tokenizer re-tokenizes
    identity = load_tokenizer(data.tokenizer_path or "default").identity()
    key = hashlib.sha256(json.dumps([files, identity.get("sha256"), identity.get("vocab_size")]).encode()).hexdigest()[:16]
    out = cache_root / f"text-{key}"
    source_dir = out / "text"  # one source, named "text"
    if not (source_dir / "manifest.json").exists():
        prepare(files, str(source_dir), data.tokenizer_path or "default", doc_per_file=True, overwrite=True,
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
            raise SpindleError(
                f"the training data holds fewer tokens than one pack (micro_bsz * seq_len = {data.packed_length})")
        weights = None
        if data.source_weights:
            unknown = set(data.source_weights) - {s.name for s in sources}
            if unknown:
                raise SpindleError(f"data.source_weights: no source named {sorted(unknown)}; "
                                   f"sources are {[s.name for s in sources]}")
            weights = [data.source_weights.get(s.name, 0.0) for s in sources]
        self.sampler = GlobalSampler(sizes, seed=data.seed, weights=weights)
        self.source_names = [s.name for s in sources]
        self.rampup = parse_rampup(data.rampup_batch_size)
        self.position = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spindle-data") if prefetch else None
        self._pending: Optional[tuple[int, int, Future]] = None
        self._lock = threading.Lock()

    # -- state
    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self._pending = None

    # -- batches
    def _pack(self, global_index: int):
        src = int(np.searchsorted(self.sampler.offsets, global_index, side="right")) - 1
        return self.packed[src][global_index - int(self.sampler.offsets[src])]

    def _build(self, position: int, micro_num: int):
        first = position + self.dp_rank * micro_num
        return collate([self._pack(self.sampler.index(first + j)) for j in range(micro_num)])

    def next_step(self, step: int) -> list[dict]:
        """The micro-batches of `step` for this rank; advances the global position."""
        micro_num = micro_num_at(step, self.data.micro_num, self.rampup)
        if self._pending is not None and self._pending[:2] == (self.position, micro_num):
            batch = self._pending[2].result()
        else:
            batch = self._build(self.position, micro_num)
        self.position += micro_num * self.dp_size
        if self._pool is not None:  # build the next step's batch while this one trains
            nxt = micro_num_at(step + 1, self.data.micro_num, self.rampup)
            self._pending = (self.position, nxt, self._pool.submit(self._build, self.position, nxt))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def build_train_loader(data: DataConfig, vocab_size: int, cache_root: Path, dp_rank: int = 0, dp_size: int = 1,
                       prefetch: bool = True) -> TrainLoader:
    """The training loader of this data-parallel rank (a StreamingLoader for type='streaming',
    which offers the same next_step / state_dict / load_state_dict / source_names / close)."""
    if data.type == "streaming":
        from spindle.data.streaming import StreamingLoader

        return StreamingLoader(data, vocab_size, dp_rank, dp_size, prefetch)
    if data.train_folder is None or data.type == "dummy":
        sources = [Source("random", 0, RandomDocuments(vocab_size, seed=data.seed))]
    elif data.type == "text":
        sources = discover_sources(text_cache(data, cache_root), vocab_size)
    else:
        sources = discover_sources(data.train_folder, vocab_size)
    return TrainLoader(sources, data, dp_rank, dp_size, prefetch)


def build_valid_sets(data: DataConfig, vocab_size: int) -> dict[str, list[dict]]:
    """name -> the first `valid_micro_num` micro-batches of that validation set (unshuffled packs)."""
    if not data.valid_folder or not data.valid_every:
        return {}
    out = {}
    for src in leaf_sources(data.valid_folder, vocab_size):
        packed = PackedDocuments(src.docs, data.seq_len, data.micro_bsz, shuffle=False,
                                 pack_into_one=data.pack_sample_into_one)
        n = min(len(packed), data.valid_micro_num or data.micro_num)
        if n == 0:
            raise SpindleError(f"validation set {src.name!r} in {data.valid_folder} holds fewer tokens than one pack")
        out[src.name] = collate([packed[i] for i in range(n)])
    return out
