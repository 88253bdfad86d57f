"""Attention kernels: everything goes through PyTorch's SDPA.

Three cases, one function each:
- dense causal rows (`is_causal=True`): the fast path, flash kernels on GPU and CPU;
- packed rows, several documents per row separated by `cu_seqlens`: a block-diagonal causal
  boolean mask (B, 1, L, L). On CPU, SDPA's flash kernel takes the mask at the cost of
  `is_causal` (reference/cpu-gloo-facts.md); varlen flash is GPU-only and FlexAttention cannot
  run backward on CPU, so the mask is the one path that trains everywhere;
- cached decoding / chunked prefill: queries at absolute positions attend to every cached key at
  a position <= their own. The mask is (Lq, Lk), never (Lk, Lk), so memory grows linearly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def segment_ids(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Document index of every token of a (batch, length) pack, from boundaries of the flat pack."""
    marks = torch.zeros(batch * length + 1, dtype=torch.int32, device=cu_seqlens.device)
    marks[cu_seqlens.long()] = 1
    # boundaries at row starts are implied: rows never attend to each other (SDPA works per row)
    return marks[: batch * length].cumsum(0).view(batch, length)


def is_dense(cu_seqlens: Optional[torch.Tensor], batch: int, length: int) -> bool:
    """True when every row is a single document: then plain causal attention is exact."""
    if cu_seqlens is None:
        return True
    if cu_seqlens.numel() != batch + 1:
        return False
    expected = torch.arange(0, batch * length + 1, length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return bool(torch.equal(cu_seqlens, expected))


def packed_causal_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(B, 1, L, L) bool: token i sees token j iff same document and j <= i."""
    seg = segment_ids(cu_seqlens, batch, length)
    same_doc = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    return (same_doc & causal)[:, None]


def cached_causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool for chunked prefill / decoding: a key is visible if it is not in the future."""
    return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * n_rep, L, D) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> (B, H, Lq, D). mask None means causal with Lq == Lk."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
