"""Run under torchrun (2 ranks, gloo): count FSDP2's all-gathers and reduce-scatters in one step of 4
micro-batches, with the trainer's `gradient_sync` and without it (every micro-batch synchronised, as
before), for zero1=-1 (parameters kept gathered through backward) and fsdp=True (ZeRO-3). Rank 0 writes
the counts, the FSDP group count and the gradients of both loops.

    torchrun --nproc_per_node=2 tests/distributed/fsdp_collectives.py OUT.pt

(tests/distributed/test_grad_sync.py calls `run` in layout_runs.py's launch of 2 processes.)
"""

import sys
from collections import Counter

import torch
import torch.distributed as dist

from spindle.config import validate_config
from spindle.model.llama import build_model
from spindle.parallel import comm
from spindle.parallel.layout import Layout, full_sharding
from spindle.parallel.mesh import init_distributed
from spindle.parallel.parallelize import apply_data_and_context_parallel, gradient_sync
from torchrun_io import save_results  # this folder is on sys.path when run as a script

MODEL = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=64,
             multiple_of=16, max_position_embeddings=16)
MICRO = 4
calls: Counter = Counter()


def spy(name: str, key: str):
    """Count dist.<name> calls under `key`; returns what undoes it."""
    real = getattr(dist, name)

    def counted(*args, **kwargs):
        calls[key] += 1
        return real(*args, **kwargs)

    setattr(dist, name, counted)
    return lambda: setattr(dist, name, real)


def one_step(model, batches, full_shard: bool, use_gradient_sync: bool) -> Counter:
    calls.clear()
    for i, ids in enumerate(batches):
        sync = gradient_sync(model, i, len(batches), full_shard) if use_gradient_sync else None
        with sync or torch.enable_grad():
            model(ids, labels=torch.roll(ids, -1, 1)).loss_sum.backward()
    return Counter(calls)


def run(out: str) -> None:
    # FSDP2 calls whichever names this torch has (2.13: *_single; 2.11: all_gather_into_tensor, ...)
    undo = [spy(comm.all_gather_single.__name__, "all_gather"),
            spy(comm.reduce_scatter_single.__name__, "reduce_scatter")]
    try:
        count(out)
    finally:
        for u in undo:
            u()


def count(out: str) -> None:
    env = init_distributed("torch", backend="gloo")
    gen = torch.Generator().manual_seed(10 + env.rank)
    batches = [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(MICRO)]
    results = {}
    for name, parallel in {"zero1": {"zero1": -1}, "fsdp": {"zero1": dict(size=-1, fsdp=True)}}.items():
        cfg = validate_config({"model": MODEL, "parallel": parallel})
        env = Layout.build(env, cfg)
        model = apply_data_and_context_parallel(build_model(cfg.model.to_args(), seed=0), cfg, env)
        groups = sum(1 for m in model.modules() if hasattr(m, "set_requires_gradient_sync"))
        per_step, grads = {}, {}
        for use in (False, True, True):  # the second deferred step checks the state was restored
            key = "gradient_sync" if use else "every_micro_batch"
            model.zero_grad(set_to_none=True)
            per_step.setdefault(key, []).append(dict(one_step(model, batches, full_sharding(cfg.parallel), use)))
            grads[key] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        results[name] = {"groups": groups, "calls": per_step, "grads": grads}
    save_results(env.rank, results, out)


if __name__ == "__main__":
    run(sys.argv[1])
    dist.destroy_process_group()
