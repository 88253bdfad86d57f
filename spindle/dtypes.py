"""The compute dtypes `model.dtype` may name, and everything the rest of Spindle derives from one: the torch
dtype of the forward, whether it is 16-bit (autocast over fp32 master weights, FSDP's half-size compute copy,
half-size weights in the memory estimate), whether it needs the fp16 loss scaler, TF32 matmuls on CUDA, and the
key of the peak-TFLOP/s table (spindle/hardware.py) MFU is measured against.

Below every layer and free of a torch import at load time: the config validates names against this table
without importing torch (the CLI stays light); `torch_dtype` imports it when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from spindle.errors import SpindleError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ComputeDtype:
    name: str  # as a config writes it: "torch.bfloat16"
    torch_name: str  # the attribute of `torch`: "bfloat16"
    peak_key: str  # the column of spindle.hardware's peak table
    tf32: bool = False  # fp32 storage, TF32 matmuls on CUDA (spindle.hardware.cuda_backend_mode)

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.torch_name)

    @property
    def half(self) -> bool:
        """16-bit compute: autocast over fp32 masters, and FSDP's mixed-precision parameter copies."""
        return self.torch_name in ("bfloat16", "float16")

    @property
    def loss_scaling(self) -> bool:
        """fp16's 5-bit exponent underflows small gradients: the dynamic loss scaler runs for it alone."""
        return self.torch_name == "float16"


_ALL = (
    ComputeDtype("torch.float32", "float32", "fp32"),
    ComputeDtype("torch.tf32", "float32", "tf32", tf32=True),
    ComputeDtype("torch.bfloat16", "bfloat16", "bf16"),
    ComputeDtype("torch.float16", "float16", "fp16"),
    ComputeDtype("torch.half", "float16", "fp16"),  # torch's alias of float16
)
COMPUTE_DTYPES: dict[str, ComputeDtype] = {d.name: d for d in _ALL}


def compute_dtype(name: str) -> ComputeDtype:
    """The entry for a `model.dtype` value ("torch.bfloat16", or "bfloat16" without the prefix)."""
    found = COMPUTE_DTYPES.get(name) or COMPUTE_DTYPES.get(f"torch.{name}")
    if found is None:
        raise SpindleError(f"model.dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return found
