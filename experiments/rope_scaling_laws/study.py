"""Evaluation and analysis stages of the RoPE scaling-law reproduction.

eval:    every trained model through `spindle.eval.perplexity.evaluate_variant` on held-out stdlib files
         (per-position loss out to the evaluation length, chunked prefill with the KV cache); the
         pre-trained model also with the training-free variants (Dynamic NTK, YaRN, log-n); the
         small-base models also with log-scaled attention. One JSON per model under work/eval/.
analyze: break lengths, the log-log fit against 2*pi*beta^(d_extra/d), small-base smoothness,
         plots, results.json and the README table (results/ or results_quick/).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import stages

SMALL_LOGN_MAX = 1000  # small bases (<= this) are also evaluated with log-scaled attention
DELTAS = (0.05, 0.1, 0.2)  # break = first bucket past T_train whose NLL exceeds the in-range NLL by delta


def out_dirs(p: dict) -> tuple[Path, Path]:
    quick = bool(p["prefix"])
    return stages.WORK / ("eval_quick" if quick else "eval"), stages.HERE / ("results_quick" if quick else "results")


def model_list(p: dict) -> list[dict]:
    """(job name, base, kind, variants) for every model the study evaluates."""
    from run import base_name

    pre = p["prefix"] + "pre-b1e4"
    out = [dict(name=pre, base=1e4, kind="pretrained", variants=["plain", "dynamic", "yarn", "logn"])]
    for b in p["large"] + p["small"]:
        v = ["plain", "logn"] if b <= SMALL_LOGN_MAX else ["plain"]
        out.append(dict(name=f"{p['prefix']}ct-b{base_name(b)}", base=b, kind="large" if b >= 1e4 else "small",
                        variants=v))
    for b in p["pre1000"]:
        out.append(dict(name=f"{p['prefix']}ct1e3-b{base_name(b)}", base=b, kind="pre1e3", variants=["plain"]))
    if p["pre1000"]:
        out.append(dict(name=p["prefix"] + "pre-b1e3", base=1e3, kind="pretrained1e3", variants=["plain"]))
    return out


def eval_windows(p: dict):
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.perplexity import load_token_docs, make_windows

    split = json.loads((stages.WORK / "data" / "split.json").read_text())
    docs = load_token_docs(split["eval_files"], load_tokenizer("byte"))
    return make_windows(docs, p["eval_len"], p["eval_windows"])


_WINDOWS: dict = {}


def evaluate_all(p: dict, runs: list[dict], log=print, only: str | None = None, extras: bool = True) -> None:
    from spindle.eval.load import load_model_for_eval
    from spindle.eval.perplexity import default_lengths, evaluate_variant, parse_variant

    ev_dir, _ = out_dirs(p)
    ev_dir.mkdir(parents=True, exist_ok=True)
    key = (p["eval_len"], p["eval_windows"])
    if key not in _WINDOWS:
        _WINDOWS[key] = eval_windows(p)
    wins, natural = _WINDOWS[key]
    T = stages.T_TRAIN
    lengths = default_lengths(T, p["eval_len"] // T)
    if only is None:
        log(f"eval: {wins.shape[0]} windows of {wins.shape[1]} bytes ({natural} whole held-out files), lengths {lengths}")  # noqa: E501
    for m in model_list(p):
        if only is not None and m["name"] != only:
            continue
        if not extras:  # the essential variants first; YaRN and log-n on the pre-trained model at the end
            m = dict(m, variants=[v for v in m["variants"] if v in ("plain", "dynamic") or
                                  (v == "logn" and m["kind"] == "small")])
        out_file = ev_dir / f"{m['name']}.json"
        ck = stages.final_checkpoint(m["name"])
        if ck is None:
            log(f"[{m['name']}] not trained: skipped")
            continue
        have = json.loads(out_file.read_text()) if out_file.exists() else {}
        if have.get("ckpt") == str(ck) and all(v in have.get("variants", {}) for v in m["variants"]):
            continue
        model, cfg = load_model_for_eval(str(ck))
        res = {"ckpt": str(ck), "name": m["name"], "base": m["base"], "kind": m["kind"], "train_len": T,
               "lengths": lengths, "n_windows": int(wins.shape[0]), "variants": have.get("variants", {})}
        log(f"[{m['name']}] base {m['base']:g}")
        for spec in m["variants"]:
            if spec in res["variants"] and have.get("ckpt") == str(ck):
                continue
            res["variants"][spec] = evaluate_variant(model, wins, lengths, T, parse_variant(spec, T), chunk=4096,
                                                     batch=4, per_octave=4, log=log)
            out_file.write_text(json.dumps(res))


# ----------------------------------------------------------------------------- analysis


def envelope(curves: list[dict]) -> list[float]:
    """Bucket-wise minimum NLL over several models' curves on the same windows (same edges)."""
    return [min(v for v in vals if v is not None) for vals in zip(*(c["nll"] for c in curves))]


