"""Attention kernels, and the one function that chooses among them.

A forward describes its rows once, as a `DocumentLayout` read from `position_ids` (a document, or a
fragment of one, starts where the position is 0; rows never share a document). A training batch brings
it read on the host (`HostLayout`, built by the loader from the positions before they go to the device),
so the forward copies nothing back; without one, `document_layout` reads the device positions (one host
sync). Every layer then calls `attention(q, k, v, layout, dropout_p)`, which runs the kernel
`choose_kernel` names:

    sdpa_causal  every row is one document: SDPA with is_causal (flash / cuDNN on GPU, flash on CPU)
    varlen       packed rows on CUDA in bf16/fp16 without dropout: `varlen_attn` over the flattened rows,
                 the documents' boundaries as its cu_seqlens
    segments     packed rows anywhere else: causal SDPA per document, the documents of one length
                 batched into one call. Work and memory are those of the documents, with no L x L mask
                 (on CPU FlexAttention has no backward and varlen_attn does not exist)
    cached       queries continue a KV cache (generation, chunked prefill): the last Lq of Lk keys are
                 the queries' own, so the mask is causal aligned to the lower right. On CPU: SDPA
                 over the past keys and causal SDPA over the block, merged by their log-sum-exp;
                 elsewhere SDPA with `causal_lower_right`

Grouped KV heads use SDPA's `enable_gqa` where the kernel takes it (CPU: measured faster than
repeating the keys, docs/benchmarks.md; CUDA flash), else the keys are repeated.
`packed_causal_mask` is the block-diagonal mask the packed path used to build; it stays as the
reference the tests and the benchmark compare with.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)


@dataclass(eq=False)
class DocumentLayout:
    """Which tokens of a (batch, length) forward attend to which; built once, read by every layer.

    `starts` are the flat indices (row * length + column) of every document's first token, on the
    host; None means one document per row. `cached` means the queries continue a KV cache.
    """

    batch: int
    length: int
    starts: Optional[tuple[int, ...]] = None
    cached: bool = False
    device: torch.device = torch.device("cpu")
    span: Optional[int] = None  # max position + 1 when known on the host (dynamic RoPE, sliding window)

    def __post_init__(self):
        # what the kernel choice reads; a compiled block guards on this string only, not on the starts
        self.kind = "cached" if self.cached else "dense" if self.starts is None else "packed"

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """Every document's length, in order (rows one after the other)."""
        if self.starts is None:
            return (self.length,) * self.batch
        ends = self.starts[1:] + (self.batch * self.length,)
        return tuple(e - s for s, e in zip(self.starts, ends))

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 boundaries of the documents in the flattened rows, on the device (varlen_attn's input),
        summed on the host: the device only receives them."""
        bounds = tuple(itertools.accumulate(self.lengths, initial=0))
        return torch.tensor(bounds, dtype=torch.int32, device=self.device)

    @cached_property
    def groups(self) -> tuple[tuple[int, Optional[torch.Tensor]], ...]:
        """(n, flat token index) per distinct document length n: the tokens of every document of that
        length, document after document. The index is None when one group covers all tokens in order."""
        lengths = torch.tensor(self.lengths)
        starts = lengths.cumsum(0) - lengths
        sizes = sorted(set(self.lengths), reverse=True)
        if len(sizes) == 1:
            return ((sizes[0], None),)
        return tuple((n, (starts[lengths == n][:, None] + torch.arange(n)).flatten().to(self.device))
                     for n in sizes)

    @cached_property
    def inverse(self) -> torch.Tensor:
        """Where each token of the flattened rows sits in the groups' concatenation."""
        order = torch.cat([index for _, index in self.groups])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return inverse


class HostLayout:
    """The documents of a (B, L) batch read from a host copy of its positions: what the loader builds with
    every batch (spindle.data.batch.Batch.documents), so a forward on any device needs no copy back.

    `positions` is a (B, L) integer array on the host (a CPU tensor is read in place, sharing its memory);
    the starts and the span are read from it when first asked, with numpy (the loader asks at once, in its
    prefetch thread). Row slices, column slices (a context-parallel rank's tokens) and stacks of micro-batches
    are layouts of the same kind."""

    def __init__(self, positions):
        self.positions = np.asarray(positions)  # a CUDA tensor refuses: this must never read the device
        if self.positions.ndim != 2:
            raise ValueError(f"positions of a (B, L) batch expected, got shape {self.positions.shape}")

    @cached_property
    def row_starts(self) -> tuple[tuple[int, ...], ...]:
        """Per row, the columns where documents start (0 first: a row starts one whatever its position)."""
        flags = self.positions == 0
        flags[:, 0] = True
        return tuple(tuple(np.flatnonzero(row).tolist()) for row in flags)

    @cached_property
    def starts(self) -> Optional[tuple[int, ...]]:
        """`DocumentLayout.starts`: flat indices of every document's first token, None if one per row."""
        b, l = self.positions.shape
        if all(len(row) == 1 for row in self.row_starts):
            return None
        return tuple(r * l + c for r, row in enumerate(self.row_starts) for c in row)

    @cached_property
    def span(self) -> int:
        return int(self.positions.max()) + 1

    def read(self) -> "HostLayout":
        """Read the starts and the span now (the loader, off the training thread's path)."""
        _ = self.starts, self.span
        return self

    def on(self, device) -> DocumentLayout:
        """The layout every layer reads, for tensors on `device`."""
        b, l = self.positions.shape
        return DocumentLayout(b, l, self.starts, device=torch.device(device), span=self.span)

    def columns(self, index) -> "HostLayout":
        """The layout of these columns of every row (host indices), e.g. a context-parallel rank's slice."""
        return HostLayout(self.positions[:, np.asarray(index)])

    @staticmethod
    def stack(layouts: list["HostLayout"]) -> "HostLayout":
        """Micro-batches as the rows of one batch."""
        return HostLayout(np.concatenate([h.positions for h in layouts]))


def document_layout(position_ids: torch.Tensor) -> DocumentLayout:
    """The layout of a (B, L) batch from its positions on the device, when no `HostLayout` came with them
    (generation, evaluation, direct model calls): one host sync for the documents' starts and the largest
    position together (RoPE scaling and the window check read `span`)."""
    b, l = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True  # a row starts a document whatever its first position (rows never share one)
    # one copy to the host, the start flags and the max together; the starts are then found there
    host = torch.cat([starts.flatten().to(torch.int32), position_ids.max().to(torch.int32).reshape(1)]).cpu().numpy()
    flat = np.flatnonzero(host[:-1]).tolist()
    return DocumentLayout(b, l, None if len(flat) == b else tuple(flat), device=position_ids.device,
                          span=int(host[-1]) + 1)


def dense_layout(batch: int, length: int, device) -> DocumentLayout:
    """Rows of positions 0..length-1 (no position_ids given, no cache)."""
    return DocumentLayout(batch, length, device=torch.device(device), span=length)


def cached_layout(batch: int, length: int, device) -> DocumentLayout:
    return DocumentLayout(batch, length, cached=True, device=torch.device(device))


# --------------------------------------------------------------------------- the choice


class Kernel(NamedTuple):
    name: str  # sdpa_causal | varlen | segments | cached
    native_gqa: bool  # pass grouped KV heads to the kernel (enable_gqa) instead of repeating them


def choose_kernel(device_type: str, dtype: torch.dtype, layout: DocumentLayout, dropout_p: float = 0.0) -> Kernel:
    """The one place that decides how attention runs, from the device, the dtype, the batch's layout
    (dense / packed / continuing a cache) and dropout."""
    half = dtype in HALF
    # CUDA's memory-efficient kernel (fp32) has no GQA and SDPA would fall back to the math kernel
    gqa = device_type == "cpu" or (device_type == "cuda" and half)
    if layout.kind == "cached":
        # the lower-right SDPA path on CUDA calls flash without enable_gqa: repeat the keys there
        return Kernel("cached", device_type == "cpu")
    if layout.kind == "dense":
        return Kernel("sdpa_causal", gqa)
    if device_type == "cuda" and half and dropout_p == 0.0:  # varlen_attn has no dropout
        return Kernel("varlen", True)
    return Kernel("segments", gqa)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> (B, H, Lq, D), with the kernel `choose_kernel` picks."""
    kernel = choose_kernel(q.device.type, q.dtype, layout, dropout_p)
    if not kernel.native_gqa:
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return KERNELS[kernel.name](q, k, v, layout, dropout_p)


def _sdpa_causal(q, k, v, layout, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B * L, H, D): a view, the tensors come from (B, L, H, D) by a transpose."""
    b, h, l, d = t.shape
    return t.transpose(1, 2).reshape(b * l, h, d)


def _unflat(t: torch.Tensor, batch: int) -> torch.Tensor:
    n, h, d = t.shape
    return t.view(batch, n // batch, h, d).transpose(1, 2)


# the packed kernels loop over the batch's documents: under torch.compile they run eagerly (a graph
# break), else every new set of document lengths would compile the block again
@torch.compiler.disable
def _segments(q, k, v, layout: DocumentLayout, dropout_p):
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    outs = []
    for n, index in layout.groups:
        def docs(t):  # (docs of length n, H, n, D)
            t = t if index is None else t.index_select(0, index)
            return t.view(-1, n, *t.shape[1:]).transpose(1, 2)

        out = F.scaled_dot_product_attention(docs(qf), docs(kf), docs(vf), is_causal=True, dropout_p=dropout_p,
                                             enable_gqa=k.shape[1] != q.shape[1])
        outs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs).index_select(0, layout.inverse)
    return _unflat(out, q.shape[0])


@torch.compiler.disable
def _varlen(q, k, v, layout: DocumentLayout, dropout_p):
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = layout.cu_seqlens, max(layout.lengths)
    grouped = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            grouped = {"enable_gqa": True}
        else:  # torch < 2.13 (2.11 is the CUDA image of the lent H200s): no GQA in varlen_attn
            n_rep = q.shape[1] // k.shape[1]
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out = varlen_attn(_flat(q), _flat(k), _flat(v), cu, cu, longest, longest, window_size=(-1, 0), **grouped)
    return _unflat(out, q.shape[0])


def _cached(q, k, v, layout, dropout_p):
    lq, lk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if lq == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    if q.device.type == "cpu" and dropout_p == 0.0 and _CPU_FLASH is not None:
        return _past_and_block(q, k, v)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk), dropout_p=dropout_p,
                                          enable_gqa=gqa)


