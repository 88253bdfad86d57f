"""InternEvo's side of a config file: module-level constants, which names are keys, and what the keys
InternEvo's configs carry mean here.

Every key of InternEvo's configs is accepted. Most do what they say (the schema). Those below do
nothing here, and a run that gives one is told so once, with the reason (`compatibility_notes`). Those
in REFUSED would change the training to something Spindle lacks when set to another value than the
one Spindle implements, so they are refused, never ignored.
"""

from __future__ import annotations

from spindle.config.schema import SpindleConfig
from spindle.errors import SpindleError

FP32_NORMS = ("norms always run in fp32 with fp32 weights (docs/parallelism.md): True is what happens anyway; "
              "InternEvo's False, norms in the compute dtype, is not offered")
NO_EFFECT = {
    "data.num_worker": "batches are built by one prefetch thread, not DataLoader workers",
    "data.empty_cache_and_diag_interval": "InternEvo's straggler diagnosis and CUDA cache emptying; "
                                          "PyTorch's caching allocator is left to itself",
    "data.diag_outlier_ratio": "InternEvo's straggler diagnosis",
    "hybrid_zero_optimizer.overlap_sync_grad": "FSDP2 and DDP overlap the gradient reduction with backward "
                                               "by themselves",
    "hybrid_zero_optimizer.overlap_sync_param": "FSDP2 prefetches the next block's parameters by itself",
    "hybrid_zero_optimizer.reduce_bucket_size": "FSDP2 reduces per block, DDP with its own buckets",
    "model.embed_split_hidden": "how InternEvo splits the embedding under tensor parallelism; the numbers "
                                "are the same",
    "model.parallel_output": "under tensor parallelism the logits stay sharded over the vocabulary and the "
                             "loss is computed from the shards",
    "model.use_flash_attn": "attention goes through SDPA / varlen_attn, which take flash kernels where the "
                            "hardware has them",
    "model.qk_interleaved": "Spindle rotates (i, i + d/2) pairs; InternEvo checkpoints are converted from the "
                            "layout they were saved in",
    "parallel.pipeline.interleaved_overlap": "torch.distributed.pipelining schedules its own communication",
    "metric_dtype": "metrics are accumulated in float64",
    "use_fp32_norm": FP32_NORMS,
    "model.use_fp32_norm": FP32_NORMS,
    "monitor.tensorboard": "TensorBoard events are written directly, not through a queue",
    "generation": "settings of InternEvo's generation tools; use `spindle generate` and its options",
}
# key -> (the value Spindle implements, what happens otherwise)
REFUSED = {
    "data.use_packed_dataset": (True, "Spindle always packs documents into rows (data.pack_sample_into_one "
                                      "chooses how); an unpacked dataset is not implemented"),
    "ckpt.snapshot_ckpt_folder": (None, "snapshots are kept in {save_ckpt_folder}/snapshot/ (two slots); a "
                                        "separate snapshot folder is not implemented"),
    "lr_scheduler.last_epoch": (-1, "the schedule's position comes from a checkpoint (load_ckpt_info content "
                                    "'scheduler'); starting it elsewhere by hand is not implemented"),
    "beta2_scheduler.cur_iter": (-1, "the schedule's position comes from a checkpoint (load_ckpt_info content "
                                     "'scheduler'); starting it elsewhere by hand is not implemented"),
}


def _given(raw: dict, path: str):
    node = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def compatibility_notes(raw: dict, source: str) -> list[str]:
    """The keys `raw` gives that do nothing here, with why; refuses a REFUSED key set to another value."""
    for key, (implemented, why) in REFUSED.items():
        given, value = _given(raw, key)
        if given and value != implemented:
            raise SpindleError(f"{source}: {key}={value!r}: {why}; remove the key or set it to {implemented!r}")
    return [f"{key} ({why})" for key, why in NO_EFFECT.items() if _given(raw, key)[0]]