def break_length(curve: dict, T: int, delta: float, env: list[float] | None = None) -> tuple[float | None, float]:
    """(first position past T whose bucket NLL exceeds the [T/2, T) level by delta, that level).

    With `env` (the best NLL any model reaches in each bucket, which tracks how hard the text at that
    position is), the comparison is on NLL - env instead of NLL: content difficulty that changes with
    position (file headers, long bodies) is removed, and only the model's excess loss is tested.
    """
    e, nll = curve["edges"], curve["nll"]
    if env is not None:
        nll = [None if v is None else v - m for v, m in zip(nll, env)]
    ref_vals = [(min(hi, T) - max(lo, T // 2), v) for lo, hi, v in zip(e[:-1], e[1:], nll)
                if hi > T // 2 and lo < T and v is not None]
    ref = sum(w * v for w, v in ref_vals) / sum(w for w, _ in ref_vals)
    for lo, hi, v in zip(e[:-1], e[1:], nll):
        if lo >= T and v is not None and v > ref + delta:
            return float(lo), ref
    return None, ref


def linfit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    resid = [y - (icpt + slope * x) for x, y in zip(xs, ys)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx) if n > 2 else float("nan")
    return {"slope": slope, "slope_se": se, "intercept": icpt, "n": n}


def tail(r: dict, L: int) -> float:
    return r["length"][str(L)]["tail_nll"]


def analyze(p: dict, log=print) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spindle.ropelaws import critical_dim, extrapolation_bound, small_base_thresholds

    ev_dir, res_dir = out_dirs(p)
    res_dir.mkdir(parents=True, exist_ok=True)
    T, d = stages.T_TRAIN, stages.HEAD_DIM
    d_extra = critical_dim(d, T, 1e4)
    b1, b2, b3 = small_base_thresholds(T)
    models = {}
    for m in model_list(p):
        f = ev_dir / f"{m['name']}.json"
        if f.exists():
            models[m["name"]] = json.loads(f.read_text())
    if not models:
        raise SystemExit("no evaluation results yet: run the eval stage")
    lengths = next(iter(models.values()))["lengths"]
    Lmax = lengths[-1]
    train = {}
    for name in models:
        s = stages.WORK / "runs" / name / "summary.json"
        if s.exists():
            train[name] = json.loads(s.read_text())

    # content-difficulty envelope: the best fixed-RoPE curve in every bucket over all evaluated models
    env = envelope([v["curve"] for r in models.values() for v in r["variants"].values() if not v["per_length"]])
    rows = []
    for name, r in models.items():
        if r["kind"] == "pretrained1e3":
            continue
        dx = critical_dim(d, T, 1e3) if r["kind"] == "pre1e3" else d_extra
        for spec, v in r["variants"].items():
            row = {"model": name, "base": r["base"], "kind": r["kind"], "variant": spec,
                   "predicted_T_extra": extrapolation_bound(r["base"], d, dx) if r["base"] >= 1e4 and
                   r["kind"] != "pretrained" else None,
                   "tail_nll": {L: tail(v, L) for L in lengths},
                   "ppl": {L: v["length"][str(L)]["ppl"] for L in lengths}}
            if not v["per_length"]:
                for delta in DELTAS:
                    b, ref = break_length(v["curve"], T, delta, env)
                    row[f"break_{delta}"] = b
                    row[f"break_raw_{delta}"], row["in_range_nll"] = break_length(v["curve"], T, delta)
            row["train"] = train.get(name)
            rows.append(row)

    # the scaling law: observed break (delta 0.1) vs base for the continued-training large bases
    fits = {}
    for kind, dx in (("large", d_extra), ("pre1e3", critical_dim(d, T, 1e3))):
        for delta in DELTAS:
            pts = [(r["base"], r[f"break_{delta}"]) for r in rows if r["kind"] == kind and r["variant"] == "plain"
                   and r.get(f"break_{delta}")]
            censored = [r["base"] for r in rows if r["kind"] == kind and r["variant"] == "plain"
                        and r.get(f"break_{delta}") is None]
            if len(pts) >= 2:  # slope_se needs 3 points (nan with 2)
                f = linfit([math.log(b) for b, _ in pts], [math.log(t) for _, t in pts])
                f["theory_slope"] = dx / d
                f["points"] = pts
                f["censored_bases (no break before L_max)"] = censored
                fits[f"{kind}/delta={delta}"] = f
            elif pts or censored:
                fits[f"{kind}/delta={delta}"] = {"points": pts, "censored_bases (no break before L_max)": censored,
                                                 "theory_slope": dx / d, "slope": None}

    # small bases: NLL at the longest bucket vs base, with and without log-n; smoothness = largest jump
    small = []
    for r in rows:
        if r["kind"] in ("small", "large") and r["base"] <= 1e4:
            v = models[r["model"]]["variants"][r["variant"]]
            c = v["curve"]
            ex = [(lo, x - m) for lo, x, m in zip(c["edges"][:-1], c["nll"], env) if x is not None]
            inside = [x for lo, x in ex if T // 2 <= lo < T]
            past = [(lo, x) for lo, x in ex if lo >= T]
            jumps = [b - a for (_, a), (_, b) in zip(past[:-1], past[1:])]
            last_octave = [x for lo, x in ex if lo >= Lmax // 2]
            small.append({"base": r["base"], "variant": r["variant"], "nll_in_range": r.get("in_range_nll"),
                          "nll_tail_Lmax": r["tail_nll"][Lmax],
                          "excess_in_range": sum(inside) / len(inside),
                          "excess_last_octave": sum(last_octave) / len(last_octave),
                          "max_excess_jump_between_quarter_octaves": max(jumps) if jumps else None})
    small.sort(key=lambda s: (-s["base"], s["variant"]))

    pre = models.get(p["prefix"] + "pre-b1e4")
    dyn = {L: tail(pre["variants"]["dynamic"], L) for L in lengths} if pre and "dynamic" in pre["variants"] else None

    result = {
        "quick": bool(p["prefix"]),
        "envelope_nll": env,
        "setup": {"T_train": T, "head_dim": d, "model": stages.MODEL, "pretrain": p["pretrain"],
                  "continued_training": p["cont"], "eval_len": Lmax, "eval_windows": p["eval_windows"],
                  "tokenizer": "byte", "data": "CPython stdlib .py files (tests excluded), long files held out",
                  "break_definition": "first quarter-octave bucket at positions >= T_train whose excess NLL (NLL minus "
                                      "the best NLL any evaluated fixed-RoPE model reaches in that bucket) exceeds "
                                      "the excess over positions [T_train/2, T_train) by delta nats; break_raw_*: "
                                      "the same on plain NLL (no content correction)"},
        "theory": {"d_extra": d_extra, "slope": d_extra / d, "beta1_beta2_beta3": [b1, b2, b3],
                   "d_extra_pre1e3": critical_dim(d, T, 1e3)},
        "rows": rows, "fits": fits, "small_bases": small, "dynamic_ntk_tail_nll": dyn,
    }
    (res_dir / "results.json").write_text(json.dumps(result, indent=1, default=float))

    # ---- plots
    cmap = plt.get_cmap("viridis")

    def curve_xy(v):
        c = v["curve"]
        return ([math.sqrt(max(lo, 1) * hi) for lo, hi in zip(c["edges"][:-1], c["edges"][1:])], c["nll"])

    def excess(y):
        return [None if v is None else v - m for v, m in zip(y, env)]

    def excess_axis(a):
        a.axvline(T, color="grey", lw=0.8)
        a.axhline(0, color="grey", lw=0.5)
        a.set_xscale("log", base=2)
        a.set_xlabel("position (bytes)")
        a.set_ylabel("excess NLL over the best model in each bucket")
        a.grid(alpha=0.3)

    def dyn_line(ax):
        if pre is None:
            return
        ax.plot(*curve_xy(pre["variants"]["plain"]), color="black", lw=1.2, label="pre-trained, plain (no tuning)")
        if dyn:
            ax.plot([math.sqrt(L / 2 * L) for L in lengths], [dyn[L] for L in lengths], "k--o", ms=3,
                    label="pre-trained + Dynamic NTK (per-length, tail)")

    def finish_position_plot(fig, ax, axe, ylabel: str, title: str, name: str) -> None:
        """Shared axes, labels and file output of the two loss-vs-position figures."""
        excess_axis(axe)
        ax.axvline(T, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
        ax.set_ylabel(ylabel)
        ax.set_title(title + (" [QUICK run]" if p["prefix"] else ""), fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(res_dir / name, dpi=110)
        plt.close(fig)

    large = sorted((r for r in rows if r["kind"] == "large" and r["variant"] == "plain"), key=lambda r: r["base"])
    fig, (ax, axe) = plt.subplots(2, 1, figsize=(9, 9), sharex=True)
    for i, r in enumerate(large):
        col = cmap(i / max(1, len(large) - 1))
        x, y = curve_xy(models[r["model"]]["variants"]["plain"])
        ax.plot(x, y, color=col, label=f"base {r['base']:g}")
        axe.plot(x, excess(y), color=col, label=f"base {r['base']:g}")
        if r["predicted_T_extra"]:
            for a in (ax, axe):
                a.axvline(r["predicted_T_extra"], color=col, ls=":", lw=1.3)
    dyn_line(ax)
    if pre is not None:
        axe.plot(*curve_xy(pre["variants"]["plain"])[:1], excess(curve_xy(pre["variants"]["plain"])[1]),
                 color="black", lw=1.2, label="pre-trained, plain")
    finish_position_plot(fig, ax, axe, "NLL (nats/byte), quarter-octave buckets",
                         f"Larger bases, continued training at T={T}: dotted = predicted 2π·β^({d_extra}/{d})",
                         "loss_vs_position_large_bases.png")

    sm = sorted((r for r in rows if r["kind"] in ("small",) or (r["kind"] == "large" and r["base"] == 1e4)),
                key=lambda r: (-r["base"], r["variant"]))
    if sm:
        fig, (ax, axe) = plt.subplots(2, 1, figsize=(9, 9), sharex=True)
        bases = sorted({r["base"] for r in sm}, reverse=True)
        for r in sm:
            col = plt.get_cmap("plasma")(bases.index(r["base"]) / max(1, len(bases) - 1) * 0.9)
            ls = "--" if "logn" in r["variant"] else "-"
            lab = f"base {r['base']:g}" + (" + log-n" if "logn" in r["variant"] else "")
            x, y = curve_xy(models[r["model"]]["variants"][r["variant"]])
            ax.plot(x, y, color=col, ls=ls, label=lab)
            axe.plot(x, excess(y), color=col, ls=ls, label=lab)
        dyn_line(ax)
        finish_position_plot(fig, ax, axe, "NLL (nats/byte)",
                             f"Smaller bases (β1/β2/β3 = {b1:.0f}/{b2:.1f}/{b3:.1f}); dashed = log-scaled attention",
                             "loss_vs_position_small_bases.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    bs = [10 ** (3.8 + k * 0.05) for k in range(90)]
    ax.plot(bs, [extrapolation_bound(b, d, d_extra) for b in bs], "k-", label=f"theory 2π·β^({d_extra}/{d})")
    markers = {0.05: "v", 0.1: "o", 0.2: "^"}
    for delta in DELTAS:
        pts = [(r["base"], r[f"break_{delta}"]) for r in large if r.get(f"break_{delta}")]
        cens = [r["base"] for r in large if r.get(f"break_{delta}") is None]
        if pts:
            ax.plot(*zip(*pts), markers[delta], ms=7 if delta == 0.1 else 5, alpha=0.9 if delta == 0.1 else 0.5,
                    label=f"observed break, δ={delta} nat")
        if cens:
            ax.plot(cens, [Lmax] * len(cens), markers[delta], mfc="none", color="grey",
                    label=f"no break ≤ {Lmax} (δ={delta})")
        f = fits.get(f"large/delta={delta}")
        if f and f.get("slope") is not None and delta == min(
                dl for dl in DELTAS if fits.get(f"large/delta={dl}", {}).get("slope") is not None):
            ax.plot(bs, [math.exp(f["intercept"]) * b ** f["slope"] for b in bs], "C1--",
                    label=f"fit (δ={delta}): slope {f['slope']:.3f} ± {f['slope_se']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rotary base β (continued training)")
    ax.set_ylabel("break length (tokens)")
    ax.set_title("Break length vs base" + (" [QUICK run]" if p["prefix"] else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res_dir / "break_length_vs_base.png", dpi=110)
    plt.close(fig)

    table = readme_table(rows, lengths, T)
    (res_dir / "table.md").write_text(table)
    log(table)
    for k, f in fits.items():
        if f.get("slope") is not None:
            log(f"fit {k}: slope {f['slope']:.3f} ± {f['slope_se']:.3f} (theory {f['theory_slope']:.3f}), n={f['n']}")
    return result


def readme_table(rows: list[dict], lengths: list[int], T: int) -> str:
    show = [L for L in lengths if L in (T, 4 * T, 16 * T, 64 * T) or L == lengths[-1]]
    show = sorted(set(show))
    head = ("| model | variant | base | predicted T_extra | break at δ=0.05 / 0.1 / 0.2 (none = not before L_max) | "
            + " | ".join(f"NLL [{L // 2}, {L})" for L in show) + " |")
    sep = "|" + "---|" * (5 + len(show))
    out = [head, sep]
    order = {"pretrained": 0, "large": 1, "small": 2, "pre1e3": 3}
    for r in sorted(rows, key=lambda r: (order.get(r["kind"], 9), -r["base"] if r["kind"] == "small" else r["base"],
                                         r["variant"])):
        if f"break_{DELTAS[0]}" in r:
            br = " / ".join("none" if r[f"break_{dl}"] is None else f"{r[f'break_{dl}']:.0f}" for dl in DELTAS)
        else:
            br = "n/a (per-length)"
        pt = f"{r['predicted_T_extra']:.0f}" if r["predicted_T_extra"] else ""
        out.append(f"| {r['model']} | {r['variant']} | {r['base']:g} | {pt} | {br} | "
                   + " | ".join(f"{r['tail_nll'][L]:.3f}" for L in show) + " |")
    return "\n".join(out) + "\n"
