"""The `model` section: the architecture, RoPE and its scaling, dtype."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from spindle.config.base import Section
from spindle.config.rope_types import PARAM_DEFAULTS, ROPE_TYPES, filled_defaults
from spindle.dtypes import COMPUTE_DTYPES, compute_dtype
from spindle.errors import SpindleError

DTYPES = tuple(COMPUTE_DTYPES)  # the names model.dtype takes: spindle/dtypes.py


class RopeScalingConfig(Section):
    # the registry, spindle/config/rope_types.py, declares the types, their parameters and the defaults
    type: Literal[tuple(ROPE_TYPES)] = "default"
    factor: float = Field(default=PARAM_DEFAULTS["factor"], gt=0, le=1e6)
    original_max_position_embeddings: Optional[int] = Field(default=None, ge=1, le=2**26)
    # yarn
    beta_fast: float = PARAM_DEFAULTS["beta_fast"]
    beta_slow: float = PARAM_DEFAULTS["beta_slow"]
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = PARAM_DEFAULTS["truncate"]
    # llama3
    low_freq_factor: float = PARAM_DEFAULTS["low_freq_factor"]
    high_freq_factor: float = PARAM_DEFAULTS["high_freq_factor"]
    # longrope: per-frequency factors (head_dim / 2 each) within / beyond the original length
    short_factor: Optional[list[float]] = None
    long_factor: Optional[list[float]] = None

    @model_validator(mode="before")
    @classmethod
    def _rope_type_alias(cls, data: Any) -> Any:
        # transformers writes "rope_type"; InternEvo writes "type"
        if isinstance(data, dict) and "rope_type" in data and "type" not in data:
            data = dict(data)
            data["type"] = data.pop("rope_type")
        return data

    def as_dict(self) -> dict:
        """type, factor, original length, and the parameters that differ from their defaults: each type
        rejects the other types' parameters, and a config read back from JSON has every field set."""
        keep = ("type", "factor", "original_max_position_embeddings", *filled_defaults(self.type))
        return {k: v for k, v in self.model_dump(exclude_none=True).items()
                if k in keep or v != type(self).model_fields[k].default}


