"""AdamW parameter groups, the LR and beta2 schedules (pure functions), the fp16 loss scaler, and the
gradient passes between backward and the optimizer step (unscale, global norm, clip)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from spindle.config import AdamConfig, Beta2SchedulerConfig, GradScalerConfig, LrSchedulerConfig


# ----------------------------------------------------------------------------- schedules


def lr_at(update: int, base_lr: float, sched: LrSchedulerConfig) -> float:
    """Learning rate of optimizer update `update` (0-based), InternEvo's FineTuneCosineAnnealingWarmupLR.

    0 for `init_steps` updates; then a linear warmup over int(total_steps * warmup_ratio) updates
    reaching base_lr at its last one; then cosine from base_lr down to eta_min at total_steps.
    (InternEvo prints the rate the scheduler will use next; we print the rate this step used.)
    """
    total = sched.total_steps
    warmup = int(total * sched.warmup_ratio)
    k = update - sched.init_steps
    if k < 0:
        return 0.0
    if k < warmup:
        return base_lr * (k + 1) / warmup
    span = max(1, total - sched.init_steps - warmup)
    t = min(k - warmup, span)
    return sched.eta_min + (base_lr - sched.eta_min) * (1 + math.cos(math.pi * t / span)) / 2


def beta2_at(update: int, sched: Beta2SchedulerConfig) -> float:
    """InternEvo's Beta2Scheduler: max(init_beta2, 1 - 1 / iter**c) with iter = update + 1; constant if c = 0."""
    if sched.c <= 0:
        return sched.init_beta2
    return max(sched.init_beta2, 1.0 - 1.0 / (update + 1) ** sched.c)


# ----------------------------------------------------------------------------- optimizer


def _kind(t: torch.Tensor) -> tuple:
    """Plain tensor, or DTensor of one (mesh, placements): the kernels that take many tensors at once want one."""
    return (id(t.device_mesh), t.placements) if isinstance(t, DTensor) else ("plain",)


def param_groups(model: nn.Module, adam: AdamConfig) -> list[dict]:
    """Decay the matrices; exempt norms and biases (1-D tensors) unless `decay_norm_and_bias`. Each of the
    two is split by kind (`_kind`): fused AdamW refuses a group that mixes plain tensors and DTensors, as
    tensor parallelism without sequence parallelism leaves the norms plain next to sharded biases (qkv
    biases under TP crashed the first step)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 or adam.decay_norm_and_bias else no_decay).append(p)
    groups = []
    for name, params, weight_decay in (("default", decay, adam.weight_decay), ("no_decay", no_decay, 0.0)):
        kinds: dict[tuple, list] = {}
        for p in params:
            kinds.setdefault(_kind(p), []).append(p)
        groups += [{"params": ps, "weight_decay": weight_decay, "name": name} for ps in kinds.values()]
    return groups or [{"params": [], "weight_decay": adam.weight_decay, "name": "default"}]


def build_optimizer(model: nn.Module, adam: AdamConfig, device_type: str) -> torch.optim.AdamW:
    # fused AdamW: one kernel per parameter instead of ~10 foreach passes; on CPU too (measured at
    # 10M parameters: 7.7 ms per step against 20-29 ms for foreach, docs/LOG.md)
    fused = adam.fused if adam.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, adam),
        lr=adam.lr,
        betas=(adam.adam_beta1, adam.adam_beta2),
        eps=adam.adam_eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def set_schedules(opt: torch.optim.Optimizer, lr: float, beta2: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
        group["betas"] = (group["betas"][0], beta2)


# ----------------------------------------------------------------------------- gradients


def gradient_groups(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The gradients of `params` grouped by kind: plain tensors together, DTensors per (mesh, placements).

    The foreach kernels refuse a list that mixes tensors and DTensors, or DTensors on different meshes
    or placements: tensor parallelism without FSDP (or without sequence parallelism) leaves the norms
    plain tensors next to the sharded projections. Every pass over all gradients goes group by group."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        groups.setdefault(_kind(g), []).append(g)
    return list(groups.values())


def unscale_gradients(params: list[torch.Tensor], inv_scale: float) -> None:
    """Multiply every gradient by 1 / loss scale (fp16), in place."""
    for grads in gradient_groups(params):
        torch._foreach_mul_(grads, inv_scale)


def clip_gradients(params: list[torch.Tensor], max_norm: float, device: torch.device,
                   pp_group: Optional[object] = None) -> torch.Tensor:
    """Global gradient norm over every stage, tensor and data shard; clip to max_norm (0 = no clip).

    Each group's norm is a DTensor's full norm (its shards reduced over its mesh) or a plain tensor's;
    pipeline stages hold different parameters, so their squared norms add up over `pp_group`."""
    groups = gradient_groups(params)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for grads in groups:
        n = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq += n.double() ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    norm = sq.sqrt().float()
    if max_norm > 0 and groups:
        # the coefficient stays on the device (no host sync); the same values as a Python scalar for
        # the fp32 gradients of fp32 master weights. DTensor gradients take it as replicated.
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        with implicit_replication():
            for grads in groups:
                torch._foreach_mul_(grads, coef)
    return norm


# ----------------------------------------------------------------------------- loss scaling


@dataclass
class DynamicLossScaler:
    """fp16 dynamic loss scaling with InternEvo's keys.

    PyTorch's GradScaler has growth/backoff but no hysteresis and no min/max scale, which the seed
    config sets, so this is our own (small) implementation. Disabled (scale 1) for bf16 and fp32:
    their exponent range does not need it.
    """

    scale: float = 1.0
    enabled: bool = False
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    growth_tracker: int = 0
    hysteresis_tracker: int = 2

    @classmethod
    def from_config(cls, cfg: GradScalerConfig, enabled: bool) -> "DynamicLossScaler":
        if not enabled:
            return cls(scale=1.0, enabled=False)
        return cls(
            scale=cfg.fp16.initial_scale, enabled=True, growth_factor=cfg.growth_factor,
            backoff_factor=cfg.backoff_factor, growth_interval=cfg.fp16.growth_interval,
            hysteresis=cfg.hysteresis, min_scale=cfg.fp16.min_scale, max_scale=cfg.max_scale,
            hysteresis_tracker=cfg.hysteresis,
        )

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            # back off only after `hysteresis` overflows; every overflow restarts the growth count
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = min(self.scale * self.growth_factor, self.max_scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
