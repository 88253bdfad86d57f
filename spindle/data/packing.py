"""Packing documents into fixed-size micro-batches that follow the batch contract.

A pack is `micro_bsz` rows of `seq_len` tokens (InternEvo's packed_length = micro_bsz * seq_len).

Cut mode (`pack_sample_into_one=False`): the documents, shuffled once by seed, form one virtual
token stream that is cut every `micro_bsz * seq_len` tokens. Every document fragment becomes its
own attention segment (`position_ids` restarting at 0: that is what marks it, spindle/data/batch.py).
Rows are segment boundaries too: a fragment never straddles two rows, so attention works per row,
within documents, and costs what its documents cost (InternEvo lets a fragment run across the
row edge of its flat pack; we cut it there, which at most adds `micro_bsz` cuts per pack).
A document longer than `seq_len` therefore ends up in `seq_len` pieces. Labels are the next
token of the same document, -100 at a document's end (and where a loss mask says no loss).

Concat mode (`pack_sample_into_one=True`): the same stream in `seq_len` windows; attention runs
across documents inside a window (InternEvo's behaviour), positions are 0..seq_len-1 in every row,
labels are still -100 at document ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np


class Documents(Protocol):
    """What packing needs from a document source (see spindle.data.shards)."""

    lengths: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]: ...


@dataclass
class Pack:
    """One micro-batch as numpy arrays, all (B, L); `collate` makes `Batch`es of them."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    type_ids: np.ndarray


class PackedDocuments:
    """Random access to the packs of one source: pack i is a pure function of (docs, seed, i)."""

    def __init__(
        self,
        docs: Documents,
        seq_len: int,
        micro_bsz: int,
        type_id: int = 0,
        seed: int = 1024,
        min_length: int = 0,
        pack_into_one: bool = False,
        shuffle: bool = True,
    ):
        self.docs, self.seq_len, self.micro_bsz, self.type_id = docs, seq_len, micro_bsz, type_id
        self.pack_into_one = pack_into_one
        lengths = np.asarray(docs.lengths, dtype=np.int64)
        keep = np.nonzero(lengths >= max(min_length, 1))[0]
        order = np.random.default_rng(seed).permutation(keep) if shuffle else keep
        self.order = order
        self.ends = np.cumsum(lengths[order])  # end offset of each document in the stream
        self.total_tokens = int(self.ends[-1]) if len(self.ends) else 0
        self.packed_length = seq_len * micro_bsz

    def __len__(self) -> int:
        return self.total_tokens // self.packed_length  # the tail that does not fill a pack is dropped

    def _stream(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, next-token labels, in-document offsets and document-start flags of stream[start:stop]."""
        first = int(np.searchsorted(self.ends, start, side="right"))
        tokens, labels, offsets = [], [], []
        pos = start
        k = first
        while pos < stop:
            doc_end = int(self.ends[k])
            doc_start = doc_end - int(self.docs.lengths[self.order[k]])
            ids, mask = self.docs[int(self.order[k])]
            ids = np.asarray(ids, dtype=np.int64)
            a, b = pos - doc_start, min(stop, doc_end) - doc_start
            nxt = np.full(b - a, -100, dtype=np.int64)
            inner = min(b, len(ids) - 1)  # next tokens exist up to the document's last token
            if inner > a:
                nxt[: inner - a] = ids[a + 1 : inner + 1]
                if mask is not None:  # a label carries loss only where the predicted token does
                    nxt[: inner - a][~mask[a + 1 : inner + 1]] = -100
            tokens.append(ids[a:b])
            labels.append(nxt)
            offsets.append(np.arange(a, b, dtype=np.int64))
            pos = doc_start + b
            k += 1
        tokens_, labels_, offsets_ = np.concatenate(tokens), np.concatenate(labels), np.concatenate(offsets)
        starts = np.zeros(stop - start, dtype=bool)
        bounds = self.ends[first:k] - start
        starts[0] = True
        starts[bounds[(bounds > 0) & (bounds < stop - start)]] = True
        return tokens_, labels_, offsets_, starts

    def __getitem__(self, i: int) -> Pack:
        if not 0 <= i < len(self):
            raise IndexError(i)
        tokens, labels, _offsets, starts = self._stream(i * self.packed_length, (i + 1) * self.packed_length)
        return assemble_pack(tokens, labels, starts, self.seq_len, self.micro_bsz, self.type_id, self.pack_into_one)

    def span(self, start: int, length: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(type id, tokens, labels, document-start flags) of stream[start:start + length]: a piece of a
        pack cut from the global order by tokens (spindle.data.sampler.TokenOrder, `pack_of_spans`)."""
        tokens, labels, _offsets, starts = self._stream(start, start + length)
        return self.type_id, tokens, labels, starts


def pack_of_spans(spans: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray]], seq_len: int, micro_bsz: int,
                  pack_into_one: bool = False) -> Pack:
    """One pack from consecutive stream pieces (`PackedDocuments.span`), maybe of several sources: each piece
    starts a segment (as a pack start does) and keeps its own source's type id."""
    pack = assemble_pack(np.concatenate([s[1] for s in spans]), np.concatenate([s[2] for s in spans]),
                         np.concatenate([s[3] for s in spans]), seq_len, micro_bsz, 0, pack_into_one)
    pack.type_ids = np.concatenate([np.full(len(s[1]), s[0], dtype=np.int64) for s in spans]).reshape(micro_bsz,
                                                                                                   seq_len)
    return pack


