"""Running one step's micro-batches through a model, whatever its layout: the trainer's only contact with it.

    stats = executor.forward_backward(batches, loss_scale)   # gradients accumulated in the parameters
    stats = executor.evaluate(batches)                        # forward only, no label smoothing

`stats` is a (3, sources + 1) float64 tensor on the device: per source (type id) the summed plain
cross-entropy, the number of tokens with a label, the number whose label had the top logit; the last
column is left for the trainer's total. Each executor adds only what this rank computed; the trainer
reduces over ranks.

`StepExecutor` serves a single-stage model — plain, DDP, FSDP2, tensor-parallel (the loss from the
vocabulary shards, under `loss_parallel`), context-parallel (full rows in, the model runs this rank's
slice) — and `spindle.parallel.pipeline.PipelineExecutor` pipeline stages.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from spindle.data.batch import Batch
from spindle.model.loss import IGNORE_INDEX, TokenLosses, token_statistics
from spindle.parallel.parallelize import gradient_sync

def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the compute dtype (fp32 masters stay fp32); none for fp32."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def loss_context(tensor_parallel: bool):
    """`loss_parallel`: cross-entropy on vocabulary-sharded logits, forward and backward, without gathering."""
    if tensor_parallel:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def add_source_stats(stats: torch.Tensor, type_ids: torch.Tensor, losses: TokenLosses,
                     labels: torch.Tensor) -> None:
    """Per-source sums of token loss, tokens with a label and hits into columns 0..sources-1 of `stats`."""
    with torch.no_grad():
        types = type_ids.reshape(-1).clamp(max=stats.shape[1] - 2)
        valid = labels.reshape(-1) != IGNORE_INDEX
        for row, values in enumerate((losses.token_loss, valid, losses.correct)):
            stats[row].index_add_(0, types, values.detach().to(torch.float64))


class StepExecutor:
    def __init__(self, model: torch.nn.Module, *, device: torch.device, compute_dtype: torch.dtype,
                 label_smoothing: float, n_sources: int, tensor_parallel: bool, full_shard: bool,
                 slices=None):
        self.model, self.device, self.compute_dtype = model, device, compute_dtype
        self.label_smoothing, self.n_sources = label_smoothing, n_sources
        self.tensor_parallel, self.full_shard = tensor_parallel, full_shard
        # context parallelism: the labels and sources of this rank's slice of each row
        self.local = slices.local if slices is not None else (lambda t: t)
        # the fused head + cross-entropy needs the whole vocabulary on this rank
        self.fused = not tensor_parallel

    def new_stats(self) -> torch.Tensor:
        return torch.zeros(3, self.n_sources + 1, dtype=torch.float64, device=self.device)

    def _run(self, batch: Batch, smoothing: float) -> TokenLosses:
        with autocast(self.device, self.compute_dtype):
            # the documents as the loader read them on the host: the forward copies nothing back
            out = self.model(batch.input_ids, batch.position_ids, labels=batch.labels if self.fused else None,
                             label_smoothing=smoothing, documents=batch.documents)
        return token_statistics(out, self.local(batch.labels), smoothing)

    def forward_backward(self, batches: list[Batch], loss_scale: torch.Tensor, balance=None) -> torch.Tensor:
        """Forward and backward of every micro-batch; the summed loss times `loss_scale` is what backward
        sees, so the step's gradient is that of the mean token loss (the trainer picks the scale). A
        mixture-of-experts model's `balance` (spindle.train.expert_balance.ExpertBalance) adds each
        micro-batch's balance-loss term to its backward and keeps its routing statistics."""
        self.model.train()
        stats = self.new_stats()
        for i, batch in enumerate(batches):
            # gradients reduced once per step, after the last micro-batch (DDP and FSDP2)
            with gradient_sync(self.model, i, len(batches), self.full_shard), loss_context(self.tensor_parallel):
                losses = self._run(batch, self.label_smoothing)
                loss = losses.loss_sum * loss_scale
                balance_term = balance.after_forward() if balance is not None else None
                # two roots, not a sum: under tensor parallelism the loss is a DTensor (loss_parallel), the
                # balance term a plain tensor
                torch.autograd.backward([loss] if balance_term is None else [loss, balance_term])
            add_source_stats(stats, self.local(batch.type_ids), losses, self.local(batch.labels))
        return stats

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Forward only, the plain cross-entropy (no label smoothing), as the training statistics report it."""
        self.model.eval()
        stats = self.new_stats()
        for batch in batches:
            with loss_context(self.tensor_parallel):
                losses = self._run(batch, 0.0)
            add_source_stats(stats, self.local(batch.type_ids), losses, self.local(batch.labels))
        return stats


def slices_of(model: torch.nn.Module) -> Optional[object]:
    """The SequenceSlices of a context-parallel model (under DDP / FSDP wrappers), else None."""
    from spindle.parallel.context import ContextParallel

    for module in model.modules():
        if isinstance(module, ContextParallel):
            return module.slices
    return None
