"""Apply parallelism and memory/speed wrappers to a plain model, from the outside.

Order (torchtitan's): tensor/sequence parallel -> activation checkpointing -> torch.compile ->
data parallel / FSDP. Each step is a function of (model, config, env); the model file never
knows it happened. Pipeline stages call `parallelize` on their own chunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from spindle.config import SpindleConfig
from spindle.parallel.mesh import ParallelEnv


def apply_activation_checkpointing(model: nn.Module, num_layers: int) -> None:
    """Recompute the first `num_layers` blocks in backward (InternEvo: int(num_layers * checkpoint))."""
    names = list(model.layers.keys())[:num_layers]
    for name in names:
        # non-reentrant checkpointing: works with FSDP2, compile and keyword arguments
        model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: one graph per block compiles fast and is reused by all blocks."""
    for name, block in model.layers.items():
        model.layers[name] = torch.compile(block, dynamic=False)


def parallelize(model: nn.Module, cfg: SpindleConfig, env: ParallelEnv) -> nn.Module:
    n_ckpt = cfg.model.num_checkpointed_layers
    if n_ckpt:
        apply_activation_checkpointing(model, min(n_ckpt, len(model.layers)))
    if cfg.trainer.compile:
        apply_compile(model)
    if env.dp_size > 1:
        model = apply_data_parallel(model, cfg, env)
    return model


def apply_data_parallel(model: nn.Module, cfg: SpindleConfig, env: ParallelEnv) -> nn.Module:
    """FSDP2 full sharding when parallel.fsdp, else DDP (gradients all-reduced once per step)."""
    if cfg.parallel.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
