"""Load balance of a mixture-of-experts router: the losses, the aux-loss-free bias step, the statistics.

Pure functions of the router's outputs, so each is checked against its closed form on tiny tensors
(tests/unit/test_moe.py) and the block in spindle/model/moe.py only calls them.

    load_balancing_loss  Switch / GShard: E * sum_e f_e * P_e, f_e the share of the routed (token, slot)
                         assignments that chose expert e, P_e its mean router probability. 1 when the routing
                         is uniform, E when every token goes to one expert. Sequence-wise (DeepSeek-V3):
                         the same per sequence, averaged over the sequences.
                         (transformers' `load_balancing_loss_func` counts f per token, not per assignment:
                         its value is top_k times this one.)
    router_z_loss        ST-MoE: mean over tokens of logsumexp(logits)^2, which keeps the logits small.
    balance_bias_step    DeepSeek-V3's aux-loss-free balancing: a per-expert bias added to the scores that
                         choose the experts (never to the weights that combine them), moved outside the
                         gradient by rate * sign(mean load - load): an overloaded expert is chosen less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingStats:
    """One MoE layer's routing in its last forward, kept as device tensors (reading them is a host sync,
    left to whoever reports them). `load` counts assignments before any capacity drop: it is what the
    router asked for, and what the balancing bias follows."""

    load: torch.Tensor  # (E,) float: (token, slot) assignments per expert
    dropped: torch.Tensor  # () float: share of the assignments dropped by the capacity (0 when dropless)

    @property
    def imbalance(self) -> torch.Tensor:
        """max / mean of the load: 1 is perfectly balanced, E is every assignment on one expert."""
        return self.load.max() / self.load.mean().clamp_min(1e-9)


def expert_load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(..., k) chosen expert indices -> (num_experts,) float counts; scatter_add, so no host sync on GPU."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """Router scores as probabilities over the experts: softmax scores already are; sigmoid scores are
    divided by their sum per token (DeepSeek-V3's P for its sequence-wise loss)."""
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, sequences: Optional[int] = None) -> torch.Tensor:
    """probs (N, E) router probabilities (each row sums to 1), experts (N, k) the chosen indices ->
    E * sum_e f_e * P_e. With `sequences`, the N tokens are that many sequences one after the other:
    the loss is computed per sequence and averaged."""
    n, e = probs.shape
    groups = sequences or 1
    probs = probs.reshape(groups, n // groups, e)
    experts = experts.reshape(groups, n // groups, -1)
    chosen = torch.zeros_like(probs).scatter_add_(2, experts, torch.ones_like(experts, dtype=probs.dtype))
    f = chosen.sum(1) / chosen.sum((1, 2)).unsqueeze(-1)  # (groups, E): share of the assignments
    p = probs.mean(1)  # (groups, E)
    return e * (f * p).sum(-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, E) -> mean over tokens of logsumexp(logits)^2 (computed in fp32)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@torch.no_grad()
def balance_bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place: bias += rate * sign(mean(load) - load). `load` is the (E,) assignments per expert of the
    step (summed over data-parallel ranks by the caller when it trains on several)."""
    bias.add_(torch.sign(load.float().mean() - load.float()), alpha=rate)