def assemble_pack(tokens: np.ndarray, labels: np.ndarray, starts: np.ndarray, seq_len: int, micro_bsz: int,
                  type_id: int = 0, pack_into_one: bool = False) -> Pack:
    """One pack from `micro_bsz * seq_len` stream tokens, their labels and document-start flags.

    Shared by the random-access packer above and the streaming packer (spindle.data.streaming),
    so both follow the same rules.
    """
    p, b, l = seq_len * micro_bsz, micro_bsz, seq_len
    if pack_into_one:
        positions = np.tile(np.arange(l, dtype=np.int64), b)
    else:
        starts = starts.copy()
        starts[::l] = True  # every row starts a segment
        seg_starts = np.nonzero(starts)[0]
        # positions restart at each segment: index minus the start of its segment
        seg_of = np.cumsum(starts) - 1
        positions = np.arange(p, dtype=np.int64) - seg_starts[seg_of]
    return Pack(
        input_ids=tokens.reshape(b, l),
        labels=labels.reshape(b, l),
        position_ids=positions.reshape(b, l),
        type_ids=np.full((b, l), type_id, dtype=np.int64),
    )


class RandomDocuments:
    """Seeded synthetic documents for `train_folder=None`, as InternEvo's RandomDataset.

    Each document repeats a short random pattern, so a model can learn it and the loss falls. With
    `fixed_len` (InternEvo's `data.fixed_random_dataset_seqlen=True`, the seq_len) every document has
    that length; otherwise lengths are drawn from [16, max_len].
    """

    def __init__(self, vocab_size: int, num_docs: int = 100_000, seed: int = 1024, max_len: int = 512,
                 fixed_len: Optional[int] = None):
        rng = np.random.default_rng(seed)
        self.vocab_size, self.seed = vocab_size, seed
        self.lengths = np.full(num_docs, fixed_len, dtype=np.int64) if fixed_len else \
            rng.integers(16, max_len + 1, size=num_docs).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, None]:
        rng = np.random.default_rng((self.seed, i))
        period = int(rng.integers(2, 17))
        pattern = rng.integers(0, self.vocab_size, size=period)
        return np.resize(pattern, int(self.lengths[i])).astype(np.int64), None


def collate(packs: Sequence[Pack]) -> list:
    """The packs as `Batch`es (one micro-batch each), sharing the numpy memory; each with its documents read
    here, on the host (in the loader's prefetch thread), so the forward never reads them from the device."""
    import torch

    from spindle.data.batch import Batch
    from spindle.model.attention import HostLayout

    return [Batch(torch.from_numpy(p.input_ids), torch.from_numpy(p.labels), torch.from_numpy(p.position_ids),
                  torch.from_numpy(p.type_ids), HostLayout(p.position_ids).read()) for p in packs]
