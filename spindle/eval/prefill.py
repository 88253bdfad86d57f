"""Chunked prefill: a long input goes through the KV cache a chunk at a time.

The one implementation behind generation (`spindle.eval.generate`), per-position losses (`spindle eval
ppl`) and passkey scoring. Each chunk's queries attend causally to their own block and fully to the
cached past (the `cached` attention kernel: no boolean mask, no L x L anything), so memory grows with
the length only through the cache, (B, Hkv, L, D) per layer, and one chunk's activations and logits.

Positions are absolute and every chunk passes the same `seq_len` (default: the whole context once
the input is in), so length-dependent RoPE (Dynamic NTK) rotates all of the input with one base.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from spindle.model.llama import KVCache, Transformer


@torch.no_grad()
def prefill_chunks(model: Transformer, ids: torch.Tensor, cache: KVCache, chunk: int = 1024,
                   seq_len: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed ids (B, L) after what `cache` holds; yield (offset into ids, logits (B, chunk, V)) per chunk."""
    b, n = ids.shape
    start = cache.length
    seq_len = start + n if seq_len is None else seq_len
    for s in range(0, n, chunk):
        piece = ids[:, s : s + chunk]
        pos = torch.arange(start + s, start + s + piece.shape[1], device=ids.device).expand(b, -1)
        yield s, model(piece, pos, cache=cache, seq_len=seq_len)


def prefill(model: Transformer, ids: torch.Tensor, cache: KVCache, chunk: int = 1024,
            seq_len: Optional[int] = None) -> torch.Tensor:
    """Chunked prefill of ids (B, L); the logits of the last position (B, V)."""
    logits = None
    for _, logits in prefill_chunks(model, ids, cache, chunk, seq_len):
        pass
    return logits[:, -1]


def check_cache_memory(model: Transformer, length: int, batch: int = 1, args=None) -> None:
    """Refuse, before allocating, a prefill whose KV cache alone exceeds the memory available on its device.
    `args`: the model's ModelArgs, for a module that does not carry them (a pipeline rank's stages)."""
    from spindle.hardware import check_fits

    args, p = args or model.args, next(model.parameters())
    per_token = args.num_layers * 2 * args.num_kv_heads * args.head_dim * p.element_size()
    check_fits(per_token * length * batch, p.device,  # the model itself is in memory by now
               f"--lengths {length:,}: the KV cache alone", f" ({batch} x {per_token:,} bytes per token)")
