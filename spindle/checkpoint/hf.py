"""Hugging Face Llama interop: export a Spindle checkpoint, import a HF Llama folder.

    spindle convert to-hf CKPT OUT       safetensors + config.json + tokenizer files that
                                         transformers' LlamaForCausalLM loads with the same logits
    spindle convert from-hf HF_DIR OUT   a Spindle checkpoint (model only, step 0) to start training
                                         from, via load_ckpt_info(path=OUT, content="model");
                                         or skip the conversion: load_ckpt_info(path=HF_DIR, ckpt_type="hf")

Parameter names map one to one (no q/k permutation: our RoPE already uses HF's rotate_half layout):

    tok_embeddings                      model.embed_tokens
    layers.N.attention.wq/wk/wv/wo      model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj
    layers.N.feed_forward.w1/w3/w2      model.layers.N.mlp.gate_proj/up_proj/down_proj
    layers.N.attention_norm/ffn_norm    model.layers.N.input_layernorm/post_attention_layernorm
    norm, output                        model.norm, lm_head

The config carries rope_base -> rope_theta and rope_scaling -> rope_scaling; config.json holds both
the transformers 4.x keys (`rope_theta`, `rope_scaling`) and the 5.x key (`rope_parameters`).
Weights are read with safetensors or `torch.load(weights_only=True)`: never pickled code.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from spindle.config import ModelConfig
from spindle.errors import SpindleError

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_HF_ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def to_hf_name(name: str) -> str:
    m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        if m.group(2) not in _LAYER_MAP:
            raise SpindleError(f"parameter {name} has no Hugging Face Llama equivalent")
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    m = re.match(r"^(\w+)\.(weight|bias)$", name)
    if m and m.group(1) in _TOP_MAP:
        return f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
    raise SpindleError(f"parameter {name} has no Hugging Face Llama equivalent")


_INV_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_INV_TOP = {v: k for k, v in _TOP_MAP.items()}


def from_hf_name(name: str) -> Optional[str]:
    """HF name -> ours; None for tensors we do not keep (rotary inv_freq buffers)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _INV_LAYER:
        return f"layers.{m.group(1)}.{_INV_LAYER[m.group(2)]}.{m.group(3)}"
    m = re.match(r"^(.+)\.(weight|bias)$", name)
    if m and m.group(1) in _INV_TOP:
        return f"{_INV_TOP[m.group(1)]}.{m.group(2)}"
    raise SpindleError(f"Hugging Face tensor {name} is not part of a Llama model this converter knows")


# --------------------------------------------------------------------------- configs


def hf_config(m: ModelConfig, bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> dict:
    """A transformers LlamaConfig dict for our model config (refuses features Llama cannot express)."""
    if m.norm_type != "rmsnorm" or not m.use_swiglu or m.apply_post_layer_norm:
        raise SpindleError("only RMSNorm + SwiGLU pre-norm models export to Hugging Face Llama "
                           f"(norm_type={m.norm_type}, use_swiglu={m.use_swiglu}, "
                           f"apply_post_layer_norm={m.apply_post_layer_norm})")
    if m.logn_attn:
        raise SpindleError("model.logn_attn=True has no Hugging Face Llama equivalent; export without it is "
                           "not the same model")
    theta = float(m.rope_base)
    scaling = m.effective_rope_scaling()
    hf_scaling = None
    if scaling is not None and scaling["type"] == "ntk":
        theta = theta * float(scaling["factor"]) ** (m.head_dim / (m.head_dim - 2))  # fixed NTK = a new base
    elif scaling is not None:
        kind = scaling["type"]
        if kind not in _HF_ROPE_KEYS:
            raise SpindleError(f"rope_scaling type {kind!r} has no Hugging Face Llama equivalent")
        hf_scaling = {k: scaling[k] for k in _HF_ROPE_KEYS[kind] if scaling.get(k) is not None}
        if kind == "dynamic":
            hf_scaling.pop("original_max_position_embeddings", None)  # HF takes it from max_position_embeddings
        hf_scaling["rope_type"] = kind
    max_pos = m.max_position_embeddings
    if scaling is not None and scaling["type"] == "dynamic":
        max_pos = scaling.get("original_max_position_embeddings") or max_pos
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_pos, "rms_norm_eps": m.layer_norm_epsilon,
        "tie_word_embeddings": m.tie_word_embeddings, "attention_bias": not m.no_bias, "mlp_bias": not m.no_bias,
        "initializer_range": m.init_std, "torch_dtype": "float32", "use_cache": True,
        # transformers 4.x reads these two ...
        "rope_theta": theta, "rope_scaling": hf_scaling,
        # ... and 5.x this one
        "rope_parameters": {"rope_type": "default", "rope_theta": theta} if hf_scaling is None
        else dict(hf_scaling, rope_theta=theta),
    }
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


