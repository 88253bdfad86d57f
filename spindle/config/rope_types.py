"""The RoPE scaling types, in one registry: for each name one function computing inv_freq and the attention
factor from its parameters, with the parameters it takes and their defaults declared beside it, and whether it
depends on the sequence length. Read by the config (`model.rope_scaling`), the rotary math
(spindle/model/rope.py validates the inputs and calls the type's function), the Hugging Face mapping
(spindle/interop/families.py), the evaluations' variants and every `--rope-scaling` option (`parse_rope_spec`).

The functions are pure and take the float64 exponents 2n/D as a tensor, so this module imports no torch
(the config layer stays light); they only call its methods. Formulas: docs/long-context.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from spindle.errors import SpindleError

if TYPE_CHECKING:
    from torch import Tensor


class RopeInputs(NamedTuple):
    params: dict  # the validated rope_scaling dict (spindle.model.rope.normalize_rope_scaling)
    base: float
    head_dim: int
    expo: "Tensor"  # 2n/D for n < D/2, float64: inv_freq is rounded to fp32 once, by the caller
    seq_len: Optional[int]  # the current length (max position + 1); None = no longer than the original
    max_position_embeddings: Optional[int]


# --------------------------------------------------------------------------- parameter readers


def positive_number(value: Any, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpindleError(f"rope_scaling.{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise SpindleError(f"rope_scaling.{name} must be a finite number > 0, got {value!r}")
    return v


def original_len(params: dict, max_position_embeddings: Optional[int], kind: str) -> int:
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


def _factor(params: dict, kind: str) -> float:
    f = params.get("factor", ROPE_TYPES[kind].defaults.get("factor"))
    if f is None:
        raise SpindleError(f"rope_scaling type {kind!r} needs 'factor'")
    return positive_number(f, "factor")


def ntk_base(base: float, alpha: float, head_dim: int) -> float:
    """NTK-aware: stretch the lowest frequency by exactly alpha while leaving the highest (n=0) alone:
    base'^((D-2)/D) = alpha * base^((D-2)/D)."""
    return base * alpha ** (head_dim / (head_dim - 2))


def _extension(params: dict, kind: str, max_position_embeddings: Optional[int]) -> tuple[int, float, Optional[float]]:
    """(original length, factor, explicit attention_factor or None) for yarn and longrope; a missing
    factor is max_position_embeddings / original length, as in transformers."""
    orig = original_len(params, max_position_embeddings, kind)
    factor = params.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise SpindleError(f"rope_scaling type {kind!r} needs 'factor' (or max_position_embeddings)")
        factor = max_position_embeddings / orig
    att = params.get("attention_factor")
    return orig, positive_number(factor, "factor"), None if att is None else positive_number(att, "attention_factor")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's temperature sqrt(1/t) = 0.1 ln s + 1; no correction when not extending.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --------------------------------------------------------------------------- one function per type


def _default(x: RopeInputs) -> tuple["Tensor", float]:
    return x.base ** (-x.expo), 1.0


def _linear(x: RopeInputs) -> tuple["Tensor", float]:
    return x.base ** (-x.expo) / _factor(x.params, "linear"), 1.0


def _ntk(x: RopeInputs) -> tuple["Tensor", float]:
    return ntk_base(x.base, _factor(x.params, "ntk"), x.head_dim) ** (-x.expo), 1.0


def _dynamic(x: RopeInputs) -> tuple["Tensor", float]:
    # factor defaults to 1: InternEvo's `use_dynamic_ntk_rope` (pure NTK with alpha = l/L).
    # An explicit original_max_position_embeddings wins over max_position_embeddings; HF ignores
    # (and warns about) that key for dynamic, so only configs HF already flags can differ.
    factor = _factor(x.params, "dynamic")
    orig = original_len(x.params, x.max_position_embeddings, "dynamic")
    length = orig if x.seq_len is None else max(x.seq_len, orig)
    # alpha = 1 at l = L (identity) and grows with slope `factor` beyond it.
    alpha = factor * length / orig - (factor - 1.0)
    return ntk_base(x.base, alpha, x.head_dim) ** (-x.expo), 1.0


