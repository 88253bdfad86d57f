"""What changed since the checkpoint a run loads, said once at start, before any tensor is read.

A checkpoint holds the config of the run that wrote it (`config.json`) and, in its trainer state, that run's
layout (`layout`: processes and data / tensor / pipeline / context sizes) and data position. Against the new
run (docs/checkpoints.md, "What a resume compares"):
- the model's structure (tied embeddings, every shape, biases, norms): weights cannot carry across a change,
  so any load of weights refuses it, in one line naming the key, old and new value;
- on a resume (the schedule or data position restored) the RoPE type and base too: a new base is continued
  training, which loads the weights only (docs/long-context.md §9);
- the data: a new micro_bsz / seq_len / packing continues from the same token of the same global order (the
  loader cuts its packs from the saved order by tokens, spindle.data.sampler.TokenOrder); a change that makes
  another order (data.seed, min_length, source_weights, seq_len of fixed-length random data) is refused;
- the layout: a new data-parallel size keeps the data position exact and changes the tokens per step, said
  with what the schedule does;
- every other key that differs is printed once, `resume: <key> <old> -> <new>`.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from spindle.checkpoint.loading import LoadPlan
from spindle.config import SpindleConfig, parse_rampup
from spindle.config.ckpt_content import SAMPLER, needs_state
from spindle.config.model import ModelConfig
from spindle.config.redact import redact
from spindle.data.sampler import position_at
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)

# ModelArgs field -> the config key a user sets; weights cannot carry across a change of any of these
STRUCTURE = {
    "tie_word_embeddings": "model.tie_word_embeddings", "vocab_size": "model.vocab_size",
    "hidden_size": "model.hidden_size", "num_layers": "model.num_layers",
    "num_attention_heads": "model.num_attention_heads", "num_kv_heads": "model.num_kv_attention_heads",
    "head_dim": "model.head_dim", "ffn_hidden_size": "model.mlp_ratio / model.multiple_of (the MLP width)",
    "use_swiglu": "model.use_swiglu", "norm_type": "model.norm_type", "norm_bias": "model.norm_type",
    "qkv_bias": "model.qkv_bias", "o_bias": "model.o_bias", "mlp_bias": "model.mlp_bias",
    "qk_norm": "model.qk_norm", "apply_post_layer_norm": "model.apply_post_layer_norm",
}
ROPE = ("model.rope_base", "model.rope_scaling.type", "model.use_dynamic_ntk_rope", "model.qk_interleaved")
# keys that make another global data order (tokenized / text / random data; a streamed dataset keeps its order)
ORDER_KEYS = ("data.seed", "data.min_length", "data.min_length_dict", "data.source_weights",
              "data.fixed_random_dataset_seqlen")
PACK_KEYS = ("data.micro_bsz", "data.seq_len", "data.pack_sample_into_one", "data.micro_num")
# how this run loads: these differ on every resume by design
NOT_COMPARED = ("constants", "ckpt.load_ckpt_info", "ckpt.load_ckpt_folder", "ckpt.auto_resume")


def check_resume(plan: LoadPlan, cfg: SpindleConfig, layout) -> dict:
    """Refuse what the loaded checkpoint cannot carry, print every other change once; returns the trainer state
    to restore from (the verified one, its loader state completed with the pack size its order is made of).
    `layout`: this run's (spindle.parallel.layout.Layout)."""
    where = f"{plan.storage.url.rstrip('/')}/{plan.ref.rel}"
    try:
        old = json.loads(plan.storage.read_bytes(f"{plan.ref.rel}/config.json"))
    except (ValueError, UnicodeDecodeError):
        old = None  # verify() has read it as a JSON object already; a race is refused by the load itself
    if not isinstance(old, dict):
        return _state_to_restore(plan, None)
    new = json.loads(json.dumps(redact(cfg.to_dict()), default=str))  # as the checkpoint wrote its own
    _refuse_structure(old, cfg, where)
    if not needs_state(plan.content):
        return plan.verified.trainer_state
    changes = _differences(old, new)
    for key in ROPE:
        if key in changes:
            raise SpindleError(f"resume: {key} {changes[key][0]!r} -> {changes[key][1]!r}: {where} is resumed with "
                               "its schedule and data position, which a new RoPE type or base is not; keep "
                               f"{key}, or continue training at the new one from its weights only "
                               "(ckpt.load_ckpt_info content=('model',), docs/long-context.md §9)")
    state = plan.verified.trainer_state
    # a data position at the start of the order (e.g. a converted checkpoint) repeats and skips nothing
    data_restored = SAMPLER in plan.content and bool(_consumed(state))
    if data_restored:
        _refuse_new_order(changes, cfg, where)
    lines = _data_lines(old, cfg, changes, data_restored)
    lines += _layout_lines(old, cfg, layout.record(), state, changes)
    lines += [f"resume: {key} {a!r} -> {b!r}" for key, (a, b) in changes.items() if key not in PACK_KEYS]
    for line in lines:
        logger.info(line)
    return _state_to_restore(plan, old)