class ModelConfig(Section):
    checkpoint: Union[bool, float] = False  # activation checkpointing: bool, or the fraction of layers
    num_attention_heads: int = Field(default=32, ge=1, le=2**12)
    num_kv_attention_heads: Optional[int] = Field(default=None, ge=1, le=2**12)  # None = num_attention_heads
    embed_split_hidden: bool = True
    vocab_size: int = Field(default=103168, ge=2, le=2**24)
    embed_grad_scale: float = Field(default=1.0, gt=0, le=1)  # the embedding gradient's scale (InternEvo)
    parallel_output: bool = True
    hidden_size: int = Field(default=4096, ge=1, le=2**17)
    num_layers: int = Field(default=32, ge=1, le=2**12)
    mlp_ratio: float = Field(default=8 / 3, gt=0, le=64)
    multiple_of: int = Field(default=256, ge=1, le=2**16)  # the SwiGLU hidden size is rounded up to this
    apply_post_layer_norm: bool = False
    dtype: str = "torch.float32"
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    layer_norm_epsilon: float = Field(default=1e-5, gt=0, lt=1)
    use_flash_attn: bool = True  # SDPA picks the flash kernel where the hardware has one
    num_chunks: int = Field(default=1, ge=1, le=2**10)  # >1: interleaved pipeline schedule
    no_bias: bool = True  # InternEvo's switch: no bias anywhere (the three keys below default to it)
    qkv_bias: Optional[bool] = None  # biases of wq/wk/wv (None: not no_bias); Qwen2: True with o/MLP False
    o_bias: Optional[bool] = None  # bias of wo (None: not no_bias)
    mlp_bias: Optional[bool] = None  # biases of w1/w2/w3 (None: not no_bias)
    qk_norm: bool = False  # RMSNorm of every q and k head over head_dim before RoPE (Qwen3)
    head_dim: Optional[int] = Field(default=None, ge=2)  # None: hidden_size / num_attention_heads
    sliding_window: Optional[int] = Field(default=None, ge=1)  # Mistral; longer sequences are refused
    tie_word_embeddings: bool = False
    use_swiglu: bool = True
    use_fp32_norm: bool = False
    drop_rate: float = Field(default=0.0, ge=0, lt=1)
    attn_drop_rate: float = Field(default=0.0, ge=0, lt=1)
    rope_base: float = Field(default=10000.0, gt=1, le=1e15)
    rope_scaling: Optional[RopeScalingConfig] = None
    qk_interleaved: bool = False  # InternEvo's RoPE column layout; Spindle rotates (i, i + d/2) pairs
    use_dynamic_ntk_rope: bool = False  # the seed's switch: means rope_scaling={"type": "dynamic"}
    max_position_embeddings: int = Field(default=2048, ge=1, le=2**26)
    logn_attn: bool = False  # log-scaled attention: q *= max(1, log_{logn_ref_len}(pos + 1))
    logn_ref_len: Optional[int] = Field(default=None, ge=2, le=2**26)  # None = max_position_embeddings
    init_std: float = Field(default=0.02, gt=0, le=10)
    # mixture of experts (docs/moe.md): num_experts 0 keeps every layer dense and every key below idle
    num_experts: int = Field(default=0, ge=0, le=2**14)
    top_k: int = Field(default=2, ge=1, le=2**10)
    moe_intermediate_size: Optional[int] = Field(default=None, ge=1, le=2**20)  # None: the dense SwiGLU width
    num_shared_experts: int = Field(default=0, ge=0, le=2**10)
    shared_expert_intermediate_size: Optional[int] = Field(default=None, ge=1, le=2**20)  # None: moe_...
    shared_expert_gate: bool = False
    router_score: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    capacity_factor: Optional[float] = Field(default=None, gt=0, le=2**10)  # None: dropless
    min_capacity: int = Field(default=4, ge=0, le=2**30)
    first_k_dense: int = Field(default=0, ge=0, le=2**12)
    moe_every: int = Field(default=1, ge=1, le=2**12)
    aux_loss_coeff: float = Field(default=0.01, ge=0, le=1e3)
    aux_loss_per_sequence: bool = False
    z_loss_coeff: float = Field(default=0.0, ge=0, le=1e3)
    bias_update_rate: float = Field(default=0.0, ge=0, le=1)
    # InternEvo's MoE layer and its residual MoE: config/internevo.py translate_moe maps them onto the keys above
    moe_type: Optional[Literal["GShard", "MegaBlock", "MegaBlock-D"]] = None
    moe_use_residual: bool = False  # True is refused there (not the shared experts' computation)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        try:
            return compute_dtype(v).name
        except SpindleError:
            raise ValueError(f"expected one of {', '.join(DTYPES)}") from None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: Union[bool, float]) -> Union[bool, float]:
        if not isinstance(v, bool) and not 0.0 <= v <= 1.0:
            raise ValueError("expected True/False or a fraction of layers in [0, 1]")
        return v

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads or self.hidden_size < 2 * self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple (>= 2x) of num_attention_heads "
                                 f"({self.num_attention_heads}), or give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads  # re-validates once, now set
            # derived, not given: a start from a Hugging Face folder reads it from config.json instead
            self.model_fields_set.discard("head_dim")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_kv_attention_heads ({self.kv_heads})"
            )
        if self.no_bias and any(getattr(self, k) for k in ("qkv_bias", "o_bias", "mlp_bias")):
            raise ValueError("no_bias=True means no bias anywhere; set no_bias=False to turn biases on by group "
                             "(qkv_bias / o_bias / mlp_bias)")
        if self.num_experts:
            self._check_moe()
        return self

    def _check_moe(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"model.top_k ({self.top_k}) must be at most model.num_experts ({self.num_experts})")
        if not any(self.to_args().is_moe_layer(i) for i in range(self.num_layers)):
            raise ValueError(f"model.first_k_dense ({self.first_k_dense}) and model.moe_every ({self.moe_every}) "
                             f"leave none of the {self.num_layers} layers MoE; lower them or set num_experts=0")
        if self.top_k == 1 and self.norm_topk_prob:
            raise ValueError("model.norm_topk_prob=True with top_k=1 makes every weight 1, so the router gets no "
                             "gradient; set norm_topk_prob=False")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("model.shared_expert_gate needs model.num_shared_experts >= 1")
        if not self.use_swiglu:
            raise ValueError("model.use_swiglu=False: the experts are SwiGLU only; set use_swiglu=True")
        if (not self.no_bias) if self.mlp_bias is None else self.mlp_bias:
            raise ValueError("model.mlp_bias: the experts have no biases; set mlp_bias=False (or no_bias=True)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_attention_heads or self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU hidden size: int(hidden * mlp_ratio) rounded up to `multiple_of` (7B: 11008)."""
        raw = int(self.hidden_size * self.mlp_ratio)
        return self.multiple_of * ((raw + self.multiple_of - 1) // self.multiple_of)

    @property
    def num_checkpointed_layers(self) -> int:
        if isinstance(self.checkpoint, bool):
            return self.num_layers if self.checkpoint else 0
        return int(self.num_layers * self.checkpoint)

    def effective_rope_scaling(self) -> Optional[dict]:
        """rope_scaling as a plain dict, with the seed's `use_dynamic_ntk_rope` folded in."""
        if self.rope_scaling is not None and self.rope_scaling.type != "default":
            return self.rope_scaling.as_dict()
        if self.use_dynamic_ntk_rope:
            return {"type": "dynamic", "factor": 1.0, "original_max_position_embeddings": self.max_position_embeddings}
        return None

    def to_args(self):
        """The model's plain `ModelArgs`: every size resolved, every bias switch explicit."""
        from spindle.config.model_args import ModelArgs

        def bias(key: str) -> bool:
            value = getattr(self, key)
            return (not self.no_bias) if value is None else value

        return ModelArgs(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
            ffn_hidden_size=self.ffn_hidden_size, norm_type=self.norm_type,
            layer_norm_epsilon=self.layer_norm_epsilon, norm_bias=not self.no_bias,
            qkv_bias=bias("qkv_bias"), o_bias=bias("o_bias"), mlp_bias=bias("mlp_bias"), qk_norm=self.qk_norm,
            use_swiglu=self.use_swiglu, apply_post_layer_norm=self.apply_post_layer_norm,
            tie_word_embeddings=self.tie_word_embeddings, drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate, rope_base=self.rope_base, rope_scaling=self.effective_rope_scaling(),
            max_position_embeddings=self.max_position_embeddings,
            logn_ref_len=(self.logn_ref_len or self.max_position_embeddings) if self.logn_attn else None,
            sliding_window=self.sliding_window, init_std=self.init_std, embed_grad_scale=self.embed_grad_scale,
            **self._moe_args(),
        )

    def _moe_args(self) -> dict:
        if not self.num_experts:
            return {}
        expert = self.moe_intermediate_size or self.ffn_hidden_size
        keys = ("num_experts", "top_k", "num_shared_experts", "shared_expert_gate", "router_score", "norm_topk_prob",
                "capacity_factor", "min_capacity", "first_k_dense", "moe_every", "aux_loss_coeff",
                "aux_loss_per_sequence", "z_loss_coeff", "bias_update_rate")
        return dict({k: getattr(self, k) for k in keys}, moe_intermediate_size=expert,
                    shared_expert_intermediate_size=self.shared_expert_intermediate_size or expert)
