"""What the hardware can do: peak FLOP/s per device (the MFU denominator) and the CPU matmul probe.

GPU peaks are the vendors' dense figures (no 2:4 sparsity) per device, by compute dtype. Device
names are matched in order, the specific variants first, each name from a word start (so "GH200" is
not an H200): `torch.cuda.get_device_name()` says "NVIDIA H100 80GB HBM3" for the SXM part,
"NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H800", "NVIDIA H20",
"NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", ... (tests/unit/test_hardware.py).

A CPU has no datasheet figure that matches what PyTorch reaches, so its peak is measured: the best
fp32 matmul of a probe that repeats for a minimum time at the current thread count, once per process
(the figure is a property of the machine, and a second Trainer in the same process would otherwise pay
for it again). The probe draws its operands from its own generator: it must not move the global RNG,
whose state a resumed run has just restored. A probe that ran while other work held the cores reads low
(the demo saw 0.015 to 0.081 TFLOP/s on one machine, and mfu up to 1.28), so a measured peak is only a
lower bound: `MfuPeak` raises it to any faster step of the run itself, and mfu never exceeds 1.

Memory is checked before a model is allocated (`refuse_unless_fits`, from `build_model` and the
trainer's model setup) and before a KV cache is (`check_fits`): against MemAvailable, or what
`ulimit -v` leaves, or a CUDA device's free memory; SPINDLE_SKIP_MEMORY_CHECK=1 skips both.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import time
from typing import Iterator, Optional

import torch

from spindle.dtypes import compute_dtype
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)

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


PROBE_MIN_SECONDS = 0.3  # long enough to outlast a burst of another process's work on the cores
PROBE_MAX_REPEATS = 200


@functools.lru_cache(maxsize=None)
def measure_cpu_peak_tflops(n: int = 1024, min_seconds: float = PROBE_MIN_SECONDS,
                            threads: Optional[int] = None) -> float:
    """fp32 matmul throughput of this CPU (TFLOP/s): the fastest of n x n matmuls repeated for `min_seconds`
    (at least 3, at most PROBE_MAX_REPEATS), measured once per process and thread count."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # warm up the kernels
    best, spent, repeats = math.inf, 0.0, 0
    while repeats < 3 or (spent < min_seconds and repeats < PROBE_MAX_REPEATS):
        t0 = time.perf_counter()
        a @ b
        took = time.perf_counter() - t0
        best, spent, repeats = min(best, took), spent + took, repeats + 1
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
    return measure_cpu_peak_tflops(threads=torch.get_num_threads()), MEASURED_SOURCE


MEASURED_SOURCE = "measured fp32 matmul on this CPU, raised to any faster step of the run"


class MfuPeak:
    """One run's MFU denominator (TFLOP/s per device). A measured peak is what the probe saw, a lower bound of
    what the machine does: a step of the run that reaches more proves the machine can, so the peak rises to
    that step's rate (said once) and mfu = achieved / peak is at most 1. A configured or datasheet peak is
    the user's or the vendor's figure and is never moved (mfu above 1 then says that figure is wrong)."""

    def __init__(self, tflops: float, source: str, measured: bool):
        self.tflops, self.source, self.measured = tflops, source, measured
        self.raised = False

    def utilization(self, achieved_tflops: float) -> float:
        """mfu of a step that did `achieved_tflops` of model FLOPs per device; 0 when no peak is known."""
        if not self.tflops:
            return 0.0
        if self.measured and achieved_tflops > self.tflops:
            if not self.raised:
                logger.info(f"MFU peak raised from {self.tflops:.3g} to {achieved_tflops:.3g} TFLOP/s: a step of "
                            "this run went faster than the start-up matmul probe (other work on the cores while it "
                            "ran); the peak follows any faster step from now on, so mfu stays at most 1 "
                            "(trainer.peak_tflops fixes it)")
            self.raised = True
            self.tflops = achieved_tflops
        return achieved_tflops / self.tflops


def mfu_peak(configured: Optional[float], device: torch.device, compute_dtype: str) -> MfuPeak:
    """`resolve_peak_tflops` as a run's MfuPeak (measured: no configured value, not a GPU)."""
    tflops, source = resolve_peak_tflops(configured, device, compute_dtype)
    return MfuPeak(tflops, source, measured=not configured and device.type != "cuda")


