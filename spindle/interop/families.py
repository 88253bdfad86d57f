"""Hugging Face model families: what each config.json field means for our model, in one table.

Every family Spindle reads is a Llama-shaped decoder (RMSNorm, SwiGLU, RoPE in the rotate_half
layout, grouped KV heads); they differ in where biases are, q/k RMSNorm, the head size, Mistral's
sliding window, how RoPE is written in config.json, and tensor names:

    family     config.json model_type   biases (q/k/v, o, MLP)                  other         to-hf class
    llama      llama                    attention_bias, attention_bias, mlp_bias              LlamaForCausalLM
    mistral    mistral                  none                                    sliding_window MistralForCausalLM
    qwen2      qwen2                    always, never, never                                  Qwen2ForCausalLM
    qwen3      qwen3                    attention_bias, attention_bias, never   q/k norm      Qwen3ForCausalLM
    internlm   internlm (remote code)   bias, bias, never                       `rotary` dict (Llama)
    internlm2  internlm2 (remote code)  bias, bias, never                       fused wqkv    (Llama)
    mixtral    mixtral                  none                                    sliding_window MixtralForCausalLM
    qwen2_moe  qwen2_moe                qkv_bias, never, never                  shared expert Qwen2MoeForCausalLM
    qwen3_moe  qwen3_moe                attention_bias, attention_bias, never   q/k norm      Qwen3MoeForCausalLM

The last three are mixtures of experts (`Family.moe`, a `MoeSpec`): spindle/interop/hf_moe.py maps their
router, experts and layer pattern; DeepSeek-V3 (MLA) and GPT-OSS are refused there until they are built.

InternLM folders carry remote-code class names; only their weights and config.json are read, never
their code. `to-hf` writes the first family (in the order above) that expresses the model exactly,
so an InternLM v1 model comes back as a Llama with attention_bias=True and mlp_bias=False.

Names map one to one (no q/k permutation: our RoPE uses HF's rotate_half layout), except InternLM2's
`attention.wqkv`, which holds q, k and v grouped per KV head: rows (kv_heads, q_per_kv + 2, head_dim).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from spindle.config.rope_types import ROPE_TYPES, ntk_base
from spindle.errors import SpindleError
from spindle.interop.hf_moe import (
    MIXTRAL_NAMES, QWEN_MOE_NAMES, MoeSpec, experts_to_hf, experts_to_ours, moe_config_from_hf, moe_hf_config,
    moe_mismatch, refuse_unbuilt,
)

BiasSpec = Union[str, bool]  # a config.json key that switches the bias, or the family's fixed value


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    export_class: Optional[str]  # the transformers class to-hf writes; None: exported as another family
    names: str  # tensor naming scheme, a key of SCHEMES
    qkv_bias: BiasSpec
    o_bias: BiasSpec
    mlp_bias: BiasSpec
    defaults: dict = field(default_factory=dict)  # values of absent config.json keys (the family's config class)
    qk_norm: bool = False
    sliding_window: bool = False  # reads and writes `sliding_window`
    rope: str = "hf"  # "hf": rope_theta / rope_scaling / rope_parameters; "internlm": the `rotary` dict
    export_fixed: dict = field(default_factory=dict)  # config.json keys to-hf writes with a fixed value
    moe: Optional[MoeSpec] = None  # a mixture-of-experts family


_FULL_ATTENTION = {"use_sliding_window": False, "sliding_window": None}
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0}
_QWEN_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "router_aux_loss_coef": 0.001}
FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), ("LlamaForCausalLM",), "LlamaForCausalLM", "llama",
           "attention_bias", "attention_bias", "mlp_bias", _HF_DEFAULTS),
    Family("mistral", ("mistral",), ("MistralForCausalLM",), "MistralForCausalLM", "llama",
           False, False, False, dict(_HF_DEFAULTS, max_position_embeddings=4096 * 32), sliding_window=True),
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), "Qwen2ForCausalLM", "llama",
           True, False, False, dict(_HF_DEFAULTS, max_position_embeddings=32768), export_fixed=_FULL_ATTENTION),
    Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), "Qwen3ForCausalLM", "llama",
           "attention_bias", "attention_bias", False, dict(_HF_DEFAULTS, max_position_embeddings=32768),
           qk_norm=True, export_fixed=_FULL_ATTENTION),
    # the defaults of InternEvo's transformers/internlm_model/configuration_internlm.py
    Family("internlm", ("internlm",), ("InternLMForCausalLM",), None, "llama", "bias", "bias", False,
           dict(_HF_DEFAULTS, bias=True, rotary={"base": 10000, "type": "dynamic"}), rope="internlm"),
    # ... and of transformers/internlm2_model/configuration_internlm2.py
    Family("internlm2", ("internlm2",), ("InternLM2ForCausalLM",), None, "internlm2", "bias", "bias", False,
           dict(_HF_DEFAULTS, bias=True)),
    # mixtures of experts: defaults of transformers' MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    Family("mixtral", ("mixtral",), ("MixtralForCausalLM",), "MixtralForCausalLM", "mixtral", False, False, False,
           dict(_HF_DEFAULTS, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, rope_theta=1e6,
                num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
           sliding_window=True,
           moe=MoeSpec("num_local_experts", "intermediate_size", jitter_key="router_jitter_noise")),
    Family("qwen2_moe", ("qwen2_moe",), ("Qwen2MoeForCausalLM",), "Qwen2MoeForCausalLM", "qwen_moe", "qkv_bias",
           False, False, dict(_HF_DEFAULTS, max_position_embeddings=32768, qkv_bias=True, **_QWEN_MOE_DEFAULTS,
                              num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632),
           export_fixed=_FULL_ATTENTION, moe=MoeSpec("num_experts", "moe_intermediate_size", "norm_topk_prob",
                                                     shared_expert=True, layer_pattern=True)),
    Family("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), "Qwen3MoeForCausalLM", "qwen_moe",
           "attention_bias", "attention_bias", False,
           dict(_HF_DEFAULTS, max_position_embeddings=32768, **_QWEN_MOE_DEFAULTS, num_experts=128,
                num_experts_per_tok=8, moe_intermediate_size=768),
           qk_norm=True, export_fixed=_FULL_ATTENTION,
           moe=MoeSpec("num_experts", "moe_intermediate_size", "norm_topk_prob", layer_pattern=True)),
)

# Tensor names: ours -> HF, for the top-level modules and the modules inside layer N.
_LLAMA_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_INTERNLM2_LAYER = {k: k for k in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                   "attention_norm", "ffn_norm")}
_LLAMA_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
SCHEMES = {
    "llama": (_LLAMA_TOP, _LLAMA_LAYER),
    "mixtral": (_LLAMA_TOP, dict(_LLAMA_LAYER, **MIXTRAL_NAMES)),
    "qwen_moe": (_LLAMA_TOP, dict(_LLAMA_LAYER, **QWEN_MOE_NAMES)),
    "internlm2": ({"tok_embeddings": "model.tok_embeddings", "norm": "model.norm", "output": "output"},
                  _INTERNLM2_LAYER),
}
_FUSED_QKV = "attention.wqkv"  # InternLM2's name inside a layer


def family_of(hf: dict, source: str) -> Family:
    """The family of a config.json (by model_type, else by architecture class name)."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs if isinstance(a, str)):
            return fam
    refuse_unbuilt(model_type, archs, source)
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise SpindleError(f"{source}: model_type {model_type!r} (architectures {archs}) is not a family Spindle "
                       f"reads ({known})")


