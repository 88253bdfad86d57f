"""The sizes of a parallel layout, decided once from the world size and the config.

`ParallelDims` is what the device mesh is built from, what `--dry-run` plans with (`--nproc N`) and
what the memory estimate divides by: one place for the data-parallel size (which excludes context
ranks: they read the same batch) and the FSDP shard group, and one place for the layout errors, so a
dry run refuses exactly what the real run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.torch_version import TorchVersion, __version__ as TORCH_VERSION

from spindle.config import SpindleConfig
from spindle.errors import SpindleError
from spindle.model.flops import parameter_counts


# torch.distributed.pipelining before 2.13 asks for a gradient of every tensor a stage receives (2.11, what
# the lent H200s' CUDA image has, fails with "only Tensors of floating point dtype can require gradients"),
# and Spindle's stages hand on the integer positions and labels with the hidden states (parallel/pipeline.py).
# 2.13 is the first release checked to work (2.12 was not tried).
PIPELINE_MIN_TORCH = (2, 13)


def full_sharding(parallel) -> bool:
    """ZeRO-3: `parallel.fsdp=True`, or InternEvo's way to ask for it, `parallel.zero1=dict(fsdp=True)`."""
    return bool(parallel.fsdp or parallel.zero1.fsdp)


@dataclass(frozen=True)
class ParallelDims:
    world: int
    dp: int  # data-parallel ranks: each reads its own batch
    tp: int
    pp: int
    cp: int  # context-parallel ranks: one batch, each its slice of the sequence
    shard: int  # ranks of one FSDP / ZeRO shard group (1: no sharding, dp: the whole data-parallel group)
    fsdp: bool  # parameters re-gathered in backward too (ZeRO-3), not only optimizer state + gradients

    @property
    def replicate(self) -> int:
        return self.dp // self.shard

    @classmethod
    def plan(cls, parallel, model, world: int, seq_len: Optional[int] = None,
             torch_version: str = TORCH_VERSION) -> "ParallelDims":
        """The layout for `world` processes (and rows of `seq_len` tokens), or a SpindleError naming the
        keys that do not fit (or the torch that cannot run them)."""
        tp, pp, cp = parallel.tensor.size, parallel.pipeline.size, parallel.context
        if pp > 1 and TorchVersion(torch_version) < PIPELINE_MIN_TORCH:
            raise SpindleError(f"parallel.pipeline.size={pp} needs torch >= 2.13 (this is torch {torch_version}, "
                               "whose pipelining wants a gradient for the positions and labels the stages hand on): "
                               "install the pinned torch==2.13.0, or use pipeline.size=1")
        if cp > 1 and seq_len is not None and seq_len % (2 * cp):
            raise SpindleError(f"data.seq_len ({seq_len}) must be divisible by 2 x parallel.context ({2 * cp}): "
                               "context parallelism gives every rank two chunks of each row (head and tail)")
        if world % (tp * pp * cp):
            raise SpindleError(f"parallel: world size {world} is not divisible by tensor ({tp}) x pipeline ({pp})"
                               + (f" x context ({cp})" if cp > 1 else ""))
        dp = world // (tp * pp * cp)
        if model.num_attention_heads % tp or model.kv_heads % tp:
            raise SpindleError(f"parallel.tensor.size={tp} must divide model.num_attention_heads "
                               f"({model.num_attention_heads}) and the KV heads ({model.kv_heads})")
        stages = pp * model.num_chunks
        if model.num_layers % stages:
            raise SpindleError(f"model.num_layers ({model.num_layers}) is not divisible by pipeline.size ({pp}) x "
                               f"model.num_chunks ({model.num_chunks})")
        zero, full = parallel.zero1.size, full_sharding(parallel)
        if zero > 1 and dp % zero and not full:  # full sharding spans all of dp whatever zero1 says
            raise SpindleError(f"parallel.zero1={zero} does not divide the data-parallel size {dp} (world {world} "
                               f"/ tensor {tp} / pipeline {pp}" + (f" / context {cp}" if cp > 1 else "") + ")")
        shard = dp if (full or zero <= 0) else zero
        return cls(world, dp, tp, pp, cp, shard, full)


def memory_estimate(cfg: SpindleConfig, world_size: int = 1) -> dict[str, float]:
    """Bytes per device, roughly: weights, gradients, AdamW state, activations of one micro-batch.

    Weights and gradients are fp32 masters (+ a 2-byte copy for bf16/fp16 compute), AdamW keeps
    two fp32 moments. Sharding: tensor and pipeline split everything; zero1 splits optimizer state
    over its group; FSDP splits weights, grads and state over data parallel. Activations follow
    Korthikanti et al. (2022): s b h (34 + 5 a s / h) bytes per layer for 16-bit activations
    (doubled for fp32); a recomputed layer keeps only its input.
    """
    m, par, data = cfg.model, cfg.parallel, cfg.data
    n = parameter_counts(m)["total"]
    dims = ParallelDims.plan(par, m, world_size)
    tp, pp = dims.tp, dims.pp
    half = m.dtype in ("torch.bfloat16", "torch.float16", "torch.half")
    model_split = tp * pp
    shard = dims.shard * dims.cp  # FSDP shards over data x context ranks (they sum the same gradients)
    weights = n * (4 + (2 if half else 0)) / model_split
    grads = n * 4 / model_split
    optim = n * 8 / model_split / shard
    if dims.fsdp:
        weights, grads = weights / shard, grads / shard
    s, b, h, a = data.seq_len, data.micro_bsz, m.hidden_size, m.num_attention_heads
    act_bytes = 2 if half else 4
    per_layer_full = s * b * h * (34 + 5 * a * s / h) * act_bytes / 2  # the formula is in 2-byte units
    per_layer_ckpt = s * b * h * act_bytes  # only the layer input is kept
    layers_local = m.num_layers / pp
    n_ckpt = m.num_checkpointed_layers / pp
    # context parallelism holds 1/cp of every sequence (keys and values of attention are gathered in full)
    activations = ((layers_local - n_ckpt) * per_layer_full + n_ckpt * per_layer_ckpt) / tp / dims.cp
    logits = s * b * m.vocab_size * 4 * 2 / tp / dims.cp  # fp32 logits and their gradient
    total = weights + grads + optim + activations + logits
    return {"weights": weights, "grads": grads, "optimizer": optim, "activations": activations,
            "logits": logits, "total": total}
