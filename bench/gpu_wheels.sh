#!/usr/bin/env bash
# For a GPU machine that reaches no package index: downloads, here, the wheels of what bench/gpu.sh needs
# besides torch (bench/gpu_deps.py --all, with their own dependencies) for that machine's Python into .whl/
# (git-ignored; bring it along with the tree). bench/gpu.sh installs from .whl/ only what is missing there.
# Usage: bench/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the Python of the lent H200s' CUDA image)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do PLATFORMS+=(--platform "$p"); done
# shellcheck disable=SC2046  # the requirements are words
python3 -m pip download -q -d .whl --only-binary=:all: --python-version "$PYV" --implementation cp "${PLATFORMS[@]}" \
  $(python3 bench/gpu_deps.py --all)
echo "bench/gpu_wheels.sh: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)) for Python $PYV"
