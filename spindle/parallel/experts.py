"""Expert parallelism: each MoE layer's experts split over `parallel.expert.size` data-parallel ranks.

Every rank routes its own tokens (the router and the shared experts are replicated like any dense weight);
the experts' stacked weights (E, out, in) become DTensors sharded by expert over the "ep" mesh, so rank i of
the group holds experts [i * E/ep, (i + 1) * E/ep). One MoE forward on each rank:

    1. the (token, slot) assignments, sorted by expert (`plan_by_expert`), are already grouped by the rank
       that holds their expert: one all-to-all of the counts tells every rank how many rows it receives;
    2. all-to-all of the tokens' hidden states (dispatch), each rank runs its experts over what it received
       with the same kernel as one process (loop or grouped GEMM), all-to-all back (combine);
    3. the outputs are weighted and summed per token where they came from, as one process does.

Both all-to-alls are autograd functions whose backward is the reverse all-to-all, so the gradient of an
expert's weights is summed over every token that reached it, from every rank of the group. Data
parallelism averages gradients over the dp ranks (the trainer scales the loss by them); an expert's
weights are sharded by FSDP over the ranks that hold the same experts ("dp_shard_mod_ep", dp / ep of
them), which average over dp / ep: scaling the experts' gradient by 1 / ep in the forward makes that the
average over all dp ranks, the one-process gradient.

The model file knows none of this: `apply_expert_parallel` sets each MoE block's `expert_parallel` (the
callable its forward hands the experts to) and distributes the expert weights, from outside, on meta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from spindle.model.moe import ExpertPlan, MoEFeedForward


class AllToAll(torch.autograd.Function):
    """Rows of `x` sent to the group's ranks (`send` rows to each, in rank order), `receive` rows from each;
    backward sends the gradient back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return exchange(x, send, receive, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def exchange(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


class ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def local_plan(received_counts: torch.Tensor) -> ExpertPlan:
    """The rows one rank received, (source rank, local expert) blocks in that order, as an ExpertPlan over
    its local experts: rows sorted by expert, weight 1 (the sender weighs the results)."""
    sources, experts = received_counts.shape
    expert_of_row = torch.arange(experts, device=received_counts.device).repeat(sources)
    expert_of_row = expert_of_row.repeat_interleave(received_counts.reshape(-1))
    order = expert_of_row.argsort(stable=True)
    ones = torch.ones(order.numel(), device=order.device)
    return ExpertPlan(order, expert_of_row[order], order, ones, received_counts.sum(0))


@dataclass(frozen=True)
class ExpertParallel:
    """The experts of one MoE layer over an expert-parallel group of `size` ranks (a block's
    `expert_parallel`)."""

    group: object
    size: int

    def __call__(self, x: torch.Tensor, plan: ExpertPlan, kernel, *weights: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        local = [w.to_local() if isinstance(w, DTensor) else w for w in weights]
        local = [ScaleGradient.apply(w, 1.0 / self.size) for w in local]
        per_rank = local[0].shape[0]
        received = torch.empty_like(plan.counts)
        dist.all_to_all_single(received, plan.counts.contiguous(), group=self.group)  # E/ep counts each way
        received = received.view(self.size, per_rank)
        # the step's host sync of the split sizes (the collective needs them on the host)
        send = plan.counts.view(self.size, per_rank).sum(1).tolist()
        receive = received.sum(1).tolist()
        kept = sum(send)  # dropped assignments are sorted last and sent nowhere
        tokens = plan.tokens[:kept]
        arrived = AllToAll.apply(x.index_select(0, tokens), send, receive, self.group)
        done = kernel(arrived, local_plan(received), *local)
        if not sum(receive):  # no token came: the experts' gradients are zeros, not missing (FSDP reduces them)
            done = done + sum(w.sum() for w in local) * 0.0
        back = AllToAll.apply(done, receive, send, self.group)
        out = torch.zeros_like(x)
        return out.index_add_(0, tokens, (back * plan.weights[:kept, None]).to(x.dtype))


def apply_expert_parallel(model: nn.Module, layout) -> None:
    """Shard every MoE block's experts over the layout's "ep" mesh (by expert, dim 0) and give the block
    the all-to-all dispatch; the model may still be on meta (each rank then initialises its own experts)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh, group = layout.groups.ep_mesh, layout.groups.ep_mesh.get_group()
    for block in model.modules():
        if not isinstance(block, MoEFeedForward):
            continue
        for linear in (block.experts.w1, block.experts.w3, block.experts.w2):
            linear.weight = nn.Parameter(distribute_tensor(linear.weight.data, mesh, [Shard(0)]))
        block.expert_parallel = ExpertParallel(group, layout.ep)
