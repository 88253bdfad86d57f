"""Marks shared by the layout tests. bench/gpu.sh runs test_parity.py with a GPU image's own torch, which can
be older than the pin: a pipeline layout there is skipped with the reason the run itself would give."""

import pytest
import torch
from torch.torch_version import TorchVersion

from spindle.parallel.layout import PIPELINE_MIN_TORCH

needs_pipeline_torch = pytest.mark.skipif(
    TorchVersion(torch.__version__) < PIPELINE_MIN_TORCH,
    reason=f"pipeline parallelism needs torch >= {'.'.join(map(str, PIPELINE_MIN_TORCH))} "
           f"(this is {torch.__version__})")


def layouts(names, pipelined=lambda name: "pp" in name, runs=lambda name: ()):
    """pytest parameters of these layout names (or (name, ...) tuples), the pipelined ones marked, each
    marked with the layout_runs jobs `runs(name)` it reads."""
    params = []
    for n in names:
        name = n[0] if isinstance(n, tuple) else n
        marks = [pytest.mark.runs(*runs(name))] + ([needs_pipeline_torch] if pipelined(name) else [])
        params.append(pytest.param(*(n if isinstance(n, tuple) else (n,)), marks=marks))
    return params