def family_named(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


# --------------------------------------------------------------------------- tensor names


def to_hf_name(name: str, fam: Family) -> str:
    top, layer = SCHEMES[fam.names]
    m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    m = re.match(r"^(\w+)\.(weight|bias)$", name)
    if m and m.group(1) in top:
        return f"{top[m.group(1)]}.{m.group(2)}"
    raise SpindleError(f"parameter {name} has no Hugging Face {fam.name} equivalent")


def from_hf_name(name: str, fam: Family) -> Optional[str]:
    """HF name -> ours; None for tensors we do not keep (rotary inv_freq buffers)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    top, layer = SCHEMES[fam.names]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    inv_layer = {v: k for k, v in layer.items()}
    if m and m.group(2) in inv_layer:
        return f"layers.{m.group(1)}.{inv_layer[m.group(2)]}.{m.group(3)}"
    m = re.match(r"^(.+)\.(weight|bias)$", name)
    inv_top = {v: k for k, v in top.items()}
    if m and m.group(1) in inv_top:
        return f"{inv_top[m.group(1)]}.{m.group(2)}"
    raise SpindleError(f"Hugging Face tensor {name} is not part of a {fam.name} model")


def ours_to_hf_tensors(state: dict[str, torch.Tensor], fam: Family) -> dict[str, torch.Tensor]:
    """Our state dict under family `fam`'s names (a tied head left out by the caller)."""
    out = {}
    if fam.moe is not None:  # stacked experts -> one tensor per expert
        out, state = experts_to_hf(state, SCHEMES[fam.names][1])
    return dict(out, **{to_hf_name(name, fam): t for name, t in state.items()})


def split_grouped_qkv(t: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused wqkv (rows grouped per KV head: q_per_kv queries, then k, then v) -> wq, wk, wv."""
    rows = t.shape[0]
    group = rows // (kv_heads * head_dim)
    if rows % (kv_heads * head_dim) or group < 3:
        raise SpindleError(f"fused wqkv has {rows} rows, not kv_heads ({kv_heads}) x (q_per_kv + 2) x "
                           f"head_dim ({head_dim})")
    g = t.reshape(kv_heads, group, head_dim, *t.shape[1:])
    q = g[:, : group - 2].reshape(kv_heads * (group - 2) * head_dim, *t.shape[1:])
    return (q.contiguous(), g[:, -2].reshape(-1, *t.shape[1:]).contiguous(),
            g[:, -1].reshape(-1, *t.shape[1:]).contiguous())


def hf_tensors_to_ours(tensors: dict[str, torch.Tensor], fam: Family, kv_heads: int,
                       head_dim: int) -> dict[str, torch.Tensor]:
    out = {}
    if fam.moe is not None:  # the experts (one tensor per expert, or fused) stacked under our names
        out, tensors = experts_to_ours(tensors, SCHEMES[fam.names][1])
    for name, t in tensors.items():
        m = re.match(rf"^model\.layers\.(\d+)\.{re.escape(_FUSED_QKV)}\.(weight|bias)$", name)
        if m and fam.names == "internlm2":
            for proj, part in zip(("wq", "wk", "wv"), split_grouped_qkv(t, kv_heads, head_dim)):
                out[f"layers.{m.group(1)}.attention.{proj}.{m.group(2)}"] = part
            continue
        key = from_hf_name(name, fam)
        if key is not None:
            out[key] = t
    return out


# --------------------------------------------------------------------------- config.json -> ours


def _number(hf: dict, key: str, source: str, kind=int, default=None):
    value = hf.get(key)
    if value is None:  # absent or null: transformers reads `"head_dim": null` as hidden / heads
        value = default
    if value is None:
        raise SpindleError(f"{source}: {key} is missing (expected a positive {kind.__name__})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
            or value <= 0:
        raise SpindleError(f"{source}: {key} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _flag(hf: dict, spec: BiasSpec, fam: Family, source: str) -> bool:
    if isinstance(spec, bool):
        return spec
    value = hf.get(spec, fam.defaults.get(spec, False))
    if not isinstance(value, bool):
        raise SpindleError(f"{source}: {spec} must be true or false, got {value!r}")
    return value


def _rope_from_hf(hf: dict, fam: Family, max_pos: int, source: str) -> tuple[float, Optional[dict]]:
    if fam.rope == "internlm":  # InternLM v1's modeling code reads only `rotary`
        rotary = hf.get("rotary", fam.defaults["rotary"])
        if not isinstance(rotary, dict) or rotary.get("type", "origin") not in ("origin", "dynamic"):
            raise SpindleError(f"{source}: rotary must be a dict with type 'origin' or 'dynamic', got {rotary!r}")
        theta = float(rotary.get("base", 10000))
        if rotary.get("type") == "dynamic":
            return theta, {"type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0)),
                           "original_max_position_embeddings": max_pos}
        return theta, None
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and not isinstance(scaling, dict):
        raise SpindleError(f"{source}: rope_scaling must be a dict or null, got {scaling!r}")
    raw_theta = next((t for t in (hf.get("rope_theta"), params.get("rope_theta")) if t is not None),
                     fam.defaults["rope_theta"])
    theta = _number({"rope_theta": raw_theta}, "rope_theta", source, float)
    if not scaling:
        return theta, None
    sc = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}
    sc["type"] = scaling.get("rope_type") or scaling.get("type")
    if sc["type"] == "default":
        return theta, None
    if sc["type"] == "dynamic":
        # transformers takes the original length of dynamic NTK from max_position_embeddings only
        sc["original_max_position_embeddings"] = max_pos
    if sc["type"] in ("yarn", "longrope"):
        # as transformers does: the pre-training length defaults to max_position_embeddings and the
        # factor to max_position_embeddings / that length; written out so nothing depends on defaults
        orig = sc.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
        sc.setdefault("factor", max_pos / orig)
    return theta, sc


def model_config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Our `model` config section for a Hugging Face config.json (any family in FAMILIES)."""
    fam = family_of(hf, source)
    if hf.get("hidden_act", "silu") != "silu":
        raise SpindleError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (silu only)")
    h, heads = _number(hf, "hidden_size", source), _number(hf, "num_attention_heads", source)
    kv = _number(hf, "num_key_value_heads", source, default=heads)
    head_dim = _number(hf, "head_dim", source, default=h // heads)
    inter = _number(hf, "intermediate_size", source)
    max_pos = _number(hf, "max_position_embeddings", source, default=fam.defaults["max_position_embeddings"])
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") and not fam.sliding_window or any(t != "full_attention" for t in layer_types):
        raise SpindleError(f"{source}: sliding-window layers (use_sliding_window / layer_types) are not supported "
                           "for this family; only full attention")
    window = hf.get("sliding_window") if fam.sliding_window else None
    if window is not None:
        window = _number(hf, "sliding_window", source)
    theta, scaling = _rope_from_hf(hf, fam, max_pos, source)
    bias = {part: _flag(hf, getattr(fam, part), fam, source) for part in ("qkv_bias", "o_bias", "mlp_bias")}
    out = {
        "hidden_size": h, "num_attention_heads": heads, "num_kv_attention_heads": kv, "head_dim": head_dim,
        "num_layers": _number(hf, "num_hidden_layers", source), "vocab_size": _number(hf, "vocab_size", source),
        "mlp_ratio": inter / h, "multiple_of": inter, "norm_type": "rmsnorm", "use_swiglu": True,
        "layer_norm_epsilon": _number(hf, "rms_norm_eps", source, float, fam.defaults["rms_norm_eps"]),
        "rope_base": theta, "max_position_embeddings": max_pos, "qk_norm": fam.qk_norm, "sliding_window": window,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range") or 0.02),
        "no_bias": not any(bias.values()),
        **({} if len(set(bias.values())) == 1 else bias),
    }
    if scaling:
        out["rope_scaling"] = scaling
    if fam.moe is not None:
        out.update(moe_config_from_hf(hf, fam, out["num_layers"], source))
    return out


# --------------------------------------------------------------------------- ours -> config.json


def expresses(fam: Family, a) -> bool:
    """Whether family `fam` writes a model with ModelArgs `a` exactly."""
    if fam.export_class is None or a.qk_norm != fam.qk_norm or (a.sliding_window and not fam.sliding_window) \
            or (fam.moe is None) != (a.num_experts == 0):
        return False
    if fam.moe is not None and moe_mismatch(fam.moe, a) is not None:
        return False
    keyed: dict[str, bool] = {}  # a key shared by two groups (attention_bias) needs them equal
    for part in ("qkv_bias", "o_bias", "mlp_bias"):
        spec, have = getattr(fam, part), getattr(a, part)
        if isinstance(spec, bool):
            if spec != have:
                return False
        elif keyed.setdefault(spec, have) != have:
            return False
    return True


def export_family(a) -> Family:
    """The first family that expresses the model exactly (refuses what no family can)."""
    if a.norm_type != "rmsnorm" or not a.use_swiglu or a.apply_post_layer_norm:
        raise SpindleError("only RMSNorm + SwiGLU pre-norm models export to Hugging Face "
                           f"(norm_type={a.norm_type}, use_swiglu={a.use_swiglu}, "
                           f"apply_post_layer_norm={a.apply_post_layer_norm})")
    if a.logn_ref_len is not None:
        raise SpindleError("model.logn_attn=True has no Hugging Face equivalent; export without it is not the "
                           "same model")
    for fam in FAMILIES:
        if expresses(fam, a):
            return fam
    if a.num_experts:
        why = "; ".join(f"{f.name}: {moe_mismatch(f.moe, a) or 'the attention differs (qk_norm, biases, window)'}"
                        for f in FAMILIES if f.moe is not None)
        raise SpindleError(f"no Hugging Face mixture-of-experts family expresses this model ({why})")
    raise SpindleError(f"no Hugging Face family has this combination: qkv_bias={a.qkv_bias}, o_bias={a.o_bias}, "
                       f"mlp_bias={a.mlp_bias}, qk_norm={a.qk_norm}, sliding_window={a.sliding_window}")


# the registry's parameters under transformers' names
_HF_ROPE_KEYS = {name: t.transformers_params for name, t in ROPE_TYPES.items()
                 if t.in_transformers and name != "default"}


def hf_config(a, bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> dict:
    """A transformers config dict for ModelArgs `a`, in the class of `export_family(a)`."""
    fam = export_family(a)
    theta, scaling, max_pos = float(a.rope_base), a.rope_scaling, a.max_position_embeddings
    hf_scaling = None
    if scaling is not None and scaling["type"] == "ntk":
        theta = ntk_base(theta, float(scaling["factor"]), a.head_dim)  # fixed NTK = a new base
    elif scaling is not None:
        kind = scaling["type"]
        hf_scaling = {k: scaling[k] for k in _HF_ROPE_KEYS[kind] if scaling.get(k) is not None}
        hf_scaling["rope_type"] = kind
        if kind == "dynamic":
            max_pos = scaling.get("original_max_position_embeddings") or max_pos
    cfg = {
        "architectures": [fam.export_class], "model_type": fam.model_types[0],
        "vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "intermediate_size": a.ffn_hidden_size,
        "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_pos, "rms_norm_eps": a.layer_norm_epsilon,
        "tie_word_embeddings": a.tie_word_embeddings, "initializer_range": a.init_std,
        "torch_dtype": "float32", "use_cache": True,
        # transformers 4.x reads these two ...
        "rope_theta": theta, "rope_scaling": hf_scaling,
        # ... and 5.x this one
        "rope_parameters": {"rope_type": "default", "rope_theta": theta} if hf_scaling is None
        else dict(hf_scaling, rope_theta=theta),
    }
    for part in ("qkv_bias", "o_bias", "mlp_bias"):
        spec = getattr(fam, part)
        if not isinstance(spec, bool):
            cfg[spec] = getattr(a, part)
    if fam.sliding_window:
        cfg["sliding_window"] = a.sliding_window
    cfg.update(fam.export_fixed)
    if fam.moe is not None:
        cfg.update(moe_hf_config(fam.moe, a))
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg
