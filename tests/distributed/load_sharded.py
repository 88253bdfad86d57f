"""Run under torchrun: load foreign weights into a sharded model, write its logits (rank 0).

    torchrun --nproc_per_node=N tests/distributed/load_sharded.py LAYOUT OUT.pt KIND:FOLDER ...

LAYOUT: fsdp (FSDP2 over all ranks) or tp (tensor parallel over all ranks). KIND: hf or internevo.
(tests/distributed/test_sharded_load.py calls `run` in layout_runs.py's launches: tp on 2 processes, fsdp on
the one process of the world-1 launch, which has no process group: it makes a 1-rank group of its own.)
"""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from spindle.interop.families import model_config_from_hf
from spindle.interop.hf import load_hf_weights
from spindle.interop.internevo import load_internevo_weights, read_internevo
from spindle.config import validate_config
from spindle.parallel.layout import Groups, Layout
from spindle.parallel.mesh import init_distributed
from spindle.parallel.parallelize import apply_fsdp, apply_model_parallel
from spindle.model.llama import build_model


def model_section(kind: str, folder: Path) -> dict:
    if kind == "hf":
        return model_config_from_hf(json.loads((folder / "config.json").read_text()))
    return read_internevo(folder).model


def run(layout: str, out: str, *sources: str) -> None:
    own = not dist.is_initialized()
    if own and "RANK" not in os.environ:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        load(layout, out, sources)
    finally:
        if own:
            dist.destroy_process_group()


def load(layout: str, out: str, sources) -> None:
    env = init_distributed("torch", backend="gloo")
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    results = {}
    for spec in sources:
        kind, folder = spec.split(":", 1)
        parallel = {"tensor": env.world_size} if layout == "tp" else {"fsdp": True}
        cfg = validate_config({"model": model_section(kind, Path(folder)), "parallel": parallel})
        env = Layout.build(env, cfg)
        model = build_model(cfg.model.to_args(), env.device, seed=0)
        if layout == "tp":
            apply_model_parallel(model, cfg, env)
        else:  # FSDP2 also on one rank (the trainer skips data parallelism there)
            from torch.distributed.device_mesh import init_device_mesh

            fsdp_mesh = init_device_mesh("cpu", (env.world_size,), mesh_dim_names=("dp_shard",))
            env = replace(env, groups=Groups(None, None, None, None, None, None, fsdp_mesh))
            apply_fsdp(model, model, env, reshard_after_forward=True, mixed_precision=None)
        loader = load_hf_weights if kind == "hf" else load_internevo_weights
        loader(model, folder)
        kinds = {type(p).__name__ for p in model.parameters()}
        with torch.no_grad():
            logits = model.eval()(ids)
        results[spec] = {"logits": logits.full_tensor() if hasattr(logits, "full_tensor") else logits,
                         "param_types": sorted(kinds)}
    if env.rank == 0:
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    run(*sys.argv[1:])
