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
    # mixture of experts (spindle/model/moe.py, docs/moe.md); num_experts 0: every layer dense
    num_experts: int = 0
    top_k: int = 2
    moe_intermediate_size: int = 0  # each routed expert's SwiGLU width
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # each shared expert's width
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared experts' output times sigmoid(w x)
    router_score: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True  # the top-k weights renormalised to sum to 1
    capacity_factor: Optional[float] = None  # None: dropless
    min_capacity: int = 4
    first_k_dense: int = 0  # the first k layers stay dense
    moe_every: int = 1  # then layer i is MoE when (i + 1) % moe_every == 0 (Qwen2-MoE's decoder_sparse_step)
    aux_loss_coeff: float = 0.0
    aux_loss_per_sequence: bool = False
    z_loss_coeff: float = 0.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing; 0: no bias

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and index >= self.first_k_dense and (index + 1) % self.moe_every == 0
