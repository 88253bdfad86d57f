"""Validation sets as InternEvo evaluates them: every token of each set, unless the user bounds it.

A set is the documents of one leaf folder of `data.valid_folder` (or the held-out text files, or a
streamed split) packed like training but in file order, unshuffled. Every pack is evaluated; the
tail that does not fill a pack is evaluated too, padded with positions that carry no label, so the
whole set counts. `data.valid_max_tokens` bounds it to the first whole packs covering that many
tokens, and the validation line then says "N of M tokens".

`data.valid_micro_num` keeps InternEvo's meaning: how many micro-batches one evaluation call runs
(a pipeline schedule's micro-batch count); it is not a bound. Data-parallel ranks split the packs
(rank r takes packs r, r + dp, ...); a rank short of one runs a copy with no labels, so every rank
runs the same number of forwards (FSDP gathers parameters in each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from spindle.data.packing import Pack, PackedDocuments, assemble_pack, collate


@dataclass
class ValidSet:
    name: str
    packed: PackedDocuments  # in file order (shuffle=False)
    count: int  # packs evaluated, the padded tail included
    used_tokens: int
    total_tokens: int

    def pack(self, i: int) -> Pack:
        if i < len(self.packed):
            return self.packed[i]
        return padded_tail(self.packed)

    def micro_batches(self, group: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[list]:
        """This rank's packs as `Batch`es, `group` per evaluation call."""
        per_rank = -(-self.count // dp_size)
        for start in range(0, per_rank, group):
            packs = []
            for k in range(start, min(start + group, per_rank)):
                i = k * dp_size + dp_rank
                packs.append(self.pack(i) if i < self.count else unlabelled(self.pack(0)))
            yield collate(packs)

    def coverage(self) -> str:
        """'all 12,345 tokens' or '4,096 of 12,345 tokens'."""
        if self.used_tokens >= self.total_tokens:
            return f"all {self.total_tokens:,} tokens"
        return f"{self.used_tokens:,} of {self.total_tokens:,} tokens"


def padded_tail(packed: PackedDocuments) -> Pack:
    """The stream's last tokens that do not fill a pack, padded to one with token 0 and no labels; the
    padding is a segment of its own, after every real token, so causal attention never reads it."""
    start, p = len(packed) * packed.packed_length, packed.packed_length
    tokens, labels, _offsets, starts = packed._stream(start, packed.total_tokens)
    pad = p - len(tokens)
    starts = np.concatenate([starts, np.eye(1, pad, dtype=bool)[0]])
    return assemble_pack(np.concatenate([tokens, np.zeros(pad, dtype=np.int64)]),
                         np.concatenate([labels, np.full(pad, -100, dtype=np.int64)]), starts,
                         packed.seq_len, packed.micro_bsz, packed.type_id, packed.pack_into_one)


def unlabelled(pack: Pack) -> Pack:
    """A pack that contributes nothing to the statistics: a rank's filler when it has no pack left."""
    return Pack(pack.input_ids, np.full_like(pack.labels, -100), pack.position_ids, pack.type_ids)


def valid_set(name: str, docs, seq_len: int, micro_bsz: int, pack_into_one: bool,
              max_tokens: Optional[int], total_tokens: Optional[int] = None) -> ValidSet:
    """`total_tokens`: the set's size when `docs` holds only its first documents (a bounded stream)."""
    packed = PackedDocuments(docs, seq_len, micro_bsz, shuffle=False, pack_into_one=pack_into_one)
    p = packed.packed_length
    held = packed.total_tokens
    total = held if total_tokens is None else total_tokens
    count = math.ceil(held / p)
    if max_tokens is not None:
        count = min(count, math.ceil(max_tokens / p))
    return ValidSet(name, packed, count, min(held, count * p), total)


class InMemoryDocuments:
    """Documents held in memory (a streamed validation split), with what packing needs."""

    def __init__(self, docs: list[tuple[np.ndarray, Optional[np.ndarray]]]):
        self.docs = docs
        self.lengths = np.asarray([len(d) for d, _ in docs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return self.docs[i]