def _refuse_structure(old: dict, cfg: SpindleConfig, where: str) -> None:
    try:
        before = ModelConfig.model_validate(old.get("model", {})).to_args()
    except (ValueError, TypeError):
        return  # a model section this version cannot read: the weights' own shapes are checked on load
    after = cfg.model.to_args()
    for field, key in STRUCTURE.items():
        a, b = getattr(before, field), getattr(after, field)
        if a != b:
            what = f"{field} {a} -> {b}" if key.startswith("model.mlp_ratio") else f"{a!r} -> {b!r}"
            raise SpindleError(f"resume: {key} {what}: the weights of {where} cannot carry this change (they were "
                               f"trained with {a!r}); keep the checkpoint's value, or start a new run")


def _differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """dotted key -> (old, new) for every value both configs hold and that differs."""
    out: dict[str, tuple] = {}
    for key, value in new.items():
        name = f"{prefix}{key}"
        if name in NOT_COMPARED or key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            out |= _differences(old[key], value, f"{name}.")
        elif old[key] != value:
            out[name] = (old[key], value)
    if isinstance(old.get("rope_scaling"), dict) != isinstance(new.get("rope_scaling"), dict) and prefix == "model.":
        kinds = [(d.get("rope_scaling") or {}).get("type", "default") for d in (old, new)]
        if kinds[0] != kinds[1]:
            out["model.rope_scaling.type"] = tuple(kinds)
    return out


def _refuse_new_order(changes: dict, cfg: SpindleConfig, where: str) -> None:
    data = cfg.data
    if data.type == "streaming":  # the dataset's own order, continued from its record cursor
        return
    keys = [k for k in ORDER_KEYS if k in changes]
    if data.train_folder is None or data.type == "dummy":
        keys += [k for k in ("data.seq_len",) if k in changes and data.fixed_random_dataset_seqlen]
    for key in keys:
        a, b = changes[key]
        raise SpindleError(f"resume: {key} {a!r} -> {b!r} makes another order of the training data, in which the "
                           f"data position of {where} means nothing (data would be repeated or skipped); keep "
                           f"{key}={a!r}, or load that checkpoint without its data position (ckpt.auto_resume=False, "
                           "load_ckpt_info content=('model', 'optimizer', 'scheduler'), a new save_ckpt_folder)")


def _data_lines(old: dict, cfg: SpindleConfig, changes: dict, data_restored: bool) -> list[str]:
    d, od = cfg.data, old.get("data", {})
    moved = [k for k in ("data.micro_bsz", "data.seq_len", "data.pack_sample_into_one") if k in changes]
    if not moved:
        return []
    what = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in moved)
    old_pack = int(od.get("micro_bsz", d.micro_bsz)) * int(od.get("seq_len", d.seq_len))
    if not data_restored:
        return [f"resume: {what}; no data position to continue from: the data starts at the beginning of its order"]
    if d.type == "streaming":
        how = "the dataset is read on from the same record and token"
    elif old_pack == d.packed_length:
        how = f"the same {old_pack} tokens per pack: the data continues at the same pack"
    else:
        how = (f"packs of {old_pack} -> {d.packed_length} tokens: the data continues from the same token of the same "
               f"order (the checkpoint's packs of {old_pack} tokens, read on by tokens)")
    return [f"resume: {what}; {how}"]


