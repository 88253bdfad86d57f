"""Where a tensor handed to `torch.distributed` must live: on the device its process group's backend serves.

NCCL moves CUDA tensors only: a CPU tensor in an NCCL collective fails (or, for a broadcast, hangs the
other ranks), so a run that works under gloo on CPU would die at its first such call on GPUs. Gloo
moves CPU tensors (CUDA ones only for some collectives, through a copy). Every tensor that Spindle
creates for a collective comes from `comm_tensor` / `comm_device`; tests/unit/test_comm.py lints every
`dist.<collective>(` call in spindle/ for it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def comm_device(group: Optional[object] = None) -> torch.device:
    """The device the backend of `group` (default: the world group) moves tensors on: the current CUDA
    device for NCCL (the one `init_distributed` set for this rank), the CPU for gloo, and the CPU when
    there is no process group at all (nothing is communicated)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    # a group may combine backends ("cpu:gloo,cuda:nccl"): any NCCL in it means collectives on CUDA
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_tensor(values, dtype: torch.dtype, group: Optional[object] = None) -> torch.Tensor:
    """A tensor of `values` (a list, or a shape given as a tuple of ints for zeros) on `group`'s device."""
    device = comm_device(group)
    if isinstance(values, tuple):
        return torch.zeros(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, device=device)


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single and deprecated the old
# names; the CUDA images GPU machines come with can be older (2.11 on the lent H200s) and have only the old
# ones. Same semantics, one flat tensor each side: take whichever this torch has.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