# the CPU flash kernel behind SDPA, which also returns the log-sum-exp that merging two blocks needs
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _past_and_block(q, k, v):
    """Lower-right causal attention of the last Lq of Lk keys as two unmasked kernels: every query sees
    all Lk - Lq past keys, and its own block causally; softmax over the union = the two results
    weighted by exp(their log-sum-exp). About twice as fast on CPU as SDPA with a (Lq, Lk) mask."""
    b, h, lq, d = q.shape
    hkv, past = k.shape[1], k.shape[2] - lq
    rep = h // hkv
    # the past needs no mask, so a KV head's query heads can be stacked along the sequence: no key copies
    stacked = q.reshape(b, hkv, rep * lq, d)
    out_p, lse_p = _CPU_FLASH(stacked, k[:, :, :past], v[:, :, :past])
    out_p, lse_p = out_p.reshape(b, h, lq, d), lse_p.reshape(b, h, lq)
    k_own, v_own = repeat_kv(k[:, :, past:], rep), repeat_kv(v[:, :, past:], rep)
    out_b, lse_b = _CPU_FLASH(q, k_own, v_own, 0.0, True)
    lse = torch.logaddexp(lse_p, lse_b)
    weight_p, weight_b = (lse_p - lse).exp()[..., None], (lse_b - lse).exp()[..., None]
    return (out_p.float() * weight_p + out_b.float() * weight_b).to(q.dtype)


KERNELS = {"sdpa_causal": _sdpa_causal, "varlen": _varlen, "segments": _segments, "cached": _cached}


# --------------------------------------------------------------------------- masks (reference, context parallel)


def segment_ids(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Document index of every token of a (batch, length) pack, from boundaries of the flat pack."""
    marks = torch.zeros(batch * length + 1, dtype=torch.int32, device=cu_seqlens.device)
    marks[cu_seqlens.long()] = 1
    # boundaries at row starts are implied: rows never attend to each other (SDPA works per row)
    return marks[: batch * length].cumsum(0).view(batch, length)


def packed_causal_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(B, 1, L, L) bool: token i sees token j iff same document and j <= i. The reference for the
    kernels above (and what the packed path cost before them)."""
    seg = segment_ids(cu_seqlens, batch, length)
    same_doc = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    return (same_doc & causal)[:, None]


def masked_attention(q, k, v, mask: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA under an explicit boolean mask (B or 1, 1, Lq, Lk); grouped KV heads are repeated."""
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask,
                                          dropout_p=dropout_p)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * n_rep, L, D) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)
