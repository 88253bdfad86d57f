"""Pipeline parallelism with `torch.distributed.pipelining`: split the model into stages, pick a schedule.

Stages are built from the same plain model: every stage constructs the full module tree on the
meta device, keeps only its own layers (index keys preserved, so `layers.12...` keeps its name and
checkpoints stay layout-independent), drops the embeddings / head it does not own, and is then
materialised and initialised with the same per-name seeding as the whole model (by the trainer after
tensor parallelism and FSDP have sharded it on meta).

With `model.num_chunks` > 1 each rank holds several stages in the looped layout (stage s lives on
rank s mod pp) and an interleaved schedule runs them.

Only the first stage receives the batch from the schedule; later stages receive hidden states.
Position ids and document boundaries, which every stage needs for RoPE and the packed mask, are
handed to each stage before the step (`PipelineChunk.set_micro_batches`) and consumed in
micro-batch order, which is the order every schedule runs a stage's forwards in (preceded, on the
first step and on every switch between training and the forward-only validation pass, by the
stage's shape-inference forward on micro-batch 0). The trainer checks after each step that every
listed entry was consumed exactly once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from spindle.config import SpindleConfig
from spindle.errors import SpindleError
from spindle.model.llama import Transformer, materialize
from spindle.parallel.mesh import ParallelEnv

SCHEDULES = {
    "1f1b": "Schedule1F1B",
    "gpipe": "ScheduleGPipe",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
}


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Uniform split (InternEvo's partition_uniform): stage s gets layers [s*k, (s+1)*k)."""
    per = num_layers // num_stages
    return [list(range(s * per, (s + 1) * per)) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp_size: int, num_chunks: int) -> list[int]:
    """Looped placement: rank r holds stages r, r + pp, r + 2 pp, ..."""
    return [pp_rank + k * pp_size for k in range(num_chunks)]


MicroBatchInfo = tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]  # positions, cu_seqlens, labels


class PipelineChunk(nn.Module):
    """One stage: a Transformer holding a slice of the layers, fed position info per micro-batch.

    Given labels, the last stage runs the fused head + cross-entropy (spindle/model/loss.py) itself and
    returns (loss_sum as shape (1,), token_loss, correct) instead of (N, V) logits; the schedule's loss
    function then only scales the summed loss."""

    def __init__(self, model: Transformer, label_smoothing: float = 0.0, context_group=None):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        # context parallelism: inputs are this rank's sequence slice, cu_seqlens the full pack's
        self.context = None
        if context_group is not None:
            from spindle.parallel.context import ContextSlices

            self.context = ContextSlices(model, context_group)
        self._meta: list[MicroBatchInfo] = []
        self._calls = 0
        self._inference_calls = 0

    def set_micro_batches(self, meta: list[MicroBatchInfo], first_step: bool) -> None:
        """(position_ids, cu_seqlens, labels or None) of this step's micro-batches, in order. On the first
        step the stage runs one extra forward on micro-batch 0 to infer its shapes, so that one is listed twice."""
        self._meta, self._calls = ([meta[0]] + meta) if first_step else meta, 0
        self._inference_calls = 1 if first_step else 0

    @property
    def last_forward_was_shape_inference(self) -> bool:
        """The latest forward ran on the schedule's placeholder inputs (whose outputs, and any loss
        the schedule computes from them for its backward metadata, are not real numbers)."""
        return 0 < self._calls <= self._inference_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calls >= len(self._meta):
            raise RuntimeError(f"pipeline stage called {self._calls + 1} times for {len(self._meta)} micro-batches")
        position_ids, cu_seqlens, labels = self._meta[self._calls]
        self._calls += 1
        if self.context is not None:  # the attention kernels build the mask from the full pack
            self.context.begin(x.shape[0], x.shape[1], cu_seqlens, x.device)
            cu_seqlens = None
        if labels is not None and self.model.output is not None:
            out = self.model(x, position_ids, cu_seqlens, labels=labels, label_smoothing=self.label_smoothing)
            # (1,), not (): the schedule concatenates the last stage's outputs over micro-batches
            return out.loss_sum.reshape(1), out.token_loss, out.correct
        return self.model(x, position_ids, cu_seqlens)

    def check_consumed(self) -> None:
        """After a schedule step: every listed micro-batch was run once, in order (else the schedule's
        forward count differs from what set_micro_batches assumed and positions would be misassigned)."""
        if self._calls != len(self._meta):
            raise RuntimeError(f"pipeline stage ran {self._calls} forwards for {len(self._meta)} micro-batches")


def build_stage_model(cfg: SpindleConfig, stage: int, num_stages: int, device: torch.device) -> Transformer:
    if cfg.model.tie_word_embeddings:
        raise SpindleError("model.tie_word_embeddings cannot be used with pipeline parallelism "
                           "(the embedding and the head live on different stages)")
    with torch.device("meta"):
        model = Transformer(cfg.model.to_args())
    keep = {str(i) for i in split_layers(cfg.model.num_layers, num_stages)[stage]}
    model.layers = nn.ModuleDict({k: v for k, v in model.layers.items() if k in keep})
    if stage != 0:
        model.tok_embeddings = None
    if stage != num_stages - 1:
        model.norm = None
        model.output = None
    if device.type != "meta":  # on meta it is sharded first, materialised after (apply_data_parallel)
        materialize(model, device, cfg.trainer.seed)
    return model


def build_schedule(cfg: SpindleConfig, env: ParallelEnv, parts: list[nn.Module], stage_ids: list[int],
                   loss_fn: Callable, n_microbatches: int, log: Callable[[str], None] = print):
    from torch.distributed.pipelining import PipelineStage, schedules

    num_stages = env.pp_size * cfg.model.num_chunks
    stages = [PipelineStage(part, sid, num_stages, env.device, group=env.pp_group)
              for part, sid in zip(parts, stage_ids)]
    name = cfg.parallel.pipeline.schedule
    if cfg.model.num_chunks > 1 and name in ("1f1b", "gpipe"):
        name = "interleaved_1f1b"  # InternEvo: num_chunks > 1 means the interleaved schedule
    if name == "1f1b" and n_microbatches < num_stages:
        # 1F1B needs a micro-batch in flight per stage; GPipe computes the same step with any count
        log(f"pipeline: {n_microbatches} micro-batch(es) per step < {num_stages} stages: 1F1B needs at least one per "
            "stage, so this step count runs GPipe (all forwards, then all backwards: the same result, a longer "
            "bubble); raise data.micro_num to use 1F1B")
        name = "gpipe"
    cls = getattr(schedules, SCHEDULES[name])
    # our loss is already divided by the step's token count, so the schedule must not rescale it
    if name in ("1f1b", "gpipe"):
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False), stages
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False), stages
