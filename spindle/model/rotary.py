"""The rotary embedding as the model applies it: cos/sin per position (spindle/model/rope.py computes the
frequencies of every scaling type), the rotation of q and k, and log-n query scaling."""

from __future__ import annotations

import math
import torch

from spindle.errors import SpindleError
from spindle.config.rope_types import ROPE_TYPES, original_len
from spindle.model.rope import _angle_dtype, normalize_rope_scaling, rope_cos_sin, rope_inv_freq

__all__ = ["RotaryEmbedding", "apply_rotary", "logn_scale", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim, the HF layout's 90-degree rotation of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, L, H, D) by cos/sin (B, L, D); math in fp32, result in x.dtype."""
    if x.dim() != 4:
        raise SpindleError(f"apply_rotary expects x of shape (B, L, H, D), got {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1]:
        raise SpindleError(
            f"cos/sin shape {tuple(cos.shape)}/{tuple(sin.shape)} do not match x {tuple(x.shape)}"
        )
    xf = x.float()
    c = cos.float().unsqueeze(-2)  # broadcast over heads
    s = sin.float().unsqueeze(-2)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def logn_scale(position_ids: torch.Tensor, ref_len: int) -> torch.Tensor:
    """Log-n query scale max(1, ln(pos+1)/ln(ref_len)), (B, L) fp32, from absolute 0-based positions.

    Identity for pos < ref_len, so training at ref_len is unaffected. It must be fed absolute positions
    (not the index inside a decode chunk) so cached decoding gets the same scale as a full forward.
    """
    if isinstance(ref_len, bool) or not isinstance(ref_len, int) or ref_len < 2:
        raise SpindleError(f"logn ref_len must be an int >= 2, got {ref_len!r}")
    if position_ids.is_floating_point():
        raise SpindleError("position_ids must be an integer tensor")
    adt = _angle_dtype(position_ids.device)
    scale = torch.log1p(position_ids.to(adt)) / math.log(ref_len)
    return scale.clamp(min=1.0).to(torch.float32)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin (and optional log-n query scale) from position_ids.

    State: only `inv_freq`, a non-persistent fp32 buffer holding the frequencies for sequences no longer
    than the original context. Seq-length-dependent types (dynamic NTK, longrope) recompute from the
    config on every call that exceeds the original context, so a call's result depends only on its own
    arguments, never on earlier calls (unlike transformers' grow-only cache).

    Meta-device construction: build under `torch.device("meta")`, call `to_empty(device=...)`, then
    `init_buffers()` (alias `reset_parameters()`) to recompute `inv_freq` on the real device.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        scaling: dict | None = None,
        max_position_embeddings: int | None = None,
        use_dynamic_ntk: bool = False,
        logn_ref_len: int | None = None,
    ) -> None:
        super().__init__()
        params = normalize_rope_scaling(scaling, base)
        if use_dynamic_ntk:
            if params["type"] not in ("default", "dynamic"):
                raise SpindleError(f"use_dynamic_ntk_rope=True conflicts with rope_scaling type {params['type']!r}")
            if params["type"] == "default":
                if max_position_embeddings is None:
                    raise SpindleError("use_dynamic_ntk_rope=True needs max_position_embeddings")
                # InternEvo's DynamicNTKScalingRotaryEmbedding: scaling_factor 1, L = max_position_embeddings.
                params = {"type": "dynamic", "factor": 1.0}
        self.scaling = params
        self.rope_type = self.scaling["type"]
        self.varies_with_length = ROPE_TYPES[self.rope_type].varies_with_length  # recomputed per length
        self.head_dim = head_dim
        self.base = float(base)
        self.max_position_embeddings = max_position_embeddings
        if logn_ref_len is not None and (
            isinstance(logn_ref_len, bool) or not isinstance(logn_ref_len, int) or logn_ref_len < 2
        ):
            raise SpindleError(f"logn_ref_len must be an int >= 2 or None, got {logn_ref_len!r}")
        self.logn_ref_len = logn_ref_len
        # Validate everything now (errors at build time, not at the first forward).
        inv, att = rope_inv_freq(head_dim, self.base, self.scaling, None, max_position_embeddings, device="cpu")
        self.attention_factor = att
        self.original_len = (
            original_len(self.scaling, max_position_embeddings, self.rope_type)
            if self.varies_with_length
            else None
        )
        # Created with the ambient default device (meta under `with torch.device("meta")`).
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        if self.inv_freq.device.type != "meta":
            with torch.no_grad():
                self.inv_freq.copy_(inv)

    def init_buffers(self) -> None:
        """Recompute `inv_freq` in place on its current device (after `to_empty`, or a dtype cast)."""
        dev = self.inv_freq.device
        if dev.type == "meta":
            return
        inv, _ = rope_inv_freq(
            self.head_dim, self.base, self.scaling, None, self.max_position_embeddings, device="cpu"
        )
        # Re-register rather than copy_: a `.to(bfloat16)` on the model may have changed the dtype.
        self.register_buffer("inv_freq", inv.to(dev), persistent=False)

    reset_parameters = init_buffers

    def inv_freq_for(self, seq_len: int | None) -> torch.Tensor:
        """The fp32 inv_freq used for a sequence of length `seq_len` (recomputed when it depends on it)."""
        if self.varies_with_length and seq_len is not None and seq_len > self.original_len:
            inv, _ = rope_inv_freq(
                self.head_dim, self.base, self.scaling, int(seq_len), self.max_position_embeddings, device="cpu"
            )
            return inv.to(self.inv_freq.device)
        if self.inv_freq.dtype != torch.float32:
            # Someone cast the module (model.to(bf16)); recompute rather than lose the precision.
            inv, _ = rope_inv_freq(
                self.head_dim, self.base, self.scaling, None, self.max_position_embeddings, device="cpu"
            )
            return inv.to(self.inv_freq.device)
        return self.inv_freq

    def forward(
        self, position_ids: torch.Tensor, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, sin) each (B, L, D) fp32, and the (B, L) log-n query scale or None.

        seq_len: the length dynamic NTK / longrope scale for; defaults to position_ids.max() + 1
        (a host sync, only taken for those types; pass it explicitly to avoid the sync).
        """
        if self.varies_with_length and seq_len is None:
            seq_len = int(position_ids.max().item()) + 1
        inv = self.inv_freq_for(seq_len)
        cos, sin = rope_cos_sin(position_ids, inv, self.attention_factor)
        q_scale = logn_scale(position_ids, self.logn_ref_len) if self.logn_ref_len is not None else None
        return cos, sin, q_scale

    def extra_repr(self) -> str:
        s = f"head_dim={self.head_dim}, base={self.base:g}, scaling={self.scaling}"
        if self.max_position_embeddings is not None:
            s += f", max_position_embeddings={self.max_position_embeddings}"
        if self.logn_ref_len is not None:
            s += f", logn_ref_len={self.logn_ref_len}"
        return s
