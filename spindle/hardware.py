"""What the hardware can do: peak FLOP/s per device (the MFU denominator) and the CPU matmul probe.

GPU peaks are the vendors' dense figures (no 2:4 sparsity) per device, by compute dtype. Device
names are matched in order, the specific variants first, each name from a word start (so "GH200" is
not an H200): `torch.cuda.get_device_name()` says "NVIDIA H100 80GB HBM3" for the SXM part,
"NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H800", "NVIDIA H20",
"NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", ... (tests/unit/test_hardware.py).

A CPU has no datasheet figure that matches what PyTorch reaches, so its peak is measured: the best
of a few fp32 matmuls at the current thread count, once per process (the figure is a property of the
machine, and a second Trainer in the same process would otherwise pay for it again). The probe draws
its operands from its own generator: it must not move the global RNG, whose state a resumed run has
just restored.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from typing import Iterator, Optional

import torch

# (name pattern, {dtype key: dense TFLOP/s}); first match wins
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"\bh100.*nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bh100.*pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bh100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bh200.*nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bh200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("NVIDIA H200")
    (r"\bh800.*pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bh800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bh20\b", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    (r"\bgh200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bb200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    (r"\ba100|\ba800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bl40s", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\ba10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bv100", {"fp16": 125.0, "fp32": 15.7}),
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


# ----------------------------------------------------------------------------- CUDA precision defaults


def resolve_model_dtype(dtype: str, dtype_is_set: bool, device: torch.device) -> tuple[str, Optional[str]]:
    """The compute dtype to train in, and the line to print when it is not the one the config wrote.

    A config without `model.dtype` means fp32 (InternEvo's default), which on a GPU leaves the tensor
    cores idle (H100 SXM datasheet: 66.9 TFLOP/s fp32, 989 bf16 dense). So on CUDA, with the key unset, Spindle trains in
    bf16 autocast over fp32 master weights, or where the GPU has no bf16, in fp32 with TF32 matmuls;
    and says so. A dtype the config sets is kept, and nothing changes on CPU (its fp32 is the fast one)."""
    if dtype_is_set or device.type != "cuda":
        return dtype, None
    if torch.cuda.is_bf16_supported():
        return "torch.bfloat16", ("model.dtype is not set: training in bf16 (autocast, fp32 master weights) on "
                                  "CUDA; set model.dtype='torch.float32' to train in fp32")
    return "torch.tf32", ("model.dtype is not set and this GPU has no bf16: training in fp32 with TF32 "
                          "matmuls; set model.dtype='torch.float32' for full fp32 matmuls")


@contextlib.contextmanager
def cuda_backend_mode(device: torch.device, dtype: str, cudnn_deterministic: bool = False,
                      cudnn_benchmark: bool = False) -> Iterator[None]:
    """The CUDA settings a run asks for, in force inside the context and restored after it (never left
    behind as a process-wide change): TF32 matmuls for model.dtype='torch.tf32' (fp32 storage, products
    with a 10-bit mantissa), and the cudnn_deterministic / cudnn_benchmark keys. No-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if dtype == "torch.tf32":
        torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
