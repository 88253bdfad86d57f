"""`ModelArgs`: the plain dataclass the model is built from (spindle/model/llama.py). It lives with the
config, which produces it (`ModelConfig.to_args`), because the config layer sits below the model: the
model imports it from here, the config never imports the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    """Everything the model's shape and arithmetic depend on, resolved (no defaults to look up)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_type: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    layer_norm_epsilon: float = 1e-5
    norm_bias: bool = False  # LayerNorm's bias
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim of every q and k head, before RoPE (Qwen3)
    use_swiglu: bool = True
    apply_post_layer_norm: bool = False
    tie_word_embeddings: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # a rope_scaling dict (spindle.model.rope), None = plain RoPE
    max_position_embeddings: int = 2048
    logn_ref_len: Optional[int] = None  # log-scaled attention with this reference length; None = off
    sliding_window: Optional[int] = None  # keys further back than this are invisible (Mistral)
    init_std: float = 0.02
    embed_grad_scale: float = 1.0  # InternEvo's: the embedding's gradient is scaled by this (values unchanged)
