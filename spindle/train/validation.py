"""Running the validation sets through the executor: loss, perplexity, accuracy per set.

Every set is evaluated as `spindle.data.validation` lays it out (all its tokens unless
`data.valid_max_tokens` bounds it), `data.valid_micro_num` micro-batches per evaluation call, the
data-parallel ranks splitting the packs. The executor returns per-source sums (cross-entropy, tokens
with a label, tokens whose label had the top logit: spindle.parallel.executor), summed here over the
calls and over data x context parallel ranks, so every layout reports the same numbers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def validate_sets(executor, valid_sets: dict, group: int, layout, device: torch.device,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """val/{set}_loss (plain cross-entropy per labelled token), val/{set}_acc (the share whose label had the
    top logit), val/{set}_plex = exp(loss) and val/{set}_tokens (tokens evaluated) for every set."""
    out = {}
    for name, found in valid_sets.items():
        total = None
        for batches in found.micro_batches(group, *layout.loader_shard):
            stats = executor.evaluate([b.to(device) for b in batches])
            total = stats if total is None else total + stats
        all_reduce(total)
        loss_sum, labelled, correct = (float(v) for v in total.sum(1).tolist())
        loss = loss_sum / max(labelled, 1.0)
        out[f"val/{name}_loss"] = loss
        out[f"val/{name}_acc"] = correct / max(labelled, 1.0)
        out[f"val/{name}_plex"] = math.exp(min(loss, 50.0))
        out[f"val/{name}_tokens"] = found.used_tokens
    return out