def model_config_from_hf(hf: dict) -> dict:
    """Our `model` config section for a HF Llama config.json."""
    if hf.get("model_type", "llama") not in ("llama", "mistral", "internlm2") and "LlamaForCausalLM" not in (
            hf.get("architectures") or []):
        raise SpindleError(f"config.json: model_type {hf.get('model_type')!r} is not a Llama model")
    if hf.get("hidden_act", "silu") != "silu":
        raise SpindleError(f"config.json: hidden_act {hf.get('hidden_act')!r} is not supported (silu only)")
    h, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, h // heads):
        raise SpindleError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                           f"({h // heads}); not supported")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise SpindleError("config.json: attention_bias and mlp_bias differ; Spindle has one no_bias switch")
    inter = int(hf["intermediate_size"])
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    out = {
        "hidden_size": h, "num_attention_heads": heads,
        "num_kv_attention_heads": int(hf.get("num_key_value_heads") or heads),
        "num_layers": int(hf["num_hidden_layers"]), "vocab_size": int(hf["vocab_size"]),
        "mlp_ratio": inter / h, "multiple_of": inter, "norm_type": "rmsnorm",
        "layer_norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)), "rope_base": theta,
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "no_bias": not bool(hf.get("attention_bias", False)), "use_swiglu": True,
    }
    if scaling:
        sc = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}
        sc["type"] = scaling.get("rope_type") or scaling.get("type")
        if sc["type"] == "dynamic":
            sc.setdefault("original_max_position_embeddings", out["max_position_embeddings"])
        if sc["type"] != "default":
            out["rope_scaling"] = sc
    return out


# --------------------------------------------------------------------------- weights


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise SpindleError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights in this folder")


def _read_hf_config(hf_dir: Path) -> dict:
    if not (hf_dir / "config.json").is_file():
        raise SpindleError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except ValueError as exc:
        raise SpindleError(f"{hf_dir / 'config.json'}: not valid JSON: {exc}") from None


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> None:
    """Copy a HF Llama folder's weights into our model (shapes must match the config exactly)."""
    hf_dir = Path(str(hf_dir)[len("local:"):] if str(hf_dir).startswith("local:") else hf_dir)
    _read_hf_config(hf_dir)
    ours = model.state_dict()
    mapped = {}
    for name, t in read_hf_weights(hf_dir).items():
        key = from_hf_name(name)
        if key is not None:
            mapped[key] = t
    if "output.weight" in ours and "output.weight" not in mapped and "tok_embeddings.weight" in mapped:
        mapped["output.weight"] = mapped["tok_embeddings.weight"]  # tied in the HF folder
    for name, t in ours.items():
        if name not in mapped:
            raise SpindleError(f"{hf_dir}: Hugging Face weights have no tensor for parameter {name} "
                               f"({to_hf_name(name)})")
        if tuple(mapped[name].shape) != tuple(t.shape):
            raise SpindleError(f"{hf_dir}: parameter {name} ({to_hf_name(name)}) has shape "
                               f"{list(mapped[name].shape)} in the Hugging Face weights but {list(t.shape)} "
                               "in the model built from the config")
    extra = sorted(set(mapped) - set(ours))
    if extra:
        raise SpindleError(f"{hf_dir}: Hugging Face tensor for {extra[0]} does not exist in the model built "
                           "from the config (more layers than model.num_layers?)")
    with torch.no_grad():
        for name, t in ours.items():
            t.copy_(mapped[name].to(t.dtype))


