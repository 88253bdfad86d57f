"""The output head and the cross-entropy in one pass over token chunks, without materialising logits.

    loss_sum, token_loss, correct = linear_cross_entropy(h, weight, labels)

`F.cross_entropy(h @ weight.T, labels, reduction="sum")` builds (N, V) logits, a (N, V) log-softmax,
and in backward a (N, V) gradient of each. At vocabulary 8 192 and 2 048 tokens that is 67 MB per
tensor: the memory-bound softmax passes and the page faults of allocating them took ~20 % of a
10M-parameter CPU step (docs/LOG.md). Here the tokens go through in chunks whose logits fit in the
cache; each chunk's softmax gradient (softmax - one_hot) is formed right away and turned into the
gradients of `h` and `weight` by two matmuls, so backward only scales them by the upstream gradient
of the summed loss. The same pass yields every token's loss and whether its argmax was right, which
the trainer's per-source statistics need.

With `label_smoothing` ε the summed loss (the one that trains) is PyTorch's smoothed cross-entropy,
(1 - ε)·(-log p_label) + ε·mean_j(-log p_j) per token, while `token_loss` stays the plain
cross-entropy that the trainer reports.

PyTorch has no fused linear + cross-entropy (torch.compile does not fuse across the matmul either),
so this is our own. The matmul FLOPs are unchanged; only elementwise traffic and allocations go.
Vocabulary-parallel (DTensor) heads use the plain path in the trainer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


class TokenLosses(NamedTuple):
    loss_sum: torch.Tensor  # () fp32, differentiable: the (label-smoothed) loss summed over valid tokens
    token_loss: torch.Tensor  # (N,) fp32 plain cross-entropy, 0 where the label is ignored; no gradient
    correct: torch.Tensor  # (N,) bool: the label has the top logit, a tie counts (False where ignored); no gradient


def chunk_rows(vocab: int, device_type: str) -> int:
    """Tokens per chunk: ~8 MB of fp32 logits on CPU (stays in cache), ~1 GB on GPUs (big GEMMs)."""
    elements = (1 << 21) if device_type == "cpu" else (1 << 28)
    return max(64, elements // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, rows, smoothing):
        n = h.shape[0]
        smoothed_sum = torch.zeros((), dtype=torch.float64, device=h.device) if smoothing else None
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)  # ignored positions pick column 0; their rows are zeroed below
        token_loss = torch.empty(n, dtype=torch.float32, device=h.device)
        correct = torch.empty(n, dtype=torch.bool, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_grad else None
        autocast = torch.is_autocast_enabled(h.device.type)  # in-place addmm_ would bypass autocast
        for s in range(0, n, rows):
            e = min(s + rows, n)
            hc, lc, vc = h[s:e], safe[s:e], valid[s:e]
            # under autocast the matmul runs in the low precision; the softmax always in fp32
            logp = torch.log_softmax(torch.mm(hc, weight.t()).float(), dim=-1)
            picked = logp.gather(1, lc[:, None]).squeeze(1)
            token_loss[s:e] = torch.where(vc, -picked, 0.0)
            # "the label has the top score" via amax (vectorised; argmax is ~10x slower on CPU);
            # a tie for the top counts as correct
            correct[s:e] = (picked >= logp.amax(-1)) & vc
            if smoothing:  # before the clamp below alters logp
                smoothed = (1.0 - smoothing) * -picked - smoothing * logp.mean(-1)
                smoothed_sum += torch.where(vc, smoothed, 0.0).sum(dtype=torch.float64)
            if not want_grad:
                continue
            # d loss_i / d logits_i = softmax_i - one_hot(label_i). Clamp first: exp of inputs below
            # -87.3 (denormal or zero results) takes a slow path, ~20x slower on x86 even with
            # flush-to-zero (docs/LOG.md); a floor of exp(-87) = 1.6e-38 per logit is far below fp32
            # rounding of the entries that matter.
            probs = logp.clamp_(min=-87.0).exp_()
            # (smoothed) target distribution: 1 - ε on the label, ε / V everywhere
            probs.scatter_add_(1, lc[:, None], torch.full_like(picked, -(1.0 - smoothing))[:, None])
            if smoothing:
                probs.sub_(smoothing / probs.shape[1])
            # rows without a label get no gradient: zero them in the (rows, d) inputs and outputs rather
            # than in the (rows, V) probabilities, and always, so no host sync asks whether any is ignored
            g = probs.to(hc.dtype)
            hv = hc * vc[:, None].to(hc.dtype)
            grad_h[s:e] = torch.mm(g, weight.to(g.dtype) if weight.dtype != g.dtype else weight) * vc[:, None]
            if not autocast and g.dtype == grad_w.dtype and hc.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), hv)
            else:
                grad_w.add_(torch.mm(g.t(), hv))
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(token_loss, correct)
        loss_sum = token_loss.sum() if smoothed_sum is None else smoothed_sum.float()
        return loss_sum, token_loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         rows: int | None = None, label_smoothing: float = 0.0) -> TokenLosses:
    """h (..., d), weight (V, d), labels (...) with -100 where no loss -> TokenLosses over the flattened tokens."""
    h2 = h.reshape(-1, h.shape[-1])
    rows = rows or chunk_rows(weight.shape[0], h.device.type)
    loss_sum, token_loss, correct = _LinearCrossEntropy.apply(h2, weight, labels.reshape(-1), rows,
                                                              float(label_smoothing))
    return TokenLosses(loss_sum, token_loss, correct)


def token_statistics(output, labels: torch.Tensor, label_smoothing: float = 0.0) -> TokenLosses:
    """The loss statistics of every head, with one meaning: the training loss summed over valid tokens
    (label-smoothed if asked, with gradient), every token's plain cross-entropy, and whether the label
    has the top logit (a tie for the top counts; False where the label is ignored).

    `output` is what the model returned: `TokenLosses` (the fused head ran), logits (..., V), or logits
    sharded over the vocabulary (a DTensor of a tensor-parallel head; call inside `loss_parallel()`,
    which computes the summed loss from the shards) — then the per-token statistics come from the
    shards too, without gathering them."""
    if isinstance(output, TokenLosses):
        return output
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    labels = labels.reshape(-1)
    flat = output.flatten(0, -2)
    if isinstance(output, DTensor):
        loss_sum = F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum",
                                   label_smoothing=label_smoothing)
        with torch.no_grad():
            token_loss, correct = _sharded_token_losses(output, labels)
        return TokenLosses(loss_sum, token_loss, correct)
    logp = torch.log_softmax(flat.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    picked = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    token_loss = torch.where(valid, -picked, 0.0)
    if label_smoothing:
        loss_sum = torch.where(valid, (1.0 - label_smoothing) * -picked - label_smoothing * logp.mean(-1), 0.0).sum()
    else:
        loss_sum = token_loss.sum()
    with torch.no_grad():
        correct = (picked >= logp.amax(-1)) & valid
    return TokenLosses(loss_sum, token_loss.detach(), correct)


def _sharded_token_losses(logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and "the label has the top logit" for logits sharded over the vocabulary
    (`Shard(-1)` on the tensor-parallel mesh): each rank reduces its slice (max, sum of exp, the label's
    logit where the label falls in its slice) and three all-reduces over the (N,) rows combine them.
    PyTorch's `loss_parallel` gives the summed loss only, hence our own."""
    import torch.distributed as dist

    local = logits.to_local().float().flatten(0, -2)
    mesh = logits.device_mesh
    group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group(mesh.ndim - 1)
    vocab, rank = logits.shape[-1], dist.get_rank(group)
    start = rank * -(-vocab // mesh.size(-1))  # Shard splits like torch.chunk: ceil(V / n) per rank
    row_max = local.amax(-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (local - row_max[:, None]).clamp_(min=-87.0).exp_().sum(-1)
    dist.all_reduce(sum_exp, group=group)
    ours = (labels >= start) & (labels < start + local.shape[-1])
    index = torch.where(ours, labels - start, 0)
    picked = torch.where(ours, local.gather(1, index[:, None]).squeeze(1), 0.0)
    dist.all_reduce(picked, group=group)
    valid = labels != IGNORE_INDEX
    return torch.where(valid, row_max + sum_exp.log() - picked, 0.0), (picked >= row_max) & valid
