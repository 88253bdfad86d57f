"""Scaling laws of RoPE-based extrapolation (Liu et al., arXiv 2310.05209, ICLR 2024) as pure functions.

Notation (docs/long-context.md has the derivations): d = head dimension, T_train = pre-training
context, beta_pre = pre-training rotary base, beta = base used for continued training at T_tune.

    critical dimension   d_extra  = 2 * ceil((d/2) * log_{beta_pre}(T_train / 2pi))        (Lemma 1)
    extrapolation bound  T_extra  = 2pi * beta^(d_extra / d)                                 (beta > beta_0)
    critical base        beta_0   = beta_pre^(log_{T_train/2pi}(T_tune / 2pi))               (Theorem 3)
    tuned critical dim   d'_extra = 2 * ceil((d/2) * log_beta(T_tune / 2pi)), capped at d    (beta <= beta_0)
    small-base thresholds beta_1, beta_2, beta_3 = 2 T_tune/pi, T_tune/pi, T_tune/(2pi)

Everything here is plain float/int math with no state; `spindle rope` (spindle/cli/rope.py) prints it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from spindle.errors import SpindleError

__all__ = [
    "critical_dim",
    "extrapolation_bound",
    "critical_base",
    "tuned_critical_dim",
    "extended_bound",
    "bound_regime",
    "small_base_thresholds",
    "recommend_base",
    "rope_report",
    "format_rope_report",

]

TWO_PI = 2.0 * math.pi
# ceil() of a float that is an integer up to rounding noise (e.g. 13.000000000000002) must not jump to the
# next integer; the tolerance is far below any real change of one dimension pair.
_CEIL_EPS = 1e-9


def _ceil(x: float) -> int:
    return math.ceil(x - _CEIL_EPS)


def _check_head_dim(head_dim: Any) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise SpindleError(f"head_dim must be a positive even integer, got {head_dim!r}")
    return head_dim


def _check_len(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpindleError(f"{name} must be a positive number of tokens, got {value!r}")
    # The laws take log(T / 2pi); a context shorter than one full turn of the fastest pair is meaningless.
    if value <= TWO_PI:
        raise SpindleError(f"{name} must exceed 2*pi (~6.28) tokens, got {value!r}")
    return float(value)


def _check_base(value: Any, name: str = "base") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise SpindleError(f"{name} must be a finite number > 1, got {value!r}")
    return float(value)


def _dims_with_full_period(head_dim: int, length: float, base: float) -> int:
    # Pair n has period 2pi * base^(2n/d); the paper counts the dims whose pair completes a period
    # within `length` as 2*ceil((d/2) log_base(length/2pi)). Clamped to [0, d].
    raw = 2 * _ceil((head_dim / 2) * math.log(length / TWO_PI) / math.log(base))
    return max(0, min(head_dim, raw))


def critical_dim(head_dim: int, train_len: float, base_pre: float = 10000) -> int:
    """d_extra (Lemma 1): how many leading dims saw a full period during pre-training at `train_len`.

    (128, 4096, 10000) -> 92. Capped at head_dim (every pair completed a turn).
    """
    return _dims_with_full_period(
        _check_head_dim(head_dim), _check_len(train_len, "train_len"), _check_base(base_pre, "base_pre")
    )


def extrapolation_bound(base: float, head_dim: int, d_extra: int) -> float:
    """T_extra = 2pi * base^(d_extra/d): the length at which the critical pair leaves its trained range.

    Returns math.inf when d_extra == head_dim: every pair already completed a full turn, so no pair
    sees an unseen angle and there is no sharp bound (degradation is gradual instead).
    """
    d = _check_head_dim(head_dim)
    b = _check_base(base)
    if isinstance(d_extra, bool) or not isinstance(d_extra, int) or not 0 <= d_extra <= d or d_extra % 2:
        raise SpindleError(f"d_extra must be an even int in [0, head_dim={d}], got {d_extra!r}")
    if d_extra == d:
        return math.inf
    return TWO_PI * b ** (d_extra / d)


def critical_base(train_len: float, tune_len: float, base_pre: float = 10000) -> float:
    """beta_0 (Theorem 3): the base at which tuning at `tune_len` moves the critical pair's period to T_tune.

    beta_0 = base_pre^(log_{T_train/2pi}(T_tune/2pi)); equals base_pre when tune_len == train_len.
    (4096 -> 16384) gives ~71 738.
    """
    t_train = _check_len(train_len, "train_len")
    t_tune = _check_len(tune_len, "tune_len")
    b_pre = _check_base(base_pre, "base_pre")
    if t_tune < t_train:
        raise SpindleError(f"tune_len ({tune_len}) must be >= train_len ({train_len}) (Theorem 3 assumes it)")
    return b_pre ** (math.log(t_tune / TWO_PI) / math.log(t_train / TWO_PI))


def tuned_critical_dim(base: float, head_dim: int, tune_len: float) -> int:
    """d'_extra: dims completing a full period within `tune_len` under `base`, capped at head_dim."""
    return _dims_with_full_period(_check_head_dim(head_dim), _check_len(tune_len, "tune_len"), _check_base(base))


