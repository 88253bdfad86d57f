"""Apply parallelism and memory/speed wrappers to a plain model, from the outside.

Order (torchtitan's): tensor/sequence parallel -> activation checkpointing -> torch.compile ->
data parallel (DDP, ZeRO-1 in the optimizer, or FSDP2). Each step is a function of
(model, config, layout); the model file never knows it happened. Pipeline stages are built by
`spindle.parallel.pipeline` and go through the same `parallelize`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from spindle.config import SpindleConfig
from spindle.dtypes import compute_dtype
from spindle.model.llama import materialize
from spindle.model.moe import MoEFeedForward
from spindle.parallel.layout import Layout, full_sharding


def apply_tensor_parallel(model: nn.Module, layout: Layout, sequence_parallel: bool) -> None:
    """Megatron-style TP with DTensor: column-parallel q/k/v and w1/w3, row-parallel wo and w2.

    With sequence parallelism the norms and the residual stream are sharded along the sequence
    (Shard(1)) between the parallel regions; the output head is column-parallel over the vocabulary
    and the loss is computed under `loss_parallel` without gathering the logits.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp_mesh = layout.groups.mesh["tp"]
    residual = Shard(1) if sequence_parallel else Replicate()
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel() if sequence_parallel else None
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, {k: v for k, v in top_plan.items() if v is not None})
    # each plan entry distributes its own module's weight: a head tied to the embedding would train as a
    # separate copy; both shard the (vocab, hidden) matrix along the vocabulary, so one tensor serves both
    model.tie_weights()
    # Block.forward(x, cos, sin, q_scale, mask, cache, positions): PrepareModuleInput counts positional
    # arguments, so every one gets a layout (None = leave it alone).
    others = (None,) * 6
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(residual, *others),
                                            desired_input_layouts=(Replicate(), *others)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
        }
        if isinstance(block.feed_forward, MoEFeedForward):
            # the router and the experts are whole on every tensor rank (docs/moe.md): each routes the whole
            # sequence and adds its output to the residual stream as the stream is laid out
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                                      use_local_output=True)
            parallelize_module(block, tp_mesh, {"feed_forward": PrepareModuleOutput(
                output_layouts=(Replicate(),), desired_output_layouts=(residual,), use_local_output=True)})
        else:
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),))
            plan["feed_forward.w1"] = ColwiseParallel()
            plan["feed_forward.w2"] = RowwiseParallel(output_layouts=residual)
            if block.feed_forward.w3 is not None:
                plan["feed_forward.w3"] = ColwiseParallel()
        if block.attention.q_norm is not None:
            # per-head norms (Qwen3) see only this rank's heads, dim 2 of (B, L, heads, head_dim): as
            # replicated DTensors over input sharded on that dim their gradients are partial sums that
            # DTensor reduces over the TP group. As plain parameters each rank kept its part (issue 24).
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: nn.Module, num_layers: int) -> None:
    """Recompute the first `num_layers` blocks in backward (InternEvo: int(num_layers * checkpoint))."""
    names = list(model.layers.keys())[:num_layers]
    for name in names:
        # non-reentrant checkpointing: works with FSDP2, compile and keyword arguments
        model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=True)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block separately: one graph per block compiles fast and is reused by all blocks.
    (KV-cache decoding runs them eagerly: spindle.model.llama.Transformer.forward.)"""
    for name, block in model.layers.items():
        model.layers[name] = torch.compile(block, dynamic=False, backend=backend)


def apply_fsdp(root: nn.Module, model: nn.Module, layout: Layout, reshard_after_forward: bool,
               mixed_precision: torch.dtype | None) -> None:
    """FSDP2 over the data-parallel mesh: each block of `model` (the Transformer or stage inside `root`),
    then `root`. A 2-D (replicate, shard) mesh gives hybrid sharding: parameters, gradients and optimizer
    state sharded within groups of `zero1` ranks and replicated across the groups.

    Precision is the one policy of every layout (docs/parallelism.md, "Mixed precision"). With a half
    compute dtype, what only feeds matmuls (the projections, an untied output head) is gathered in that
    dtype: the rounding autocast applies to it under DDP. The norms (one group per block, one for the
    final norm) and the embedding (its own group; the root's when tied to the head) stay fp32, and no
    forward input is cast, so RoPE cos/sin, log-n scales and the residual stream stay fp32. Gradients
    are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
    compute = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if mixed_precision else fp32
    shard = dict(mesh=layout.groups.fsdp_mesh, reshard_after_forward=reshard_after_forward)

    def keep_fp32(modules: list[nn.Module]) -> None:  # one group, gathered in fp32 (a no-op for fp32 runs)
        if mixed_precision and modules:
            fully_shard(modules, mp_policy=fp32, **shard)

    for block in model.layers.values():
        keep_fp32([m for m in block.modules() if isinstance(m, (nn.RMSNorm, nn.LayerNorm))])
        experts = getattr(block.feed_forward, "experts", None)
        if layout.ep > 1 and experts is not None:
            # expert-parallel weights (DTensors by expert on "ep"): sharded again over the ranks holding the same
            # experts, along dim 1, as dim 0 is already split by expert
            fully_shard(experts, mesh=layout.groups.edp_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=compute, shard_placement_fn=lambda p: Shard(1))
        fully_shard(block, mp_policy=compute, **shard)
    embedding, head = model.tok_embeddings, model.output
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    if embedding is not None and not tied:
        keep_fp32([embedding])
    if model.norm is not None:
        keep_fp32([model.norm])
    # the fused loss reads output.weight directly (the head module is never called), so the head stays
    # in the root's group, which its forward gathers
    fully_shard(root, mp_policy=fp32 if tied else compute, **shard)


class LocalStages(nn.Module):
    """The pipeline stages held by this rank, seen as one model with the whole model's parameter names
    (layers.N..., tok_embeddings on the first stage, norm/output on the last): what the optimizer and
    checkpoints use, so a checkpoint does not depend on how the layers were split."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict({k: v for part in parts for k, v in part.layers.items()})
        for name in ("tok_embeddings", "norm", "output"):
            setattr(self, name, next((getattr(p, name) for p in parts if getattr(p, name) is not None), None))


def apply_model_parallel(model: nn.Module, cfg: SpindleConfig, layout: Layout) -> nn.Module:
    """Expert, tensor/sequence parallel, activation checkpointing, compile: in place on the plain model."""
    if layout.ep > 1:
        from spindle.parallel.experts import apply_expert_parallel

        apply_expert_parallel(model, layout)
    if layout.tp > 1:
        apply_tensor_parallel(model, layout, cfg.parallel.sequence_parallel)
    n_ckpt = cfg.model.num_checkpointed_layers
    if n_ckpt:
        apply_activation_checkpointing(model, min(n_ckpt, len(model.layers)))
    if cfg.trainer.compile:
        apply_compile(model)
    return model


def apply_data_and_context_parallel(module: nn.Module, cfg: SpindleConfig, layout: Layout) -> nn.Module:
    """The seed's zero1 / our fsdp switch on top of the model-parallel module.

    - zero1 == 1 (no sharding), no tensor parallelism: DDP, gradients all-reduced once per step;
    - zero1 <= 0: FSDP2 sharding over the whole data-parallel group; zero1 = k: hybrid sharding
      within groups of k ranks. Parameters stay gathered between forward and backward
      (reshard_after_forward=False), so communication is ZeRO-1/2-like: one all-gather per step,
      one reduce-scatter; the optimizer state is sharded as in ZeRO-1;
    - parallel.fsdp (or zero1.fsdp): full FSDP (ZeRO-3), re-gathering parameters in backward to save memory.
    Tensor-parallel (DTensor) parameters compose with FSDP2 on a 2-D mesh, not with DDP.

    A model still on the meta device (as the trainer builds it) is allocated and initialised here,
    between sharding and replication: tensor parallelism and FSDP2 shard it on meta, so each rank
    allocates and initialises only its own shards (with the values of the whole model's init); DDP
    needs it whole.
    """
    inner = module
    while not hasattr(inner, "layers"):  # PipelineStageModel / ContextParallel hold the model in .model
        inner = inner.model
    if layout.cp > 1 and hasattr(module, "layers"):  # a pipeline stage slices in PipelineStageModel instead
        from spindle.parallel.context import ContextParallel

        module = ContextParallel(module, layout.groups.cp)
    par = cfg.parallel
    data_parallel = layout.gradient_ranks > 1
    sharded = data_parallel and (full_sharding(par) or par.zero1.size != 1 or layout.tp > 1)
    if sharded:
        compute = compute_dtype(cfg.model.dtype)
        half = compute.torch_dtype if compute.half else None
        apply_fsdp(module, inner, layout, reshard_after_forward=full_sharding(par), mixed_precision=half)
    if any(p.is_meta for p in inner.parameters()):
        materialize(inner, layout.device, cfg.trainer.seed, root=module)
    if sharded or not data_parallel:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[layout.device.index] if layout.device.type == "cuda" else None,
               process_group=layout.groups.grad)


def gradient_sync(model: nn.Module, micro_index: int, micro_count: int, full_shard: bool):
    """The context for the backward of micro-batch `micro_index` of `micro_count` in one step, so that
    gradients cross the network once per step, after the last micro-batch:

    - DDP: `no_sync()` before the last micro-batch;
    - FSDP2 keeping parameters gathered between forward and backward (`zero1`, ZeRO-1/2-like): no
      gradient reduction and no resharding after backward before the last micro-batch, so a step does
      one all-gather and one reduce-scatter (+ one all-reduce across replicas under HSDP) per FSDP group;
      the unsharded gradients accumulate in fp32 meanwhile, as DDP's do;
    - FSDP2 with full sharding (`full_shard`, ZeRO-3): every micro-batch reduce-scatters its gradients.
      Deferring would hold the whole model's unsharded fp32 gradients (4 bytes per parameter) on every
      rank, the memory ZeRO-3 was chosen to save; its re-gathering in backward costs more traffic than
      the reduce-scatters anyway.
    Pipeline schedules run their micro-batches themselves (and handle FSDP / DDP stages likewise)."""
    from torch.distributed.fsdp import FSDPModule

    last = micro_index == micro_count - 1
    if isinstance(model, FSDPModule):
        if not full_shard:
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)
            model.set_is_last_backward(last)
        return contextlib.nullcontext()
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def parallelize(model: nn.Module, cfg: SpindleConfig, layout: Layout) -> nn.Module:
    """The whole recipe for a single-stage model."""
    return apply_data_and_context_parallel(apply_model_parallel(model, cfg, layout), cfg, layout)
