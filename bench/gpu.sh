#!/usr/bin/env bash
# Train a ~1B-parameter Llama in bf16 on one GPU with Spindle's Trainer (SDPA flash attention, fused
# AdamW, per-block torch.compile) and report tokens/s and MFU against the declared peak (989 TFLOP/s
# bf16 dense on H100/H200). Usage: bench/gpu.sh [extra gpu_train.py flags, e.g. --micro-bsz 8]
# CPU smoke test of the same code path: bench/gpu.sh --preset tiny --device cpu --steps 4 --warmup 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/bench_gpu}
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv || true
"$PY" -m spindle.benchmarks.gpu_train --preset 1b --steps 30 --warmup 5 --out "$OUT/gpu_train_$(date +%Y%m%d_%H%M%S).json" "$@"