# Module-level constants the seed guide writes. They are plain variables used inside the file;
# other all-caps names are accepted too (users add their own), lower-case names must be known keys.
KNOWN_CONSTANTS = {
    "JOB_NAME", "DO_ALERT", "SEQ_LEN", "HIDDEN_SIZE", "NUM_ATTENTION_HEAD", "NUM_KV_ATTENTION_HEAD", "MLP_RATIO",
    "NUM_LAYER", "VOCAB_SIZE", "MODEL_ONLY_FOLDER", "SAVE_CKPT_FOLDER", "LOAD_CKPT_FOLDER", "CHECKPOINT_EVERY",
    "TRAIN_FOLDER", "VALID_FOLDER",
}


def _split_constants(raw: dict) -> tuple[dict, dict]:
    keys, constants = {}, {}
    for key, value in raw.items():
        if key in SpindleConfig.model_fields:
            keys[key] = value
        elif key.isupper() or key in KNOWN_CONSTANTS:
            constants[key] = value
        else:
            keys[key] = value  # validation reports it as unknown, with the closest valid key
    return keys, constants


def translate_parallel(raw: dict) -> list[str]:
    """InternEvo's tensor-parallel modes and weight parallelism, in Spindle's terms (in place), with a note
    each. They compute the same numbers; what differs is which ranks hold what and what they exchange:
      mode "mtp": tensor parallelism;
      mode "msp" / "fsp": tensor parallelism with sequence parallelism (the norms and the residual stream
        split along the sequence between the parallel regions; "fsp" is InternEvo's flash-attn variant);
      mode "isp": the sequence split over the group for every module, no weight split: context
        parallelism of that size;
      weight.size > 1 (with "isp"): parameters sharded over the ranks and gathered per block: FSDP."""
    par = raw.get("parallel")
    if not isinstance(par, dict):
        return []
    notes = []
    tensor = par.get("tensor")
    if isinstance(tensor, dict) and tensor.get("mode") in ("msp", "fsp", "isp"):
        mode, size = tensor["mode"], tensor.get("size", 1)
        if mode == "isp":
            if size != 1 and par.get("context", 1) not in (1, size):
                raise SpindleError(f"parallel.tensor mode 'isp' size {size} and parallel.context={par['context']}: "
                                   "isp is Spindle's context parallelism; give one of them")
            par["tensor"] = {k: v for k, v in tensor.items() if k != "mode"} | {"size": 1, "mode": "mtp"}
            if size != 1:
                par["context"] = size
                notes.append(f"parallel.tensor mode='isp' size {size}: runs as context parallelism of size {size} "
                             "(the sequence split over the group; the same numbers)")
        else:
            par["tensor"] = dict(tensor, mode="mtp")
            if size != 1:
                par["sequence_parallel"] = True
                notes.append(f"parallel.tensor mode={mode!r} size {size}: runs as tensor parallelism with sequence "
                             "parallelism (the same numbers" + ("; the gathered input is kept for backward instead "
                                                                 "of gathered again" if mode == "fsp" else "") + ")")
    weight = par.get("weight")
    if isinstance(weight, dict) and isinstance(weight.get("size"), int) and weight["size"] > 1:
        par["fsdp"] = True
        notes.append(f"parallel.weight size {weight['size']}: parameters sharded with FSDP over the data-parallel "
                     "ranks (the same numbers)")
    return notes


# --------------------------------------------------------------------------- mixture of experts

# InternEvo's MoE layers (model.moe_type): the `moe` keys each constructor takes, with its defaults
# (internlm/model/moe/gshard_layer.py GShardMOELayer, megablock/megablock_moe.py, megablock_dmoe.py). A key the
# layer does not take stops InternEvo with a TypeError; it is refused here in one line instead.
MOE_LAYER_KEYS = {
    "GShard": {"top_k": 1, "capacity_factor": 1.0, "eval_capacity_factor": 1.0, "min_capacity": 4,
               "noisy_gate_policy": None, "drop_tokens": True, "use_rts": True},
    "MegaBlock": {"top_k": 1, "capacity_factor": 1.0, "drop_tokens": True, "multiple_of": 256},
    "MegaBlock-D": {"top_k": 1, "parallel_mode": "tensor", "multiple_of": 256},
}
INTERNEVO_MOE_LOSS_COEFF = 1.0  # internlm/initialize/launch.py: loss.moe_loss_coeff of a config that has none
RESIDUAL_MOE = ("DeepSpeed's residual MoE mixes the experts' output and a dense MLP's by a learned softmax over two "
                "logits (with a bias), scaling the experts' output too; Spindle's shared experts add a dense "
                "output to the experts' unscaled one, so the weights would not mean the same; set it to False")


