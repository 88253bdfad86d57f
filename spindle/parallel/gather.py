"""A whole, plain model on rank 0 from a sharded or staged one — for the closing sample of a run.

FSDP and tensor-parallel parameters are DTensors: `get_model_state_dict(full_state_dict=True)`
all-gathers them on every rank. Pipeline stages hold different layers: each rank's full stage weights
are gathered to rank 0 as objects, where one plain `Transformer` is built from them. Every rank must
call `whole_model` (it is collective); ranks other than 0 get None.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from spindle.model.llama import Transformer, build_model
from spindle.parallel.layout import Layout


def needs_gathering(raw_model: torch.nn.Module, layout: Layout) -> bool:
    """False when rank 0 already holds every weight as a plain tensor in a plain model (one process, DDP).
    Context parallelism keeps plain weights but gives attention a kernel that all-gathers over the context
    group, also for cached decoding after training: rank 0 alone would wait on it, so it gets a copy."""
    return layout.pp > 1 or layout.cp > 1 or any(isinstance(p, DTensor) for p in raw_model.parameters())


def whole_model(raw_model: torch.nn.Module, args, layout: Layout) -> Optional[Transformer]:
    """rank 0: a plain model (on CPU) with the trained weights; other ranks: None."""
    if not needs_gathering(raw_model, layout):
        return raw_model if layout.is_main else None
    state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    if layout.pp > 1:  # each rank has its stages' layers: rank 0 collects them all
        parts = [None] * layout.world if layout.is_main else None
        dist.gather_object(state, parts, dst=0)
        if layout.is_main:
            state = {k: v for part in parts for k, v in part.items()}
    if not layout.is_main:
        return None
    model = build_model(args, "cpu")
    model.load_state_dict(state, strict=True)
    return model