def _tokenizer_files(spec: Optional[str], out: Path) -> Optional[str]:
    """Copy the run's tokenizer next to the weights; returns a note, or None when nothing to copy."""
    if not spec or spec == "byte":
        return f"no tokenizer written (data.tokenizer_path={spec!r})"
    from spindle.data.tokenizer import DEFAULT_TOKENIZER_PATH

    p = DEFAULT_TOKENIZER_PATH if spec == "default" else Path(spec).expanduser()
    if p.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (p / name).is_file():
                p = p / name
                break
    if not p.is_file():
        return f"no tokenizer written ({p} not found)"
    if p.suffix == ".json":
        shutil.copyfile(p, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    else:
        shutil.copyfile(p, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}, indent=1))
    return None


def export_hf(ckpt: str, out: str | Path) -> Path:
    """Write a Spindle checkpoint as a HF Llama folder (safetensors, config.json, tokenizer)."""
    from safetensors.torch import save_file

    from spindle.checkpoint.manager import load_checkpoint, open_checkpoint
    from spindle.eval.load import checkpoint_config
    from spindle.model.llama import build_model

    out = Path(out)
    with open_checkpoint(ckpt) as path:
        cfg = checkpoint_config(path)
        model = build_model(cfg.model.to_args(), "cpu")
        load_checkpoint(path, model, None, ("model",))
    bos = eos = None
    if cfg.data.tokenizer_path and cfg.data.tokenizer_path != "byte":
        try:
            from spindle.data.tokenizer import load_tokenizer

            tok = load_tokenizer(cfg.data.tokenizer_path)
            bos, eos = tok.bos_id, tok.eos_id
        except SpindleError:
            pass
    config = hf_config(cfg.model, bos, eos)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.model.tie_word_embeddings:
            continue
        tensors[to_hf_name(name)] = t.detach().to(torch.float32).contiguous().clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}, indent=1))
    note = _tokenizer_files(cfg.data.tokenizer_path, out)
    if note:
        print(f"note: {note}")
    return out


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write a HF Llama folder as a Spindle checkpoint (model weights, step 0) under `out`."""
    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig, validate_config
    from spindle.model.llama import build_model

    hf_dir = Path(hf_dir)
    mcfg = ModelConfig.model_validate(model_config_from_hf(_read_hf_config(hf_dir)))
    model = build_model(mcfg.to_args(), "cpu")
    load_hf_weights(model, hf_dir)
    raw = {"model": mcfg.model_dump()}
    tok = next((hf_dir / n for n in ("tokenizer.model", "tokenizer.json") if (hf_dir / n).is_file()), None)
    if tok is not None:
        raw["data"] = {"tokenizer_path": str(tok)}
    cfg = validate_config(raw, str(hf_dir / "config.json"))
    mgr = CheckpointManager(str(out), CkptConfig())
    mgr.save(0, model, None, {"step": 0, "updates": 0, "num_consumed_tokens": 0, "source": str(hf_dir)},
             cfg.to_dict())
    return Path(str(out)) / "0"


def convert_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="spindle convert", description="Convert checkpoints to and from Hugging Face.")
    sub = ap.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("to-hf", help="Spindle checkpoint -> Hugging Face Llama folder")
    a.add_argument("ckpt", help="checkpoint folder, save folder (latest), local: or boto3:s3://...")
    a.add_argument("out")
    b = sub.add_parser("from-hf", help="Hugging Face Llama folder -> Spindle checkpoint (model only, step 0)")
    b.add_argument("hf_dir")
    b.add_argument("out")
    for p in (a, b):
        p.add_argument("--debug", action="store_true")
    args = ap.parse_args(list(argv))
    if args.direction == "to-hf":
        out = export_hf(args.ckpt, args.out)
        print(f"wrote {out}: model.safetensors, config.json (LlamaForCausalLM)")
    else:
        path = import_hf(args.hf_dir, args.out)
        cfg = json.loads((path / "config.json").read_text())["model"]
        print(f"wrote {path} (+ {path.name}.step)")
        print("train from it with, in your config:")
        print(f"  ckpt = dict(load_ckpt_info=dict(path={str(args.out)!r}, content=('model',)))")
        keys = ("hidden_size", "num_attention_heads", "num_kv_attention_heads", "num_layers", "vocab_size",
                "mlp_ratio", "multiple_of", "rope_base", "rope_scaling", "max_position_embeddings",
                "layer_norm_epsilon", "tie_word_embeddings", "no_bias")
        print("  model = dict(" + ", ".join(f"{k}={cfg[k]!r}" for k in keys if cfg.get(k) is not None) + ")")
    return 0
