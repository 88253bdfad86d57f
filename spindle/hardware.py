"""What the hardware can do: peak FLOP/s per device (the MFU denominator) and the CPU matmul probe.

GPU peaks are the vendors' dense figures (no 2:4 sparsity) per device, by compute dtype. Device
names are matched in order, the specific variants first: `torch.cuda.get_device_name()` says
"NVIDIA H100 80GB HBM3" for the SXM part, "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
"NVIDIA H200 NVL", "NVIDIA H800", "NVIDIA H20", "NVIDIA A100-SXM4-80GB", ...

A CPU has no datasheet figure that matches what PyTorch reaches, so its peak is measured: the best
of a few fp32 matmuls at the current thread count, once per process (the figure is a property of the
machine, and a second Trainer in the same process would otherwise pay for it again). The probe draws
its operands from its own generator: it must not move the global RNG, whose state a resumed run has
just restored.
"""

from __future__ import annotations

import functools
import math
import re
import time
from typing import Optional

import torch

# (name pattern, {dtype key: dense TFLOP/s}); first match wins
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"h100.*nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h100.*pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"h200.*nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"h800.*pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h20\b", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    (r"gh200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"b200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    (r"a100|a800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"l40s", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"a10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"v100", {"fp16": 125.0, "fp32": 15.7}),
]


def lookup_peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Peak for a GPU name such as 'NVIDIA H100 80GB HBM3' and a compute dtype key (bf16/fp16/tf32/fp32)."""
    name = device_name.lower()
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return peaks.get(dtype)
    return None


@functools.lru_cache(maxsize=None)
def measure_cpu_peak_tflops(n: int = 1024, repeats: int = 3, threads: Optional[int] = None) -> float:
    """fp32 matmul throughput of this CPU (TFLOP/s), measured once per process and thread count."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # warm up the kernels
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def resolve_peak_tflops(configured: Optional[float], device: torch.device, compute_dtype: str) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from): config > GPU table > measured CPU matmul."""
    if configured:
        return configured, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = lookup_peak_tflops(name, compute_dtype)
        if peak:
            return peak, f"table ({name}, {compute_dtype})"
        return 0.0, f"unknown GPU {name}: set trainer.peak_tflops"
    return measure_cpu_peak_tflops(threads=torch.get_num_threads()), "measured fp32 matmul on this CPU"
