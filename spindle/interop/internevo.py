"""InternEvo's own checkpoint folders, read into Spindle names and counters.

A folder as InternEvo's CheckpointManager writes it (internlm/checkpoint/components.py):

    model_tp{t}_pp{p}.pt            the model shard of tensor rank t, pipeline rank p (layer indices local
                                    to the stage), under `model.`-prefixed or bare names
    model_config.pt                 the `model` section of the config (an InternEvo Config dict)
    optimizer_tp{t}_pp{p}_zo{z}.pt  HybridZeroOptimizer: grad scaler, AdamW state of flat fp32 buffers
    schedulder.pt (sic)             the LR scheduler; sampler.pt, context.pt (counters), {step}.step
    model_moe_layer{L}_expert{E}_tp{t}.pt  an INTERNLM_MoE model's experts (internevo_moe.py)

Shards are merged the way InternEvo's transformers/convert2hf_internlm*.py do: pipeline stages are renumbered by
shifting each stage's layer indices past the previous stage's highest, tensor shards are concatenated along the
dimension each layer splits (column-parallel q/k/v, w1, w3-or-w2-up and the vocabulary head along dim 0; row-parallel
wo / out_proj and the down projection along dim 1; the embedding along dim 1 when `embed_split_hidden`, else dim 0).

    model_type        layers                                   q/k layout
    INTERNLM          blocks.N.mixer.Wqkv (+bias) = (3, heads, head_dim) rows, out_proj (+bias),
                      mlp.w1 gate / w2 up / w3 down, norm1/norm2, embedding, head       rotate_half
    INTERNLM2_PUBLIC  layers.N.attention.wqkv grouped (kv_heads, q_per_kv + 2, head_dim), wo,
                      feed_forward.w1/w3/w2, attention_norm/ffn_norm, tok_embeddings, output
                                                        adapt_hf (default True): rotate_half, else interleaved
    LLAMA2            layers.N.attention.wq/wk/wv/wo, feed_forward.w1/w3/w2, ...  adapt_hf (default False)

Interleaved q/k rows (RoPE pairs (2i, 2i+1)) are permuted to our rotate_half pairs (i, i + d/2), as convert2hf's
`permute` does. InternEvo has used both meanings of w2/w3 (revert_internlm.py `--version`): the shapes decide where
they tell, else the convert script's convention (noted). Every .pt file is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from spindle.checkpoint.loading import is_internevo_folder
from spindle.interop.families import split_grouped_qkv
from spindle.interop.internevo_moe import read_moe
from spindle.interop.weights import assign_weights, read_torch_file
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)
SHARD = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
_CONFIG_CLASS = "internlm.core.context.parallel_context.Config"
# model_config.pt defaults: the builders' (internlm/model/modeling_*.py build_model_with_cfg)
_DEFAULTS = {"layer_norm_epsilon": 1e-5, "norm_type": "rmsnorm", "rope_base": 10000, "max_position_embeddings": 2048,
             "embed_split_hidden": False, "use_dynamic_ntk_rope": False, "apply_post_layer_norm": False,
             "use_swiglu": True, "norm_head": False, "num_chunks": 1, "drop_rate": 0.0, "attn_drop_rate": 0.0}
ADAPT_HF_DEFAULT = {"INTERNLM2_PUBLIC": True, "LLAMA2": False}  # build_model_with_cfg of each model file
W2_IS_UP = {"INTERNLM": True, "INTERNLM2_PUBLIC": False, "LLAMA2": False}  # the convert scripts' convention


@dataclass
class InternEvoCheckpoint:
    model_type: str
    model: dict  # our `model` config section (ModelConfig fields)
    state_dict: dict[str, torch.Tensor]  # full tensors under our parameter names
    step: int = 0  # our step: the next batch to train (InternEvo's batch_count + 1)
    updates: Optional[int] = None  # optimizer updates done (drives the LR schedule)
    num_consumed_tokens: int = 0
    inf_nan_skip_batches: int = 0
    optimizer: Optional[dict] = None  # AdamW moments under our names, where the layout allows
    notes: list[str] = field(default_factory=list)

    def trainer_state(self) -> dict:
        """The counters in the form of Spindle's trainer_state.json (TrainState restores what content asks)."""
        return {"step": self.step, "updates": self.updates or 0, "num_consumed_tokens": self.num_consumed_tokens,
                "inf_nan_skip_batches": self.inf_nan_skip_batches}


