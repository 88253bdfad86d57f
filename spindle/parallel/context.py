"""Context parallelism: one sequence split across ranks, attention over all-gathered keys and values.

PyTorch's own `context_parallel` only shards the CUDA flash / efficient / cuDNN SDPA kernels and has
no CPU path (reference/cpu-gloo-facts.md), so this is a small wrapper of ours that works on every
backend:

- rank c of the context group holds tokens [c * Lc, (c + 1) * Lc) of every row (Lc = L / cp):
  embeddings, MLPs, norms, the head and the loss all run on that slice only;
- in attention each rank all-gathers keys and values (autograd-aware: the backward reduce-scatters
  their gradients) and its queries attend to the full sequence under a causal, same-document mask
  built from global token indices and the full pack's `cu_seqlens`.

Activations and the mask are per-slice (Lc x L), so a sequence longer than one rank's memory for
L x L attention trains; keys and values are held in full, which is the all-gather trade-off (a ring
would pass them in pieces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from spindle.model.attention import attention, masked_attention, segment_ids


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


@dataclass
class _SliceInfo:
    """Set per forward by ContextParallel: which global tokens this rank's queries are, and the documents."""

    q_index: Optional[torch.Tensor] = None  # (Lc,) global token indices of the local slice
    segments: Optional[torch.Tensor] = None  # (B, L) document index of every token of the full rows
    extra: dict = field(default_factory=dict)


def make_cp_kernel(group, info: _SliceInfo):
    def cp_attention(q, k, v, layout, dropout_p=0.0):
        # the model's layout describes only this rank's slice: the documents come from `info` instead
        if layout.cached and info.q_index is None:  # cached decoding: not context-parallel
            return attention(q, k, v, layout, dropout_p)
        k_full = _GatherSequence.apply(k, group)
        v_full = _GatherSequence.apply(v, group)
        length = k_full.shape[2]
        key_index = torch.arange(length, device=q.device)
        causal = key_index[None, :] <= info.q_index[:, None]  # (Lc, L)
        same_doc = info.segments[:, info.q_index][:, :, None] == info.segments[:, None, :]  # (B, Lc, L)
        return masked_attention(q, k_full, v_full, (same_doc & causal[None])[:, None], dropout_p)

    return cp_attention


class ContextSlices:
    """Gives every block of `model` the all-gathering attention kernel; `begin` tells the kernels, before
    each forward, which global tokens this rank's slice holds and where the full pack's documents are."""

    def __init__(self, model: nn.Module, group):
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.info = _SliceInfo()
        kernel = make_cp_kernel(group, self.info)
        for block in model.layers.values():
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            inner.attention.kernel = kernel

    def begin(self, batch: int, local_len: int, cu_seqlens: Optional[torch.Tensor], device) -> None:
        length = local_len * self.size
        self.info.q_index = torch.arange(self.rank * local_len, (self.rank + 1) * local_len, device=device)
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, batch * length + 1, length, device=device, dtype=torch.int32)
        self.info.segments = segment_ids(cu_seqlens, batch, length)


class ContextParallel(nn.Module):
    """Wraps the plain model: takes this rank's slice of (B, L) inputs plus the full pack's cu_seqlens.
    (Pipeline stages use `ContextSlices` directly, through `PipelineChunk`.)"""

    def __init__(self, model: nn.Module, group):
        super().__init__()
        self.model = model
        self.slices = ContextSlices(model, group)

    def forward(self, input_ids, position_ids, cu_seqlens, labels=None, label_smoothing=0.0):
        self.slices.begin(input_ids.shape[0], input_ids.shape[1], cu_seqlens, input_ids.device)
        # no cu_seqlens below: the mask is the kernel's business (built from the full rows above)
        return self.model(input_ids, position_ids, None, labels=labels, label_smoothing=label_smoothing)


def local_slice(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous part of dim 1 (the sequence)."""
    lc = t.shape[1] // size
    return t[:, rank * lc:(rank + 1) * lc]