def bound_regime(base: float, head_dim: int, train_len: float, tune_len: float, base_pre: float = 10000) -> str:
    """Which branch of Theorem 3 applies: "large" (beta > beta_0, sharp bound 2pi beta^(d_extra/d)),
    "tuned" (beta <= beta_0: bound T_tune, some dims never saw a full turn), or "small"
    (beta <= beta_0 and d'_extra == d: every dim completed a turn, no sharp bound, gradual rise)."""
    b = _check_base(base)
    if b > critical_base(train_len, tune_len, base_pre):
        return "large"
    return "small" if tuned_critical_dim(b, head_dim, tune_len) == head_dim else "tuned"


def extended_bound(
    base: float, head_dim: int, train_len: float, tune_len: float | None = None, base_pre: float = 10000
) -> float:
    """Predicted extrapolation bound after continued training at `tune_len` with `base` (Theorem 3).

    beta > beta_0: 2pi * beta^(d_extra/d) with the *pre-training* d_extra; beta <= beta_0: T_tune.
    In the beta <= beta_0 regime small bases still extrapolate past T_tune, but gradually (no sharp
    bound); see `bound_regime`. tune_len defaults to train_len (the paper's 4K setting).
    """
    tune = train_len if tune_len is None else tune_len
    b = _check_base(base)
    if b > critical_base(train_len, tune, base_pre):
        return extrapolation_bound(b, head_dim, critical_dim(head_dim, train_len, base_pre))
    return float(tune)


def small_base_thresholds(tune_len: float) -> tuple[float, float, float]:
    """(beta_1, beta_2, beta_3) = (2T/pi, T/pi, T/2pi) for T = tune_len: at these bases the slowest pair
    covers a quarter, half and full period within T. 4096 -> (2607.6, 1303.8, 651.9)."""
    t = _check_len(tune_len, "tune_len")
    return 2 * t / math.pi, t / math.pi, t / TWO_PI


def _round_up_nice(x: float, digits: int = 2) -> float:
    # Round up to `digits` significant figures so a recommended base is a number people write in configs.
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - (digits - 1)
    step = 10.0**e
    return math.ceil(x / step - _CEIL_EPS) * step


def recommend_base(
    head_dim: int,
    train_len: float,
    target_len: float,
    base_pre: float = 10000,
    tune_len: float | None = None,
) -> dict:
    """Smallest base whose predicted bound (Theorem 3) reaches `target_len`, plus the small-base option.

    Returns a dict:
      base           exact smallest base (float); base_pre itself when T_tune already covers the target
      base_rounded   `base` rounded up to 2 significant figures
      bound          predicted bound at base_rounded
      regime         "large" (base > beta_0) or "within_tune_len" (target <= T_tune, no change needed)
      small_base     beta_3(T_tune): the largest base with no sharp bound (every pair turns within T_tune);
                     the paper pairs such a base (500 < beta_3(4K)) with log-n attention scaling
      logn_ref_len   the reference length to use with small_base (T_tune)
    """
    d = _check_head_dim(head_dim)
    t_train = _check_len(train_len, "train_len")
    t_tune = t_train if tune_len is None else _check_len(tune_len, "tune_len")
    target = _check_len(target_len, "target_len")
    b_pre = _check_base(base_pre, "base_pre")
    beta0 = critical_base(t_train, t_tune, b_pre)
    d_extra = critical_dim(d, t_train, b_pre)
    small = small_base_thresholds(t_tune)[2]
    out: dict[str, Any] = {"target_len": target, "beta0": beta0, "small_base": small, "logn_ref_len": t_tune}
    if target <= t_tune or d_extra == d:
        # The tuned length covers it (or every pair already turned in pre-training): keep the base.
        out.update(base=b_pre, base_rounded=b_pre, regime="within_tune_len",
                   bound=extended_bound(b_pre, d, t_train, t_tune, b_pre))
        return out
    if d_extra == 0:
        raise SpindleError("no dimension completed a period in pre-training (d_extra = 0): no base reaches the target")
    # Invert 2pi * beta^(d_extra/d) = target; it must also lie above beta_0 to be in the large-base regime.
    beta = (target / TWO_PI) ** (d / d_extra)
    beta = max(beta, math.nextafter(beta0, math.inf))
    rounded = _round_up_nice(beta)
    out.update(base=beta, base_rounded=rounded, regime="large",
               bound=extended_bound(rounded, d, t_train, t_tune, b_pre))
    return out