def _yarn(x: RopeInputs) -> tuple["Tensor", float]:
    p, d, base, defaults = x.params, x.head_dim, x.base, ROPE_TYPES["yarn"].defaults
    orig, factor, explicit_attention = _extension(p, "yarn", x.max_position_embeddings)
    if explicit_attention is not None:
        attention_factor = explicit_attention
    else:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all:  # DeepSeek-V3 style ratio; both must be non-zero, as in HF
            attention_factor = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = positive_number(p.get("beta_fast") or defaults["beta_fast"], "beta_fast")
    beta_slow = positive_number(p.get("beta_slow") or defaults["beta_slow"], "beta_slow")
    if beta_fast < beta_slow:
        raise SpindleError(f"rope_scaling.beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow})")
    truncate = p.get("truncate", defaults["truncate"])
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
    idx = x.expo.new_tensor(list(range(d // 2)))  # the pair indices, float64 on the exponents' device
    ramp = ((idx - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep (fast pairs), 1: interpolate
    inv_extrap = base ** (-x.expo)
    return inv_extrap * (1.0 - ramp) + (inv_extrap / factor) * ramp, attention_factor


def _llama3(x: RopeInputs) -> tuple["Tensor", float]:
    p = x.params
    factor = _factor(p, "llama3")
    orig = original_len(p, x.max_position_embeddings, "llama3")
    if "low_freq_factor" not in p or "high_freq_factor" not in p:  # transformers has no defaults for them
        raise SpindleError("rope_scaling type 'llama3' needs low_freq_factor and high_freq_factor")
    lo = positive_number(p["low_freq_factor"], "low_freq_factor")
    hi = positive_number(p["high_freq_factor"], "high_freq_factor")
    if hi <= lo:
        raise SpindleError(f"rope_scaling.high_freq_factor ({hi}) must exceed low_freq_factor ({lo})")
    inv0 = x.base ** (-x.expo)
    wavelen = 2 * math.pi / inv0
    # Short wavelengths (< orig/hi) are kept, long ones (> orig/lo) interpolated by `factor`,
    # the band between blends linearly in orig/wavelen.
    smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
    inv = (1.0 - smooth) * inv0 / factor + smooth * inv0
    inv = inv0.where(wavelen < orig / hi, inv)
    return (inv0 / factor).where(wavelen > orig / lo, inv), 1.0


def _longrope(x: RopeInputs) -> tuple["Tensor", float]:
    p, d = x.params, x.head_dim
    orig, factor, explicit_attention = _extension(p, "longrope", x.max_position_embeddings)
    attention_factor = 1.0
    if explicit_attention is not None:
        attention_factor = explicit_attention
    elif factor > 1.0:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(orig))
    which = "long_factor" if x.seq_len is not None and x.seq_len > orig else "short_factor"
    for key in ("short_factor", "long_factor"):
        vals = p.get(key)
        if not isinstance(vals, (list, tuple)) or len(vals) != d // 2:
            raise SpindleError(f"rope_scaling.{key} must be a list of head_dim/2 = {d // 2} numbers")
    ext = x.expo.new_tensor([float(v) for v in p[which]])
    if not bool((ext > 0).all()):
        raise SpindleError(f"rope_scaling.{which} entries must all be > 0")
    return 1.0 / (ext * x.base**x.expo), attention_factor


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class RopeType:
    inv_freq: Callable[[RopeInputs], tuple["Tensor", float]]  # (inv_freq float64, attention factor)
    params: tuple[str, ...]  # the keys it takes besides the type name (transformers' names)
    defaults: dict = field(default_factory=dict)  # what a parameter the dict leaves out is taken as
    # parameters a dict handed to the math must name although they have a default above (transformers has none
    # for them): the config and the command lines fill the default in
    required: tuple[str, ...] = ()
    varies_with_length: bool = False  # inv_freq depends on the current sequence length
    in_transformers: bool = True  # False: Spindle's own (fixed NTK = a larger base)
    hf_params: Optional[tuple[str, ...]] = None  # what transformers reads, where fewer than `params`
    what: str = ""

    @property
    def transformers_params(self) -> tuple[str, ...]:
        return self.params if self.hf_params is None else self.hf_params


_YARN = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim", "truncate")
ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType(_default, (), what="base^(-2n/D)"),
    "linear": RopeType(_linear, ("factor",), what="position interpolation: inv_freq / factor"),
    "ntk": RopeType(_ntk, ("factor",), in_transformers=False, what="fixed NTK-aware: base * factor^(D/(D-2))"),
    # transformers' dynamic takes its original length from max_position_embeddings alone
    "dynamic": RopeType(_dynamic, ("factor", "original_max_position_embeddings"), {"factor": 1.0},
                        varies_with_length=True, hf_params=("factor",),
                        what="dynamic NTK: the base grows with the sequence beyond the original length"),
    "yarn": RopeType(_yarn, _YARN, {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True},
                     what="NTK-by-parts with an attention factor"),
    "llama3": RopeType(_llama3, ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                       {"low_freq_factor": 1.0, "high_freq_factor": 4.0},  # Llama 3.1's bands
                       required=("low_freq_factor", "high_freq_factor"),
                       what="wavelength-banded interpolation (Llama 3.1)"),
    "longrope": RopeType(_longrope, ("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                                     "long_factor"), varies_with_length=True,
                         what="per-frequency short / long factors (Phi-3)"),
}
# every parameter's default, for the config's fields (no two types give one parameter two defaults)
PARAM_DEFAULTS: dict[str, Any] = {k: v for t in ROPE_TYPES.values() for k, v in t.defaults.items()}


def filled_defaults(kind: str) -> dict:
    """The defaults a config or a command line writes into a `kind` dict: those the math requires named."""
    t = ROPE_TYPES[kind]
    return {k: t.defaults[k] for k in t.required}


# the types a command line can name with a factor ("linear:4"); the others need their full parameters
SPEC_TYPES = ("dynamic", "ntk", "linear", "yarn", "llama3")


def parse_rope_spec(spec: str, original_len: int, option: str = "--rope-scaling") -> dict:
    """'none' | 'plain' | 'dynamic' | 'ntk:8' | 'linear:4' | 'yarn:16' | 'llama3:8' -> a rope_scaling dict."""
    kind, _, factor = spec.strip().lower().partition(":")
    if kind in ("none", "plain", "default", "base"):
        return {"type": "default"}
    if kind not in SPEC_TYPES:
        raise SpindleError(f"{option} {spec!r}: expected none, " + ", ".join(
            k if k == "dynamic" else f"{k}:F" for k in SPEC_TYPES))
    try:
        f = float(factor) if factor else 1.0
    except ValueError:
        raise SpindleError(f"{option} {spec!r}: the factor after ':' must be a number") from None
    if not 0 < f <= 1e6:
        raise SpindleError(f"{option} {spec!r}: the factor must be in (0, 1e6]")
    out = {"type": kind, "factor": f}
    if "original_max_position_embeddings" in ROPE_TYPES[kind].params:
        out["original_max_position_embeddings"] = original_len
    out.update(filled_defaults(kind))
    return out


def rope_type(name: Optional[str]) -> RopeType:
    if name not in ROPE_TYPES:
        raise SpindleError(f"rope_scaling type {name!r}: expected one of {', '.join(ROPE_TYPES)}")
    return ROPE_TYPES[name]


# --------------------------------------------------------------------------- evaluation variants


@dataclass
class Variant:
    name: str
    scaling: Optional[dict] = None  # rope_scaling dict; None = the checkpoint's own
    per_length_yarn: bool = False  # yarn with factor L / T_train, one pass per length
    logn: bool = False
    overrides: dict = field(default_factory=dict)

    @property
    def per_length(self) -> bool:
        kind = (self.scaling or {}).get("type")
        return self.per_length_yarn or (kind in ROPE_TYPES and ROPE_TYPES[kind].varies_with_length)


def parse_variant(spec: str, train_len: int) -> Variant:
    """'plain' | 'dynamic' | 'yarn' | 'yarn:F' | 'ntk:F' | 'linear:F' | 'logn' and '+' combinations."""
    v = Variant(name=spec)
    for part in spec.split("+"):
        kind, _, arg = part.strip().lower().partition(":")
        try:
            factor = float(arg) if arg else None
        except ValueError:
            raise SpindleError(f"variant {spec!r}: the factor after ':' must be a number") from None
        if kind in ("plain", "none", "default", "base"):
            continue
        if kind == "logn":
            v.logn = True
        elif kind == "yarn" and factor is None:
            v.per_length_yarn = True
        else:
            try:
                v.scaling = parse_rope_spec(part, train_len, "--variants")
            except SpindleError:
                raise SpindleError(f"variant {spec!r}: unknown part {part!r} (expected plain, dynamic, yarn, yarn:F, "
                                   "ntk:F, linear:F, llama3:F, logn, joined by '+')") from None
    return v