def read_pt(path: Path, what: str) -> dict:
    """A torch.save file of InternEvo's (tensors, numbers, its Config dict); never runs pickled code."""
    with torch.serialization.safe_globals([(dict, _CONFIG_CLASS)]):
        return read_torch_file(path, what)


def _shard_grid(folder: Path) -> tuple[int, int]:
    names = [f.name for f in folder.iterdir() if f.name.startswith("model_tp") and f.suffix == ".pt"]
    odd = [n for n in names if not SHARD.match(n)]
    if odd:
        raise SpindleError(f"{folder / odd[0]}: weight-parallel (isp, _wp) and FSDP (_dp) model shards are not "
                           "supported; save from a mtp/msp/fsp run without zero1.fsdp")
    pairs = {tuple(int(x) for x in SHARD.match(n).groups()) for n in names}
    tp, pp = max(t for t, _ in pairs) + 1, max(p for _, p in pairs) + 1
    missing = [f"model_tp{t}_pp{p}.pt" for t in range(tp) for p in range(pp) if (t, p) not in pairs]
    if missing:
        raise SpindleError(f"{folder}: shard {missing[0]} is missing (the folder holds a {tp} x {pp} tp x pp grid)")
    return tp, pp


def merge_pipeline(stages: list[dict]) -> dict:
    """One tensor rank's stages -> one state dict, layers renumbered as convert2hf_internlm*.py do."""
    merged, shift = {}, 0
    for stage in stages:
        top = 0
        for key, t in stage.items():
            if key.endswith(".inv_freq"):
                continue
            name = key
            m = re.search(r"\.\d+\.", key)
            if m is not None:
                local = int(key[m.start() + 1: m.end() - 1])
                top = max(top, local)
                name = f"{key[:m.start()]}.{local + shift}.{key[m.end():]}"
            merged[name.removeprefix("model.")] = t
        shift += top + 1
    return merged


def interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q or k heads from RoPE pairs (2i, 2i+1) to pairs (i, i + head_dim/2)."""
    x = w.reshape(-1, head_dim, *w.shape[1:])
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=1).reshape(w.shape)


class _Shards:
    """The tensor-parallel shards of one merged model: concatenation along the split dimension."""

    def __init__(self, states: list[dict], folder: Path):
        self.states, self.folder = states, folder

    def has(self, key: str) -> bool:
        return key in self.states[0]

    def get(self, key: str) -> list[torch.Tensor]:
        if key not in self.states[0]:
            raise SpindleError(f"{self.folder}: model shards have no tensor {key}")
        return [s[key] for s in self.states]

    def cat(self, key: str, dim: int) -> torch.Tensor:
        return torch.cat(self.get(key), dim=dim)

    def one(self, key: str) -> torch.Tensor:  # replicated over tensor ranks
        return self.get(key)[0]


def _up_down(sh: _Shards, prefix: str, hidden: int, model_type: str, notes: list[str]) -> tuple[str, str]:
    """Which of w2 / w3 is the up projection: from the shapes when they tell, else the convention."""
    w2 = sh.get(f"{prefix}.w2.weight")[0]
    if w2.shape[0] == hidden and w2.shape[1] != hidden:
        w2_up = False
    elif w2.shape[1] == hidden and w2.shape[0] != hidden:
        w2_up = True
    else:
        w2_up = W2_IS_UP[model_type]
        if not any("w2/w3" in n for n in notes):
            notes.append("note: w2/w3 shapes are square per shard; "
                         f"taking {'w2 up, w3 down' if w2_up else 'w3 up, w2 down'}"
                         f" ({model_type} in InternEvo's convert scripts)")
    if w2_up != W2_IS_UP[model_type] and not any("w2/w3" in n for n in notes):
        notes.append(f"note: w2/w3 shapes show {'w2 up, w3 down' if w2_up else 'w3 up, w2 down'} (the other "
                     "InternEvo version's layout); read accordingly")
    return ("w2", "w3") if w2_up else ("w3", "w2")


def _layer(sh: _Shards, mt: str, i: int, c: dict, notes: list[str]) -> dict[str, torch.Tensor]:
    """Layer i's tensors under our names, shards merged."""
    hd, heads, kv = c["head_dim"], c["num_attention_heads"], c["kv_heads"]
    out = {}
    if mt == "INTERNLM":
        p, attn, mlp, norms = f"blocks.{i}", f"blocks.{i}.mixer", f"blocks.{i}.mlp", ("norm1", "norm2")
        for suffix in ("weight", "bias") if sh.has(f"{attn}.Wqkv.bias") else ("weight",):
            parts = [t.reshape(3, t.shape[0] // 3, *t.shape[1:]) for t in sh.get(f"{attn}.Wqkv.{suffix}")]
            qkv = torch.cat(parts, dim=1)
            for j, proj in enumerate(("wq", "wk", "wv")):
                out[f"attention.{proj}.{suffix}"] = qkv[j]
        out["attention.wo.weight"] = sh.cat(f"{attn}.out_proj.weight", 1)
        if sh.has(f"{attn}.out_proj.bias"):
            out["attention.wo.bias"] = sh.one(f"{attn}.out_proj.bias")
    else:
        p, attn, mlp, norms = f"layers.{i}", f"layers.{i}.attention", f"layers.{i}.feed_forward", \
            ("attention_norm", "ffn_norm")
        for suffix in ("weight", "bias") if sh.has(f"{attn}.wo.bias") or sh.has(f"{attn}.wq.bias") \
                or sh.has(f"{attn}.wqkv.bias") else ("weight",):
            if mt == "INTERNLM2_PUBLIC":
                q, k, v = split_grouped_qkv(sh.cat(f"{attn}.wqkv.{suffix}", 0), kv, hd)
            else:
                q, k, v = (sh.cat(f"{attn}.{x}.{suffix}", 0) for x in ("wq", "wk", "wv"))
            if c["interleaved"]:
                q, k = interleaved_to_half(q, hd), interleaved_to_half(k, hd)
            out.update({f"attention.wq.{suffix}": q, f"attention.wk.{suffix}": k, f"attention.wv.{suffix}": v})
        out["attention.wo.weight"] = sh.cat(f"{attn}.wo.weight", 1)
        if sh.has(f"{attn}.wo.bias"):
            out["attention.wo.bias"] = sh.one(f"{attn}.wo.bias")
    if out["attention.wq.weight"].shape[0] != heads * hd:
        raise SpindleError(f"{sh.folder}: layer {i} q projection has {out['attention.wq.weight'].shape[0]} rows, "
                           f"expected num_attention_heads x head_dim = {heads * hd} (model_config.pt)")
    if not sh.has(f"{mlp}.moe_layer.gate.wg.weight"):  # an MoE layer's router and experts: internevo_moe.py
        up, down = _up_down(sh, mlp, c["hidden_size"], mt, notes)
        out["feed_forward.w1.weight"] = sh.cat(f"{mlp}.w1.weight", 0)
        out["feed_forward.w3.weight"] = sh.cat(f"{mlp}.{up}.weight", 0)
        out["feed_forward.w2.weight"] = sh.cat(f"{mlp}.{down}.weight", 1)
    for ours, theirs in zip(("attention_norm", "ffn_norm"), norms):
        for suffix in ("weight", "bias"):
            if sh.has(f"{p}.{theirs}.{suffix}"):
                out[f"{ours}.{suffix}"] = sh.one(f"{p}.{theirs}.{suffix}")
    return {f"layers.{i}.{k}": v for k, v in out.items()}


def _embedding(sh: _Shards, keys: tuple[str, ...], hidden: int) -> torch.Tensor:
    key = next((k for k in keys if sh.has(k)), None)
    if key is None:
        raise SpindleError(f"{sh.folder}: model shards have no embedding ({' or '.join(keys)})")
    parts = sh.get(key)
    # embed_split_hidden shards are (vocab, hidden / tp), vocabulary-parallel ones (vocab / tp, hidden)
    return torch.cat(parts, dim=1 if parts[0].shape[1] != hidden else 0)


def _model_type(keys: set[str], folder: Path) -> str:
    if any(".mixer.Wqkv." in k for k in keys):
        return "INTERNLM"
    if any(".attention.wqkv." in k for k in keys):
        return "INTERNLM2_PUBLIC"
    if any(".attention.wq." in k for k in keys):
        return "LLAMA2"
    raise SpindleError(f"{folder}: model shards hold neither INTERNLM (blocks.N.mixer.Wqkv), INTERNLM2_PUBLIC "
                       "(layers.N.attention.wqkv) nor LLAMA2 (layers.N.attention.wq) tensors")


def _declared_model_type(folder: Path) -> Optional[str]:
    """model_type from config_file.pt (the config's text), parsed, never executed."""
    f = folder / "config_file.pt"
    if not f.is_file():
        return None
    try:
        text = torch.load(f, map_location="cpu", weights_only=True)
        tree = ast.parse(text if isinstance(text, str) else "")
    except Exception:  # noqa: BLE001 - an unreadable copy of the config text only loses the cross-check
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "model_type" for t in node.targets) \
                and isinstance(node.value, ast.Constant):
            return str(node.value.value)
    return None


def _config(folder: Path, model_type: str, notes: list[str]) -> dict:
    """model_config.pt with the builders' defaults filled in (each default it relies on is noted)."""
    path = folder / "model_config.pt"
    if not path.is_file():
        raise SpindleError(f"{folder}: no model_config.pt (InternEvo writes it with every checkpoint)")
    raw = read_pt(path, "model config")
    for key, bad in (("num_chunks", lambda v: v != 1), ("use_swiglu", lambda v: not v),
                     ("deepnorm", bool), ("is_reward", bool)):
        value = raw.get(key, _DEFAULTS.get(key))
        if value is not None and bad(value):
            raise SpindleError(f"{path}: {key}={value!r} is not supported (interleaved pipeline chunks, non-SwiGLU "
                               "MLPs, deepnorm and reward heads are not read)")
    c = {**_DEFAULTS, **raw}
    for key in ("hidden_size", "num_attention_heads", "num_layers", "vocab_size"):
        if not isinstance(c.get(key), int) or isinstance(c.get(key), bool) or c[key] <= 0:
            raise SpindleError(f"{path}: {key} must be a positive int, got {c.get(key)!r}")
    c["kv_heads"] = c.get("num_kv_attention_heads") or c["num_attention_heads"]
    c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    if "qk_interleaved" in raw:  # later InternEvo's name: qk_interleaved=True is adapt_hf=False
        c["interleaved"] = bool(raw["qk_interleaved"])
    elif "adapt_hf" in raw:
        c["interleaved"] = not raw["adapt_hf"]
    else:
        c["interleaved"] = not ADAPT_HF_DEFAULT.get(model_type, True)
        if model_type in ADAPT_HF_DEFAULT:
            notes.append(f"note: model_config.pt has no adapt_hf; {model_type}'s default adapt_hf="
                         f"{ADAPT_HF_DEFAULT[model_type]} (internlm/model/modeling_*.py build_model_with_cfg)")
    return c


def _counters(folder: Path, ck: InternEvoCheckpoint) -> None:
    ctx = folder / "context.pt"
    if not ctx.is_file():
        ck.notes.append("note: no context.pt: step and token counters start at 0")
        return
    state = read_pt(ctx, "train state")
    for key in ("batch_count", "num_consumed_tokens", "inf_nan_skip_batches"):
        if not isinstance(state.get(key, 0), int):
            raise SpindleError(f"{ctx}: {key} must be an int, got {state.get(key)!r}")
    ck.step = state.get("batch_count", -1) + 1  # InternEvo resumes at batch_count + 1
    ck.num_consumed_tokens = state.get("num_consumed_tokens", 0)
    ck.inf_nan_skip_batches = state.get("inf_nan_skip_batches", 0)
    ck.updates = state.get("step_count")
    sched = folder / "schedulder.pt"
    if sched.is_file():
        s = read_pt(sched, "LR scheduler state")
        after = s.get("after_scheduler_dict") or {}
        try:  # the warmup scheduler counts until it hands over, then the cosine scheduler counts
            done = int(s["warmup_epochs"]) + int(after["last_epoch"]) if s.get("finished") else int(s["last_epoch"])
        except (KeyError, TypeError, ValueError):
            raise SpindleError(f"{sched}: not a FineTuneCosineAnnealingWarmupLR state (last_epoch, warmup_epochs, "
                               "finished, after_scheduler_dict)") from None
        if ck.updates is not None and done != ck.updates:
            ck.notes.append(f"note: the LR scheduler counts {done} updates, context.pt step_count {ck.updates}; "
                            "using the scheduler's")
        ck.updates = done
    if not any(folder.glob("*.step")):
        ck.notes.append(f"note: {folder} has no {{step}}.step marker (an incomplete save?)")
    if (folder / "sampler.pt").is_file():
        ck.notes.append("note: sampler.pt is not read: InternEvo's pack order is not Spindle's; data starts at "
                        "the beginning of Spindle's order")


def read_internevo(path: str | Path) -> InternEvoCheckpoint:
    """Everything a Spindle run can take from an InternEvo checkpoint folder (see the module doc)."""
    folder = Path(str(path).removeprefix("local:"))
    if not is_internevo_folder(folder):
        raise SpindleError(f"{folder}: not an InternEvo checkpoint (no model_tp{{t}}_pp{{p}}.pt)")
    tp, pp = _shard_grid(folder)
    states = [merge_pipeline([read_pt(folder / f"model_tp{t}_pp{p}.pt", "model shard") for p in range(pp)])
              for t in range(tp)]
    model_type = _model_type(set(states[0]), folder)
    declared = _declared_model_type(folder)
    if declared is not None and {"LLAMA": "LLAMA2", "INTERNLM_MoE": "INTERNLM"}.get(declared, declared) != model_type:
        raise SpindleError(f"{folder}: config_file.pt says model_type={declared!r} but the shards hold "
                           f"{model_type} tensors")
    notes: list[str] = [f"InternEvo {model_type} checkpoint, tp={tp} x pp={pp}"]
    c = _config(folder, model_type, notes)
    sh = _Shards(states, folder)
    top = {"INTERNLM": (("embedding.weight", "embedding.word_embeddings.weight"), "head.weight"),
           "INTERNLM2_PUBLIC": (("tok_embeddings.weight", "tok_embeddings.word_embeddings.weight"), "output.weight"),
           "LLAMA2": (("tok_embeddings.weight", "tok_embeddings.word_embeddings.weight"), "output.weight")}
    emb_keys, head_key = top[model_type]
    sd = {"tok_embeddings.weight": _embedding(sh, emb_keys, c["hidden_size"]), "norm.weight": sh.one("norm.weight"),
          "output.weight": sh.cat(head_key, 0)}
    if sh.has("norm.bias"):
        sd["norm.bias"] = sh.one("norm.bias")
    if c["norm_head"]:
        sd["output.weight"] = torch.nn.functional.normalize(sd["output.weight"], dim=-1)
    held = {int(m.group(1)) for k in states[0] if (m := re.search(r"\.(\d+)\.", k))}
    if held != set(range(c["num_layers"])):
        raise SpindleError(f"{folder}: the shards hold {len(held)} layers but model_config.pt says "
                           f"num_layers={c['num_layers']}")
    for i in range(c["num_layers"]):
        sd.update(_layer(sh, model_type, i, c, notes))
    moe_keys = read_moe(folder, sh, c, model_type, (read_pt, _up_down), notes, sd)  # {} when dense
    ffn, h = moe_keys.get("moe_intermediate_size") or sd["layers.0.feed_forward.w1.weight"].shape[0], c["hidden_size"]
    bias = {"qkv_bias": "layers.0.attention.wq.bias" in sd, "o_bias": "layers.0.attention.wo.bias" in sd,
            "mlp_bias": False}
    dtype = str(c.get("dtype", "torch.float32"))
    model = {
        "hidden_size": h, "num_attention_heads": c["num_attention_heads"], "num_kv_attention_heads": c["kv_heads"],
        "num_layers": c["num_layers"], "vocab_size": c["vocab_size"], "mlp_ratio": ffn / h, "multiple_of": ffn,
        "norm_type": c["norm_type"], "layer_norm_epsilon": float(c["layer_norm_epsilon"]),
        "rope_base": float(c["rope_base"]), "max_position_embeddings": int(c["max_position_embeddings"]),
        "use_dynamic_ntk_rope": bool(c["use_dynamic_ntk_rope"]),
        "apply_post_layer_norm": bool(c["apply_post_layer_norm"]),
        "drop_rate": float(c["drop_rate"]), "attn_drop_rate": float(c["attn_drop_rate"]),
        "no_bias": not any(bias.values()) and "layers.0.attention_norm.bias" not in sd,
        **({"dtype": dtype} if dtype.startswith("torch.") else {}), **moe_keys,
    }
    if not model["no_bias"]:
        model.update(bias)
    ck = InternEvoCheckpoint(model_type, model, sd, notes=notes)
    _counters(folder, ck)
    zero_files = sorted(folder.glob("optimizer_tp*_pp*_zo*.pt"))
    ck.notes.append("note: optimizer moments not mapped: HybridZeroOptimizer keeps AdamW state for flat fp32 "
                    "buffers per (tp, pp, zero) rank, ordered by its own partitioning; AdamW restarts from zero "
                    "moments (the LR schedule position is kept)" if zero_files else
                    "note: no optimizer_tp*_pp*_zo*.pt: AdamW starts from zero moments")
    return ck


def _validated_model(ck: InternEvoCheckpoint, folder: Path):
    from spindle.config import validate_config
    return validate_config({"model": ck.model}, str(folder / "model_config.pt")).model


def load_internevo_weights(model: torch.nn.Module, path: str | Path, args=None) -> list[str]:
    """Like load_hf_weights: an InternEvo folder's weights into `model` (plain, FSDP2, TP, a pipeline
    view with `args`); returns the notes to print."""
    return load_internevo(model, path, args).notes


def load_internevo(model: torch.nn.Module, path: str | Path, args=None) -> InternEvoCheckpoint:
    """An InternEvo folder's weights into `model` (any layout); the checkpoint, for its counters and notes."""
    ck = read_internevo(path)
    assign_weights(model, ck.state_dict, str(path), args=args)
    return ck


def import_internevo(src: str | Path, out: str | Path) -> Path:
    """Write an InternEvo checkpoint as a Spindle checkpoint (model weights and counters) under `out`."""
    from spindle.checkpoint.manager import save_weights_checkpoint
    from spindle.config import validate_config
    from spindle.model.llama import build_model

    folder = Path(str(src).removeprefix("local:"))
    ck = read_internevo(folder)
    mcfg = _validated_model(ck, folder)
    model = build_model(mcfg.to_args(), "cpu")
    assign_weights(model, ck.state_dict, str(folder))
    cfg = validate_config({"model": mcfg.model_dump()}, str(folder / "model_config.pt"))
    counters = {"updates": ck.updates or 0, "num_consumed_tokens": ck.num_consumed_tokens,
                "inf_nan_skip_batches": ck.inf_nan_skip_batches}
    save_weights_checkpoint(str(out), ck.step, model, cfg.to_dict(), counters)
    for note in ck.notes:
        logger.info(note)
    return Path(str(out)) / str(ck.step)
