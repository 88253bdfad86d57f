"""The MFU denominator from the names `torch.cuda.get_device_name()` returns, and the CUDA-only step timing
and memory metrics (monkeypatched CUDA: no GPU needed)."""

import pytest
import torch

from spindle.hardware import lookup_peak_tflops, resolve_peak_tflops
from spindle.train import metrics


@pytest.mark.parametrize("name, bf16, tf32", [
    ("NVIDIA H100 80GB HBM3", 989.4, 494.7),  # SXM5
    ("NVIDIA H100 PCIe", 756.5, 378.0),
    ("NVIDIA H100 NVL", 835.5, 417.5),
    ("NVIDIA H200", 989.4, 494.7),  # SXM
    ("NVIDIA H200 NVL", 835.5, 417.5),
    ("NVIDIA H800", 989.4, 494.7),
    ("NVIDIA H800 PCIe", 756.5, 378.0),
    ("NVIDIA H20", 148.0, 74.0),
    ("NVIDIA GH200 480GB", 989.4, 494.7),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0),
    ("NVIDIA A800-SXM4-80GB", 312.0, 156.0),
    ("NVIDIA B200", 2250.0, 1100.0),
    ("NVIDIA L40S", 362.1, 183.0),
    ("NVIDIA A10", 125.0, 62.5),
])
def test_peak_of_each_device_name(name, bf16, tf32):
    assert lookup_peak_tflops(name, "bf16") == bf16
    assert lookup_peak_tflops(name, "tf32") == tf32


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "NVIDIA L4", "Tesla T4"])
def test_unknown_devices_have_no_peak(name):
    assert lookup_peak_tflops(name, "bf16") is None


def test_unknown_gpu_asks_for_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert resolve_peak_tflops(None, torch.device("cuda", 0), "bf16") == (
        0.0, "unknown GPU NVIDIA A10G: set trainer.peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert resolve_peak_tflops(None, torch.device("cuda", 0), "bf16") == (835.5, "table (NVIDIA H200 NVL, bf16)")


def test_step_timing_synchronises_cuda_only(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    metrics.synchronize(torch.device("cpu"))
    assert waited == []
    metrics.synchronize(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]


def test_memory_metrics_on_cuda_and_none_on_cpu(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4.5 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3.25 * gib)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    assert metrics.memory_metrics(torch.device("cpu")) == {}
    out = metrics.memory_metrics(torch.device("cuda", 0))
    assert out == {"mem_allocated_gib": 3.0, "mem_reserved_gib": 4.5, "mem_peak_allocated_gib": 3.25}
    assert resets == [torch.device("cuda", 0)]  # the next step's peak is its own
    assert "mem_peak_allocated_gib=3.25" in metrics.format_line({"step": 1, **out})


def test_unset_dtype_trains_in_bf16_on_cuda_and_says_so(monkeypatch):
    from spindle.hardware import resolve_model_dtype

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    dtype, note = resolve_model_dtype("torch.float32", dtype_is_set=False, device=cuda)
    assert dtype == "torch.bfloat16" and note.startswith("model.dtype is not set: training in bf16")
    assert resolve_model_dtype("torch.float32", dtype_is_set=True, device=cuda) == ("torch.float32", None)
    assert resolve_model_dtype("torch.float32", dtype_is_set=False, device=cpu) == ("torch.float32", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100
    dtype, note = resolve_model_dtype("torch.float32", dtype_is_set=False, device=cuda)
    assert dtype == "torch.tf32" and "TF32 matmuls" in note


def test_cuda_backend_settings_hold_inside_the_context_only():
    from spindle.hardware import cuda_backend_mode

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with cuda_backend_mode(torch.device("cuda", 0), "torch.tf32", cudnn_deterministic=True, cudnn_benchmark=True):
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    with cuda_backend_mode(torch.device("cpu"), "torch.tf32", cudnn_benchmark=True):
        assert torch.get_float32_matmul_precision() == before[0] and torch.backends.cudnn.benchmark == before[2]