def translate_moe(raw: dict, source: str) -> list[str]:
    """InternEvo's MoE keys (model_type INTERNLM_MoE, model.num_experts / moe_type / moe_use_residual, the `moe`
    section, loss.moe_loss_coeff) onto the model's MoE keys, in place, with a note for each key that does nothing
    here; refuses what would train differently. A model key the file gives itself wins over an InternEvo
    default and must agree with an InternEvo key the file gives (so a saved config.json reads back the same)."""
    from pydantic import ValidationError

    from spindle.config.schema import MoeConfig

    model, section = raw.get("model", {}), raw.get("moe")
    if not isinstance(model, dict) or model.get("moe_type") not in (None, *MOE_LAYER_KEYS):
        return []  # the schema names what is wrong
    try:
        moe = MoeConfig.model_validate(section if section is not None else {})
    except ValidationError:
        return []  # likewise
    if model.get("moe_use_residual") not in (None, False):
        raise SpindleError(f"{source}: model.moe_use_residual={model['moe_use_residual']!r}: {RESIDUAL_MOE}")
    internevo = raw.get("model_type") == "INTERNLM_MoE"
    notes = []
    experts = model.get("num_experts", 0)
    if internevo and experts in (0, 1) and not isinstance(experts, bool):  # InternEvo: <= 1 is a dense model
        if experts == 1:
            model["num_experts"] = 0
            notes.append("model.num_experts=1 (InternEvo's dense model: no experts)")
        experts = 0
    if not isinstance(experts, int) or isinstance(experts, bool):
        return notes
    coeff_given, coeff = _given(raw, "loss.moe_loss_coeff")
    if experts == 0:
        for key, given in (("moe", section is not None), ("model.moe_type", "moe_type" in model),
                           ("loss.moe_loss_coeff", coeff_given and coeff is not None)):
            if given:
                notes.append(f"{key} (the model has no experts: model.num_experts=0)")
        return notes
    # model key -> (value, the InternEvo key it comes from; None for an InternEvo default)
    mapped: dict = {}
    if coeff_given and coeff is not None:
        mapped["aux_loss_coeff"] = (coeff, "loss.moe_loss_coeff")
    elif internevo:
        mapped["aux_loss_coeff"] = (INTERNEVO_MOE_LOSS_COEFF, None)
    if internevo or section is not None or "moe_type" in model:
        mapped.update(_moe_layer(moe.model_dump(exclude_none=True), model, experts, source, notes))
    for key, (value, origin) in mapped.items():
        if key in model and model[key] != value:
            if origin is not None:
                raise SpindleError(f"{source}: model.{key}={model[key]!r} but {origin} gives {value!r}; "
                                   "give one of them")
            continue  # the file's own model key wins over InternEvo's default
        model[key] = value
    return notes


