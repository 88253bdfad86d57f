"""One tiny Hugging Face folder per family of `spindle.interop.families.FAMILIES` (and the Llama variants
with biases and with tied embeddings), written by our own code from random weights: the family × layout
matrix (tests/distributed/family_matrix.py) starts every layout's training from them.

A family joins the matrix by joining FAMILIES: `write_family_folders` refuses a family it has no
switches for (FAMILY_SWITCHES), so the new row is never silently left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# folder name -> (family, the model switches its weights have)
FAMILY_SWITCHES = {
    "llama": ("llama", {}),
    "llama_bias": ("llama", {"no_bias": False, "qkv_bias": True, "o_bias": True, "mlp_bias": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"no_bias": False, "qkv_bias": True, "o_bias": False, "mlp_bias": False}),
    "qwen3": ("qwen3", {"qk_norm": True}),
    "internlm": ("internlm", {"no_bias": False, "qkv_bias": True, "o_bias": True, "mlp_bias": False,
                              "num_kv_attention_heads": 4}),  # InternLM v1 has no GQA
    "internlm2": ("internlm2", {}),
    # mixtures of experts: 4 experts of width 32, 2 a token; Qwen2-MoE with its gated shared expert and a dense
    # first layer (mlp_only_layers), Qwen3-MoE with q/k norms
    "mixtral": ("mixtral", {"num_experts": 4, "top_k": 2, "moe_intermediate_size": 32}),
    "qwen2_moe": ("qwen2_moe", {"no_bias": False, "qkv_bias": True, "o_bias": False, "mlp_bias": False,
                                "num_experts": 4, "top_k": 2, "moe_intermediate_size": 32, "norm_topk_prob": False,
                                "num_shared_experts": 1, "shared_expert_intermediate_size": 48,
                                "shared_expert_gate": True, "first_k_dense": 1}),
    "qwen3_moe": ("qwen3_moe", {"qk_norm": True, "num_experts": 4, "top_k": 2, "moe_intermediate_size": 32}),
}
SIZES = {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
         "vocab_size": 64, "mlp_ratio": 1.5, "multiple_of": 48, "max_position_embeddings": 64}


def fuse_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """wq, wk, wv -> InternLM2's wqkv: per KV head, its query heads, then its key head, then its value head."""
    rows = lambda t: t.reshape(kv_heads, -1, *t.shape[1:])  # noqa: E731
    return torch.cat([rows(q), rows(k), rows(v)], dim=1).reshape(-1, *q.shape[1:])


def family_config(name: str, args) -> dict:
    from spindle.interop.families import family_named, hf_config

    fam = family_named(name)
    config = hf_config(args)  # sizes, norms, RoPE, tie in transformers' keys
    config.update(model_type=fam.model_types[0], architectures=list(fam.architectures))
    for part in ("qkv_bias", "o_bias", "mlp_bias"):
        spec = getattr(fam, part)
        if not isinstance(spec, bool):
            config[spec] = getattr(args, part)
    if fam.rope == "internlm":  # InternLM v1 keeps RoPE in its own `rotary` dict
        config["rotary"] = {"base": args.rope_base, "type": "origin"}
    return config


def write_family_folders(root: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    from spindle.interop.families import FAMILIES, family_named, ours_to_hf_tensors, to_hf_name
    from spindle.config import ModelConfig
    from spindle.model.llama import build_model

    missing = {f.name for f in FAMILIES} - {family for family, _ in FAMILY_SWITCHES.values()}
    assert not missing, f"families without a folder in tests/family_folders.py FAMILY_SWITCHES: {sorted(missing)}"
    folders = {}
    for folder_name, (family, switches) in FAMILY_SWITCHES.items():
        args = ModelConfig.model_validate({**SIZES, **switches}).to_args()
        model = build_model(args, "cpu", seed=len(folders) + 1)
        with torch.no_grad():  # far from init: every tensor's mapping shows in the losses
            gen = torch.Generator().manual_seed(len(folders))
            for n, p in model.named_parameters():
                p.copy_((1.0 if "norm" in n else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        fam = family_named(family)
        state = {n: t for n, t in model.state_dict().items() if not (n == "output.weight" and args.tie_word_embeddings)}
        tensors = ours_to_hf_tensors(state, fam) if fam.moe is not None else {}  # the experts one tensor each
        for n, t in state.items() if fam.moe is None else ():
            if fam.names == "internlm2" and ".attention.w" in n and n.split(".")[3] in ("wq", "wk", "wv"):
                continue
            tensors[to_hf_name(n, fam)] = t
        if fam.names == "internlm2":
            for i in range(args.num_layers):
                for kind in ("weight", "bias"):
                    parts = [state.get(f"layers.{i}.attention.{w}.{kind}") for w in ("wq", "wk", "wv")]
                    if parts[0] is not None:
                        tensors[f"model.layers.{i}.attention.wqkv.{kind}"] = fuse_grouped_qkv(*parts, args.num_kv_heads)
        out = root / folder_name
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(family_config(family, args)))
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / "model.safetensors"))
        folders[folder_name] = out
    return folders
