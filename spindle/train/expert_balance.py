"""The mixture-of-experts side of a training step: the balance loss each micro-batch adds to its backward,
the routing statistics summed over the step, the aux-loss-free bias update, and the metrics they give.

The balance loss, as InternEvo defines its `moe_loss`: the aux loss of a micro-batch (the MoE blocks'
coefficient-weighted load-balancing and z losses, summed over the layers: `MoEFeedForward.aux_loss`),
averaged over the step's micro-batches and data-parallel ranks,

    L_moe = 1 / (M G) * sum over ranks r and micro-batches m of aux(r, m)

with M micro-batches on each of G data-parallel ranks. The trainer scales each micro-batch's summed
cross-entropy by S G / N (S the fp16 loss scale, N the step's labelled tokens on all ranks) and data
parallelism averages the gradients over the G ranks. Adding aux(r, m) * S / M to each micro-batch's
backward, that average gives S / (M G) * sum grad aux(r, m) = S * grad L_moe: what one process running all
M G micro-batches gets with aux * S / (M G) each (tests/unit/test_expert_balance.py checks both by hand).
MoE layouts have no context parallelism (spindle/parallel/layout.py), so the gradient ranks are the
data-parallel ranks.

Statistics stay on the device, one float64 vector per step (the one read after the update takes them with
the loss: spindle.train.metrics.step_statistics):
    [aux summed over micro-batches, micro-batches, then per MoE layer: load (E,), dropped assignments]
summed over micro-batches here and over data-parallel ranks by the trainer (`layout.sum_over_data_ranks`),
so every rank moves its balancing bias by the same load and keeps the same bias.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from spindle.model.moe import MoEFeedForward

HEAD = 2  # the vector's aux sum and micro-batch count, before the layers' entries


def layer_label(module_name: str) -> str:
    """'layers.3.feed_forward' (wrappers' segments in between or not) -> 'layer3', the metrics' suffix."""
    parts = module_name.split(".")
    return f"layer{parts[parts.index('layers') + 1]}" if "layers" in parts[:-1] else module_name


class ExpertBalance:
    """One model's MoE blocks, as a training step uses them: `start_step`, `after_forward` per micro-batch
    (inside the executor, before its backward), the trainer's reduction of `totals`, `update_bias` after an
    optimizer step taken, `metrics` from the values read."""

    def __init__(self, named_blocks: list[tuple[str, MoEFeedForward]], device: torch.device):
        self.labels = [layer_label(name) for name, _ in named_blocks]
        self.blocks = [block for _, block in named_blocks]
        self.num_experts = self.blocks[0].num_experts
        self.with_loss = any(b.aux_loss_coeff > 0 or b.z_loss_coeff > 0 for b in self.blocks)
        self.with_capacity = any(b.capacity_factor is not None for b in self.blocks)
        self.device = device
        self.totals = self._zeros()
        self.backward_scale = 1.0

    @classmethod
    def of(cls, model: nn.Module, device: torch.device) -> Optional["ExpertBalance"]:
        """The balance of `model`'s MoE blocks (under any wrapper), None for a dense model."""
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]
        return cls(named, device) if named else None

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(HEAD + len(self.blocks) * (self.num_experts + 1), dtype=torch.float64, device=self.device)

    def start_step(self, loss_scale: float, micro_batches: int) -> None:
        """A new step of `micro_batches` micro-batches on this rank, under the fp16 `loss_scale` (1 otherwise)."""
        self.totals = self._zeros()
        self.backward_scale = loss_scale / micro_batches

    def after_forward(self) -> Optional[torch.Tensor]:
        """After a micro-batch's forward, before its backward: its statistics added to the step's; the term its
        backward adds to the loss (aux * S / M), None when the model has no balance loss."""
        losses = [b.aux_loss for b in self.blocks if b.aux_loss is not None]
        aux = torch.stack(losses).sum() if losses else None
        with torch.no_grad():
            parts = [aux.detach().double().reshape(1) if aux is not None else self.totals.new_zeros(1),
                     self.totals.new_ones(1)]
            for b in self.blocks:
                load = b.stats.load.double()
                parts += [load, (b.stats.dropped.double() * load.sum()).reshape(1)]  # a share -> a count
            self.totals += torch.cat(parts)
        return None if aux is None else aux * self.backward_scale

    def layer_load(self, i: int) -> torch.Tensor:
        start = HEAD + i * (self.num_experts + 1)
        return self.totals[start:start + self.num_experts]

    def update_bias(self) -> None:
        """Aux-loss-free balancing after an optimizer step taken: each block's bias moves against its load
        of the whole step (the totals, once the trainer summed them over data-parallel ranks). No host sync."""
        for i, block in enumerate(self.blocks):
            block.update_bias(self.layer_load(i))

    def metrics(self, values: list[float]) -> dict:
        """The step's MoE metrics from `totals` read on the host: moe_loss (the mean above; only when a balance
        loss is on), moe_imbalance (the largest over the layers) and moe_dropped (the largest, only with a
        capacity), and per layer moe_imbalance/layerN, moe_dropped/layerN and the load moe_load/layerN."""
        e = self.num_experts
        out = {"moe_loss": values[0] / max(values[1], 1.0)} if self.with_loss else {}
        per_layer = {}
        for i, label in enumerate(self.labels):
            row = values[HEAD + i * (e + 1):HEAD + (i + 1) * (e + 1)]
            load, dropped = row[:e], row[e]
            assigned = sum(load)
            per_layer[f"moe_imbalance/{label}"] = max(load) / max(assigned / e, 1e-9)
            per_layer[f"moe_dropped/{label}"] = dropped / max(assigned, 1.0)
            per_layer[f"moe_load/{label}"] = [int(x) for x in load]
        out["moe_imbalance"] = max(per_layer[f"moe_imbalance/{label}"] for label in self.labels)
        if self.with_capacity:
            out["moe_dropped"] = max(per_layer[f"moe_dropped/{label}"] for label in self.labels)
        return out | per_layer
