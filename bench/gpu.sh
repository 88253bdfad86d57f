#!/usr/bin/env bash
# The GPU check, on a fresh machine, in minutes: installs what is missing (the CUDA wheel of the pinned
# torch where no CUDA torch is there, pydantic / numpy from .whl/ or PyPI, a C compiler for Inductor),
# refuses a machine without a CUDA device at once (one line, exit 2), then runs with a timeout each:
#   1. a bf16 ~1B training step, dense rows and packed documents: tokens/s, MFU, peak memory, the
#      attention kernel (spindle.benchmarks.gpu_train; JSON under $OUT);
#   2. the save / resume round trip, bit for bit (deterministic kernels);
#   3. with two or more GPUs: the parity layouts that fit them, a rank per GPU (NCCL), against one process;
#   4. `spindle bench attention --quick --device cuda` (packed vs dense attention);
#   5. an MoE training step (every layer 8 experts, top 2; --moe; eager): tokens/s, MFU on active FLOPs, and
#      the expert kernel it ran (grouped GEMMs on CUDA in bf16; JSON under $OUT).
# Usage: bench/gpu.sh [--preset 1b|tiny] [--device cuda|cpu] [extra gpu_train.py flags]
# A machine that reaches no package index (the lent H200s): bench/gpu_wheels.sh first where pip works, and
# bring .whl/ along. CPU smoke run of the same stages (what tests/e2e/test_gpu_sh.py runs): bench/gpu.sh --preset tiny --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=1b DEVICE=cuda EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
# the Python that holds a CUDA torch: $PY, else the project's .venv, else python3 (what CUDA images ship)
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/bench_gpu}
TORCH_VERSION=2.13.0  # the pinned version (pyproject.toml)
has_cuda() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ "$DEVICE" = cuda ] && ! has_cuda; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no CUDA device on this machine (no working nvidia-smi); for the CPU smoke run use --preset tiny --device cpu" >&2
    exit 2
  fi
  # a GPU but a CPU-only (or no) torch: the CUDA wheel of the pinned version, first index that has it
  for tag in cu128 cu130 cu126; do
    "$PY" -m pip install -q --timeout 20 --retries 1 "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$tag" \
      && has_cuda && break
  done
  has_cuda || { echo "bench/gpu.sh: torch $TORCH_VERSION with CUDA could not be installed or sees no device" >&2; exit 2; }
fi
# a CUDA torch already there is used as it is (CUDA images ship their own build; Spindle's unit suite also
# passes on torch 2.11, docs/benchmarks.md); the rest Spindle imports, where missing, goes into a folder of
# its own on PYTHONPATH, never touching torch: from .whl/ (bench/gpu_wheels.sh, for machines without an
# index) or PyPI. Spindle itself runs from this checkout (python -m, from the repository root).
MISSING=$("$PY" bench/gpu_deps.py)
if [ -n "$MISSING" ]; then
  SITE=${TMPDIR:-/tmp}/spindle-gpu-site
  FROM=(); compgen -G ".whl/*.whl" >/dev/null && FROM=(--no-index --find-links .whl)
  # shellcheck disable=SC2086  # the requirements are words
  "$PY" -m pip install -q --timeout 20 --retries 1 "${FROM[@]}" --target "$SITE" $MISSING >&2 || {
    echo "bench/gpu.sh: could not install $MISSING (without a package index: run bench/gpu_wheels.sh where pip works, bring .whl/)" >&2
    exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the torchrun workers of the parity stage import spindle too
if [ "$DEVICE" = cuda ] && ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  # Inductor / Triton compile their launchers with the system C compiler
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q build-essential || sudo apt-get install -y -q build-essential) >/dev/null 2>&1 || true
  fi
  command -v cc >/dev/null 2>&1 || echo "bench/gpu.sh: no C compiler found; torch.compile will fail (install gcc)" >&2
fi
mkdir -p "$OUT"
STAMP=$(date +%Y%m%d_%H%M%S)
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv || true

if [ "$PRESET" = tiny ]; then STEPS=(--steps 3 --warmup 1 --no-compile); LIMIT=300; else STEPS=(--steps 12 --warmup 4); LIMIT=150; fi
FAILED=0
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if ! timeout "$limit" "$@"; then echo "== $name: FAILED or timed out (${limit}s)"; FAILED=1; fi
}
for layout in dense packed; do
  flag=(); [ $layout = packed ] && flag=(--packed)
  stage "train step, $layout" "$LIMIT" "$PY" -m spindle.benchmarks.gpu_train --preset "$PRESET" --device "$DEVICE" \
    "${STEPS[@]}" "${flag[@]}" --out "$OUT/gpu_train_${layout}_$STAMP.json" "${EXTRA[@]}"
done
# cuBLAS gives the same bits every run only with a fixed workspace, set before CUDA starts
stage "resume round trip" 120 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PY" -m spindle.benchmarks.gpu_train --resume-check \
  --preset tiny --device "$DEVICE"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
  # the layouts that fit the GPUs here (a rank per GPU; the others skip), each against one process
  stage "layout parity (NCCL)" 240 "$PY" -m pytest -q -rs -m dist tests/distributed/test_parity.py \
    -k test_layout_matches_single_process
fi
if [ "$DEVICE" = cuda ]; then
  stage "attention kernels" 120 "$PY" -m spindle.cli bench attention --quick --device cuda
fi
# eager: compiled MoE blocks are not checked yet (on the CPU's loop kernel every step compiles again)
stage "MoE train step" "$LIMIT" "$PY" -m spindle.benchmarks.gpu_train --preset "$PRESET" --device "$DEVICE" --moe \
  "${STEPS[@]}" --no-compile --out "$OUT/gpu_train_moe_$STAMP.json" "${EXTRA[@]}"
echo "bench/gpu.sh: done ($( [ $FAILED = 0 ] && echo 'all stages passed' || echo 'some stages FAILED' )); JSON in $OUT"
exit $FAILED
