"""`data.type="streaming"`: a local Hugging Face dataset, tokenized on the fly, packed, resumable.

`train_folder` is a dataset as it sits on disk: a dataset repository folder downloaded from the
Hub (parquet / json / jsonl / arrow files, optionally with a README that declares configs), or the
output of `Dataset.save_to_disk` / `DatasetDict.save_to_disk`. It is read with the `datasets`
library in streaming mode (`load_dataset(..., streaming=True)`, or `load_from_disk(...)
.to_iterable_dataset()` for a saved dataset), record by record, in the dataset's own order.

Each record's `content_name` column (default "text") is one document. Text is tokenized in
batches with `load_tokenizer(tokenizer_path)` and wrapped as [BOS] ids [EOS] (no BOS for a model
without one); a conversation (a list of {role, content} messages) is rendered with the tokenizer's
chat template, loss on the assistant's turns only (spindle.data.chat); any other value is refused.
Documents shorter than `min_length` tokens are dropped. The documents form one token stream that is packed exactly
like cut-mode packing (spindle.data.packing.assemble_pack: rows of seq_len, a segment per
document fragment, positions restarting per fragment, labels the next token of the same document
and -100 at its end), or concat mode with `pack_sample_into_one=True`. The tail of the stream that
does not fill a pack is dropped and the next epoch starts the dataset again from its first record.

Data parallel: there is one global stream of packs, the same on every rank. A step takes
`micro_num * dp_size` consecutive packs and rank r keeps packs [r*micro_num, (r+1)*micro_num) of
them, like the tokenized loader. So the global sequence of packs does not depend on the number of
ranks, and a run resumed with another data-parallel size continues the same sequence. The price:
every rank reads and tokenizes the whole stream (tokenizing is cheap next to a training step; it
runs in a prefetch thread while the step trains).

Resume: the state is the global pack position plus the stream cursor at that position
(epoch, record index, token offset inside that record). Loading it re-opens the dataset, skips
`record` records (`IterableDataset.skip`, which reads past them for local files) and continues
from the offset, so a resumed run sees exactly the packs an uninterrupted run would have seen.
A state holding only a position replays the stream from the start to that position.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from spindle.config import DataConfig, parse_rampup
from spindle.data.chat import conversation_tokens, text_or_conversation
from spindle.data.files import check_fingerprints, fingerprint, walk_files
from spindle.data.hub import builder_of, split_files
from spindle.data.packing import Pack, assemble_pack, collate
from spindle.data.sampler import micro_num_at
from spindle.errors import SpindleError
from spindle.extras import require

TOKENIZE_BATCH = 256  # records per tokenizer call


def _saved_to_disk(root: Path) -> bool:
    return root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file())


def stream_files(folder: str, subset_name: Optional[str] = None, split: str = "train",
                 folder_key: str = "data.train_folder") -> list[str]:
    """The files one split of a local dataset folder is read from: a repository folder's split of
    one config (spindle.data.hub: found by a loop-safe walk), every file of a save_to_disk folder,
    or the single data file given."""
    root = Path(folder)
    if not root.exists():
        raise SpindleError(f"{folder_key}: dataset folder not found: {folder}")
    if _saved_to_disk(root):
        return walk_files(str(root))
    if root.is_dir():
        return split_files(str(root), split, subset_name, split_key="data.split", subset_key="data.subset_name")
    return [str(root)]


def open_stream(folder: str, subset_name: Optional[str] = None, split: str = "train",
                folder_key: str = "data.train_folder"):
    """The `datasets.IterableDataset` of one split of a local dataset folder (repository layout or
    save_to_disk). A repository folder's files are handed to `datasets` as `data_files`, so neither
    the card, nor another split or config, nor a symlink loop reaches it."""
    datasets = require("datasets", "hf", 'data.type="streaming"')
    files = stream_files(folder, subset_name, split, folder_key)
    if _saved_to_disk(Path(folder)):
        ds = datasets.load_from_disk(str(folder))  # save_to_disk output: memory-mapped arrow
        if isinstance(ds, datasets.DatasetDict):
            key = subset_name if subset_name in ds else split
            if key not in ds:
                raise SpindleError(f"data.split: {folder} has no split {split!r}; its splits: {', '.join(ds)}")
            ds = ds[key]
        return ds.to_iterable_dataset()
    try:
        return datasets.load_dataset(builder_of(files, folder_key), data_files={split: files}, split=split,
                                     streaming=True)
    except (FileNotFoundError, ValueError) as e:
        raise SpindleError(f"{folder_key}: cannot read {folder} as a Hugging Face dataset ({e})") from None


class StreamPacker:
    """Documents of one epoch -> packs, with a cursor (record index, token offset) at every pack start."""

    def __init__(self, data: DataConfig, tokenizer, vocab_size: Optional[int] = None, type_id: int = 0):
        self.data, self.tok, self.type_id = data, tokenizer, type_id
        self.packed_length = data.seq_len * data.micro_bsz
        self.vocab_size = vocab_size
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise SpindleError(f"data.tokenizer_path: the tokenizer has {tokenizer.vocab_size} ids but "
                               f"model.vocab_size is {vocab_size}")

    def documents(self, start_record: int) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
        """(record index, ids, loss mask or None) from record `start_record` on; short documents
        dropped. A text cell is `Tokenizer.document(ids)`; a conversation (a list of {role, content}
        messages, smoltalk / ultrachat style) is rendered by spindle.data.chat with its mask. A whole
        epoch in which `min_length` drops every document is an error naming it."""
        data = self.data
        ds = open_stream(data.train_folder, data.subset_name, data.split)
        if start_record:
            ds = ds.skip(start_record)
        column, min_len = data.content_name, max(data.min_length, 1)
        index, kept, longest = start_record, 0, 0
        for batch in ds.iter(batch_size=TOKENIZE_BATCH):
            if column not in batch:
                raise SpindleError(f"data.content_name: the dataset {data.train_folder} has no column "
                                   f"{column!r}; its columns are {sorted(batch)}")
            wheres = [f"data.content_name: column {column!r} of {data.train_folder}, record {index + k}"
                      for k in range(len(batch[column]))]
            cells = [text_or_conversation(v, w) for v, w in zip(batch[column], wheres)]
            encoded = iter(self.tok.encode_batch([c or "" for c in cells if not isinstance(c, list)]))
            for cell, where in zip(cells, wheres):
                if isinstance(cell, list):
                    ids, trained = conversation_tokens(self.tok, cell, where)
                    doc, mask = np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)
                else:
                    doc, mask = np.asarray(self.tok.document(next(encoded)), dtype=np.int64), None
                longest = max(longest, len(doc))
                if len(doc) >= min_len:
                    kept += 1
                    yield index, doc, mask
                index += 1
        if start_record == 0 and index and not kept:
            raise SpindleError(f"data.min_length={data.min_length} drops every document of {data.train_folder} "
                               f"(split {data.split!r}: {index} documents, the longest {longest} tokens)")

    def packs(self, start_record: int = 0, start_offset: int = 0) -> Iterator[tuple[Pack, tuple[int, int]]]:
        """(pack, cursor after it) for the rest of the epoch; the cursor is where the next pack starts."""
        p = self.packed_length
        pending: deque = deque()  # [record, ids, offset, mask] fragments not yet packed
        buffered = 0
        next_record = start_record
        for record, ids, mask in self.documents(start_record):
            ids_off = start_offset if record == start_record else 0  # resume inside a document
            pending.append([record, ids, ids_off, mask])
            buffered += len(ids) - ids_off
            next_record = record + 1
            while buffered >= p:
                tokens, labels, starts = [], [], []
                need = p
                while need:
                    frag = pending[0]
                    rec, d, off, m = frag
                    take = min(need, len(d) - off)
                    tokens.append(d[off : off + take])
                    nxt = np.full(take, -100, dtype=np.int64)
                    inner = min(off + take, len(d) - 1) - off  # next tokens exist up to the last token
                    if inner > 0:
                        nxt[:inner] = d[off + 1 : off + 1 + inner]
                        if m is not None:  # a label carries loss only where the predicted token does
                            nxt[:inner][~m[off + 1 : off + 1 + inner]] = -100
                    labels.append(nxt)
                    st = np.zeros(take, dtype=bool)
                    st[0] = True
                    starts.append(st)
                    need -= take
                    if off + take == len(d):
                        pending.popleft()
                    else:
                        frag[2] = off + take
                buffered -= p
                cursor = (pending[0][0], pending[0][2]) if pending else (next_record, 0)
                pack = assemble_pack(np.concatenate(tokens), np.concatenate(labels), np.concatenate(starts),
                                     self.data.seq_len, self.data.micro_bsz, self.type_id,
                                     self.data.pack_sample_into_one)
                if self.vocab_size is not None and int(pack.input_ids.max()) >= self.vocab_size:
                    raise SpindleError(f"token id {int(pack.input_ids.max())} >= model.vocab_size {self.vocab_size}")
                yield pack, cursor


class StreamingLoader:
    """TrainLoader's interface over a streamed dataset: `next_step(step)`, state = global position + cursor."""

    def __init__(self, data: DataConfig, vocab_size: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1,
                 prefetch: bool = True, tokenizer=None):
        if not data.train_folder:
            raise SpindleError("data.type='streaming' needs data.train_folder (a local Hugging Face dataset folder)")
        if tokenizer is None:
            if not data.tokenizer_path:
                raise SpindleError("data.type='streaming' needs data.tokenizer_path")
            from spindle.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(data.tokenizer_path)
        self.data, self.dp_rank, self.dp_size = data, dp_rank, dp_size
        self.packer = StreamPacker(data, tokenizer, vocab_size)
        name = data.subset_name or Path(os.path.normpath(data.train_folder)).name or "streaming"
        self.source_names = [name.replace("/", "_")]
        files = stream_files(data.train_folder, data.subset_name, data.split)
        root = data.train_folder if os.path.isdir(data.train_folder) else os.path.dirname(data.train_folder)
        self.fingerprint = [fingerprint(self.source_names[0], root, files, tokenizer.identity())]
        self.rampup = parse_rampup(data.rampup_batch_size)
        self.position = 0
        self._at: tuple[int, tuple[int, int]] = (0, (0, 0))  # (epoch, cursor) at `position`
        self.epoch, self.cursor = self._at  # the reader head (ahead of `position` while prefetching)
        self._iter: Optional[Iterator] = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spindle-stream") if prefetch else None
        self._pending: Optional[tuple[int, int, Future]] = None

    # -- state
    def state_dict(self) -> dict:
        epoch, (record, offset) = self._at
        return {"position": self.position, "epoch": epoch, "record": record, "offset": offset,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        check_fingerprints(state.get("fingerprint"), self.fingerprint)
        self._drop_pending()
        position = int(state["position"])
        if "record" in state:
            self._at = (int(state["epoch"]), (int(state["record"]), int(state["offset"])))
        else:  # a bare position (e.g. a checkpoint of the tokenized loader): replay from the start
            self._at = (0, (0, 0))
            self._seek()
            self._take(position)
            self._at = (self.epoch, self.cursor)
        self.position = position
        self._seek()

    def _seek(self) -> None:
        """Put the reader head at the state of the current position; the stream re-opens lazily."""
        self.epoch, self.cursor = self._at
        self._iter = None

    # -- the global pack stream
    def _take(self, n: int) -> list[Pack]:
        """The next `n` packs of the global stream; advances the reader head (and the epoch at an epoch's end)."""
        out: list[Pack] = []
        while len(out) < n:
            if self._iter is None:
                self._iter = self.packer.packs(*self.cursor)
            item = next(self._iter, None)
            if item is None:  # end of the epoch: the tail is dropped, the next epoch starts over
                if self.cursor == (0, 0):
                    raise SpindleError(f"{self.data.train_folder}: the dataset holds fewer tokens than one pack "
                                       f"(micro_bsz * seq_len = {self.data.packed_length})")
                self.epoch, self.cursor, self._iter = self.epoch + 1, (0, 0), None
                continue
            pack, self.cursor = item
            out.append(pack)
        return out

    def _build(self, micro_num: int) -> tuple[list[dict], tuple]:
        packs = self._take(micro_num * self.dp_size)
        mine = packs[self.dp_rank * micro_num : (self.dp_rank + 1) * micro_num]
        return collate(mine), (self.epoch, self.cursor)

    def _drop_pending(self) -> None:
        """Forget a prefetched step that will not be used and rewind the reader head."""
        if self._pending is not None:
            try:
                self._pending[2].result()
            except Exception:  # noqa: BLE001 - the step is rebuilt and raises again if it must
                pass
            self._pending = None
            self._seek()

    def next_step(self, step: int) -> list[dict]:
        """The micro-batches of `step` for this rank; advances the global position."""
        micro_num = micro_num_at(step, self.data.micro_num, self.rampup)
        if self._pending is not None and self._pending[:2] == (self.position, micro_num):
            batch, at = self._pending[2].result()
            self._pending = None
        else:
            self._drop_pending()
            batch, at = self._build(micro_num)
        self.position += micro_num * self.dp_size
        self._at = at
        if self._pool is not None:  # read and tokenize the next step while this one trains
            nxt = micro_num_at(step + 1, self.data.micro_num, self.rampup)
            self._pending = (self.position, nxt, self._pool.submit(self._build, nxt))
        return batch

    def close(self) -> None:
        self._pending = None
        if self._pool is not None:
            # wait for a batch being built (milliseconds): no torch work left in a thread while the
            # process group and the interpreter are torn down (a C++ abort at exit was seen once, dp2_cp2)
            self._pool.shutdown(wait=True, cancel_futures=True)


def streamed_valid_set(data: DataConfig, vocab_size: Optional[int]):
    """The validation split of a streamed dataset as a `spindle.data.validation.ValidSet`: `data.valid_split`
    (default "validation") of `data.valid_folder` (default: the training dataset), in dataset order,
    packed like training. Read once, whole: the documents the set evaluates stay in memory (up to
    `data.valid_max_tokens` when set; the rest is only counted, for "N of M tokens")."""
    from spindle.data.tokenizer import load_tokenizer
    from spindle.data.validation import InMemoryDocuments, valid_set

    if not data.tokenizer_path:
        raise SpindleError("data.type='streaming' needs data.tokenizer_path")
    split = data.valid_split or "validation"
    folder = data.valid_folder or data.train_folder
    valid = data.model_copy(update={"train_folder": folder, "split": split})
    packer = StreamPacker(valid, load_tokenizer(data.tokenizer_path), vocab_size)
    keep = math.inf if data.valid_max_tokens is None else \
        math.ceil(data.valid_max_tokens / data.packed_length) * data.packed_length
    docs, held, total = [], 0, 0
    for _record, ids, mask in packer.documents(0):
        total += len(ids)
        if held < keep:
            docs.append((ids, mask))
            held += len(ids)
    return valid_set(split, InMemoryDocuments(docs), data.seq_len, data.micro_bsz, data.pack_sample_into_one,
                     data.valid_max_tokens, total)
