"""A run that starts from a Hugging Face folder (`load_ckpt_info(ckpt_type="hf")`) takes its model from the
folder's config.json: the config file may leave the model out, or state only what it changes.

- What fixes the weights' shapes and the architecture (sizes, heads, kv heads, head_dim, layers,
  vocabulary, FFN size, tie, biases, q/k norms, norm type, SwiGLU; experts, top-k, their widths, shared
  experts, routing, the MoE layer pattern): taken from config.json when the
  config leaves it out; a config value that differs is refused in one line naming both keys and values
  (a model built otherwise could not hold the weights, or would compute something else with them).
- What a continued training may change on purpose (RoPE base and scaling, context length, norm epsilon,
  sliding window, init scale, the balance loss's weight): taken from config.json when left out; a config
  value that differs is kept and said once at start (configs/continue_rope.py continues at a new base this way).
"""

from __future__ import annotations

import logging

from spindle.interop.families import model_config_from_hf
from spindle.interop.hf import local_dir, read_hf_config
from spindle.checkpoint.loading import HF_TYPES
from spindle.config import ModelConfig, SpindleConfig
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)

# ModelArgs field -> (our model key, config.json key): what the weights and the architecture fix
STRUCTURE = {
    "hidden_size": ("hidden_size", "hidden_size"),
    "num_attention_heads": ("num_attention_heads", "num_attention_heads"),
    "num_kv_heads": ("num_kv_attention_heads", "num_key_value_heads"),
    "head_dim": ("head_dim", "head_dim"),
    "num_layers": ("num_layers", "num_hidden_layers"),
    "vocab_size": ("vocab_size", "vocab_size"),
    "ffn_hidden_size": ("mlp_ratio / multiple_of", "intermediate_size"),
    "tie_word_embeddings": ("tie_word_embeddings", "tie_word_embeddings"),
    "qkv_bias": ("qkv_bias", "attention_bias"),
    "o_bias": ("o_bias", "attention_bias / o_bias"),
    "mlp_bias": ("mlp_bias", "mlp_bias"),
    "qk_norm": ("qk_norm", "model_type (q/k norms)"),
    "norm_type": ("norm_type", "model_type (RMSNorm)"),
    "use_swiglu": ("use_swiglu", "hidden_act"),
    # mixtures of experts (hf_moe.py)
    "num_experts": ("num_experts", "num_local_experts / num_experts"),
    "top_k": ("top_k", "num_experts_per_tok"),
    "moe_intermediate_size": ("moe_intermediate_size", "moe_intermediate_size (Mixtral: intermediate_size)"),
    "num_shared_experts": ("num_shared_experts", "shared_expert_intermediate_size"),
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size", "shared_expert_intermediate_size"),
    "shared_expert_gate": ("shared_expert_gate", "model_type (Qwen2-MoE's gated shared expert)"),
    "router_score": ("router_score", "model_type (softmax routers)"),
    "norm_topk_prob": ("norm_topk_prob", "norm_topk_prob (Mixtral: always true)"),
    "first_k_dense": ("first_k_dense", "mlp_only_layers"),
    "moe_every": ("moe_every", "decoder_sparse_step"),
}
# our model key -> config.json key: what a continued training may set otherwise
TUNABLE = {"rope_base": "rope_theta", "rope_scaling": "rope_scaling",
           "max_position_embeddings": "max_position_embeddings", "layer_norm_epsilon": "rms_norm_eps",
           "sliding_window": "sliding_window", "init_std": "initializer_range",
           "aux_loss_coeff": "router_aux_loss_coef x num_experts_per_tok"}
BIAS_KEYS = ("no_bias", "qkv_bias", "o_bias", "mlp_bias")


def model_from_hf_folder(cfg: SpindleConfig) -> SpindleConfig:
    """`cfg` with its model section completed from the HF folder it starts from (module docstring); `cfg`
    itself when the run does not start from one."""
    info = cfg.ckpt.load_ckpt_info
    if info is None or info.ckpt_type not in HF_TYPES or not info.path:
        return cfg
    folder = local_dir(info.path)
    source = str(folder / "config.json")
    folder_model = model_config_from_hf(read_hf_config(folder), source)
    theirs = dict(folder_model)
    given = cfg.model.model_dump(include=cfg.model.model_fields_set)
    if any(k in given for k in BIAS_KEYS):  # the biases are one group: the config's, or the folder's
        theirs = {k: v for k, v in theirs.items() if k not in BIAS_KEYS}
    taken = sorted(k for k in theirs if k not in given)
    try:
        merged = ModelConfig.model_validate({**cfg.model.model_dump(exclude_unset=True),
                                             **{k: theirs[k] for k in taken}})
    except ValueError as exc:
        raise SpindleError(f"{source}: the model config completed from it is invalid: {exc}") from None
    mine, hf = merged.to_args(), ModelConfig.model_validate(folder_model).to_args()
    for field, (ours, hf_key) in STRUCTURE.items():
        if getattr(mine, field) != getattr(hf, field):
            raise SpindleError(f"model.{ours} gives {field}={getattr(mine, field)!r} but {source} {hf_key} gives "
                               f"{getattr(hf, field)!r}; the weights have the folder's shape: leave the key out "
                               "(it is read from config.json) or make them agree")
    for key, hf_key in TUNABLE.items():
        if key in given and getattr(mine, key) != getattr(hf, key):
            logger.info(f"config: model.{key}={getattr(mine, key)!r} while {source} gives {hf_key}="
                        f"{getattr(hf, key)!r}: training with the config's value")
    if taken:
        logger.info(f"config: from {source}: model {', '.join(taken)}")
    return cfg.model_copy(update={"model": merged})