def _old_layout(old: dict, state: dict) -> Optional[dict]:
    """The checkpoint's layout: recorded, or (older checkpoints) the data-parallel size its data position implies."""
    if isinstance(state.get("layout"), dict):
        return state["layout"]
    od, loader = old.get("data", {}), state.get("loader") or {}
    try:
        rampup = parse_rampup(od.get("rampup_batch_size", ""))
        per_rank = position_at(int(state["step"]), int(od["micro_num"]), 1, rampup)
    except (KeyError, TypeError, ValueError):
        return None
    if "tokens" in loader or not per_rank or loader.get("position", 0) % per_rank:
        return None
    return {"dp": loader["position"] // per_rank}


def _layout_lines(old: dict, cfg: SpindleConfig, now: dict, state: dict, changes: dict) -> list[str]:
    """The tokens per step (data-parallel size x micro_num x pack size) and the other parallel sizes; `now`: this
    run's layout as a checkpoint records it."""
    before, od = _old_layout(old, state) or {}, old.get("data", {})
    old_dp = int(before.get("dp", now["dp"]))
    causes = [f"{old_dp} -> {now['dp']} data-parallel ranks"] if old_dp != now["dp"] else []
    if before.get("processes", now["processes"]) != now["processes"]:
        causes[-1:] = [f"{causes[-1]} ({before['processes']} -> {now['processes']} processes)"] if causes else \
            [f"{before['processes']} -> {now['processes']} processes"]
    causes += [f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in ("data.micro_num",) if k in changes]
    try:
        old_tokens = int(od["micro_num"]) * int(od["micro_bsz"]) * int(od["seq_len"]) * old_dp
    except (KeyError, TypeError, ValueError):
        old_tokens = None
    new_tokens = cfg.data.micro_num * cfg.data.packed_length * now["dp"]
    lines = []
    if causes or (old_tokens is not None and old_tokens != new_tokens):
        schedule = (f"the lr schedule continues by optimizer updates (update {state.get('updates', 0)} of "
                    f"{cfg.lr_scheduler.total_steps})")
        per_step = f"{old_tokens} -> {new_tokens} tokens per step" if old_tokens != new_tokens else \
            f"{new_tokens} tokens per step as before"
        lines.append(f"resume: {', '.join(causes) + ': ' if causes else ''}{per_step}; {schedule}"
                     + ("; the data continues from the same position of the same order" if old_dp != now["dp"]
                        else ""))
    for key, name in (("tp", "tensor-parallel"), ("pp", "pipeline"), ("cp", "context-parallel"),
                      ("ep", "expert-parallel")):
        # a checkpoint from before "ep" was recorded had no expert parallelism
        if before and before.get(key, 1 if key == "ep" else None) not in (None, now[key]):
            lines.append(f"resume: {before.get(key, 1)} -> {now[key]} {name} ranks "
                         "(the checkpoint is resharded on load)")
    return lines


def _consumed(state: dict) -> int:
    loader = state.get("loader") or {}
    return int(loader.get("tokens", loader.get("position", 0)))


def _state_to_restore(plan: LoadPlan, old: Optional[dict]) -> dict:
    """The saved trainer state, its loader state with the pack size its order is made of when it does not say."""
    saved = plan.verified.trainer_state
    if SAMPLER not in plan.content:
        return saved
    loader = dict(saved["loader"])
    od = (old or {}).get("data", {})
    known = isinstance(od.get("micro_bsz"), int) and isinstance(od.get("seq_len"), int)
    if "order_tokens" not in loader and known and _consumed(saved):
        loader["order_tokens"] = od["micro_bsz"] * od["seq_len"]
    return saved | {"loader": loader}
