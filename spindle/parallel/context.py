"""Context parallelism: one sequence split across ranks, attention over all-gathered keys and values.

PyTorch's own `context_parallel` only shards the CUDA flash / efficient / cuDNN SDPA kernels and has
no CPU path (reference/cpu-gloo-facts.md), so this is a small wrapper of ours that works on every
backend:

- the rows of a batch are cut into 2 x cp chunks along the sequence and rank c holds chunks c and
  2 cp - 1 - c ("head-tail" balancing: under causal attention the late tokens attend to many keys,
  the early ones to few, so pairing the c-th chunk from each end gives every rank the same work);
  embeddings, MLPs, norms, the head and the loss all run on that slice only;
- in attention each rank all-gathers keys and values (autograd-aware: the backward reduce-scatters
  their gradients); its queries attend within their documents, causally, using the global token
  indices and the full rows' `position_ids`, so packed documents that cross a rank boundary attend
  exactly as on one rank. On CPU each document's piece of a chunk runs as flash kernels with no mask
  (its earlier keys in full, its own causally, merged by log-sum-exp: spindle/parallel/blockwise.py);
  elsewhere one (B, Lc, L) causal same-document mask.

Keys and values are held in full, which is the all-gather trade-off (a ring would pass them in
pieces).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from spindle.model.attention import HostLayout, attention, masked_attention, repeat_kv
from spindle.parallel import blockwise, comm
from spindle.parallel.blockwise import past_and_own


class _GatherSequence(torch.autograd.Function):
    """all_gather along the sequence dim (2) of (B, H, Lc, D); backward: reduce-scatter of the grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.transpose(0, 2).contiguous()  # (Lc, H, B, D): gather along dim 0
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        comm.all_gather_single(out, x, group=group)
        return out.transpose(0, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        g = grad.transpose(0, 2).contiguous()
        out = torch.empty((g.shape[0] // world, *g.shape[1:]), dtype=g.dtype, device=g.device)
        # every rank's queries used this rank's keys: their gradients add up here
        comm.reduce_scatter_single(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.transpose(0, 2), None


def balanced_indices(rank: int, size: int, length: int, device=None) -> torch.Tensor:
    """The global token indices rank `rank` of `size` holds: chunks rank and 2 size - 1 - rank of 2 size."""
    chunk = length // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, last])


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) index of the document every token belongs to: a new one starts where the position is 0."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=1)


@dataclass
class _SliceInfo:
    """Set per forward by SequenceSlices.begin: this rank's queries, every rank's keys, the documents."""

    q_index: Optional[torch.Tensor] = None  # (Lc,) global indices of this rank's tokens
    k_index: Optional[torch.Tensor] = None  # (L,) global indices of the all-gathered keys, in gathered order
    k_order: Optional[torch.Tensor] = None  # (L,) gathered position of each global index (k_index's inverse)
    documents: Optional[torch.Tensor] = None  # (B, L) document index of every token of the full rows
    starts: Optional[list] = None  # per row, the global indices where documents start (host)
    chunks: Optional[list] = None  # this rank's (first global index, local offset, length) chunks


def _pieces(starts: list, first: int, length: int):
    """The (document start, piece start, piece end) of a chunk of global indices [first, first + length)
    cut at the document starts inside it."""
    i = bisect.bisect_right(starts, first) - 1
    begin, end = first, first + length
    while begin < end:
        nxt = starts[i + 1] if i + 1 < len(starts) else end
        stop = min(nxt, end)
        yield starts[i], begin, stop
        begin, i = stop, i + 1


def _blockwise(q, k_glob, v_glob, info: _SliceInfo):
    """Each query piece (one document's part of one chunk) attends to its document's earlier keys in full
    and to its own keys causally: no mask anywhere (spindle/parallel/blockwise.py)."""
    rep = q.shape[1] // k_glob.shape[1]
    rows = []
    for b, starts in enumerate(info.starts):
        parts = []
        for first, offset, length in info.chunks:
            for doc, s, e in _pieces(starts, first, length):
                qp = q[b:b + 1, :, offset + s - first: offset + e - first]
                ko, vo = k_glob[b:b + 1, :, s:e], v_glob[b:b + 1, :, s:e]
                if doc == s:  # the piece starts its document: plain causal attention
                    parts.append(F.scaled_dot_product_attention(qp, ko, vo, is_causal=True, enable_gqa=rep > 1))
                    continue
                kp, vp = k_glob[b:b + 1, :, doc:s], v_glob[b:b + 1, :, doc:s]
                parts.append(past_and_own(qp, *(repeat_kv(t, rep) for t in (kp, vp, ko, vo))))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def make_cp_kernel(group, info: _SliceInfo):
    def cp_attention(q, k, v, layout, dropout_p=0.0):
        # the model's layout describes only this rank's slice: the documents come from `info` instead
        if layout.cached and info.q_index is None:  # cached decoding: not context-parallel
            return attention(q, k, v, layout, dropout_p)
        k_full = _GatherSequence.apply(k, group)
        v_full = _GatherSequence.apply(v, group)
        if blockwise.available(q, dropout_p):
            order = info.k_order
            return _blockwise(q, k_full.index_select(2, order), v_full.index_select(2, order), info)
        # elsewhere (CUDA, dropout): one causal, same-document (B, Lc, L) mask
        causal = info.k_index[None, :] <= info.q_index[:, None]  # (Lc, L)
        docs = info.documents
        same_doc = docs[:, info.q_index][:, :, None] == docs[:, info.k_index][:, None, :]  # (B, Lc, L)
        return masked_attention(q, k_full, v_full, (same_doc & causal[None])[:, None], dropout_p)

    return cp_attention


class SequenceSlices:
    """This rank's part of every (B, L) tensor of a batch, and the attention kernels that see the rest.

    Gives every block of `model` the all-gathering kernel; `begin(position_ids, documents)` tells the
    kernels, before each forward, the full rows' documents and which global tokens this rank holds."""

    def __init__(self, model: nn.Module, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.info = _SliceInfo()
        kernel = make_cp_kernel(group, self.info)
        for block in model.layers.values():
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            inner = getattr(inner, "_orig_mod", inner)
            inner.attention.kernel = kernel

    def indices(self, length: int, device) -> torch.Tensor:
        return balanced_indices(self.rank, self.size, length, device)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a (B, L, ...) tensor of full rows."""
        return t.index_select(1, self.indices(t.shape[1], t.device))

    def local_documents(self, documents: Optional[HostLayout]) -> Optional[HostLayout]:
        """The host layout of this rank's tokens (what the model's RoPE scaling and window check read)."""
        if documents is None:
            return None
        return documents.columns(self.indices(documents.positions.shape[1], "cpu"))

    def begin(self, position_ids: torch.Tensor, documents: Optional[HostLayout] = None) -> None:
        """Before a forward: the full rows' positions (B, L), and their documents read on the host when the
        batch brought them."""
        length, device = position_ids.shape[1], position_ids.device
        self.info.q_index = self.indices(length, device)
        self.info.k_index = torch.cat([balanced_indices(r, self.size, length, device) for r in range(self.size)])
        self.info.k_order = torch.argsort(self.info.k_index)
        self.info.documents = document_ids(position_ids)
        chunk = length // (2 * self.size)
        self.info.chunks = [(self.rank * chunk, 0, chunk), ((2 * self.size - 1 - self.rank) * chunk, chunk, chunk)]
        if documents is not None:  # read by the loader: nothing to copy back
            self.info.starts = [list(row) for row in documents.row_starts]
            return
        # else one host copy per forward (shared by every layer): where the documents start in each row
        # (a row always starts a document, as in document_layout: also the pipeline schedule's shape
        # inference, whose positions are arbitrary)
        flat = (position_ids == 0).nonzero().tolist()
        self.info.starts = [[0] for _ in range(position_ids.shape[0])]
        for row, col in flat:
            if col:
                self.info.starts[row].append(col)


class ContextParallel(nn.Module):
    """Wraps the plain model: takes full rows, runs this rank's slice of them (`slices.local`), returns the
    model's output for that slice. (Pipeline stages use `SequenceSlices` directly.)"""

    def __init__(self, model: nn.Module, group):
        super().__init__()
        self.model = model
        self.slices = SequenceSlices(model, group)

    def forward(self, input_ids, position_ids, labels=None, label_smoothing=0.0, documents=None):
        self.slices.begin(position_ids, documents)
        local = self.slices.local
        return self.model(local(input_ids), local(position_ids),
                          labels=None if labels is None else local(labels), label_smoothing=label_smoothing,
                          documents=self.slices.local_documents(documents))