def _moe_layer(given: dict, model: dict, experts: int, source: str, notes: list[str]) -> dict:
    """The model keys InternEvo's MoE layer (model.moe_type, GShard by default) and its `moe` keys mean."""
    layer = model.get("moe_type") or "GShard"
    takes = MOE_LAYER_KEYS[layer]
    for key in given:
        if key not in takes:
            raise SpindleError(f"{source}: moe.{key}: InternEvo's {layer} MoE layer (model.moe_type) takes no "
                               f"{key}; it takes {', '.join(takes)}")

    def value(key):
        return given.get(key, takes[key])

    def origin(key):
        return f"moe.{key}" if key in given else None

    top_k = given.get("top_k", model.get("top_k", takes["top_k"]))
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        return {}  # the schema names model.top_k
    if top_k > experts:
        raise SpindleError(f"{source}: moe.top_k ({top_k}) must be at most model.num_experts ({experts})")
    out = {"top_k": (top_k, origin("top_k"))}
    if layer == "GShard":  # top-1 weighs its expert by the router probability; top-2 renormalises the pair
        out["norm_topk_prob"] = (top_k > 1, origin("top_k"))
    elif top_k == 1:
        raise SpindleError(f"{source}: moe.top_k=1 with model.moe_type={layer!r}: MegaBlock weighs the one chosen "
                           "expert by 1, so the router learns from the balance loss alone, which Spindle does not "
                           "train (docs/moe.md); use top_k >= 2, or moe_type 'GShard' (weights = probabilities)")
    else:
        out["norm_topk_prob"] = (True, None)
    dropping = layer != "MegaBlock-D" and value("drop_tokens")
    if dropping:
        out["capacity_factor"] = (value("capacity_factor"), origin("capacity_factor"))
        out["min_capacity"] = (value("min_capacity"), origin("min_capacity")) if layer == "GShard" else (0, None)
    else:
        out["capacity_factor"] = (None, origin("drop_tokens") or ("model.moe_type" if "moe_type" in model else None))
        notes += [f"moe.{k} (no effect: dropless)" for k in ("capacity_factor", "eval_capacity_factor",
                                                              "min_capacity") if k in given]
    hidden, ratio = model.get("hidden_size", 4096), model.get("mlp_ratio", 8 / 3)
    if "multiple_of" in given and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (hidden, ratio)):
        width = int(hidden * ratio)  # InternEvo's expert width before rounding (MegaBlockMoE.ffn_dim)
        m = given["multiple_of"]
        out["moe_intermediate_size"] = (m * ((width + m - 1) // m), "moe.multiple_of")
    if layer == "GShard":
        _gshard_notes(given, value, top_k, dropping, source, notes)
    elif layer == "MegaBlock" and dropping:
        notes.append("model.moe_type='MegaBlock' (mapped; capacity rounds up here, down in MegaBlock, and a full "
                     "expert keeps every first choice before second ones, MegaBlock token order: docs/moe.md)")
    if "parallel_mode" in given:
        notes.append("moe.parallel_mode (no effect: experts are whole on every tensor rank, parallel.expert)")
    return out


def _gshard_notes(given: dict, value, top_k: int, dropping: bool, source: str, notes: list[str]) -> None:
    """What the GShard gate's keys do here: top-1 as InternEvo's; top-2's noise and RTS keys are ignored by
    InternEvo's own top-2 gate, which also samples its second expert (docs/moe.md)."""
    noisy = value("noisy_gate_policy") not in (None, "None")
    if top_k != 2 and noisy:
        raise SpindleError(f"{source}: moe.noisy_gate_policy={value('noisy_gate_policy')!r}: noisy gating (input "
                           "jitter, a Gumbel-sampled choice) is not implemented; set it to None")
    if top_k == 1 and dropping and value("use_rts"):
        default = "" if "use_rts" in given else " (InternEvo's default)"
        raise SpindleError(f"{source}: moe.use_rts=True{default}: random token selection (which tokens a full "
                           "expert keeps) is not implemented, experts keep tokens in order here; set "
                           "moe.use_rts=False")
    if top_k > 1:
        notes += [f"moe.{k} (no effect: only InternEvo's top-1 gate reads it)" for k in ("noisy_gate_policy",
                                                                                        "use_rts") if k in given]
        if not value("drop_tokens"):
            notes.append("moe.drop_tokens=False (dropless here; InternEvo's top-2 gate ignores it and drops)")
    elif "use_rts" in given and not dropping:
        notes.append("moe.use_rts (no effect: dropless)")
    if top_k == 2:
        notes.append("model.moe_type='GShard' top-2 (mapped; the second expert is the next-highest score, "
                     "Gumbel-sampled in InternEvo; the balance loss counts both choices: docs/moe.md)")
    elif top_k > 2:
        notes.append(f"moe.top_k={top_k} (InternEvo's GShard gate takes 1 or 2; here the top {top_k}, renormalised)")
    if dropping and value("eval_capacity_factor") != value("capacity_factor"):
        notes.append(f"moe.eval_capacity_factor={value('eval_capacity_factor')} (no effect: validation runs at "
                     f"capacity_factor {value('capacity_factor')}, as training does)")
