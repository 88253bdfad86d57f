"""Causal attention of a block of queries to its own keys and to every key before them, without a mask:
the two parts run as separate CPU flash kernels and their softmaxes are merged by log-sum-exp.

Context parallelism needs this: a rank's query chunk starts in the middle of a document, so its
queries see the document's earlier keys in full and their own chunk causally ("lower-right" causal).
SDPA can only express that with an (Lq, Lk) mask, which on CPU is stored as floats and kept for
backward: at 16K tokens on 2 ranks that mask made context parallelism cost more memory per rank than
one process (docs/benchmarks.md C3). PyTorch has no public kernel that returns the log-sum-exp, so
this uses the private `_scaled_dot_product_flash_attention_for_cpu` op and its backward.

Backward is ring attention's: each part's flash backward, given the *merged* output and log-sum-exp,
computes its share of the merged softmax's gradient (P = exp(S - lse), D = rowsum(dO * O) are the
merged ones), and the query gradients add up.
"""

from __future__ import annotations

import torch

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def available(q: torch.Tensor, dropout_p: float) -> bool:
    """The merge runs on CPU tensors without dropout (the private kernels are CPU-only)."""
    return q.device.type == "cpu" and dropout_p == 0.0 and _FLASH is not None and _FLASH_BACKWARD is not None


class _PastAndOwn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_past, v_past, k_own, v_own):
        out_p, lse_p = _FLASH(q, k_past, v_past, 0.0, False)
        out_o, lse_o = _FLASH(q, k_own, v_own, 0.0, True)
        lse = torch.logaddexp(lse_p, lse_o)
        out = (out_p.float() * (lse_p - lse).exp()[..., None] + out_o.float() * (lse_o - lse).exp()[..., None])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k_past, v_past, k_own, v_own, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_past, v_past, k_own, v_own, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        gq_p, gk_p, gv_p = _FLASH_BACKWARD(grad, q, k_past, v_past, out, lse, 0.0, False)
        gq_o, gk_o, gv_o = _FLASH_BACKWARD(grad, q, k_own, v_own, out, lse, 0.0, True)
        return gq_p + gq_o, gk_p, gv_p, gk_o, gv_o


def past_and_own(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor, k_own: torch.Tensor,
                 v_own: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, D) queries over (B, H, Lp, D) earlier keys (all seen) and (B, H, Lq, D) own keys (causal),
    as one softmax; keys and values already have the queries' head count."""
    return _PastAndOwn.apply(q, k_past, v_past, k_own, v_own)
