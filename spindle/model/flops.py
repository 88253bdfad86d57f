"""Parameter counts, FLOPs and memory estimates: pure functions of the model config.

Two FLOP counts, because they answer different questions:

- `internevo_flops_per_step` is InternEvo's printed `tflops` formula (get_megatron_flops), kept so
  our log line compares with theirs: f * ((8 + 4r) B s h^2 + 4 B s^2 h) L + 6 B s h V, with
  f = 4 when activation checkpointing is on (recomputation counted as work, so it is closer to a
  hardware-FLOPs utilisation), r = mlp_ratio * 3/2 for SwiGLU, dense non-causal attention.
- `model_flops_per_token` is the model-FLOPs count behind MFU: 6 N_matmul + 12 L h s (the output
  head included, the embedding lookup excluded, attention over the full s x s square, i.e. the
  causal half not subtracted; the same convention as reference/cpu-baselines.md and PaLM's MFU).

A mixture-of-experts layer (docs/moe.md) holds every routed expert but runs only `top_k` of them per token:
`parameter_counts` gives both, `total` (what memory holds) and `active` (what one token passes through:
the router, top_k routed experts, the shared experts), and N_matmul counts the active matrices only, so
MFU is on active FLOPs. InternEvo's formula takes the layers' average active FFN width for its mlp_ratio.
"""

from __future__ import annotations

from spindle.config import ModelConfig


def moe_ffn_counts(a) -> dict[str, int]:
    """One MoE layer's feed-forward parameters (ModelArgs `a`): `total`, `active` per token, `experts` (the
    routed experts, what expert parallelism splits) and `matmul` (the active matrices: all of them are)."""
    h = a.hidden_size
    router = h * a.num_experts + (h if a.shared_expert_gate else 0)
    shared = 3 * h * a.num_shared_experts * a.shared_expert_intermediate_size
    expert = 3 * h * a.moe_intermediate_size
    active = router + shared + a.top_k * expert
    return {"total": router + shared + a.num_experts * expert, "active": active,
            "experts": a.num_experts * expert, "matmul": active}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, active (per token: equal to total for a dense model), embedding, per_layer (a dense layer's),
    matmul (the active matrices, output head included), non_embedding; for a mixture of experts (0 when
    dense) moe_ffn (its MoE feed-forwards: routers, shared and routed experts), experts (the routed
    experts alone), moe_layers."""
    a = cfg.to_args()
    h, v, hd = a.hidden_size, a.vocab_size, a.head_dim
    q, kv = a.num_attention_heads * hd, a.num_kv_heads * hd
    per_norm_dim = 2 if a.norm_type == "layernorm" and a.norm_bias else 1  # weight (+ bias)
    attn = h * q + 2 * h * kv + q * h + a.qkv_bias * (q + 2 * kv) + a.o_bias * h + a.qk_norm * 2 * hd * per_norm_dim
    ffn_h = a.ffn_hidden_size
    n_mats = 3 if a.use_swiglu else 2
    ffn = n_mats * h * ffn_h + a.mlp_bias * ((n_mats - 1) * ffn_h + h)
    norm = h * per_norm_dim
    per_layer = attn + ffn + 2 * norm
    embedding = v * h
    head = 0 if a.tie_word_embeddings else v * h
    n_moe = sum(a.is_moe_layer(i) for i in range(a.num_layers))
    moe = moe_ffn_counts(a) if n_moe else {"total": 0, "active": 0, "experts": 0, "matmul": 0}
    dense_layers = a.num_layers - n_moe
    layers_except_ffn = a.num_layers * (attn + 2 * norm)
    total = embedding + head + layers_except_ffn + dense_layers * ffn + n_moe * moe["total"] + norm
    active = total - n_moe * (moe["total"] - moe["active"])
    matmul = (a.num_layers * (h * q + 2 * h * kv + q * h) + dense_layers * n_mats * h * ffn_h + n_moe * moe["matmul"]
              + v * h)  # output head included
    return {"total": total, "active": active, "embedding": embedding, "per_layer": per_layer, "matmul": matmul,
            "non_embedding": total - embedding, "moe_ffn": n_moe * moe["total"], "experts": n_moe * moe["experts"],
            "moe_layers": n_moe}


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for MFU: 6 N_matmul + 12 L h s."""
    return 6.0 * parameter_counts(cfg)["matmul"] + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def internevo_flops_per_step(cfg: ModelConfig, seq_len: int, sequences: int) -> float:
    """InternEvo's get_megatron_flops: FLOPs of one step over `sequences` rows of `seq_len` (all ranks)."""
    f = 4 if cfg.checkpoint else 3  # truthy checkpoint, even a fraction, counts as full recompute there
    r = cfg.mlp_ratio * 3 / 2 if cfg.use_swiglu else cfg.mlp_ratio
    if cfg.num_experts:  # the FFN a token passes through, averaged over the layers, as its mlp_ratio
        a = cfg.to_args()
        n_moe = sum(a.is_moe_layer(i) for i in range(a.num_layers))
        moe_width = moe_ffn_counts(a)["active"] / (3 * cfg.hidden_size)
        width = (n_moe * moe_width + (cfg.num_layers - n_moe) * cfg.ffn_hidden_size) / cfg.num_layers
        r = width / cfg.hidden_size * 3 / 2
    b, s, h, layers, v = sequences, seq_len, cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    return f * ((8 + 4 * r) * b * s * h**2 + 4 * b * s**2 * h) * layers + 6 * b * s * h * v
