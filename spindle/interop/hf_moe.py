"""Mixture-of-experts Hugging Face families (Mixtral, Qwen2-MoE, Qwen3-MoE), both ways: what their config.json
keys mean for the MoE block (spindle/model/moe.py, docs/moe.md), and their experts' tensors.

    config.json                                   ours (model = dict(...))
    num_local_experts (Mixtral) / num_experts     num_experts
    num_experts_per_tok                           top_k
    intermediate_size (Mixtral: the experts')     moe_intermediate_size; Qwen: moe_intermediate_size
    norm_topk_prob (Qwen; Mixtral always True)    norm_topk_prob
    shared_expert_intermediate_size (Qwen2-MoE)   num_shared_experts=1, shared_expert_intermediate_size,
                                                  shared_expert_gate=True
    decoder_sparse_step, mlp_only_layers (Qwen)   moe_every, first_k_dense (refused where only some of the
                                                  later layers are dense: our pattern cannot say it)
    router_aux_loss_coef                          aux_loss_coeff = router_aux_loss_coef * top_k: transformers'
                                                  load_balancing_loss_func is top_k times ours (docs/moe.md)
    router_jitter_noise (Mixtral)                 only 0 (our router has no jitter)
    output_router_logits                          not read: transformers adds the balance loss only when it
                                                  is true, Spindle whenever aux_loss_coeff > 0

Experts: ours are stacked [E, out, in] (`experts.w1/w3/w2.weight`); the files transformers writes
(save_pretrained's default, and every transformers 4.x) hold one module per expert, `experts.{e}.w1` in
Mixtral's `block_sparse_moe`, `experts.{e}.gate_proj / up_proj / down_proj` in Qwen's `mlp`. transformers 5
keeps them fused in memory (`mlp.experts.gate_up_proj` [E, 2I, H] = gate rows then up rows, `down_proj`
[E, H, I], Mixtral's router renamed `mlp.gate`), which `save_pretrained(save_original_format=False)` writes:
both layouts are read; `to-hf` writes the per-expert one, which every version loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from spindle.errors import SpindleError


@dataclass(frozen=True)
class MoeSpec:
    """What a mixture-of-experts family's config.json says about its MoE layers."""
    experts_key: str  # the routed experts' count: num_local_experts (Mixtral) or num_experts (Qwen)
    width_key: str  # each routed expert's SwiGLU width
    norm_topk_prob: Union[str, bool] = True  # renormalised top-k weights: fixed, or the config key that says it
    shared_expert: bool = False  # Qwen2-MoE: one shared expert, gated by sigmoid(shared_expert_gate x)
    layer_pattern: bool = False  # decoder_sparse_step / mlp_only_layers choose the MoE layers (else all are)
    jitter_key: Optional[str] = None  # Mixtral's router_jitter_noise: only 0 is expressible


# Tensor names inside layer N, ours -> theirs; `*` is the expert's index (families.SCHEMES adds them to Llama's)
MIXTRAL_NAMES = {"feed_forward.gate": "block_sparse_moe.gate",
                 **{f"feed_forward.experts.{w}": f"block_sparse_moe.experts.*.{w}" for w in ("w1", "w3", "w2")}}
QWEN_MOE_NAMES = {
    "feed_forward.gate": "mlp.gate", "feed_forward.experts.w1": "mlp.experts.*.gate_proj",
    "feed_forward.experts.w3": "mlp.experts.*.up_proj", "feed_forward.experts.w2": "mlp.experts.*.down_proj",
    "feed_forward.shared_experts.w1": "mlp.shared_expert.gate_proj",
    "feed_forward.shared_experts.w3": "mlp.shared_expert.up_proj",
    "feed_forward.shared_experts.w2": "mlp.shared_expert.down_proj",
    "feed_forward.shared_expert_gate": "mlp.shared_expert_gate",
}
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")  # transformers maps one to the other per class
# transformers 5's in-memory layout, under `mlp` in every family: the router and the fused experts
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")

# architectures transformers has and Spindle does not build yet: one line each, not "an unknown family"
NOT_BUILT = {
    "deepseek_v3": ("DeepseekV3ForCausalLM", "multi-head latent attention (MLA) and grouped sigmoid routing"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "multi-head latent attention (MLA) and grouped routing"),
    "gpt_oss": ("GptOssForCausalLM", "attention sinks, biased experts with a clamped SwiGLU and a biased router"),
}


def refuse_unbuilt(model_type, archs: list, source: str) -> None:
    for name, (arch, what) in NOT_BUILT.items():
        if model_type == name or arch in archs:
            raise SpindleError(f"{source}: {arch} (model_type {name!r}) is not built in Spindle yet ({what}); "
                               "of the mixture-of-experts families, Spindle reads Mixtral, Qwen2-MoE and Qwen3-MoE")