def _default_bases(base_pre: float, tune_len: float) -> list[float]:
    b1, b2, b3 = small_base_thresholds(tune_len)
    large = [base_pre * k for k in (2, 4, 8, 16, 50, 100, 1000, 10000)]
    return sorted({round(b3), round(b2), round(b1), float(base_pre), *large})


def rope_report(
    head_dim: int,
    train_len: float,
    base_pre: float = 10000,
    tune_len: float | None = None,
    target_len: float | None = None,
    bases: Sequence[float] | None = None,
) -> dict:
    """Everything `spindle rope` prints, as a JSON-serialisable dict (inf bounds become None)."""
    d = _check_head_dim(head_dim)
    t_train = _check_len(train_len, "train_len")
    b_pre = _check_base(base_pre, "base_pre")
    t_tune = t_train if tune_len is None else _check_len(tune_len, "tune_len")
    d_extra = critical_dim(d, t_train, b_pre)
    beta0 = critical_base(t_train, t_tune, b_pre)
    b1, b2, b3 = small_base_thresholds(t_tune)
    if bases is None:
        bases = _default_bases(b_pre, t_tune)
    rows = []
    for b in bases:
        b = _check_base(b, "--base")
        bound = extended_bound(b, d, t_train, t_tune, b_pre)
        rows.append(
            {
                "base": b,
                "regime": bound_regime(b, d, t_train, t_tune, b_pre),
                "tuned_critical_dim": tuned_critical_dim(b, d, t_tune),
                "bound": None if math.isinf(bound) else bound,
                "bound_over_train_len": None if math.isinf(bound) else bound / t_train,
            }
        )
    report: dict[str, Any] = {
        "head_dim": d,
        "train_len": t_train,
        "base_pre": b_pre,
        "tune_len": t_tune,
        "critical_dim": d_extra,
        "critical_dim_fraction": d_extra / d,
        "critical_base": beta0,
        "small_base_thresholds": {"beta1": b1, "beta2": b2, "beta3": b3},
        "bases": rows,
    }
    if target_len is not None:
        report["recommendation"] = recommend_base(d, t_train, target_len, b_pre, t_tune)
    return report


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "none"
    if x >= 1e7:
        return f"{x:.3g}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.4g}"


_REGIME_TEXT = {
    "large": "base > beta0: sharp bound 2pi*base^(d_extra/d)",
    "tuned": "base <= beta0: bound = tune_len",
    "small": "all dims turn within tune_len: no sharp bound",
}


def format_rope_report(report: dict) -> str:
    """Human-readable text of a `rope_report` dict."""
    d, de = report["head_dim"], report["critical_dim"]
    t_train, t_tune = report["train_len"], report["tune_len"]
    th = report["small_base_thresholds"]
    lines = [
        f"RoPE scaling laws (Liu et al. 2310.05209) for head_dim={d}, train_len={_fmt_num(t_train)}, "
        f"base_pre={_fmt_num(report['base_pre'])}, tune_len={_fmt_num(t_tune)}",
        f"  critical dimension d_extra = {de}/{d} (slope {de / d:.4f}): dims {de}..{d - 1} never saw a full "
        "period in pre-training",
        f"  critical base beta0        = {_fmt_num(report['critical_base'])}",
        f"  small-base thresholds      = beta1 {_fmt_num(th['beta1'])}, beta2 {_fmt_num(th['beta2'])}, "
        f"beta3 {_fmt_num(th['beta3'])}",
        "",
        # d'_extra only governs the bound when base <= beta0; above it the pre-training d_extra does.
        f"  {'base':>12}  {'d_extra used':>12}  {'bound (tokens)':>14}  {'x train_len':>11}  regime",
    ]
    for r in report["bases"]:
        ratio = r["bound_over_train_len"]
        used = de if r["regime"] == "large" else r["tuned_critical_dim"]
        lines.append(
            f"  {_fmt_num(r['base']):>12}  {used:>12}  {_fmt_num(r['bound']):>14}  "
            f"{('none' if ratio is None else f'{ratio:.2f}'):>11}  {_REGIME_TEXT[r['regime']]}"
        )
    rec = report.get("recommendation")
    if rec is not None:
        lines.append("")
        if rec["regime"] == "within_tune_len":
            lines.append(
                f"  target {_fmt_num(rec['target_len'])}: within tune_len; keep base {_fmt_num(rec['base'])}"
            )
        else:
            lines.append(
                f"  target {_fmt_num(rec['target_len'])}: smallest base {_fmt_num(rec['base'])} "
                f"-> use {_fmt_num(rec['base_rounded'])} (predicted bound {_fmt_num(rec['bound'])})"
            )
        lines.append(
            f"  small-base alternative: base <= {_fmt_num(rec['small_base'])} (beta3) with log-n scaling, "
            f"logn_ref_len={_fmt_num(rec['logn_ref_len'])}: no sharp bound, gradual degradation"
        )
    return "\n".join(lines)
