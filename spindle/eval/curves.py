"""Long-context metrics of a training run by step: their names, reading them back from metrics.jsonl, the plot.

The names (written by spindle/train/long_eval.py, read here and by `spindle eval plot`):

    val/ppl@L            perplexity over the first L tokens of the evaluation windows, the model's own RoPE
    val/ppl@L/VARIANT    the same with a RoPE variant of `spindle eval --variants` (yarn, dynamic+logn, ...)
    val/passkey@L        passkey accuracy at length L, averaged over the configured depths
    val/passkey@L/VARIANT
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

from spindle.errors import SpindleError

KINDS = ("ppl", "passkey")
_KEY = re.compile(r"^val/(ppl|passkey)@(\d+)(?:/(.+))?$")


def metric_key(kind: str, length: int, variant: str = "plain") -> str:
    return f"val/{kind}@{length}" + ("" if variant == "plain" else f"/{variant}")


def parse_key(key: str) -> Optional[tuple[str, int, str]]:
    """'val/ppl@4096/yarn' -> ('ppl', 4096, 'yarn'); None for any other key."""
    m = _KEY.match(key)
    return (m.group(1), int(m.group(2)), m.group(3) or "plain") if m else None


def read_curves(run: str) -> dict:
    """{kind: {variant: {step: {length: value}}}} from a run folder (or its metrics.jsonl)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise SpindleError(f"eval plot {run}: not found" if not Path(run).exists() else
                           f"eval plot {run}: no metrics.jsonl in this folder (trainer.jsonl=False, or not a run)")
    curves: dict = {k: {} for k in KINDS}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SpindleError(f"eval plot {path}: line {n} is not JSON") from None
        if not isinstance(record, dict):
            continue
        for key, value in record.items():
            parsed = parse_key(key)
            if parsed and isinstance(value, (int, float)) and math.isfinite(value):
                kind, length, variant = parsed
                curves[kind].setdefault(variant, {}).setdefault(int(record.get("step", -1)), {})[length] = value
    if not any(curves.values()):
        raise SpindleError(f"eval plot {path}: no val/ppl@L or val/passkey@L records "
                           f"({len(lines)} lines; set long_eval.lengths or long_eval.passkey_lengths and "
                           "data.valid_every to record them)")
    return curves


def plot_curves(curves: dict, path: Path, title: str = "") -> None:
    """One panel per kind present: the value against the length, one line per (variant, step); later steps darker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if curves.get(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, kind in zip(axes[0], kinds):
        cmaps = [plt.cm.viridis, plt.cm.plasma, plt.cm.cividis, plt.cm.magma]
        for v, (variant, by_step) in enumerate(sorted(curves[kind].items())):
            steps = sorted(by_step)
            for i, step in enumerate(steps):
                pts = sorted(by_step[step].items())
                shade = 0.15 + 0.7 * (i / max(1, len(steps) - 1))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[v % len(styles)], marker="o",
                        color=cmaps[v % len(cmaps)](1 - shade), label=f"{variant} step {step}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("length (tokens)")
        if kind == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity over the first L tokens")
        else:
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("passkey accuracy (mean over depths)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "long-context metrics by training step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