# --------------------------------------------------------------------------- config.json <-> ours


def moe_config_from_hf(hf: dict, fam, num_layers: int, source: str) -> dict:
    """Our MoE model keys for the config.json of MoE family `fam` (module docstring)."""
    from spindle.interop.families import _flag, _number  # families imports this module: read when called

    spec = fam.moe
    count_key = next((k for k in (spec.experts_key, *_EXPERT_COUNT_KEYS) if hf.get(k) is not None), spec.experts_key)
    experts = _number(hf, count_key, source, default=fam.defaults.get(spec.experts_key))
    top_k = _number(hf, "num_experts_per_tok", source, default=fam.defaults["num_experts_per_tok"])
    if top_k > experts:
        raise SpindleError(f"{source}: num_experts_per_tok ({top_k}) must be at most {count_key} ({experts})")
    norm = _flag(hf, spec.norm_topk_prob, fam, source)
    if top_k == 1 and norm:
        raise SpindleError(f"{source}: num_experts_per_tok 1 with renormalised weights ({spec.norm_topk_prob}) "
                           "weighs every token's expert by 1, so the router would get no gradient; Spindle refuses "
                           "it (model.norm_topk_prob)")
    if spec.jitter_key is not None:
        jitter = hf.get(spec.jitter_key) or 0.0
        if jitter != 0.0:
            raise SpindleError(f"{source}: {spec.jitter_key} {jitter!r} is not supported (Spindle's router has no "
                               "jitter noise); only 0 is")
    coef = hf.get("router_aux_loss_coef", fam.defaults["router_aux_loss_coef"])
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef * top_k <= 1e3:
        raise SpindleError(f"{source}: router_aux_loss_coef must be a number >= 0 (at most 1000 / "
                           f"num_experts_per_tok), got {coef!r}")
    out = {"num_experts": experts, "top_k": top_k, "router_score": "softmax", "norm_topk_prob": norm,
           "moe_intermediate_size": _number(hf, spec.width_key, source, default=fam.defaults.get(spec.width_key)),
           "aux_loss_coeff": float(coef) * top_k, "first_k_dense": 0, "moe_every": 1}
    if spec.shared_expert:
        width = _number(hf, "shared_expert_intermediate_size", source,
                        default=fam.defaults["shared_expert_intermediate_size"])
        out.update(num_shared_experts=1, shared_expert_intermediate_size=width, shared_expert_gate=True)
    if spec.layer_pattern:
        out.update(_layer_pattern(hf, fam, num_layers, source, _number))
    return out


def _layer_pattern(hf: dict, fam, num_layers: int, source: str, number) -> dict:
    """transformers' Qwen MoE layers, `i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`, as our
    `i >= first_k_dense and (i + 1) % moe_every == 0`: the smallest first_k_dense that gives the same layers."""
    step = number(hf, "decoder_sparse_step", source, default=fam.defaults["decoder_sparse_step"])
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in dense):
        raise SpindleError(f"{source}: mlp_only_layers must be a list of layer indices, got {dense!r}")
    theirs = [i for i in range(num_layers) if (i + 1) % step == 0 and i not in dense]
    if not theirs:
        raise SpindleError(f"{source}: decoder_sparse_step {step} and mlp_only_layers {dense} leave none of the "
                           f"{num_layers} layers a mixture of experts")
    first_k = max(0, theirs[0] - step + 1)
    ours = [i for i in range(num_layers) if i >= first_k and (i + 1) % step == 0]
    if ours != theirs:
        raise SpindleError(f"{source}: mlp_only_layers {dense} makes layers {sorted(set(ours) - set(theirs))} dense "
                           f"after MoE layer {theirs[0]}; Spindle's layer pattern (model.first_k_dense, "
                           "model.moe_every) keeps only the first layers dense")
    return {"first_k_dense": first_k, "moe_every": step}


def moe_mismatch(spec: MoeSpec, a) -> Optional[str]:
    """Why MoE family `spec` cannot write a model with ModelArgs `a` exactly (None: it can)."""
    if a.router_score != "softmax":
        return f"model.router_score={a.router_score!r} (transformers' routers are softmax)"
    if a.capacity_factor is not None:
        return f"model.capacity_factor={a.capacity_factor} (transformers' experts are dropless)"
    if spec.norm_topk_prob is True and not a.norm_topk_prob:
        return "model.norm_topk_prob=False (always renormalised)"
    if spec.shared_expert and not (a.num_shared_experts and a.shared_expert_gate):
        return "no gated shared expert (model.num_shared_experts, model.shared_expert_gate)"
    if not spec.shared_expert and a.num_shared_experts:
        return f"model.num_shared_experts={a.num_shared_experts} (no shared experts)"
    if not spec.layer_pattern and (a.first_k_dense or a.moe_every != 1):
        return "dense layers (model.first_k_dense / model.moe_every; every layer is MoE)"
    return None


