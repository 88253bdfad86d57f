"""Run under torchrun (2 ranks, gloo): one forward + backward of a Qwen3-shaped model (per-head q/k norms,
qkv biases) under tensor parallelism 2, with and without sequence parallelism, against the same step of the
plain model on each rank. Rank 0 writes, per layout, the largest gradient difference from the plain model
and the names of the parameters that are not DTensors whose gradients differ between the TP ranks (a
replicated parameter whose gradient was never reduced).

    torchrun --nproc_per_node=2 tests/distributed/tp_replicated.py OUT.pt
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from spindle.config import validate_config
from spindle.model.llama import build_model
from spindle.model.loss import token_statistics
from spindle.parallel.executor import loss_context
from spindle.parallel.layout import Layout
from spindle.parallel.mesh import init_distributed
from spindle.parallel.parallelize import apply_model_parallel
from torchrun_io import finish  # this folder is on sys.path when run as a script

MODEL = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=64,
             multiple_of=16, qk_norm=True, no_bias=False, qkv_bias=True, max_position_embeddings=16,
             dtype="torch.float32")


def step_grads(model, ids, tensor_parallel: bool = False) -> dict:
    with loss_context(tensor_parallel):  # the vocabulary-sharded head's loss, as the trainer runs it
        # the head unfused, its logits vocabulary-sharded under TP: what the trainer's executor does
        loss = token_statistics(model(ids, None, None), torch.roll(ids, -1, 1)).loss_sum / ids.numel()
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def not_reduced(grads: dict, group) -> list[str]:
    """Plain-tensor gradients that differ between the ranks of `group`: TP left the parameter replicated
    but each rank computed only its part of the gradient."""
    names = []
    for name, g in grads.items():
        if isinstance(g, DTensor):
            continue
        copies = [torch.zeros_like(g) for _ in range(dist.get_world_size(group))]
        dist.all_gather(copies, g.contiguous(), group=group)
        if any(not torch.equal(c, copies[0]) for c in copies):
            names.append(name)
    return names


def main(out: str) -> None:
    env = init_distributed("torch", backend="gloo")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))  # the same rows on both ranks
    results = {}
    for sp in (False, True):
        cfg = validate_config({"model": MODEL, "parallel": {"tensor": 2, "sequence_parallel": sp}})
        env = Layout.build(env, cfg)
        reference = step_grads(build_model(cfg.model.to_args(), seed=0), ids)
        model = apply_model_parallel(build_model(cfg.model.to_args(), seed=0), cfg, env)
        grads = step_grads(model, ids, tensor_parallel=True)
        full = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
        diff = {n: (full[n] - reference[n]).abs().max().item() for n in reference}
        results[f"tp2{'_sp' if sp else ''}"] = {"max_grad_diff": diff,
                                                "not_reduced": not_reduced(grads, env.groups.mesh["tp"].get_group())}
    finish(env.rank, results, out)


if __name__ == "__main__":
    main(sys.argv[1])
