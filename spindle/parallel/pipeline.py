"""Pipeline parallelism with `torch.distributed.pipelining`: split the model into stages, run a schedule.

Stages are built from the same plain model: every stage constructs the full module tree on the
meta device, keeps only its own layers (index keys preserved, so `layers.12...` keeps its name and
checkpoints stay layout-independent), drops the embeddings / head it does not own, and is then
sharded, materialised and initialised with the same per-name seeding as the whole model.

With `model.num_chunks` > 1 each rank holds several stages in the looped layout (stage s lives on
rank s mod pp) and an interleaved schedule runs them.

What a stage needs besides hidden states — the positions (RoPE, documents) and, at the last stage,
the labels — travels with them through the schedule itself: the first stage takes the full rows'
(input_ids, position_ids, labels) as its arguments, every stage hands (hidden, position_ids, labels)
on to the next, and the last returns its losses. So each stage reads its micro-batch's positions
from its own arguments, whatever order and however many forwards (shape inference included) the
schedule runs. Per-token statistics come from the schedule's returned outputs (real micro-batches
only), never from the loss function's calls.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from spindle.config import SpindleConfig
from spindle.data.batch import Batch
from spindle.model.attention import HostLayout
from spindle.model.llama import Transformer, materialize
from spindle.model.loss import IGNORE_INDEX, TokenLosses, token_statistics
from spindle.parallel.executor import add_source_stats, autocast, loss_context
from spindle.parallel.layout import Layout

logger = logging.getLogger(__name__)

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


class PipelineStageModel(nn.Module):
    """One pipeline stage: a Transformer holding a slice of the layers (see the module docstring for
    what flows between stages). Under context parallelism the stage keeps this rank's slice of the full
    rows it is handed (`slices`). The last stage runs the fused head + cross-entropy itself when the
    vocabulary is not sharded (returning loss_sum (1,), token_loss, correct), else it returns the
    vocabulary-sharded logits."""

    def __init__(self, model: Transformer, label_smoothing: float = 0.0, fused: bool = True, slices=None):
        super().__init__()
        self.model, self.label_smoothing, self.fused, self.slices = model, label_smoothing, fused, slices

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                host_positions: Optional[torch.Tensor] = None):
        # `host_positions`: this micro-batch's rows of the positions the loader kept on the host (the schedule
        # splits a CPU tensor kwarg by rows as it splits the arguments): the documents without a host sync
        documents = None if host_positions is None else HostLayout(host_positions)
        # The schedule's first forward of a stage infers its shapes from buffers it has not filled
        # (torch.empty): bound positions and labels to the ranges real ones always lie in (positions
        # restart within a row; labels are ids or IGNORE_INDEX), a no-op on every real micro-batch.
        position_ids = position_ids.clamp(0, position_ids.shape[1] - 1)
        vocab = self.model.args.vocab_size
        labels = torch.where((labels >= 0) & (labels < vocab), labels, IGNORE_INDEX)
        local = (lambda t: t) if self.slices is None else self.slices.local
        if self.slices is not None:
            self.slices.begin(position_ids, documents)
            documents = self.slices.local_documents(documents)
        if self.model.tok_embeddings is not None:  # the first stage: token ids of the full rows
            x = local(x)
        positions = local(position_ids)
        if self.model.output is None:
            return self.model(x, positions, documents=documents), position_ids, labels
        if self.fused:
            out = self.model(x, positions, labels=local(labels), label_smoothing=self.label_smoothing,
                             documents=documents)
            # (1,), not (): the schedule concatenates the last stage's outputs over micro-batches
            return out.loss_sum.reshape(1), out.token_loss, out.correct
        return self.model(x, positions, documents=documents)


class PipelineExecutor:
    """`forward_backward` / `evaluate` (spindle.parallel.executor's interface) through a pipeline schedule;
    one schedule per micro-batch count (rampup_batch_size changes it), built when first needed."""

    def __init__(self, cfg: SpindleConfig, layout: Layout, stage_models: list[PipelineStageModel],
                 parts: list[nn.Module], stage_ids: list[int], *, compute_dtype: torch.dtype, n_sources: int):
        self.cfg, self.layout, self.parts, self.stage_ids = cfg, layout, parts, stage_ids
        self.compute_dtype, self.n_sources = compute_dtype, n_sources
        num_stages = layout.pp * cfg.model.num_chunks
        self.is_first, self.is_last = 0 in stage_ids, num_stages - 1 in stage_ids
        self.tensor_parallel = layout.tp > 1
        slices = stage_models[0].slices
        self.local = (lambda t: t) if slices is None else slices.local
        self.label_smoothing = cfg.loss.label_smoothing
        self.loss_scale = 1.0  # of the summed loss, for backward: set before each training pass
        self._schedules: dict[int, object] = {}

    def _loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one micro-batch: the summed loss times the step's scale."""
        if isinstance(output, tuple):  # the stage ran the fused head + loss
            return output[0].sum() * self.loss_scale
        labels = self.local(target[:, 0])
        return token_statistics(output, labels, self.label_smoothing).loss_sum * self.loss_scale

    def _schedule(self, n: int):
        if n not in self._schedules:
            self._schedules[n], _ = build_schedule(self.cfg, self.layout, self.parts, self.stage_ids, self._loss, n)
        return self._schedules[n]

    def _run(self, batches: list[Batch], train: bool) -> torch.Tensor:
        for part in self.parts:
            part.train(train)
        batch = Batch.stack(batches)
        target = torch.stack([batch.labels, batch.type_ids], 1)
        schedule = self._schedule(len(batches))
        run = schedule.step if train else schedule.eval
        args = (batch.input_ids, batch.position_ids, batch.labels) if self.is_first else ()
        kwargs = {"target": target} if self.is_last else {}
        if batch.documents is not None:  # to every stage, split by rows with the micro-batches
            kwargs["host_positions"] = torch.from_numpy(batch.documents.positions)
        with autocast(self.layout.device, self.compute_dtype), loss_context(self.tensor_parallel):
            outputs = run(*args, **kwargs)
        stats = torch.zeros(3, self.n_sources + 1, dtype=torch.float64, device=self.layout.device)
        if self.is_last:  # this pass's statistics, from the outputs of its real micro-batches
            labels = self.local(batch.labels)
            with torch.no_grad(), loss_context(self.tensor_parallel):
                losses = TokenLosses(None, outputs[1], outputs[2]) if isinstance(outputs, tuple) else \
                    token_statistics(outputs, labels)
            add_source_stats(stats, self.local(batch.type_ids), losses, labels)
        if self.layout.groups is not None:  # the last stage's sums, to every stage (then dp reduces)
            dist.all_reduce(stats, group=self.layout.groups.pp)
        return stats

    def forward_backward(self, batches: list[Batch], loss_scale: torch.Tensor) -> torch.Tensor:
        self.loss_scale = loss_scale
        return self._run(batches, train=True)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        self.loss_scale = 1.0
        return self._run(batches, train=False)


def build_stage_model(cfg: SpindleConfig, stage: int, num_stages: int, device: torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg.model.to_args())
    keep = {str(i) for i in split_layers(cfg.model.num_layers, num_stages)[stage]}
    model.layers = nn.ModuleDict({k: v for k, v in model.layers.items() if k in keep})
    if stage != 0:
        model.tok_embeddings = None
    if stage != num_stages - 1:
        model.norm = None
        model.output = None
    if device.type != "meta":  # on meta it is sharded first, materialised after (apply_data_and_context_parallel)
        materialize(model, device, cfg.trainer.seed)
    return model


def build_schedule(cfg: SpindleConfig, layout: Layout, parts: list[nn.Module], stage_ids: list[int],
                   loss_fn: Callable, n_microbatches: int):
    from torch.distributed.pipelining import PipelineStage, schedules

    num_stages = layout.pp * cfg.model.num_chunks
    stages = [PipelineStage(part, sid, num_stages, layout.device, group=layout.groups.pp)
              for part, sid in zip(parts, stage_ids)]
    name = cfg.parallel.pipeline.schedule
    if cfg.model.num_chunks > 1 and name in ("1f1b", "gpipe"):
        name = "interleaved_1f1b"  # InternEvo: num_chunks > 1 means the interleaved schedule
    if name == "1f1b" and n_microbatches < num_stages:
        # 1F1B needs a micro-batch in flight per stage; GPipe computes the same step with any count
        logger.info(f"pipeline: {n_microbatches} micro-batch(es) per step < {num_stages} stages: 1F1B needs at least "
                    "one per stage, so this step count runs GPipe (all forwards, then all backwards: the same result, "
                    "a longer bubble); raise data.micro_num to use 1F1B")
        name = "gpipe"
    cls = getattr(schedules, SCHEDULES[name])
    # our loss is already divided by the step's token count, so the schedule must not rescale it
    if name in ("1f1b", "gpipe"):
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False), stages
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False), stages
