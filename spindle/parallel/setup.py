"""The model of a training run, laid out as the config asks, and the step executor that runs it.

    raw_model, model, executor = build_training(cfg, layout)

`raw_model` has the plain model's parameter names (what the optimizer and checkpoints use: the whole
model, or a `LocalStages` of this rank's pipeline stages); `model` is what runs (wrapped by DDP / FSDP /
context parallelism); `executor` takes `Batch`es (spindle.parallel.executor). Models are built on
meta, sharded, then each rank allocates and initialises its own shards (apply_data_and_context_parallel).
"""

from __future__ import annotations

import torch

from spindle.config import SpindleConfig
from spindle.dtypes import compute_dtype
from spindle.hardware import refuse_unless_fits
from spindle.model.llama import build_model
from spindle.parallel.context import SequenceSlices
from spindle.parallel.dims import memory_estimate
from spindle.parallel.executor import StepExecutor, slices_of
from spindle.parallel.layout import Layout, full_sharding
from spindle.parallel.parallelize import LocalStages, apply_data_and_context_parallel, apply_model_parallel
from spindle.parallel.pipeline import PipelineExecutor, PipelineStageModel, build_stage_model, stages_of_rank


def build_training(cfg: SpindleConfig, layout: Layout, n_sources: int):
    dtype = compute_dtype(cfg.model.dtype).torch_dtype
    m = cfg.model  # refused here, before the model (or a stage) is allocated on meta and materialised
    refuse_unless_fits(memory_estimate(cfg, layout.world), layout.device, f"training model.num_layers={m.num_layers:,} "
                       f"x model.hidden_size={m.hidden_size:,} (vocab_size {m.vocab_size:,}) on {layout.device}")
    if layout.pp == 1:
        raw = build_model(cfg.model.to_args(), "meta")
        model = apply_data_and_context_parallel(apply_model_parallel(raw, cfg, layout), cfg, layout)
        executor = StepExecutor(model, device=layout.device, compute_dtype=dtype,
                                label_smoothing=cfg.loss.label_smoothing, n_sources=n_sources,
                                tensor_parallel=layout.tp > 1,
                                full_shard=full_sharding(cfg.parallel), slices=slices_of(model))
        return raw, model, executor
    num_stages = layout.pp * cfg.model.num_chunks
    stage_ids = stages_of_rank(layout.pp_rank, layout.pp, cfg.model.num_chunks)
    inner = [build_stage_model(cfg, sid, num_stages, torch.device("meta")) for sid in stage_ids]
    stages = []
    for m in inner:
        m = apply_model_parallel(m, cfg, layout)
        slices = SequenceSlices(m, layout.groups.cp) if layout.cp > 1 else None
        stages.append(PipelineStageModel(m, cfg.loss.label_smoothing, fused=layout.tp == 1, slices=slices))
    parts = [apply_data_and_context_parallel(s, cfg, layout) for s in stages]
    executor = PipelineExecutor(cfg, layout, stages, parts, stage_ids, compute_dtype=dtype, n_sources=n_sources)
    return LocalStages(inner), parts[0], executor
