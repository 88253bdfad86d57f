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
    "loss.moe_loss_coeff": "no mixture-of-experts models here",
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
