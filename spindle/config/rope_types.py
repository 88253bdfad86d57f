"""The RoPE scaling types, in one registry: which parameters each takes, which depend on the sequence
length, how a command line names one. Used by the config (`model.rope_scaling`), the rotary math
(spindle/model/rope.py: one inv_freq rule per name), the Hugging Face mapping
(spindle/interop/families.py) and every `--rope-scaling` / `--variants` option (`parse_rope_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from spindle.errors import SpindleError


@dataclass(frozen=True)
class RopeType:
    params: tuple[str, ...]  # the keys it takes besides the type name (transformers' names)
    varies_with_length: bool = False  # inv_freq depends on the current sequence length
    in_transformers: bool = True  # False: Spindle's own (fixed NTK = a larger base)
    what: str = ""


_YARN = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim", "truncate")
ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType((), what="base^(-2n/D)"),
    "linear": RopeType(("factor",), what="position interpolation: inv_freq / factor"),
    "ntk": RopeType(("factor",), in_transformers=False, what="fixed NTK-aware: base * factor^(D/(D-2))"),
    "dynamic": RopeType(("factor", "original_max_position_embeddings"), varies_with_length=True,
                        what="dynamic NTK: the base grows with the sequence beyond the original length"),
    "yarn": RopeType(_YARN, what="NTK-by-parts with an attention factor"),
    "llama3": RopeType(("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                       what="wavelength-banded interpolation (Llama 3.1)"),
    "longrope": RopeType(("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                          "long_factor"), varies_with_length=True, what="per-frequency short / long factors (Phi-3)"),
}
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
    if kind == "llama3":  # Llama 3.1's bands (transformers has no defaults for them)
        out.update(low_freq_factor=1.0, high_freq_factor=4.0)
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
        return self.per_length_yarn or (self.scaling or {}).get("type") in ("dynamic", "longrope")


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
