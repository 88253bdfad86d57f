#!/usr/bin/env bash
# Paired demo-step benchmark of two checkouts: bash bench/paired_demo.sh OLD_CHECKOUT NEW_CHECKOUT
# The two alternate, 3 rounds each, 30 steps of the embedded demo config per run (no validation, no sample,
# one torch thread); the step time is tokens per step / tgs, median over steps 5..29 of each run, and the
# loss at step 29 shows whether the two compute the same thing.
set -euo pipefail
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
OLD=$1 NEW=$2
OUT=${OUT:-/tmp/paired}; rm -rf "$OUT"; mkdir -p "$OUT"
for round in 1 2 3; do
  for tree in "$OLD" "$NEW"; do
    name=$(basename "$tree")_$round
    (cd "$OUT" && PYTHONPATH=$tree OMP_NUM_THREADS=1 $PY -m spindle train --set data.total_steps=30 data.valid_every=0 \
      trainer.sample_tokens=0 trainer.run_folder=$OUT/$name trainer.peak_tflops=1.0 > $OUT/$name.log 2>&1)
    $PY - "$OUT/$name" "$name" <<'PY'
import json, sys, statistics, pathlib
recs = [json.loads(l) for l in next(pathlib.Path(sys.argv[1]).rglob("metrics.jsonl")).read_text().splitlines()]
t = [2048 / r["tgs (tokens/gpu/second)"] for r in recs[5:]]
print(f"{sys.argv[2]}: median step {statistics.median(t):.4f} s over {len(t)} steps; loss at step 29 {recs[-1]['loss']:.6f}")
PY
  done
done
