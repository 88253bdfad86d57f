"""Parameter counts, FLOPs and memory estimates: pure functions of the model config.

Two FLOP counts, because they answer different questions:

- `internevo_flops_per_step` is InternEvo's printed `tflops` formula (get_megatron_flops), kept so
  our log line compares with theirs: f * ((8 + 4r) B s h^2 + 4 B s^2 h) L + 6 B s h V, with
  f = 4 when activation checkpointing is on (recomputation counted as work, so it is closer to a
  hardware-FLOPs utilisation), r = mlp_ratio * 3/2 for SwiGLU, dense non-causal attention.
- `model_flops_per_token` is the model-FLOPs count behind MFU: 6 N_matmul + 12 L h s (the output
  head included, the embedding lookup excluded, attention over the full s x s square, i.e. the
  causal half not subtracted; the same convention as reference/cpu-baselines.md and PaLM's MFU).
"""

from __future__ import annotations

from spindle.config import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
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
    total = embedding + head + a.num_layers * per_layer + norm
    matmul = a.num_layers * (h * q + 2 * h * kv + q * h + n_mats * h * ffn_h) + v * h  # output head included
    return {"total": total, "embedding": embedding, "per_layer": per_layer, "matmul": matmul,
            "non_embedding": total - embedding}


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for MFU: 6 N_matmul + 12 L h s."""
    return 6.0 * parameter_counts(cfg)["matmul"] + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def internevo_flops_per_step(cfg: ModelConfig, seq_len: int, sequences: int) -> float:
    """InternEvo's get_megatron_flops: FLOPs of one step over `sequences` rows of `seq_len` (all ranks)."""
    f = 4 if cfg.checkpoint else 3  # truthy checkpoint, even a fraction, counts as full recompute there
    r = cfg.mlp_ratio * 3 / 2 if cfg.use_swiglu else cfg.mlp_ratio
    b, s, h, layers, v = sequences, seq_len, cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    return f * ((8 + 4 * r) * b * s * h**2 + 4 * b * s**2 * h) * layers + 6 * b * s * h * v