def moe_hf_config(spec: MoeSpec, a) -> dict:
    """The MoE keys of the config.json `to-hf` writes for ModelArgs `a` (which `spec` expresses)."""
    cfg = {spec.experts_key: a.num_experts, "num_experts_per_tok": a.top_k, spec.width_key: a.moe_intermediate_size,
           "router_aux_loss_coef": a.aux_loss_coeff / a.top_k, "output_router_logits": False}
    if not isinstance(spec.norm_topk_prob, bool):
        cfg[spec.norm_topk_prob] = a.norm_topk_prob
    if spec.shared_expert:  # our n shared experts of width S are one SwiGLU of width n * S
        cfg["shared_expert_intermediate_size"] = a.num_shared_experts * a.shared_expert_intermediate_size
    if spec.layer_pattern:
        cfg["decoder_sparse_step"] = a.moe_every
        cfg["mlp_only_layers"] = [i for i in range(a.first_k_dense) if (i + 1) % a.moe_every == 0]
    if spec.jitter_key is not None:
        cfg[spec.jitter_key] = 0.0
    return cfg


# --------------------------------------------------------------------------- tensors


def _per_expert_patterns(layer: dict) -> dict[str, re.Pattern]:
    """Our stacked name inside a layer ('feed_forward.experts.w1') -> the pattern of their per-expert tensors."""
    return {ours: re.compile(r"^model\.layers\.(\d+)\." + re.escape(theirs).replace(r"\*", r"(\d+)") + r"\.weight$")
            for ours, theirs in layer.items() if "*" in theirs}


def experts_to_ours(tensors: dict[str, torch.Tensor], layer: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Their router and experts (per expert, or fused) -> ours, stacked; returns (ours, the other tensors)."""
    patterns = _per_expert_patterns(layer)
    ours: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    rest = {}
    for name, t in tensors.items():
        m = _FUSED.match(name)
        if m:
            base = f"layers.{m.group(1)}.feed_forward."
            if m.group(2) == "gate.weight":
                parts = {base + "gate.weight": t}
            elif m.group(2) == "experts.down_proj":
                parts = {base + "experts.w2.weight": t}
            elif t.dim() != 3 or t.shape[1] % 2:
                raise SpindleError(f"Hugging Face tensor {name} has shape {list(t.shape)}, not [experts, 2 x "
                                   "intermediate, hidden]")
            else:  # gate rows, then up rows (transformers chunks the product in two)
                gate, up = t.chunk(2, dim=1)
                parts = {base + "experts.w1.weight": gate, base + "experts.w3.weight": up}
            for key, part in parts.items():
                if key in ours:
                    raise SpindleError(f"Hugging Face tensor {name}: layer {m.group(1)} holds this tensor twice "
                                       "(fused and per expert, or both router names)")
                ours[key] = part
            continue
        hit = next(((key, m) for key, p in patterns.items() if (m := p.match(name))), None)
        if hit is None:
            rest[name] = t
            continue
        key, m = hit
        per_expert.setdefault(f"layers.{m.group(1)}.{key}.weight", {})[int(m.group(2))] = t
    for key, by_index in per_expert.items():
        missing = next((e for e in range(max(by_index) + 1) if e not in by_index), None)
        if missing is not None:
            raise SpindleError(f"Hugging Face weights have experts up to {max(by_index)} of {key} but not expert "
                               f"{missing}")
        if key in ours:
            raise SpindleError(f"Hugging Face weights hold {key} twice (fused and per expert)")
        ours[key] = torch.stack([by_index[e] for e in range(len(by_index))])
    return ours, rest


def experts_to_hf(state: dict[str, torch.Tensor], layer: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Our stacked experts -> one tensor per expert under their names; returns (theirs, the other tensors).
    The balancing bias (`score_bias`) has no place in their models: dropped when zero, else refused."""
    theirs, rest = {}, {}
    for name, t in state.items():
        m = re.match(r"^layers\.(\d+)\.(feed_forward\.experts\.w[123])\.weight$", name)
        if m:
            for e in range(t.shape[0]):
                theirs[f"model.layers.{m.group(1)}.{layer[m.group(2)].replace('*', str(e))}.weight"] = t[e]
        elif name.endswith(".feed_forward.score_bias"):
            if torch.any(t != 0):
                raise SpindleError(f"{name} (aux-loss-free balancing, model.bias_update_rate) is not zero: it "
                                   "changes which experts each token takes, and transformers' routers have no bias")
        else:
            rest[name] = t
    return theirs, rest
