"""Context parallelism: one sequence split across ranks, attention over all-gathered keys and values.

PyTorch's own `context_parallel` only shards the CUDA flash / efficient / cuDNN SDPA kernels and has
no CPU path (reference/cpu-gloo-facts.md), so this is a small wrapper of ours that works on every
backend:

- the rows of a batch are cut into 2 x cp chunks along the sequence and rank c holds chunks c and
  2 cp - 1 - c ("head-tail" balancing: under causal attention the late tokens attend to many keys,
  the early ones to few, so pairing the c-th chunk from each end gives every rank the same work);
  embeddings, MLPs, norms, the head and the loss all run on that slice only;
- in attention each rank all-gathers keys and values (autograd-aware: the backward reduce-scatters
  their gradients) and its queries attend under a causal, same-document mask built from the global
  token indices and the full rows' `position_ids`, so packed documents that cross a rank boundary
  attend exactly as on one rank.

Activations and the mask are per-slice (Lc x L), so a sequence longer than one rank's memory for
L x L attention trains; keys and values are held in full, which is the all-gather trade-off (a ring
would pass them in pieces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from spindle.model.attention import attention, masked_attention


class _GatherSequence(torch.autograd.Function):
    """all_gather along the sequence dim (2) of (B, H, Lc, D); backward: reduce-scatter of the grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.transpose(0, 2).contiguous()  # (Lc, H, B, D): gather along dim 0
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out.transpose(0, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        g = grad.transpose(0, 2).contiguous()
        out = torch.empty((g.shape[0] // world, *g.shape[1:]), dtype=g.dtype, device=g.device)
        # every rank's queries used this rank's keys: their gradients add up here
        dist.reduce_scatter_tensor(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
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
    documents: Optional[torch.Tensor] = None  # (B, L) document index of every token of the full rows


def make_cp_kernel(group, info: _SliceInfo):
    def cp_attention(q, k, v, layout, dropout_p=0.0):
        # the model's layout describes only this rank's slice: the documents come from `info` instead
        if layout.cached and info.q_index is None:  # cached decoding: not context-parallel
            return attention(q, k, v, layout, dropout_p)
        k_full = _GatherSequence.apply(k, group)
        v_full = _GatherSequence.apply(v, group)
        causal = info.k_index[None, :] <= info.q_index[:, None]  # (Lc, L)
        docs = info.documents
        same_doc = docs[:, info.q_index][:, :, None] == docs[:, info.k_index][:, None, :]  # (B, Lc, L)
        return masked_attention(q, k_full, v_full, (same_doc & causal[None])[:, None], dropout_p)

    return cp_attention


class SequenceSlices:
    """This rank's part of every (B, L) tensor of a batch, and the attention kernels that see the rest.

    Gives every block of `model` the all-gathering kernel; `begin(position_ids)` tells the kernels,
    before each forward, the full rows' documents and which global tokens this rank holds."""

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

    def begin(self, position_ids: torch.Tensor) -> None:
        """Before a forward: the full rows' positions (B, L)."""
        length, device = position_ids.shape[1], position_ids.device
        self.info.q_index = self.indices(length, device)
        self.info.k_index = torch.cat([balanced_indices(r, self.size, length, device) for r in range(self.size)])
        self.info.documents = document_ids(position_ids)


class ContextParallel(nn.Module):
    """Wraps the plain model: takes full rows, runs this rank's slice of them (`slices.local`), returns the
    model's output for that slice. (Pipeline stages use `SequenceSlices` directly.)"""

    def __init__(self, model: nn.Module, group):
        super().__init__()
        self.model = model
        self.slices = SequenceSlices(model, group)

    def forward(self, input_ids, position_ids, labels=None, label_smoothing=0.0):
        self.slices.begin(position_ids)
        local = self.slices.local
        return self.model(local(input_ids), local(position_ids),
                          labels=None if labels is None else local(labels), label_smoothing=label_smoothing)
