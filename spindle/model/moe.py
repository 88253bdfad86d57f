"""The mixture-of-experts feed-forward block, in the model file's style (plain PyTorch, no process groups).

    x -> gate (router logits) -> scores -> top-k experts and their weights
      -> every routed expert's SwiGLU over the tokens that chose it, weighted, summed per token
      (+ shared experts over every token, optionally gated by sigmoid(w x) as Qwen2-MoE does)

Routing, as each family does it (`route`):
    softmax scores, top-k, renormalised (norm_topk_prob)   Mixtral; Qwen3-MoE; GShard's top-2
    softmax scores, top-k, not renormalised                Qwen2-MoE (norm_topk_prob=False)
    sigmoid scores, top-k, renormalised                    DeepSeek-V3 style
A balancing bias (aux-loss-free balancing, spindle/model/moe_balance.py) shifts the scores that choose the
experts only; the combine weights are the unbiased scores.

Dropless by default: every expert takes every token routed to it. With a capacity factor (GShard), an
expert takes at most ceil(capacity_factor * tokens * top_k / E) (at least min_capacity) assignments, the
first slot's choices before the second's, each slot in token order; a dropped assignment adds nothing (the
token still passes through the residual).

The experts' weights are stacked, [E, out, in] per projection (`experts.w1/w3/w2.weight`), so expert
parallelism can shard dim 0. How the experts run is chosen in one function, `choose_expert_kernel`:
    loop        a loop over experts, each over its gathered tokens (index_select / index_add): exact,
                the CPU's and every non-bf16 path
    grouped_mm  CUDA in bf16: tokens sorted by expert into groups padded to GROUP_ALIGN rows, three grouped
                GEMMs (`torch.nn.functional.grouped_mm`, or `torch._grouped_mm` on a torch without it),
                no host sync
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from spindle.config.model_args import ModelArgs
from spindle.model.moe_balance import (RoutingStats, balance_bias_step, expert_load, load_balancing_loss,
                                       normalized_scores, router_z_loss)

GROUP_ALIGN = 16  # rows per padded group of the grouped GEMM: 16 keeps every group's start 16-byte aligned


class Routing(NamedTuple):
    logits: torch.Tensor  # (N, E) fp32
    scores: torch.Tensor  # (N, E) fp32 softmax or sigmoid scores, no bias
    experts: torch.Tensor  # (N, k) int64: the chosen experts, best first
    weights: torch.Tensor  # (N, k) fp32: their combine weights


def route(logits: torch.Tensor, top_k: int, score: str = "softmax", norm_topk_prob: bool = True,
          bias: Optional[torch.Tensor] = None) -> Routing:
    """Token-choice top-k routing of router logits (N, E)."""
    logits = logits.float()
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    choose = scores if bias is None else scores + bias  # the bias only chooses; it never weighs
    experts = choose.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(logits, scores, experts, weights)


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """GShard's capacity: assignments one expert takes, ceil(capacity_factor * tokens * top_k / E), at
    least min_capacity."""
    return max(min_capacity, math.ceil(capacity_factor * tokens * top_k / num_experts))


def within_capacity(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) chosen experts -> (N, k) bool, True where the assignment fits its expert's capacity. Priority
    as GShard / DeepSpeed: every token's first choice before any second choice, then token order."""
    slot_major = experts.t().reshape(-1)  # slot 0 of every token, then slot 1, ...
    one_hot = F.one_hot(slot_major, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # the assignment's place in its expert's queue
    return (position < capacity).reshape(experts.shape[1], -1).t()


# --------------------------------------------------------------------------- the experts' kernels


class ExpertPlan(NamedTuple):
    """The (token, slot) assignments sorted by expert: `order` indexes the flat (N * k) assignments, dropped
    ones last; `counts` (E,) how many each expert takes."""

    order: torch.Tensor
    experts: torch.Tensor  # (N * k,) the expert of each sorted assignment, E where dropped
    tokens: torch.Tensor  # (N * k,) its token
    weights: torch.Tensor  # (N * k,) its weight, 0 where dropped
    counts: torch.Tensor


def plan_by_expert(experts: torch.Tensor, weights: torch.Tensor, keep: Optional[torch.Tensor],
                   num_experts: int) -> ExpertPlan:
    flat = experts.reshape(-1)
    w = weights.reshape(-1)
    if keep is not None:  # a dropped assignment becomes expert E: sorted after every real one, never run
        flat = torch.where(keep.reshape(-1), flat, num_experts)
        w = torch.where(keep.reshape(-1), w, 0.0)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))[:num_experts]
    return ExpertPlan(order, flat[order], order // experts.shape[1], w[order], counts)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def experts_loop(x: torch.Tensor, plan: ExpertPlan, w1, w3, w2) -> torch.Tensor:
    """x (N, H); w1/w3 (E, I, H), w2 (E, H, I) -> (N, H): each expert over the tokens it took, in turn.
    The tokens are gathered once in expert order and the results added back once: a gather per expert would
    make its backward fill a whole (N, H) zero gradient per expert (the CPU step's largest cost in
    `spindle bench moe`)."""
    counts = plan.counts.tolist()  # one host sync for the group sizes
    kept = sum(counts)  # dropped assignments are sorted last
    tokens = plan.tokens[:kept]
    groups = x.index_select(0, tokens).split(counts)
    outs = [swiglu(g, w1[e], w3[e], w2[e]) for e, g in enumerate(groups) if g.shape[0]]
    y = torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])
    return torch.zeros_like(x).index_add_(0, tokens, (y * plan.weights[:kept, None]).to(x.dtype))


