"""Rotary position embeddings (RoPE), their scaling variants, and log-n query scaling.

Layout is Hugging Face's `rotate_half`: frequency pair n covers dims (n, n + D/2), and
cos/sin are `cat(freqs, freqs)`. The scaling types take the same dict as transformers'
`rope_scaling` / `rope_parameters` and produce the same numbers as its
`modeling_rope_utils` (see docs/long-context.md for every formula):

    default  inv_freq_n = base^(-2n/D)
    linear   inv_freq / factor                                   (position interpolation)
    ntk      base' = base * factor^(D/(D-2))                      (fixed NTK-aware; not in HF)
    dynamic  base' = base * (factor*l/L - (factor-1))^(D/(D-2)),  l = max(seq_len, L)
    yarn     NTK-by-parts ramp between inv_freq and inv_freq/factor, attention factor mscale
    llama3   wavelength-banded interpolation (Llama 3.1)
    longrope per-frequency short/long factors (Phi-3)

Precision. `rope_inv_freq` returns fp32 inv_freq, computed in float64 and rounded once (HF computes
the power in fp32, so its values may differ from ours by an ulp; that is far below bf16 noise).
`rope_cos_sin` then treats those fp32 values as exact: the angle position * inv_freq is formed in
float64 from int64 positions and reduced modulo 2*pi in float64, and only the reduced angle (|a| <= pi)
is cast to fp32 for cos/sin. Forming the angle in fp32 instead would carry an absolute error of about
ulp(1e6)/2 = 0.03 rad at position 1e6; the reduced fp32 angle is off by at most ~2e-7 rad, so
cos/sin are within ~3e-7 of the float64 closed form at any position below 2^53. The cost is one
float64 multiply and rounding per (position, pair) - trig itself stays fp32 and half-width.
MPS has no float64; there the angle is formed in fp32 and carries the larger error (`_angle_dtype`).
inv_freq is always computed on CPU and moved, so every device sees bit-identical frequencies.
"""

from __future__ import annotations

import math
import torch

from spindle.config.rope_types import ROPE_TYPES, RopeInputs
from spindle.errors import SpindleError

__all__ = ["normalize_rope_scaling", "rope_cos_sin", "rope_inv_freq"]

# Parameters each type accepts besides the common keys (the registry, spindle/config/rope_types.py).
# Unknown keys are an error rather than a warning (transformers only warns) so that a misspelled
# `beta_fast` cannot silently fall back to a default.
_TYPE_KEYS: dict[str, frozenset[str]] = {name: frozenset(t.params) for name, t in ROPE_TYPES.items()}


def normalize_rope_scaling(scaling: dict | None, base: float | None = None) -> dict:
    """Return a validated copy of a `rope_scaling` dict with the type under the key "type".

    "rope_type" is accepted as an alias of "type" (transformers v4.4x+ writes it), None means
    {"type": "default"}. Raises SpindleError for an unknown type, unknown keys, or a `rope_theta`
    entry that contradicts `base`.
    """
    if scaling is None:
        return {"type": "default"}
    if not isinstance(scaling, dict):
        raise SpindleError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    out = dict(scaling)
    t1, t2 = out.pop("type", None), out.pop("rope_type", None)
    if t1 is not None and t2 is not None and t1 != t2:
        raise SpindleError(f"rope_scaling has type={t1!r} and rope_type={t2!r}; give one")
    kind = t1 if t1 is not None else (t2 if t2 is not None else "default")
    if kind not in ROPE_TYPES:
        raise SpindleError(f"rope_scaling type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
    theta = out.pop("rope_theta", None)
    if theta is not None and base is not None and not math.isclose(float(theta), float(base), rel_tol=1e-9):
        raise SpindleError(f"rope_scaling.rope_theta={theta} contradicts the rotary base {base}")
    prf = out.pop("partial_rotary_factor", None)
    if prf is not None and float(prf) != 1.0:
        raise SpindleError(
            f"rope_scaling.partial_rotary_factor={prf} is not supported; pass the rotary dimension as head_dim"
        )
    unknown = set(out) - _TYPE_KEYS[kind]
    if unknown:
        allowed = sorted(_TYPE_KEYS[kind] | {"type"})
        raise SpindleError(
            f"rope_scaling type {kind!r} got unknown key(s) {sorted(unknown)}; allowed: {allowed}"
        )
    out["type"] = kind
    return out


def rope_inv_freq(
    head_dim: int,
    base: float,
    scaling: dict | None = None,
    seq_len: int | None = None,
    max_position_embeddings: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, shape (head_dim//2,)) and the attention factor for a RoPE config.

    `scaling` is an HF-style `rope_scaling` dict (see module doc). `seq_len` is the current sequence
    length (max position + 1); only "dynamic" and "longrope" use it, and None means "no longer than the
    original context" (identity for dynamic, short factors for longrope). `max_position_embeddings` is
    the fallback for `original_max_position_embeddings` and for the implicit yarn/longrope factor.
    The attention factor multiplies both cos and sin (so logits scale by its square), as in HF.
    Each type's rule is its function in the registry (spindle/config/rope_types.py).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise SpindleError(f"head_dim must be a positive even int, got {head_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 1:
        raise SpindleError(f"rope base must be a finite number > 1, got {base!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise SpindleError(f"seq_len must be a positive int or None, got {seq_len!r}")
    params = normalize_rope_scaling(scaling, base)
    kind = params["type"]
    if kind in ("ntk", "dynamic") and head_dim <= 2:
        raise SpindleError(f"rope_scaling type {kind!r} needs head_dim > 2 (exponent D/(D-2)), got {head_dim}")
    # Exponent 2n/D in float64; the final inv_freq is rounded to fp32 once at the end.
    expo = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inputs = RopeInputs(params, float(base), head_dim, expo, seq_len, max_position_embeddings)
    inv, attention_factor = ROPE_TYPES[kind].inv_freq(inputs)
    return inv.to(torch.float32), float(attention_factor)


def _angle_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; there we accept the fp32 angle error (documented in the module doc).
    return torch.float32 if device.type == "mps" else torch.float64


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (B, L, D) fp32 in rotate_half layout, scaled by `attention_factor`.

    position_ids: (B, L) integer tensor (absolute positions; they may restart inside a packed row).
    inv_freq: (D/2,) tensor; its values are taken as exact (see module doc for the float64 angle).
    """
    if position_ids.dim() != 2:
        raise SpindleError(f"position_ids must be (B, L), got shape {tuple(position_ids.shape)}")
    if position_ids.is_floating_point():
        raise SpindleError("position_ids must be an integer tensor")
    if inv_freq.dim() != 1:
        raise SpindleError(f"inv_freq must be 1-D, got shape {tuple(inv_freq.shape)}")
    dev = position_ids.device
    adt = _angle_dtype(dev)
    pos = position_ids.to(adt)
    freq = inv_freq.to(device=dev, dtype=adt)
    angle = pos[..., None] * freq  # (B, L, D/2), exact to float64 rounding
    # Reduce to [-pi, pi] while still in float64 so the fp32 cast keeps ~1e-7 absolute accuracy.
    two_pi = 2 * math.pi
    angle = angle - two_pi * torch.round(angle / two_pi)
    angle = angle.to(torch.float32)
    cos, sin = angle.cos(), angle.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    # Pair n lives in dims (n, n + D/2): duplicate after the (cheaper) half-size trig.
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
