"""The RoPE scaling-law reproduction (rope.md §4): one command, resumable stages.

    .venv/bin/python experiments/rope_scaling_laws/run.py            # the full study (~60-90 min alone)
    .venv/bin/python experiments/rope_scaling_laws/run.py --quick    # a few-minute smoke test
    ... --stages data,pretrain,continue,eval,analyze                 # a subset (default: all)

Stages (each skipped when its output exists under work/):
  data      byte-level shards of the stdlib .py files (spindle prepare), long files held out
  pretrain  base 10^4 at T_train = 256 (and base 10^3 for the critical-dimension test)
  continue  continued training from the pre-trained weights at new bases (model weights only)
  eval      per-position loss to 16K tokens: every base, plus Dynamic NTK / YaRN / log-n variants
  analyze   results JSON, plots, the README table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repo root, for `import spindle`
sys.path.insert(0, str(HERE))

import stages  # noqa: E402

FULL = dict(
    prefix="",
    pretrain=dict(steps=400, lr=1e-3, warmup_ratio=0.15, eta_min=1e-4, micro_bsz=32),
    cont=dict(steps=50, lr=5e-4, warmup_ratio=0.1, eta_min=5e-4, micro_bsz=32),
    large=[1e4, 1e5, 1e6, 1e7, 1e8],
    small=[163, 40.7, 20],
    pre1000=[1e4, 1e5, 1e6],  # continued from the base-10^3 pre-training
    eval_len=16384, eval_windows=6,
)
QUICK = dict(
    prefix="quick-",
    pretrain=dict(steps=150, lr=2e-3, warmup_ratio=0.1, eta_min=2e-4, micro_bsz=16),
    cont=dict(steps=30, lr=3e-4, warmup_ratio=0.2, eta_min=3e-4, micro_bsz=16),
    large=[1e4, 1e6, 1e8],
    small=[20],
    pre1000=[],
    eval_len=4096, eval_windows=4,
)


def base_name(b: float) -> str:
    return f"{b:g}".replace("+", "")


def training_plan(p: dict) -> list[dict]:
    pre = p["prefix"] + "pre-b1e4"
    runs = [stages.train_config(pre, 1e4, **p["pretrain"])]
    # the most informative bases first, so that a study cut short still has the widest span
    order = sorted(p["large"] + p["small"], key=lambda b: (b not in (1e4, 1e6, 1e8, 20), b))
    for b in order:
        runs.append(stages.train_config(f"{p['prefix']}ct-b{base_name(b)}", b, init_from=pre, **p["cont"]))
    if p["pre1000"]:
        pre3 = p["prefix"] + "pre-b1e3"
        runs.append(stages.train_config(pre3, 1e3, **p["pretrain"]))
        for b in p["pre1000"]:
            runs.append(stages.train_config(f"{p['prefix']}ct1e3-b{base_name(b)}", b, init_from=pre3, **p["cont"]))
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test version (a few minutes)")
    ap.add_argument("--with-pre1000", action="store_true",
                    help="also pre-train at base 10^3 and continue it at 10^4..10^6 (the critical-dimension test)")
    ap.add_argument("--stages", default="data,pretrain,continue,eval,analyze")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if not args.with_pre1000:
        p["pre1000"] = []
    todo = set(args.stages.split(","))
    log = lambda *a: print(time.strftime("%H:%M:%S"), *a, flush=True)  # noqa: E731
    import torch

    torch.set_num_threads(2)
    if "data" in todo or "pretrain" in todo or "continue" in todo:
        stages.prepare_data(log)
    runs = training_plan(p)
    import study
    for raw in runs:
        is_pre = "-pre-" in "-" + raw["JOB_NAME"]
        if (is_pre and "pretrain" in todo) or (not is_pre and "continue" in todo):
            # resolve the model-only init to the pre-training's final checkpoint folder
            info = raw["ckpt"].get("load_ckpt_info")
            if info is not None:
                src = stages.final_checkpoint(info["path"])
                if src is None or src.name != str(p["pretrain"]["steps"]):
                    log(f"[{raw['JOB_NAME']}] skipped: {info['path']} has not finished pre-training")
                    continue
                info["path"] = str(src)
            stages.train(raw, log)
            if "eval" in todo:  # evaluate each model as soon as it is trained: partial results at any time
                study.evaluate_all(p, runs, log, only=raw["JOB_NAME"], extras=False)
                if "analyze" in todo:
                    try:
                        study.analyze(p, log=lambda *a: None)
                    except Exception as exc:  # noqa: BLE001 - partial results must not stop the study
                        log(f"analyze (partial) failed: {exc!r}")
    if "eval" in todo or "analyze" in todo:
        if "eval" in todo:
            study.evaluate_all(p, runs, log)
        if "analyze" in todo:
            study.analyze(p, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
