"""One global, deterministic order of packs whose whole state is a position.

The order is a pure function of (seed, epoch): pack `order(pos)` for every global position `pos`.
A step consumes `micro_num * dp_size` consecutive positions; data-parallel rank r takes its
`micro_num` slice. Resuming only needs the position, so a run resumed with another data-parallel
size still walks the same global sequence of packs (Megatron's consumed-samples idea, without
per-rank state that would tie a checkpoint to its layout).

With per-source weights, each position first picks a source by a seeded draw, then walks that
source's own permutation: still a pure function of the position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class GlobalSampler:
    def __init__(self, sizes: Sequence[int], seed: int = 1024, weights: Optional[Sequence[float]] = None):
        """`sizes`: number of packs of each source (concatenated in this order)."""
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise ValueError("no packs to sample from")
        self.seed = seed
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64) * (np.asarray(self.sizes) > 0)
            if w.sum() <= 0:
                raise ValueError("source weights are all zero")
            self.cdf = np.cumsum(w / w.sum())
        else:
            self.cdf = None
        self._perm_cache: dict[tuple, np.ndarray] = {}  # a pure memo: values depend only on the key

    def _perm(self, key: tuple, n: int) -> np.ndarray:
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            perm = np.random.default_rng((self.seed,) + key).permutation(n)
            self._perm_cache[key] = perm
        return perm

    def index(self, pos: int) -> int:
        """The global pack index at global position `pos`."""
        if self.cdf is None:
            epoch, r = divmod(pos, self.total)
            return int(self._perm((0, epoch), self.total)[r])
        # weighted: this position's source, then the k-th draw of that source in its own order
        src = self._source_of(pos)
        k = self._rank_within_source(pos, src)
        size = self.sizes[src]
        epoch, r = divmod(k, size)
        return int(self.offsets[src] + self._perm((1, src, epoch), size)[r])

    def _source_draws(self, block: int) -> np.ndarray:
        u = np.random.default_rng((self.seed, 2, block)).random(4096)
        return np.searchsorted(self.cdf, u, side="right").clip(0, len(self.sizes) - 1)

    def _source_of(self, pos: int) -> int:
        block, r = divmod(pos, 4096)
        return int(self._cached_draws(block)[r])

    def _cached_draws(self, block: int) -> np.ndarray:
        key = (2, block)
        draws = self._perm_cache.get(key)
        if draws is None:
            draws = self._source_draws(block)
            self._perm_cache[key] = draws
        return draws

    def _rank_within_source(self, pos: int, src: int) -> int:
        # how many earlier positions drew the same source; counted block by block
        block, r = divmod(pos, 4096)
        counts = self._block_counts(block)
        before = int(counts[:block, src].sum()) if block else 0
        return before + int((self._cached_draws(block)[:r] == src).sum())

    def _block_counts(self, upto: int) -> np.ndarray:
        key = (3, upto)
        counts = self._perm_cache.get(key)
        if counts is None:
            counts = np.stack(
                [np.bincount(self._source_draws(b), minlength=len(self.sizes)) for b in range(upto)]
            ) if upto else np.zeros((0, len(self.sizes)), dtype=np.int64)
            self._perm_cache[key] = counts
        return counts


def micro_num_at(step: int, micro_num: int, rampup: Optional[tuple[int, int, int]]) -> int:
    """Micro-batches in step `step` under `rampup_batch_size='start incr every'` (capped at micro_num)."""
    if rampup is None:
        return micro_num
    start, incr, every = rampup
    return min(micro_num, start + incr * (step // every))


def position_at(step: int, micro_num: int, dp_size: int, rampup: Optional[tuple[int, int, int]]) -> int:
    """Global position at the start of `step` (closed form, so resume needs no replay)."""
    if rampup is None:
        return step * micro_num * dp_size
    return sum(micro_num_at(s, micro_num, rampup) for s in range(step)) * dp_size


class TokenOrder:
    """The global order read by tokens, for a run resumed with another pack size (micro_bsz * seq_len).

    A global order is made of packs of `unit` tokens (the pack size of the run that started it). Read end to
    end it is one token stream; a run with packs of P tokens takes its packs as consecutive P-token spans of
    that stream from `tokens` on, so a resume with another micro_bsz or seq_len trains on from the same token
    of the same order (a span may cross from one unit into the next, i.e. into another source).
    """

    def __init__(self, sampler: GlobalSampler, unit: int, tokens: int):
        self.sampler, self.unit, self.tokens = sampler, int(unit), int(tokens)

    def spans(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """(source, token offset in that source's stream, length) of stream tokens [start, start + length)."""
        out = []
        while length > 0:
            unit_index, offset = divmod(start, self.unit)
            pack = self.sampler.index(unit_index)
            src = int(np.searchsorted(self.sampler.offsets, pack, side="right")) - 1
            take = min(length, self.unit - offset)
            out.append((src, (pack - int(self.sampler.offsets[src])) * self.unit + offset, take))
            start, length = start + take, length - take
        return out
