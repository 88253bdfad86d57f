"""Run under torchrun (2 ranks, gloo): one bf16 forward + backward of the same tiny model under DDP and
under FSDP2 (Spindle's policy), and under FSDP2 with PyTorch's default MixedPrecisionPolicy (inputs cast to
bf16 in every block) for contrast, at positions up to 32K with log-n scaling. Rank 0 writes each layout's
loss, full gradients and the dtypes the blocks and norms saw.

    torchrun --nproc_per_node=2 tests/distributed/precision_layouts.py OUT.pt

(tests/distributed/test_precision.py calls `run` in layout_runs.py's launch of 2 processes.)
"""

import sys

import torch
import torch.distributed as dist

from spindle.config import validate_config
from spindle.model.llama import build_model
from spindle.parallel.layout import Layout
from spindle.parallel.mesh import init_distributed
from spindle.parallel.parallelize import apply_data_and_context_parallel
from torchrun_io import save_results  # this folder is on sys.path when run as a script

MODEL = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=64,
             multiple_of=16, qk_norm=True, dtype="torch.bfloat16", max_position_embeddings=32768, logn_attn=True,
             logn_ref_len=512)
LAYOUTS = {"ddp": {"zero1": 1}, "fsdp": {"fsdp": True}, "fsdp_torch_default": {"fsdp": True}}


def torch_default_fsdp(model, env):
    """FSDP2 as the trainer applied it before: one bf16 policy with cast_forward_inputs=True everywhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=env.groups.fsdp_mesh, mp_policy=mp)
    fully_shard(model, mesh=env.groups.fsdp_mesh, mp_policy=mp)
    return model


def record_dtypes(model, seen: set):
    def block_inputs(module, args):
        x, cos, sin, q_scale = args[:4]
        seen.update({f"residual {x.dtype}", f"cos {cos.dtype}", f"sin {sin.dtype}", f"q_scale {q_scale.dtype}"})

    def norm_weight(module, args):
        seen.add(f"norm weight {module.weight.dtype}")

    for block in model.layers.values():
        block.register_forward_pre_hook(block_inputs)
    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm):
            m.register_forward_pre_hook(norm_weight)


def run(out: str) -> None:
    env = init_distributed("torch", backend="gloo")
    gen = torch.Generator().manual_seed(100 + env.rank)  # each rank its own rows
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    positions = (32768 - 16 + torch.arange(16)).expand(2, 16)  # the last 16 positions of a 32K context
    results = {}
    for name, parallel in LAYOUTS.items():
        cfg = validate_config({"model": MODEL, "parallel": parallel})
        env = Layout.build(env, cfg)
        model = build_model(cfg.model.to_args(), seed=0)
        seen: set = set()
        record_dtypes(model, seen)
        wrapped = torch_default_fsdp(model, env) if name == "fsdp_torch_default" else \
            apply_data_and_context_parallel(model, cfg, env)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(ids, positions, None, labels=torch.roll(ids, -1, 1)).loss_sum / ids.numel()
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
                 for n, p in model.named_parameters()}
        losses = torch.stack([loss.detach().float()])
        gathered = [torch.zeros_like(losses) for _ in range(env.world_size)]
        dist.all_gather(gathered, losses)
        results[name] = {"losses": torch.cat(gathered), "grads": grads, "dtypes": sorted(seen)}
    save_results(env.rank, results, out)


if __name__ == "__main__":
    run(sys.argv[1])
    dist.destroy_process_group()