def grouped_mm_op():
    """The grouped GEMM of this torch: the public one where it exists (torch >= 2.9), else the private."""
    return getattr(F, "grouped_mm", None) or torch._grouped_mm


def padded_groups(plan: ExpertPlan, align: int = GROUP_ALIGN) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's rows padded up to a multiple of `align`: (offs, rows) with offs (E,) int32 the groups'
    ends (the grouped GEMM's `offs`) and rows (N * k,) where each sorted assignment sits; dropped
    assignments point past the last group, at a row that is never computed into the output."""
    padded = (plan.counts + align - 1) // align * align
    ends = padded.cumsum(0)
    last_row = plan.order.numel() + plan.counts.numel() * (align - 1)  # bound on the padded total: no sync
    # per expert, and one more entry for the dropped ones (expert E): where its rows start, padded and not
    padded_start = torch.cat([ends - padded, ends.new_full((1,), last_row)])
    sorted_start = torch.cat([plan.counts.new_zeros(1), plan.counts.cumsum(0)])
    rank = torch.arange(plan.order.numel(), device=ends.device) - sorted_start[plan.experts]
    rows = padded_start[plan.experts] + torch.where(plan.experts < plan.counts.numel(), rank, 0)
    return ends.to(torch.int32), rows


def experts_grouped(x: torch.Tensor, plan: ExpertPlan, w1, w3, w2) -> torch.Tensor:
    """As `experts_loop`, through grouped GEMMs over the tokens sorted by expert (CUDA, bf16)."""
    offs, rows = padded_groups(plan)
    mm = grouped_mm_op()
    n_rows = plan.order.numel() + plan.counts.numel() * (GROUP_ALIGN - 1) + 1  # + the dropped ones' row
    sorted_x = x.new_zeros(n_rows, x.shape[1]).index_copy(0, rows, x.index_select(0, plan.tokens))
    hidden = F.silu(mm(sorted_x, w1.transpose(-2, -1), offs=offs)) * mm(sorted_x, w3.transpose(-2, -1), offs=offs)
    y = mm(hidden, w2.transpose(-2, -1), offs=offs).index_select(0, rows)
    # rows past the last group are not written by the kernel: where(), not a product with a zero weight
    y = torch.where(plan.weights[:, None] != 0, y * plan.weights[:, None], 0.0)
    return torch.zeros_like(x).index_add_(0, plan.tokens, y.to(x.dtype))


EXPERT_KERNELS = {"loop": experts_loop, "grouped_mm": experts_grouped}


def choose_expert_kernel(device_type: str, dtype: torch.dtype) -> str:
    """The one place that decides how the experts run: grouped GEMMs on CUDA in bf16 (the dtype the kernel
    takes), the per-expert loop everywhere else (exact in fp32)."""
    has_grouped = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return "grouped_mm" if device_type == "cuda" and dtype == torch.bfloat16 and has_grouped else "loop"


# --------------------------------------------------------------------------- the modules


class GroupedLinear(nn.Module):
    """E bias-free linear maps stacked: weight (E, out, in), each expert's as nn.Linear stores it."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = GroupedLinear(num_experts, hidden, intermediate)  # gate
        self.w3 = GroupedLinear(num_experts, hidden, intermediate)  # up
        self.w2 = GroupedLinear(num_experts, intermediate, hidden)  # down


class SharedExperts(nn.Module):
    """The shared experts as one SwiGLU (n shared experts of width I sum to one of width n * I)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight)


class MoEFeedForward(nn.Module):
    """The MoE block. After each forward it keeps `aux_loss` (the weighted balance and z losses, None when
    both coefficients are 0) and `stats` (RoutingStats) for whoever reports and trains."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.score, self.norm_topk_prob = args.router_score, args.norm_topk_prob
        self.capacity_factor, self.min_capacity = args.capacity_factor, args.min_capacity
        self.aux_loss_coeff, self.z_loss_coeff = args.aux_loss_coeff, args.z_loss_coeff
        self.aux_loss_per_sequence, self.bias_update_rate = args.aux_loss_per_sequence, args.bias_update_rate
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size)
        width = args.num_shared_experts * args.shared_expert_intermediate_size
        self.shared_experts = SharedExperts(args.hidden_size, width) if width else None
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False) if args.shared_expert_gate else None
        if args.bias_update_rate > 0:  # fp32 always, saved with the model: it is part of how it routes
            self.register_buffer("score_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        else:
            self.score_bias = None
        self.aux_loss: Optional[torch.Tensor] = None
        self.stats: Optional[RoutingStats] = None
        # expert parallelism puts here what runs the experts across ranks (spindle/parallel/experts.py):
        # called as expert_parallel(x, plan, kernel, w1, w3, w2); None runs them all on this rank
        self.expert_parallel = None

    def reset_buffers(self) -> None:
        """After `to_empty()`: the balancing bias starts at zero."""
        if self.score_bias is not None:
            self.score_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(self.gate(flat), self.top_k, self.score, self.norm_topk_prob, self.score_bias)
        keep = None
        if self.capacity_factor is not None:
            cap = expert_capacity(flat.shape[0], self.top_k, self.num_experts, self.capacity_factor,
                                  self.min_capacity)
            keep = within_capacity(routing.experts, self.num_experts, cap)
        plan = plan_by_expert(routing.experts, routing.weights, keep, self.num_experts)
        kernel = EXPERT_KERNELS[choose_expert_kernel(x.device.type, x.dtype)]
        e = self.experts
        weights = (e.w1.weight, e.w3.weight, e.w2.weight)
        if self.expert_parallel is None:
            out = kernel(flat, plan, *weights)
        else:
            out = self.expert_parallel(flat, plan, kernel, *weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        self.aux_loss = self.balance_loss(routing, shape[0] if len(shape) == 3 else None)
        with torch.no_grad():
            dropped = (1 - keep.float().mean()) if keep is not None else flat.new_zeros((), dtype=torch.float)
            self.stats = RoutingStats(expert_load(routing.experts, self.num_experts), dropped)
        return out.view(shape)

    def balance_loss(self, routing: Routing, sequences: Optional[int]) -> Optional[torch.Tensor]:
        """aux_loss_coeff * load balancing loss + z_loss_coeff * router z-loss; None when both are off."""
        loss = None
        if self.aux_loss_coeff > 0:
            probs = routing.scores if self.score == "softmax" else normalized_scores(routing.scores)
            loss = self.aux_loss_coeff * load_balancing_loss(
                probs, routing.experts, sequences if self.aux_loss_per_sequence else None)
        if self.z_loss_coeff > 0:
            z = self.z_loss_coeff * router_z_loss(routing.logits)
            loss = z if loss is None else loss + z
        return loss

    @torch.no_grad()
    def update_bias(self, load: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing, after an optimizer step: move the bias against the last forward's load
        (or `load`, e.g. that load summed over data-parallel ranks). Nothing when bias_update_rate is 0."""
        if self.score_bias is None:
            return
        balance_bias_step(self.score_bias, self.stats.load if load is None else load, self.bias_update_rate)
