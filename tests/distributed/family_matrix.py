"""The family × layout matrix (issue 24): every family folder of tests/family_folders.py trains from its
Hugging Face weights (load_ckpt_info ckpt_type="hf") under each given layout, with the same global batch;
rank 0 writes, per (folder, layout), the losses of a few steps and every parameter's gradient of the first
step (whole tensors, gathered from shards, TP pieces and pipeline stages). tests/distributed/
test_family_matrix.py compares each with the one-process run ("single", the world-1 launch).

Called by tests/distributed/train_many.py on every rank: run(LAYOUTS, FOLDERS, OUT) with LAYOUTS a
comma-separated list of names of LAYOUTS below, all of this launch's world size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from spindle.config import validate_config
from spindle.parallel.mesh import ParallelEnv, init_distributed
from spindle.train.trainer import Trainer

STEPS, MICRO = 2, 4  # steps compared; micro-batches of the global batch on one data-parallel rank
# name -> (world size, parallel section, data-parallel ranks)
LAYOUTS = {
    "single": (1, {}, 1),
    "dp2": (2, {}, 2),
    "zero1": (2, {"zero1": -1}, 2),
    "fsdp2": (2, {"fsdp": True}, 2),
    "tp2": (2, {"tensor": 2}, 1),
    "tp2_sp": (2, {"tensor": 2, "sequence_parallel": True}, 1),
    "pp2": (2, {"pipeline": {"size": 2}}, 1),
    "cp2": (2, {"context": 2}, 1),
    "dp2_tp2": (4, {"tensor": 2}, 2),  # TP x FSDP
    "dp4_zero1_2": (4, {"zero1": 2}, 4),  # hybrid: sharded within pairs of ranks, replicated across them
    # mixtures of experts only: the experts split over 2 data-parallel ranks (all-to-all), and that next to TP
    "ep2": (2, {"expert": 2, "zero1": -1}, 2),
    "ep2_tp2": (4, {"expert": 2, "zero1": -1, "tensor": 2}, 2),
}
EXPERT_LAYOUTS = ("ep2", "ep2_tp2")
# the mixture-of-experts folders of tests/family_folders.py (test_family_matrix.py checks this is all of them) and
# the layouts each trains under. MoE has no pipeline or context parallelism (the layout refuses them). To keep
# the suite's time, Mixtral takes every other MoE layout and the two Qwen MoE families the ones where what they
# add (a gated shared expert and a dense first layer; q/k norms) meets a split: experts over ranks, heads over TP.
MOE_FOLDERS = {"mixtral": ("dp2", "fsdp2", "tp2_sp", "ep2", "ep2_tp2"),
               "qwen2_moe": ("tp2_sp", "ep2"), "qwen3_moe": ("tp2_sp", "ep2_tp2")}


def offered(folder: str, layout: str) -> bool:
    """Pipelines keep the embedding and the head on different stages: tied models are refused there. MoE
    folders: the layouts of MOE_FOLDERS (and the one process); expert layouts only for them."""
    if folder in MOE_FOLDERS:
        return layout == "single" or layout in MOE_FOLDERS[folder]
    return layout not in EXPERT_LAYOUTS and not (folder.endswith("_tied") and "pipeline" in LAYOUTS[layout][1])


def config(folder: Path, layout: str, out: Path):
    world, parallel, dp = LAYOUTS[layout]
    return validate_config({
        "data": {"seq_len": 16, "micro_bsz": 2, "micro_num": MICRO // dp, "total_steps": STEPS, "seed": 11},
        "parallel": parallel, "adam": {"lr": 1e-3},
        "trainer": {"run_folder": str(out), "tensorboard": False, "progress_bar": False, "seed": 5,
                    "num_threads": 1},
        "ckpt": {"load_ckpt_info": {"path": str(folder), "content": ["model"], "ckpt_type": "hf"}},
    })


def whole(grad) -> torch.Tensor:
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()


def first_step_gradients(trainer: Trainer) -> dict:
    """The gradients the optimizer's first step sees, as whole tensors on every rank."""
    seen: dict = {}
    step = trainer.optimizer.step

    def recording(*args, **kwargs):
        if not seen:
            seen.update({n: whole(p.grad) for n, p in trainer.raw_model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return seen


def run(layouts: str, folders: str, out: str) -> None:
    distributed = "RANK" in os.environ
    results = {}
    for folder in sorted(Path(folders).iterdir()):
        for layout in layouts.split(","):
            if not offered(folder.name, layout):
                continue
            env = init_distributed("torch", backend="gloo") if distributed else ParallelEnv()
            trainer = Trainer(config(folder, layout, Path(out).with_suffix("") / folder.name / layout), env)
            grads = first_step_gradients(trainer)
            losses = [h["loss"] for h in trainer.fit()["history"]]
            if distributed:  # pipeline stages each hold their own parameters
                parts = [None] * dist.get_world_size()
                dist.all_gather_object(parts, grads)
                grads = {n: g for part in parts for n, g in part.items()}
            results[(folder.name, layout)] = {"losses": losses, "grads": grads}
    if not distributed or dist.get_rank() == 0:
        torch.save(results, out)
    if distributed:
        dist.barrier()
