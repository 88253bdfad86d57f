"""The memory a training run needs per device, from the layout `Layout.plan` decides (the sizes, one place:
spindle/parallel/layout.py): what `--dry-run` prints and what `parallel/setup.py` checks against the
machine before allocating.
"""

from __future__ import annotations

from spindle.config import SpindleConfig
from spindle.dtypes import compute_dtype
from spindle.model.flops import parameter_counts
from spindle.parallel.layout import Layout


def memory_estimate(cfg: SpindleConfig, world_size: int = 1) -> dict[str, float]:
    """Bytes per device, roughly: weights, gradients, AdamW state, activations of one micro-batch.

    Weights and gradients are fp32 masters (+ a 2-byte copy for bf16/fp16 compute), AdamW keeps
    two fp32 moments. Sharding: tensor and pipeline split everything; zero1 splits optimizer state
    over its group; FSDP splits weights, grads and state over data parallel. A mixture of experts' layers
    stay whole on every tensor rank; expert parallelism splits the routed experts' weights and grads over
    its ranks (their optimizer state and FSDP shards span all data-parallel ranks anyway). Activations follow
    Korthikanti et al. (2022): s b h (34 + 5 a s / h) bytes per layer for 16-bit activations
    (doubled for fp32); a recomputed layer keeps only its input.
    """
    m, par, data = cfg.model, cfg.parallel, cfg.data
    counts = parameter_counts(m)
    dims = Layout.plan(par, m, world_size)
    tp, pp = dims.tp, dims.pp
    half = compute_dtype(m.dtype).half
    shard = dims.shard * dims.cp  # FSDP shards over data x context ranks (they sum the same gradients)
    moe, experts = counts["moe_ffn"], counts["experts"]
    split_by_tp = (counts["total"] - moe) / tp + moe  # the MoE layers' feed-forwards are whole on each tensor rank
    held = (split_by_tp - experts + experts / dims.ep) / pp  # a rank's parameters before sharding
    sharded = split_by_tp / pp / shard  # with expert parallelism too: ep x the dp / ep ranks of the experts' FSDP
    weights = (sharded if dims.fsdp else held) * (4 + (2 if half else 0))
    grads = (sharded if dims.fsdp else held) * 4
    optim = sharded * 8
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
