"""The layout of a run, decided once: its sizes, every refusal, this rank's place and its process groups.

    layout = Layout.build(env, cfg)                           # the run: `plan` + the device mesh
    layout = Layout.plan(cfg.parallel, cfg.model, world, seq_len)   # `--dry-run`, the memory estimate

`Layout.plan` is the only place a layout is refused, so `spindle train --dry-run` refuses exactly what the
run refuses, with the same line. `Layout.build` plans for the launched processes (`ParallelEnv`, what the
launcher said) and attaches the DeviceMesh and its groups; the result is frozen: nothing changes a layout
after it is built. The trainer asks it questions (`sum_over_data_ranks`, `tokens_per_step`, `is_main`...)
instead of reading sizes; code under spindle/parallel reads the sizes and groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion, __version__ as TORCH_VERSION

from spindle.errors import SpindleError
from spindle.parallel.mesh import ParallelEnv

# torch.distributed.pipelining before 2.13 asks for a gradient of every tensor a stage receives (2.11, what
# the lent H200s' CUDA image has, fails with "only Tensors of floating point dtype can require gradients"),
# and Spindle's stages hand on the integer positions and labels with the hidden states (parallel/pipeline.py).
# 2.13 is the first release checked to work (2.12 was not tried).
PIPELINE_MIN_TORCH = (2, 13)


class LayoutError(SpindleError):
    """A layout refused by `Layout.plan`. `with_world`: the refusal depends on the number of processes, so
    `--dry-run` adds how to plan for another number (spindle/cli/train.py)."""

    def __init__(self, message: str, with_world: bool = False):
        super().__init__(message)
        self.with_world = with_world


def full_sharding(parallel) -> bool:
    """ZeRO-3: `parallel.fsdp=True`, or InternEvo's way to ask for it, `parallel.zero1=dict(fsdp=True)`."""
    return bool(parallel.fsdp or parallel.zero1.fsdp)


def expert_size(parallel, model, dp: int, tp: int, shard: int) -> int:
    """`parallel.expert.size` for this layout (-1: every data-parallel rank), or the LayoutError of the
    combinations expert parallelism does not take."""
    size = parallel.expert.size
    ep = dp if size == -1 else size
    if ep == 1:
        return 1
    key = f"parallel.expert.size={size}"
    if not model.num_experts:
        raise LayoutError(f"{key} needs a mixture-of-experts model (model.num_experts > 0)")
    if dp % ep:
        raise LayoutError(f"{key} must divide the data-parallel size {dp}: the experts are split over data-parallel "
                          "ranks", with_world=True)
    if model.num_experts % ep:
        raise LayoutError(f"{key} must divide model.num_experts ({model.num_experts})")
    if shard != dp:  # the experts' own FSDP group is cut from the one data-parallel shard dimension
        raise LayoutError(f"{key} needs parameters sharded over every data-parallel rank: parallel.zero1=-1 or "
                          f"parallel.fsdp=True (this layout has zero1={parallel.zero1.size})")
    if tp > 1 and not parallel.expert.no_tp:
        raise LayoutError("parallel.expert.no_tp=False: experts split by tensor parallelism are not built; "
                          "with tensor parallelism the experts stay whole on every tensor rank (no_tp=True)")
    return ep


@dataclass(frozen=True)
class Groups:
    """The DeviceMesh ("dp_replicate", "dp_shard", "cp", "pp", "tp") and the process groups cut from it."""

    mesh: object
    dp: object  # data parallel: ranks that read different batches
    tp: object
    pp: object
    cp: object
    grad: object  # data x context parallel: where gradients and loss sums add up
    fsdp_mesh: object  # 1-D ("dp_shard") or 2-D ("dp_replicate", "dp_shard") mesh for FSDP2
    ep_mesh: object = None  # expert parallelism: the ranks that split the experts ("ep")
    edp_mesh: object = None  # and the ranks holding the same experts, the experts' FSDP mesh ("dp_shard_mod_ep")


