"""Meta's own Llama folders (`consolidated.NN.pth` + `params.json`): `ckpt_type="llama"`.

InternEvo's "llama" loader takes these files as they are into its LLAMA2 model (whose names are
Meta's: tok_embeddings, layers.N.attention.wq/wk/wv/wo, feed_forward.w1/w2/w3 with w2 the down
projection, attention_norm, ffn_norm, norm, output). Here the model-parallel files are merged the
way Meta's model splits them (ColumnParallel wq/wk/wv/w1/w3/output along dim 0, RowParallel
wo/w2 along dim 1, ParallelEmbedding along the hidden dim 1, norms replicated), and the q/k rows are
permuted from Meta's complex (interleaved) RoPE pairs to our rotate_half pairs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from spindle.interop.internevo import interleaved_to_half
from spindle.interop.weights import assign_weights, read_torch_file
from spindle.errors import SpindleError

_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                    "feed_forward.w3.weight", "output.weight")


def is_meta_folder(path: Path) -> bool:
    return (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


def model_config_from_params(params: dict, vocab_from_weights: int, source: str) -> dict:
    """Our `model` section for a params.json (Meta's ModelArgs, the FFN size rule included)."""
    try:
        dim, heads, layers = int(params["dim"]), int(params["n_heads"]), int(params["n_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpindleError(f"{source}: needs integer dim, n_heads and n_layers ({exc})") from None
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
    multiple_of = int(params.get("multiple_of", 256))
    ffn = multiple_of * math.ceil(hidden / multiple_of)
    vocab = int(params.get("vocab_size", -1))
    out = {"hidden_size": dim, "num_attention_heads": heads,
           "num_kv_attention_heads": int(params.get("n_kv_heads") or heads),
           "num_layers": layers, "vocab_size": vocab if vocab > 0 else vocab_from_weights,
           "mlp_ratio": ffn / dim, "multiple_of": ffn, "layer_norm_epsilon": float(params.get("norm_eps", 1e-5)),
           "rope_base": float(params.get("rope_theta", 10000.0)), "norm_type": "rmsnorm", "no_bias": True}
    if params.get("use_scaled_rope"):  # Llama 3.1's scaling, with the constants of Meta's reference code
        out["rope_scaling"] = {"type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    return out


def read_meta(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our model config section, full state dict in our names and layout) of a Meta folder."""
    folder = Path(str(path).removeprefix("local:"))
    if not is_meta_folder(folder):
        hint = "; for a Hugging Face folder use ckpt_type='hf'" if (folder / "config.json").is_file() else ""
        raise SpindleError(f"{folder}: not a Meta Llama folder (params.json + consolidated.NN.pth){hint}")
    try:
        params = json.loads((folder / "params.json").read_text())
    except ValueError as exc:
        raise SpindleError(f"{folder / 'params.json'}: not valid JSON ({exc})") from None
    files = sorted(folder.glob("consolidated.*.pth"), key=lambda f: int(re.sub(r"\D", "", f.stem) or 0))
    shards = [read_torch_file(f, "Meta checkpoint") for f in files]
    full = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        parts = [s[name] for s in shards]
        suffix = re.sub(r"^layers\.\d+\.", "", name)
        if len(parts) > 1 and suffix in _ROW_PARALLEL:
            full[name] = torch.cat(parts, dim=1)
        elif len(parts) > 1 and suffix in _COLUMN_PARALLEL:
            full[name] = torch.cat(parts, dim=0)
        else:
            full[name] = parts[0]
    cfg = model_config_from_params(params, full["tok_embeddings.weight"].shape[0], str(folder / "params.json"))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    for name in [n for n in full if n.endswith(("attention.wq.weight", "attention.wk.weight"))]:
        full[name] = interleaved_to_half(full[name], head_dim)
    return cfg, full


def load_meta_weights(model: torch.nn.Module, path: str | Path, args=None) -> list[str]:
    """`ckpt_type="llama"`: a Meta consolidated.NN.pth folder's weights into `model` (any layout)."""
    cfg, full = read_meta(path)
    assign_weights(model, full, str(path), args=args)
    return [f"Meta Llama folder: {len(list(Path(str(path).removeprefix('local:')).glob('consolidated.*.pth')))} "
            f"model-parallel file(s), hidden {cfg['hidden_size']}, {cfg['num_layers']} layers"]
