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
from typing import Any

import torch

from spindle.config.rope_types import ROPE_TYPES as REGISTRY
from spindle.errors import SpindleError

__all__ = ["ROPE_TYPES", "normalize_rope_scaling", "rope_cos_sin", "rope_inv_freq"]

# Parameters each type accepts besides the common keys (the registry, spindle/config/rope_types.py).
# Unknown keys are an error rather than a warning (transformers only warns) so that a misspelled
# `beta_fast` cannot silently fall back to a default.
_TYPE_KEYS: dict[str, frozenset[str]] = {name: frozenset(t.params) for name, t in REGISTRY.items()}
ROPE_TYPES: tuple[str, ...] = tuple(REGISTRY)
# Keys HF configs carry that mean nothing extra here: the type name itself, and v5's copy of the base.
_COMMON_KEYS = frozenset({"type", "rope_type", "rope_theta", "partial_rotary_factor"})
# Types whose inv_freq depends on the current sequence length.
_SEQ_DEPENDENT = frozenset(name for name, t in REGISTRY.items() if t.varies_with_length)


def _positive_number(value: Any, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpindleError(f"rope_scaling.{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise SpindleError(f"rope_scaling.{name} must be a finite number > 0, got {value!r}")
    return v


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
    if kind not in _TYPE_KEYS:
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


def _original_len(params: dict, max_position_embeddings: int | None, kind: str) -> int:
    # Same fallback as transformers' standardize_rope_params: the pre-training length defaults to
    # max_position_embeddings when the dict does not name it.
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        orig = max_position_embeddings
    if orig is None:
        raise SpindleError(
            f"rope_scaling type {kind!r} needs original_max_position_embeddings "
            "(in the dict) or max_position_embeddings"
        )
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise SpindleError(f"original_max_position_embeddings must be a positive int, got {orig!r}")
    return orig


def _factor(params: dict, kind: str, *, default: float | None = None) -> float:
    f = params.get("factor", default)
    if f is None:
        raise SpindleError(f"rope_scaling type {kind!r} needs 'factor'")
    return _positive_number(f, "factor")


def _ntk_base(base: float, alpha: float, head_dim: int) -> float:
    # NTK-aware: stretch the lowest frequency by exactly alpha while leaving the highest (n=0) alone:
    # base'^((D-2)/D) = alpha * base^((D-2)/D).
    return base * alpha ** (head_dim / (head_dim - 2))


def _extension(params: dict, kind: str, max_position_embeddings: int | None) -> tuple[int, float, float | None]:
    """(original length, factor, explicit attention_factor or None) for yarn and longrope; a missing
    factor is max_position_embeddings / original length, as in transformers."""
    orig = _original_len(params, max_position_embeddings, kind)
    factor = params.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise SpindleError(f"rope_scaling type {kind!r} needs 'factor' (or max_position_embeddings)")
        factor = max_position_embeddings / orig
    att = params.get("attention_factor")
    return orig, _positive_number(factor, "factor"), None if att is None else _positive_number(att, "attention_factor")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's temperature sqrt(1/t) = 0.1 ln s + 1; no correction when not extending.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise SpindleError(f"head_dim must be a positive even int, got {head_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 1:
        raise SpindleError(f"rope base must be a finite number > 1, got {base!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise SpindleError(f"seq_len must be a positive int or None, got {seq_len!r}")
    params = normalize_rope_scaling(scaling, base)
    kind = params["type"]
    base = float(base)
    d = head_dim
    if kind in ("ntk", "dynamic") and d <= 2:
        raise SpindleError(f"rope_scaling type {kind!r} needs head_dim > 2 (exponent D/(D-2)), got {d}")

    # Exponent 2n/D in float64; the final inv_freq is rounded to fp32 once at the end.
    expo = torch.arange(0, d, 2, dtype=torch.float64, device=device) / d
    attention_factor = 1.0

    if kind == "default":
        inv = base ** (-expo)
    elif kind == "linear":
        inv = base ** (-expo) / _factor(params, kind)
    elif kind == "ntk":
        inv = _ntk_base(base, _factor(params, kind), d) ** (-expo)
    elif kind == "dynamic":
        # factor defaults to 1: InternEvo's `use_dynamic_ntk_rope` (pure NTK with alpha = l/L).
        # An explicit original_max_position_embeddings wins over max_position_embeddings; HF ignores
        # (and warns about) that key for dynamic, so only configs HF already flags can differ.
        factor = _factor(params, kind, default=1.0)
        orig = _original_len(params, max_position_embeddings, kind)
        length = orig if seq_len is None else max(seq_len, orig)
        # alpha = 1 at l = L (identity) and grows with slope `factor` beyond it.
        alpha = factor * length / orig - (factor - 1.0)
        inv = _ntk_base(base, alpha, d) ** (-expo)
    elif kind == "yarn":
        orig, factor, explicit_attention = _extension(params, kind, max_position_embeddings)
        if explicit_attention is not None:
            attention_factor = explicit_attention
        else:
            mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all:  # DeepSeek-V3 style ratio; both must be non-zero, as in HF
                attention_factor = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast = _positive_number(params.get("beta_fast") or 32, "beta_fast")
        beta_slow = _positive_number(params.get("beta_slow") or 1, "beta_slow")
        if beta_fast < beta_slow:
            raise SpindleError(f"rope_scaling.beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow})")
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise SpindleError(f"rope_scaling.truncate must be true or false, got {truncate!r}")

        def correction_dim(n_rot: float) -> float:
            # Dimension index whose pair completes n_rot full turns within the original context.
            return d * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        # HF clamps the top at D-1 (not D/2-1); kept for identical numbers.
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # avoid 0/0 in the ramp
        idx = torch.arange(d // 2, dtype=torch.float64, device=device)
        ramp = ((idx - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep (fast pairs), 1: interpolate
        inv_extrap = base ** (-expo)
        inv = inv_extrap * (1.0 - ramp) + (inv_extrap / factor) * ramp
    elif kind == "llama3":
        factor = _factor(params, kind)
        orig = _original_len(params, max_position_embeddings, kind)
        if "low_freq_factor" not in params or "high_freq_factor" not in params:
            raise SpindleError("rope_scaling type 'llama3' needs low_freq_factor and high_freq_factor")
        lo = _positive_number(params["low_freq_factor"], "low_freq_factor")
        hi = _positive_number(params["high_freq_factor"], "high_freq_factor")
        if hi <= lo:
            raise SpindleError(f"rope_scaling.high_freq_factor ({hi}) must exceed low_freq_factor ({lo})")
        inv0 = base ** (-expo)
        wavelen = 2 * math.pi / inv0
        # Short wavelengths (< orig/hi) are kept, long ones (> orig/lo) interpolated by `factor`,
        # the band between blends linearly in orig/wavelen.
        smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
        inv = (1.0 - smooth) * inv0 / factor + smooth * inv0
        inv = torch.where(wavelen < orig / hi, inv0, inv)
        inv = torch.where(wavelen > orig / lo, inv0 / factor, inv)
    elif kind == "longrope":
        orig, factor, explicit_attention = _extension(params, kind, max_position_embeddings)
        if explicit_attention is not None:
            attention_factor = explicit_attention
        elif factor > 1.0:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(orig))
        which = "long_factor" if seq_len is not None and seq_len > orig else "short_factor"
        for key in ("short_factor", "long_factor"):
            vals = params.get(key)
            if not isinstance(vals, (list, tuple)) or len(vals) != d // 2:
                raise SpindleError(f"rope_scaling.{key} must be a list of head_dim/2 = {d // 2} numbers")
        ext = torch.tensor([float(v) for v in params[which]], dtype=torch.float64, device=device)
        if not bool((ext > 0).all()):
            raise SpindleError(f"rope_scaling.{which} entries must all be > 0")
        inv = 1.0 / (ext * base**expo)
    else:  # pragma: no cover - normalize_rope_scaling rejects unknown types
        raise AssertionError(kind)
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