@dataclass(frozen=True)
class Layout:
    world: int = 1
    dp: int = 1  # data-parallel ranks: each reads its own batch
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context-parallel ranks: one batch, each its slice of the sequence
    shard: int = 1  # ranks of one FSDP / ZeRO shard group (1: no sharding, dp: the whole data-parallel group)
    fsdp: bool = False  # parameters re-gathered in backward too (ZeRO-3), not only optimizer state + gradients
    ep: int = 1  # expert-parallel ranks: data-parallel ranks that split each MoE layer's experts between them
    process: ParallelEnv = field(default_factory=ParallelEnv)  # this process: rank, device
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    groups: Optional[Groups] = None  # None on one process and in a plan

    # ------------------------------------------------------------------ construction

    @classmethod
    def plan(cls, parallel, model, world: int, seq_len: Optional[int] = None,
             torch_version: str = TORCH_VERSION) -> "Layout":
        """The sizes for `world` processes (and rows of `seq_len` tokens), or a LayoutError naming the keys
        that do not fit (or the torch that cannot run them): every layout refusal of the run is here."""
        tp, pp, cp = parallel.tensor.size, parallel.pipeline.size, parallel.context
        if model.num_experts and pp > 1:  # the stages' balance losses never reach the schedule's loss
            raise LayoutError(f"model.num_experts={model.num_experts} with parallel.pipeline.size={pp}: "
                              "mixture-of-experts models do not pipeline yet (docs/moe.md); use pipeline.size=1")
        if model.num_experts and cp > 1:  # each rank would balance its slice of the rows, not the rows
            raise LayoutError(f"model.num_experts={model.num_experts} with parallel.context={cp}: "
                              "mixture-of-experts models have no context parallelism yet (docs/moe.md); "
                              "use context=1")
        if pp > 1 and TorchVersion(torch_version) < PIPELINE_MIN_TORCH:
            raise LayoutError(f"parallel.pipeline.size={pp} needs torch >= 2.13 (this is torch {torch_version}, "
                              "whose pipelining wants a gradient for the positions and labels the stages hand on): "
                              "install the pinned torch==2.13.0, or use pipeline.size=1")
        if pp > 1 and model.tie_word_embeddings:
            raise LayoutError("model.tie_word_embeddings cannot be used with pipeline parallelism "
                              f"(parallel.pipeline.size={pp}: the embedding and the head live on different stages)")
        if cp > 1 and seq_len is not None and seq_len % (2 * cp):
            raise LayoutError(f"data.seq_len ({seq_len}) must be divisible by 2 x parallel.context ({2 * cp}): "
                              "context parallelism gives every rank two chunks of each row (head and tail)")
        if world % (tp * pp * cp):
            raise LayoutError(f"parallel: world size {world} is not divisible by tensor ({tp}) x pipeline ({pp})"
                              + (f" x context ({cp})" if cp > 1 else ""), with_world=True)
        dp = world // (tp * pp * cp)
        if model.num_attention_heads % tp or model.kv_heads % tp:
            raise LayoutError(f"parallel.tensor.size={tp} must divide model.num_attention_heads "
                              f"({model.num_attention_heads}) and the KV heads ({model.kv_heads})")
        stages = pp * model.num_chunks
        if model.num_layers % stages:
            raise LayoutError(f"model.num_layers ({model.num_layers}) is not divisible by pipeline.size ({pp}) x "
                              f"model.num_chunks ({model.num_chunks})")
        zero, full = parallel.zero1.size, full_sharding(parallel)
        if zero > 1 and dp % zero and not full:  # full sharding spans all of dp whatever zero1 says
            raise LayoutError(f"parallel.zero1={zero} does not divide the data-parallel size {dp} (world {world} "
                              f"/ tensor {tp} / pipeline {pp}" + (f" / context {cp}" if cp > 1 else "") + ")",
                              with_world=True)
        shard = dp if (full or zero <= 0) else zero
        ep = expert_size(parallel, model, dp, tp, shard)
        return cls(world, dp, tp, pp, cp, shard, full, ep)

    @classmethod
    def build(cls, env, cfg) -> "Layout":
        """The layout of `cfg` over the launched processes `env` (a ParallelEnv, or the processes of a Layout:
        a new layout, the old one unchanged), process groups attached."""
        if isinstance(env, Layout):
            env = env.process
        sizes = cls.plan(cfg.parallel, cfg.model, env.world_size, cfg.data.seq_len)
        if env.world_size == 1:
            return cls(*sizes.sizes, process=env)
        return sizes._with_mesh(env)

    def _with_mesh(self, env: ParallelEnv) -> "Layout":
        """DeviceMesh ("dp_replicate", "dp_shard", "cp", "pp", "tp"): tp ranks adjacent (fastest links), then
        pp, then context, then data parallel. dp_shard is the zero1 group size (the whole dp group for
        zero1 <= 0 or fsdp). Context ranks read the same batch (each its own slice of the sequence)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep > 1:
            return self._with_expert_mesh(env)
        dp, shard, cp = self.dp, self.shard, self.cp
        mesh = init_device_mesh(env.device.type, (dp // shard, shard, cp, self.pp, self.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "cp", "pp", "tp"))
        dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        grad_mesh = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        if cp > 1:  # gradients are summed over data and context ranks alike: shard over (dp_shard, cp)
            shard_cp = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
            fsdp_mesh = shard_cp if shard == dp else mesh["dp_replicate", "dp_shard_cp"]
        else:
            fsdp_mesh = mesh["dp_shard"] if shard == dp else mesh["dp_replicate", "dp_shard"]
        groups = Groups(mesh, dp_mesh.get_group(), mesh["tp"].get_group(), mesh["pp"].get_group(),
                        mesh["cp"].get_group(), grad_mesh.get_group(), fsdp_mesh)
        return Layout(*self.sizes, process=env, dp_rank=dp_mesh.get_local_rank(),
                      tp_rank=mesh["tp"].get_local_rank(), pp_rank=mesh["pp"].get_local_rank(),
                      cp_rank=mesh["cp"].get_local_rank(), groups=groups)

    def _with_expert_mesh(self, env: ParallelEnv) -> "Layout":
        """Expert parallelism (context 1, parameters sharded over all of dp: `expert_size`): the data-parallel
        dimension split into ("dp_shard_mod_ep", "ep"), ep ranks adjacent. Every parameter is sharded over
        both (flattened: "dp"), the experts over "ep" by expert and over "dp_shard_mod_ep" by FSDP."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(env.device.type, (self.dp // self.ep, self.ep, 1, self.pp, self.tp),
                                mesh_dim_names=("dp_shard_mod_ep", "ep", "cp", "pp", "tp"))
        dp_mesh = mesh["dp_shard_mod_ep", "ep"]._flatten("dp")
        groups = Groups(mesh, dp_mesh.get_group(), mesh["tp"].get_group(), mesh["pp"].get_group(),
                        mesh["cp"].get_group(), dp_mesh.get_group(), dp_mesh, ep_mesh=mesh["ep"],
                        edp_mesh=mesh["dp_shard_mod_ep"])
        return Layout(*self.sizes, process=env, dp_rank=dp_mesh.get_local_rank(),
                      tp_rank=mesh["tp"].get_local_rank(), pp_rank=mesh["pp"].get_local_rank(),
                      cp_rank=0, groups=groups)

    @property
    def sizes(self) -> tuple:
        return self.world, self.dp, self.tp, self.pp, self.cp, self.shard, self.fsdp, self.ep

    # ------------------------------------------------------------------ what the trainer asks

    @property
    def replicate(self) -> int:
        return self.dp // self.shard

    @property
    def rank(self) -> int:
        return self.process.rank

    @property
    def world_size(self) -> int:
        return self.world

    @property
    def device(self) -> torch.device:
        return self.process.device

    @property
    def is_main(self) -> bool:
        return self.process.is_main

    @property
    def distributed(self) -> bool:
        return self.process.distributed

    @property
    def gradient_ranks(self) -> int:
        """The ranks whose gradients are averaged: data x context parallel."""
        return self.dp * self.cp

    @property
    def pipelined(self) -> bool:
        """Each rank holds only its pipeline stages' layers."""
        return self.pp > 1

    @property
    def norm_group(self):
        """The group a gradient norm adds up over (pipeline stages hold different parameters), or None."""
        return self.groups.pp if self.pp > 1 else None

    @property
    def loader_shard(self) -> tuple[int, int]:
        """(this rank's index, the number of ranks) among those that read different batches."""
        return self.dp_rank, self.dp

    def tokens_per_step(self, tokens_on_rank: int) -> int:
        """A step's tokens over all data-parallel ranks, from one rank's."""
        return tokens_on_rank * self.dp

    def sum_over_data_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed in place over the data-parallel group (a no-op on one process); returns `t`."""
        if self.distributed:
            dist.all_reduce(t, group=self.groups.dp)
        return t

    def sum_over_gradient_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed in place over data x context ranks (where loss sums add up); returns `t`."""
        if self.distributed:
            dist.all_reduce(t, group=self.groups.grad)
        return t

    def record(self) -> dict:
        """The layout recorded in every checkpoint's trainer state."""
        return {"processes": self.world, "dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep}