# ----------------------------------------------------------------------------- CUDA precision defaults


def resolve_model_dtype(dtype: str, dtype_is_set: bool, device: torch.device) -> tuple[str, Optional[str]]:
    """The compute dtype to train in, and the line to print when it is not the one the config wrote.

    A config without `model.dtype` means fp32 (InternEvo's default), which on a GPU leaves the tensor
    cores idle (H100 SXM datasheet: 66.9 TFLOP/s fp32, 989 bf16 dense). So on CUDA, with the key unset, Spindle trains
    in bf16 autocast over fp32 master weights, or where the GPU has no bf16, in fp32 with TF32 matmuls;
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
    if compute_dtype(dtype).tf32:
        torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


# ----------------------------------------------------------------------------- memory before allocating

SKIP_MEMORY_CHECK_ENV = "SPINDLE_SKIP_MEMORY_CHECK"
MODEL_STATE = ("weights", "grads", "optimizer")  # the parts of spindle.parallel.dims.memory_estimate counted


def format_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{int(n):,} B" if step == 0 else f"{n:,.1f} {units[step]}"


def _processes_on_this_machine() -> int:
    """torchrun's LOCAL_WORLD_SIZE (ranks of this machine, sharing its CPU memory); 1 when unset or not a
    count (the launch checks name a bad value themselves)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def _meminfo_available(meminfo: str) -> Optional[int]:
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_headroom() -> Optional[int]:
    """What `ulimit -v` (RLIMIT_AS) still lets this process map: under such a limit the allocation fails
    however much memory the machine has."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        mapped = 0
    return max(0, soft - mapped)


def available_memory(device: torch.device | str, meminfo: str = "/proc/meminfo") -> tuple[Optional[int], str]:
    """(bytes new tensors can take on `device`, where that figure comes from); None where this system
    does not say (then nothing is refused). CPU: /proc/meminfo's MemAvailable (what can be allocated
    without swapping), or less under an address-space limit; CUDA: the device's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has {format_bytes(free)} free"
    if device.type != "cpu":
        return None, f"{device}: its free memory is not known"
    have, where = _meminfo_available(meminfo), "MemAvailable in " + meminfo
    limit = _address_space_headroom()
    if limit is not None and (have is None or limit < have):
        have, where = limit, "the address-space limit (ulimit -v) of this process"
    return have, "" if have is None else f"this machine has {format_bytes(have)} available ({where})"


def check_fits(need: float, device: torch.device | str, what: str, detail: str = "") -> None:
    """Refuse, before allocating, `need` bytes on `device` when more than it has available: one line
    "`what` needs N`detail` but the machine has M available (where): ..." with the override,
    SPINDLE_SKIP_MEMORY_CHECK=1 (for a machine whose figure misleads: swap meant to be used, memory
    about to be freed by another process)."""
    if os.environ.get(SKIP_MEMORY_CHECK_ENV, "").strip() not in ("", "0"):
        return
    have, where = available_memory(device)
    if have is not None and need > have:
        raise SpindleError(f"{what} needs {format_bytes(need)}{detail} but {where}: refused before allocating; "
                           f"set {SKIP_MEMORY_CHECK_ENV}=1 to try anyway")


def refuse_unless_fits(need: dict[str, float], device: torch.device | str, what: str) -> None:
    """`check_fits` for a model: sizes read from a file (a config.json of 4,096 layers of width 65,536)
    otherwise allocate until the process is killed or the machine swaps. `need`: bytes by part (a
    `spindle.parallel.dims.memory_estimate` dict): its MODEL_STATE parts are counted, activations are
    not (they vary with the batch and the kernels); processes that torchrun starts on this machine
    (LOCAL_WORLD_SIZE) share its CPU memory."""
    parts = {k: v for k, v in need.items() if k in MODEL_STATE and v > 0}
    device = torch.device(device)
    sharing = _processes_on_this_machine() if device.type == "cpu" else 1
    detail = f" ({' + '.join(f'{k} {format_bytes(v)}' for k, v in parts.items())})" if len(parts) > 1 else \
        "".join(f" for its {k}" for k in parts)
    detail += f" x {sharing} processes on this machine" if sharing > 1 else ""
    check_fits(sum(parts.values()) * sharing, device, what, detail)
