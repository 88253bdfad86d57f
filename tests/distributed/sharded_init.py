"""Run under torchrun (2 ranks, gloo): build the model on the meta device, shard it (FSDP2, tensor
parallelism, a pipeline stage), then materialise and initialise, as the trainer does. Rank 0 writes, per
layout, every parameter gathered whole under its plain name (and the whole model's init to compare), the
elements each rank allocated when the parameters were first allocated, and whether a tied head is still
the embedding.

    torchrun --nproc_per_node=2 tests/distributed/sharded_init.py OUT.pt

(tests/distributed/test_sharded_init.py calls `run` in layout_runs.py's launch of 2 processes.)
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import spindle.parallel.parallelize as parallelize
from spindle.config import validate_config
from spindle.model.llama import build_model
from spindle.parallel.layout import Layout
from spindle.parallel.mesh import init_distributed
from spindle.parallel.pipeline import PipelineStageModel, build_stage_model
from torchrun_io import save_results  # this folder is on sys.path when run as a script

MODEL = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=66,
             multiple_of=16, max_position_embeddings=16, qk_norm=True, no_bias=False)
LAYOUTS = {
    # FSDP2 with activation checkpointing and compile wrappers (names gain segments); vocab 66 shards unevenly
    "fsdp": ({"fsdp": True}, {"checkpoint": True, "dtype": "torch.bfloat16"}, {"compile": True}),
    "tp": ({"tensor": 2, "sequence_parallel": True}, {}, {}),
    "tp_tied": ({"tensor": 2}, {"tie_word_embeddings": True}, {}),
    "pp": ({"pipeline": 2}, {}, {}),
}
allocations: list[int] = []  # elements each materialisation allocates on this rank
real_materialize = parallelize.materialize


def spy_materialize(model, device, seed, root=None):
    allocations.append(local_elements(model))
    real_materialize(model, device, seed, root)


def local_elements(model) -> int:
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


def whole(model) -> dict:
    return {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""):
            (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def run(out: str) -> None:
    parallelize.materialize = spy_materialize
    try:
        initialise(out)
    finally:
        parallelize.materialize = real_materialize  # the trainings after this one in the launch allocate as usual


def initialise(out: str) -> None:
    env = init_distributed("torch", backend="gloo")
    results = {}
    for name, (parallel, model_keys, trainer) in LAYOUTS.items():
        cfg = validate_config({"model": {**MODEL, **model_keys}, "parallel": parallel, "trainer": trainer})
        env = Layout.build(env, cfg)
        allocations.clear()
        if env.pp > 1:
            model = build_stage_model(cfg, env.pp_rank, env.pp, torch.device("meta"))
            parallelize.apply_data_and_context_parallel(
                PipelineStageModel(parallelize.apply_model_parallel(model, cfg, env)), cfg, env)
        else:
            model = build_model(cfg.model.to_args(), "meta")
            parallelize.apply_data_and_context_parallel(parallelize.apply_model_parallel(model, cfg, env), cfg, env)
        counts = [None] * env.world_size
        dist.all_gather_object(counts, allocations)
        stages = [None] * env.world_size
        dist.all_gather_object(stages, whole(model) if env.pp > 1 else None)
        params = {k: v for s in stages for k, v in s.items()} if env.pp > 1 else whole(model)
        results[name] = {"params": params, "allocated": counts,
                         "tied": (model_keys.get("tie_word_embeddings")
                                  and model.output.weight is model.tok_embeddings.weight)}
        reference = build_model(cfg.model.to_args(), seed=cfg.trainer.seed)
        if model_keys.get("tie_word_embeddings"):  # a model materialised before tensor parallelism stays tied too
            loaded = parallelize.apply_model_parallel(build_model(cfg.model.to_args()), cfg, env)
            results[name]["tied_when_materialised_first"] = loaded.output.weight is loaded.tok_embeddings.weight
        results[name]["reference"] = whole(reference)
    save_results(env.rank, results, out)


if __name__ == "__main__":
    run(sys.argv[1])
    dist.destroy_process_group()
