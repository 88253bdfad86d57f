"""The training loop: step, accumulate, clip, skip non-finite steps, validate, save, log.

One optimizer step:
  1. fetch `micro_num` micro-batches (the loader prefetches the next step in a thread);
  2. count the valid labels of the whole step (all micro-batches, all data-parallel ranks): N;
  3. for each micro-batch: forward, loss = sum of token losses / N (times dp size, because data
     parallel averages gradients over ranks), backward — so the step's gradient is the gradient of
     the mean token loss of the step, however the tokens are split into micro-batches or ranks;
  4. unscale (fp16), measure the gradient norm, clip; a non-finite loss or norm skips the update;
  5. set lr and beta2 from their schedules, optimizer step, loss-scaler update;
  6. log, validate every `valid_every`, checkpoint every `checkpoint_every` / on the stop file.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from spindle.checkpoint.manager import CheckpointManager, LoadPlan, plan_load, restore
from spindle.config import SpindleConfig, parse_skip_batches, save_resolved_config
from spindle.data.loader import build_train_loader, build_valid_sets
from spindle.model.flops import internevo_flops_per_step, model_flops_per_token, parameter_counts
from spindle.model.llama import Transformer, build_model
from spindle.parallel.context import local_slice
from spindle.parallel.dims import full_sharding
from spindle.parallel.mesh import ParallelEnv, build_mesh
from spindle.parallel.parallelize import ModelView, apply_data_parallel, apply_model_parallel, gradient_sync
from spindle.parallel.pipeline import PipelineChunk, build_schedule, build_stage_model, stages_of_rank
from spindle.errors import SpindleError
from spindle.hardware import cuda_backend_mode, resolve_peak_tflops
from spindle.train.metrics import (
    LineFile, MetricSinks, Progress, RunFolderFull, batch_shape_stats, continue_tensorboard, format_line,
    memory_metrics, synchronize,
)
from spindle.train.host import cpu_training_mode
from spindle.train.monitor import build_monitor
from spindle.train.optim import (DynamicLossScaler, beta2_at, build_optimizer, clip_gradients, lr_at, set_schedules,
                                 unscale_gradients)

COMPUTE_DTYPES = {
    "torch.float32": torch.float32, "torch.tf32": torch.float32, "torch.bfloat16": torch.bfloat16,
    "torch.float16": torch.float16, "torch.half": torch.float16,
}


def sharded_token_statistics(logits: DTensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token plain cross-entropy and "the label has the top logit" for logits sharded over the
    vocabulary (`Shard(-1)` on the tensor-parallel mesh), without gathering them: each rank reduces its
    slice (max, sum of exp, the label's logit where the label falls in its slice), and three all-reduces
    over the (N,) rows combine them. `loss_parallel` gives the summed loss only, hence our own."""
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
    valid = labels != -100
    token_loss = torch.where(valid, row_max + sum_exp.log() - picked, 0.0)
    return token_loss, (picked >= row_max) & valid


def compute_dtype_key(dtype: str) -> str:
    return {"torch.float32": "fp32", "torch.tf32": "tf32", "torch.bfloat16": "bf16"}.get(dtype, "fp16")


@dataclass
class TrainState:
    """Counters that go into every checkpoint."""

    step: int = 0  # batch_count: the next batch to train (skipped batches included)
    updates: int = 0  # successful optimizer updates (drives the LR / beta2 schedules)
    num_consumed_tokens: int = 0
    inf_nan_skip_batches: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)


class Trainer:
    def __init__(self, cfg: SpindleConfig, env: ParallelEnv, log=print):
        self.cfg, self.env, self.log = cfg, env, log
        self.run_dir = cfg.run_dir
        self.device = env.device
        torch.manual_seed(cfg.trainer.seed)
        if cfg.trainer.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.trainer.num_threads)

        if env.mesh is None:
            env = self.env = build_mesh(env, cfg.parallel, cfg.model)  # layout errors before any work
        try:
            self._build(cfg, env)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: SpindleConfig, env: ParallelEnv) -> None:
        self.ckpt_manager = self._open_save_folder()
        self.save_dir = self.ckpt_manager.location if self.ckpt_manager else None
        if env.is_main:
            save_resolved_config(cfg, self.run_dir)
        self.n_params = parameter_counts(cfg.model)["total"]
        self.schedule = None
        # the fused head + cross-entropy needs the whole vocabulary on this rank
        self._fused_loss = env.tp_size == 1
        if env.pp_size > 1:
            self._build_pipeline()
        else:
            # [gpu] built on meta: sharded first, then each rank allocates and initialises its shards
            model: Transformer = build_model(cfg.model.to_args(), "meta")
            self.raw_model = model  # parameter names of the plain model, for checkpoints and the optimizer
            self.model = apply_data_parallel(apply_model_parallel(model, cfg, env), cfg, env)
        self.optimizer = build_optimizer(self.raw_model, cfg.adam, self.device.type)
        self.compute_dtype = COMPUTE_DTYPES[cfg.model.dtype]
        self.scaler = DynamicLossScaler.from_config(cfg.grad_scaler, enabled=self.compute_dtype == torch.float16)
        self.state = TrainState()
        self.skip = parse_skip_batches(cfg.data.skip_batches)
        self.loader = build_train_loader(cfg.data, cfg.model.vocab_size, self.run_dir / "data_cache",
                                         env.dp_rank, env.dp_size)
        self.valid_sets = build_valid_sets(cfg.data, cfg.model.vocab_size)
        self.peak, self.peak_source = resolve_peak_tflops(cfg.trainer.peak_tflops, self.device,
                                                          compute_dtype_key(cfg.model.dtype))
        self._restore()  # last: nothing may draw from the global RNG between the restore and the first step
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
        self.monitor = build_monitor(cfg, self.run_dir, env.rank, env.is_main, log=lambda m: self.log(m))

    # ------------------------------------------------------------------ setup

    def _open_save_folder(self) -> Optional[CheckpointManager]:
        """Open the save folder (local or boto3:): refuse foreign checkpoints, lock it, ping it, so a bad
        path, a folder in use or an unreachable endpoint fails now, before any training."""
        ck = self.cfg.ckpt
        if not ck.enable_save_ckpt:
            return None
        folder = ck.save_ckpt_folder or str(self.run_dir / "ckpt")
        manager = CheckpointManager(folder, ck, job=self.cfg.JOB_NAME, is_writer=self.env.is_main,
                                    distributed=self.env.distributed, device=self.device, log=self.log,
                                    alert=lambda kind, msg: self.monitor.alert(kind, msg))
        self.ckpt_manager = manager  # close() releases what open() took, also when open() fails half-way
        manager.open()
        return manager

    def _restore(self) -> None:
        plan: LoadPlan = plan_load(self.cfg.ckpt, self.ckpt_manager.storage if self.ckpt_manager else None)
        self.log(f"checkpoint: {plan.reason}")
        if self.ckpt_manager is not None:
            self.lineage = self.ckpt_manager.adopt(plan)
        if plan.kind == "hf":
            from spindle.checkpoint.hf import load_hf_weights

            load_hf_weights(self.raw_model, plan.url)
            return
        if plan.ref is None:
            return
        ts = restore(plan, self.raw_model, self.optimizer, partial=self.env.pp_size > 1, log=self.log)
        if "scheduler" in plan.content:
            self.state.updates = ts["updates"]
            if "scaler" in ts and self.scaler.enabled:
                self.scaler.load_state_dict(ts["scaler"])
        if "sampler" in plan.content:
            self.state.step = ts["step"]
            self.state.num_consumed_tokens = ts["num_consumed_tokens"]
            self.state.inf_nan_skip_batches = ts["inf_nan_skip_batches"]
            self.loader.load_state_dict(ts["loader"])

    def close(self) -> None:
        """Confirm the last uploads and release the save folder (fit() does this when it ends)."""
        if getattr(self, "ckpt_manager", None) is not None:
            self.ckpt_manager.close()

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _build_pipeline(self) -> None:
        """This rank's stages, parallelized like a whole model, and the pipeline schedule."""
        cfg, env = self.cfg, self.env
        num_stages = env.pp_size * cfg.model.num_chunks
        self.stage_ids = stages_of_rank(env.pp_rank, env.pp_size, cfg.model.num_chunks)
        inner = [build_stage_model(cfg, sid, num_stages, torch.device("meta")) for sid in self.stage_ids]  # [gpu]
        self.raw_model = ModelView(inner)
        cp_group = env.cp_group if env.cp_size > 1 else None
        self.chunks = [PipelineChunk(apply_model_parallel(m, cfg, env), cfg.loss.label_smoothing, cp_group)
                       for m in inner]
        parts = [apply_data_parallel(c, cfg, env) for c in self.chunks]
        self.is_first, self.is_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        # a schedule runs each stage's shape-inference forward on micro-batch 0 at its first step and
        # whenever it switches between training and evaluation (torch.distributed.pipelining); one
        # schedule per micro-batch count (rampup_batch_size changes it), built when first needed
        self._pp_schedules: dict[int, object] = {}
        self._pp_mode: dict[int, str] = {}  # micro-batch count -> "train" / "eval" of that schedule's last step
        self._pp_loss_factor = 1.0  # scale / denom while training, 1 for validation
        self._pp_stats: Optional[torch.Tensor] = None  # per-source sums the last stage adds to

        last_chunk = self.chunks[self.stage_ids.index(num_stages - 1)] if self.is_last else None

        def loss_fn(output, target):
            # target rows are (labels, type_ids) of one micro-batch, so per-source statistics survive
            # the schedule's micro-batch split; the loss of the schedule's shape-inference pass is not counted
            labels, types = target[:, 0], target[:, 1]
            stats = None if last_chunk.last_forward_was_shape_inference else self._pp_stats
            if isinstance(output, tuple):  # the stage ran the fused head + loss (PipelineChunk)
                loss_sum, token_loss, correct = output
                loss_sum = loss_sum.sum()  # shape (1,) -> ()
                if stats is not None:
                    with torch.no_grad():
                        self._add_source_stats(stats, types, token_loss, labels.flatten() != -100, correct)
            else:  # vocabulary-sharded logits (tensor-parallel head)
                loss_sum = self._token_statistics(output, labels, types, stats)
            return loss_sum * self._pp_loss_factor

        self._pp_parts, self._pp_loss_fn = parts, loss_fn
        self.schedule = self._schedule_for(cfg.data.micro_num)
        self.model = parts[0]

    def _schedule_for(self, n: int):
        if n not in self._pp_schedules:
            self._pp_schedules[n], _ = build_schedule(self.cfg, self.env, self._pp_parts, self.stage_ids,
                                                      self._pp_loss_fn, n, log=self.log)
        return self._pp_schedules[n]

    def _cross_entropy(self, logits, labels, label_smoothing: Optional[float] = None) -> torch.Tensor:
        """Sum of token losses (vocabulary-parallel inside `_loss_context` when the head is tensor-parallel);
        `label_smoothing` defaults to the configured one (the training loss)."""
        smoothing = self.cfg.loss.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum",
                               label_smoothing=smoothing)

    def _token_statistics(self, logits, labels, types, stats: Optional[torch.Tensor]) -> torch.Tensor:
        """The training loss (summed, with grad) of unfused logits; adds each source's summed plain
        cross-entropy, valid tokens and argmax hits to `stats` (3, sources + 1) when given. Logits may be
        vocabulary-sharded DTensors (tensor-parallel head): the statistics then come from the shards."""
        if isinstance(logits, DTensor):
            loss_sum = self._cross_entropy(logits, labels)
            if stats is not None:
                with torch.no_grad():
                    token_loss, correct = sharded_token_statistics(logits, labels.flatten())
                    self._add_source_stats(stats, types, token_loss, labels.flatten() != -100, correct)
            return loss_sum
        flat = logits.float().flatten(0, -2)
        labels = labels.flatten()
        token_loss = F.cross_entropy(flat, labels, ignore_index=-100, reduction="none")
        smoothing = self.cfg.loss.label_smoothing
        loss_sum = token_loss.sum() if smoothing == 0 else \
            F.cross_entropy(flat, labels, ignore_index=-100, reduction="sum", label_smoothing=smoothing)
        if stats is not None:
            with torch.no_grad():
                valid = labels != -100
                correct = (flat.argmax(-1) == labels) & valid
                self._add_source_stats(stats, types, token_loss.detach(), valid, correct)
        return loss_sum

    @staticmethod
    def _add_source_stats(stats: torch.Tensor, types, token_loss, valid, correct) -> None:
        """Per-source sums of token loss, valid tokens and hits into columns 0..sources-1 of `stats`."""
        types = types.reshape(-1).clamp(max=stats.shape[1] - 2)
        for row, values in enumerate((token_loss, valid, correct)):
            stats[row].index_add_(0, types, values.to(torch.float64))

    def _loss_context(self):
        """loss_parallel: cross-entropy on vocabulary-sharded logits, forward and backward, no gather."""
        if self.env.tp_size > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        """Sum over the data-parallel group (default), or over `group`."""
        if self.env.distributed:
            dist.all_reduce(t, op=op, group=group or self.env.dp_group)
        return t

    # ------------------------------------------------------------------ one step

    def _to_device(self, mb: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}

    def _context_slices(self, mbs: list[dict]) -> list[dict]:
        """Under context parallelism each rank keeps its slice of the sequence (cu_seqlens stay whole)."""
        if self.env.cp_size == 1:
            return mbs
        return [{k: v if k == "cu_seqlens" else local_slice(v, self.env.cp_rank, self.env.cp_size).contiguous()
                 for k, v in mb.items()} for mb in mbs]

    def train_step(self, micro_batches: list[dict]) -> dict:
        model, cfg = self.model, self.cfg
        model.train()
        mbs = [self._to_device(mb) for mb in micro_batches]
        n_sources = max(1, len(self.loader.source_names))
        # loss sum, valid tokens, correct predictions per source; [-1] slot is the total
        stats = torch.zeros(3, n_sources + 1, dtype=torch.float64, device=self.device)
        n_valid = sum((mb["labels"] != -100).sum() for mb in mbs).to(torch.float64)
        n_valid = self._all_reduce(n_valid.clone())
        # gradients are averaged over data x context ranks: scale the loss up by their number
        denom = n_valid.clamp(min=1).item() / (self.env.dp_size * self.env.cp_size)
        mbs = self._context_slices(mbs)
        scale = self.scaler.scale
        t0 = time.perf_counter()
        if self.schedule is not None:
            self._pipeline_run(mbs, "train", scale / denom, stats)
        for i, mb in enumerate(mbs if self.schedule is None else []):
            # [gpu] gradients reduced once per step, after the last micro-batch (DDP and FSDP2)
            sync = gradient_sync(model, i, len(mbs), full_sharding(cfg.parallel))
            with sync, self._loss_context():
                if self._fused_loss:  # head + loss over token chunks: no (N, V) logits (spindle/model/loss.py)
                    with self.autocast():
                        out = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], labels=mb["labels"],
                                    label_smoothing=cfg.loss.label_smoothing)
                    (out.loss_sum * (scale / denom)).backward()
                    token_loss, correct = out.token_loss, out.correct
                    with torch.no_grad():
                        self._add_source_stats(stats, mb["type_ids"], token_loss.detach(),
                                               mb["labels"].view(-1) != -100, correct)
                else:  # tensor-parallel head: vocabulary-sharded (N, V) logits
                    with self.autocast():
                        logits = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"])
                    loss_sum = self._token_statistics(logits, mb["labels"], mb["type_ids"], stats)
                    (loss_sum * (scale / denom)).backward()
        synchronize(self.device)  # [gpu] the kernels, not their enqueueing
        fwd_bwd = time.perf_counter() - t0
        stats[:, -1] = stats[:, :-1].sum(1)
        self._all_reduce(stats, group=self.env.grad_group)

        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.scaler.enabled:  # [gpu] grouped by tensor kind: TP mixes DTensor and plain gradients
            unscale_gradients(params, 1.0 / scale)
        grad_norm = clip_gradients(params, cfg.hybrid_zero_optimizer.clip_grad_norm, self.device,
                                   self.env.pp_group if self.env.pp_size > 1 else None)
        loss = (stats[0, -1] / stats[1, -1].clamp(min=1)).item()
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        lr = lr_at(self.state.updates, cfg.adam.lr, cfg.lr_scheduler)
        beta2 = beta2_at(self.state.updates, cfg.beta2_scheduler)
        if finite:
            set_schedules(self.optimizer, lr, beta2)
            self.optimizer.step()
            self.state.updates += 1
        else:
            self.state.inf_nan_skip_batches += 1
        self.scaler.update(found_inf=not finite)
        self.optimizer.zero_grad(set_to_none=True)

        out = {"loss": loss, "grad_norm": float(grad_norm), "lr": lr, "adam_beta2": beta2,
               "loss_scale": scale, "fwd_bwd_time": round(fwd_bwd, 3), "finite": finite,
               "acc": (stats[2, -1] / stats[1, -1].clamp(min=1)).item()}
        for k, name in enumerate(self.loader.source_names):
            if stats[1, k] > 0:
                out[f"loss/{name}"] = (stats[0, k] / stats[1, k]).item()
                out[f"acc/{name}"] = (stats[2, k] / stats[1, k]).item()
                out[f"tokens/{name}"] = int(stats[1, k])
        return out

    def _pipeline_run(self, mbs: list[dict], mode: str, loss_factor: float, stats: torch.Tensor) -> None:
        """One pass of the schedule over `micro_num` micro-batches (stacked as rows of one batch):
        forward + backward (`mode="train"`) or forward only ("eval"). The last stage adds the loss
        statistics to `stats`, which then reach every stage of the pipeline."""
        for chunk in self.chunks:  # labels only where the fused head + loss runs inside the last stage
            fused = self._fused_loss and chunk.model.output is not None
            chunk.set_micro_batches([(mb["position_ids"], mb["cu_seqlens"], mb["labels"] if fused else None)
                                     for mb in mbs], first_step=self._pp_mode.get(len(mbs)) != mode)
        self._pp_mode[len(mbs)] = mode
        schedule = self._schedule_for(len(mbs))
        # this pass's sums go to a buffer of their own: reducing `stats` itself would count earlier passes again
        local = torch.zeros_like(stats)
        self._pp_loss_factor, self._pp_stats = loss_factor, local
        inputs = torch.cat([mb["input_ids"] for mb in mbs])
        target = torch.stack([torch.cat([mb[k] for mb in mbs]).long() for k in ("labels", "type_ids")], 1)
        run = schedule.step if mode == "train" else schedule.eval
        try:
            with self.autocast(), self._loss_context():
                if self.is_first and self.is_last:
                    run(inputs, target=target)
                elif self.is_first:
                    run(inputs)
                elif self.is_last:
                    run(target=target)
                else:
                    run()
        finally:
            self._pp_stats = None
        for chunk in self.chunks:  # the position side channel must have been consumed exactly
            chunk.check_consumed()
        if self.env.pp_group is not None:  # the last stage's sums, to every stage (then dp reduces)
            dist.all_reduce(local, group=self.env.pp_group)
        stats += local

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict:
        """val/{set}_loss (plain cross-entropy per valid token) and val/{set}_plex for every validation set."""
        self.model.eval()
        out = {}
        for name, mbs in self.valid_sets.items():
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            mbs = [self._to_device(mb) for mb in mbs]
            total[1] = sum((mb["labels"] != -100).sum() for mb in mbs)  # of the whole rows, on every rank
            mbs = self._context_slices(mbs)
            if self.schedule is not None:
                total[0] = self._pipeline_validate(mbs)
            for mb in mbs if self.schedule is None else []:
                with self.autocast(), self._loss_context():
                    if self._fused_loss:
                        loss_sum = self.model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"],
                                              labels=mb["labels"]).loss_sum.detach()
                    else:  # the plain cross-entropy, as the fused path reports (no label smoothing)
                        logits = self.model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"])
                        loss_sum = self._cross_entropy(logits, mb["labels"], label_smoothing=0.0).detach()
                total[0] += (loss_sum.full_tensor() if isinstance(loss_sum, DTensor) else loss_sum).double()
            total[0:1] = self._all_reduce(total[0:1].clone(), group=self.env.grad_group)
            total[1:2] = self._all_reduce(total[1:2].clone())
            loss = (total[0] / total[1].clamp(min=1)).item()
            out[f"val/{name}_loss"] = loss
            out[f"val/{name}_plex"] = math.exp(min(loss, 50.0))
        return out

    def _pipeline_validate(self, mbs: list[dict]) -> torch.Tensor:
        """Summed loss of a validation set through the schedule's forward-only pass, in groups of
        `micro_num` micro-batches; a short last group is padded with copies that carry no labels."""
        n = self.cfg.data.micro_num
        stats = torch.zeros(3, 2, dtype=torch.float64, device=self.device)
        for start in range(0, len(mbs), n):
            group = mbs[start:start + n]
            filler = {**group[-1], "labels": torch.full_like(group[-1]["labels"], -100)}
            self._pipeline_run(group + [filler] * (n - len(group)), "eval", 1.0, stats)
        return stats[0].sum()

    # ------------------------------------------------------------------ checkpoint

    def save(self, snapshot: bool = False) -> str:
        ts = self.state.state_dict() | {"loader": self.loader.state_dict(), "scaler": self.scaler.state_dict()}
        where = self.ckpt_manager.save(self.state.step, self.raw_model, self.optimizer, ts, self.cfg.to_dict(),
                                       snapshot=snapshot)
        self.log(f"checkpoint saved: {where}")
        return where

    def _step_signals(self, write_failed: bool) -> tuple[Optional[int], bool]:
        """What every rank must agree on after a step, in one collective: the stop file's value (rank 0
        reads it) and whether a rank could not write its metrics or log."""
        path = self.cfg.ckpt.stop_file_path
        value = torch.zeros(2, dtype=torch.int64, device=self.device)  # a collective's tensor lives on its device
        if path and self.env.is_main:
            try:
                text = Path(path).read_text().strip()
                value[0] = int(text) if text else 0
            except (OSError, ValueError):
                value[0] = 0
        value[1] = int(write_failed)
        if self.env.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        stop, failed = (int(v) for v in value.tolist())
        return stop or None, bool(failed)

    def _acted_on_stop_file(self, stop: int, say) -> None:
        """After "save and quit at step N": reset the file to 0, as InternEvo does, so a restart trains on
        to total_steps instead of quitting again after one step."""
        path = self.cfg.ckpt.stop_file_path
        saved = f"checkpoint saved at step {self.state.step}" if self.ckpt_manager is not None else \
            "saving is off (ckpt.enable_save_ckpt=False), so nothing was saved"
        say(f"stop file {path}: asked to stop at step {stop}; stopping at step {self.state.step} ({saved})")
        if self.env.is_main:
            try:
                Path(path).write_text("0\n")
                say(f"stop file {path}: reset to 0, a restart continues to data.total_steps")
            except OSError as exc:
                say(f"stop file {path}: could not reset it to 0 ({exc.strerror}); a restart would stop again")

    def _stop_after_write_failure(self, failure: Optional[RunFolderFull]) -> None:
        """The run folder cannot be written (a full disk): save what can be saved, then stop with one line."""
        what = str(failure) if failure is not None else "another rank could not write its log"
        saved = ""
        if self.ckpt_manager is not None:
            try:
                saved = f"; checkpoint of step {self.state.step} saved to {self.save()}"
            except SpindleError as exc:
                saved = f"; the checkpoint of step {self.state.step} could not be saved either ({exc})"
        raise SpindleError(f"{what}: training stopped after step {self.state.step}{saved}")

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        cfg, env, state = self.cfg, self.env, self.state
        total = cfg.data.total_steps
        tensorboard = cfg.trainer.tensorboard and cfg.enable_tb
        if env.is_main and tensorboard:
            continue_tensorboard(cfg.resume_tb_folder, Path(cfg.tensorboard_folder or self.run_dir / "tensorboard"),
                                 self.log)
        sinks = MetricSinks(self.run_dir, cfg.trainer.jsonl, tensorboard, cfg.tensorboard_folder) \
            if env.is_main else None
        progress = Progress(total, state.step, cfg.trainer.progress_bar if env.is_main else False)
        # every rank keeps its own log in the run folder; rank 0 also prints to the console
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        rank_log = LineFile(self.run_dir / "logs" / f"rank{env.rank}.log")

        outer_log = self.log

        def printer(line: str) -> None:
            rank_log.write_line(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank{env.rank} {line}")
            if env.is_main:
                progress.print(line)

        self.log = printer
        history: list[dict] = []
        every = cfg.ckpt.checkpoint_every
        saved_at = None
        self.monitor.start()
        # CPU: flush denormals, keep freed memory for reuse (spindle/train/host.py); undone at the end
        host_mode = contextlib.ExitStack()
        host_mode.enter_context(cpu_training_mode(self.device.type == "cpu"))
        # [gpu] TF32 for torch.tf32 and the cudnn keys, for this fit only (were process-wide, set in __init__)
        host_mode.enter_context(cuda_backend_mode(self.device, cfg.model.dtype, cfg.cudnn_deterministic,
                                                  cfg.cudnn_benchmark))
        if state.step >= total:
            self.log(f"already at data.total_steps={total} (the run resumed at step {state.step}): nothing to train; "
                     "raise data.total_steps to train further")
        try:
            while state.step < total:
                step = state.step
                self.monitor.step_started(step)
                t_start = time.perf_counter()
                batch = self.loader.next_step(step)
                data_wait = time.perf_counter() - t_start
                if step in self.skip:
                    state.step += 1
                    continue
                m = self.train_step(batch)
                state.step += 1
                synchronize(self.device)  # [gpu] the optimizer's kernels too
                elapsed = time.perf_counter() - t_start
                tokens_local = sum(mb["labels"].numel() for mb in batch)
                tokens_global = tokens_local * env.dp_size
                if m.pop("finite"):
                    state.num_consumed_tokens += tokens_global
                sequences = sum(mb["input_ids"].shape[0] for mb in batch) * env.dp_size
                flops = internevo_flops_per_step(cfg.model, cfg.data.seq_len, sequences)
                tgs = tokens_global / env.world_size / elapsed
                record = {
                    "tflops": flops / elapsed / env.world_size / 1e12, "step": step, "loss": m["loss"],
                    "tgs (tokens/gpu/second)": round(tgs, 2), "lr": m["lr"], "loss_scale": m["loss_scale"],
                    "grad_norm": m["grad_norm"], "micro_num": len(batch),
                    "num_consumed_tokens": state.num_consumed_tokens,
                    "inf_nan_skip_batches": state.inf_nan_skip_batches, **batch_shape_stats(batch),
                    "adam_beta2": m["adam_beta2"], "fwd_bwd_time": m["fwd_bwd_time"],
                    "mfu": (self.flops_per_token * tgs / 1e12 / self.peak) if self.peak else 0.0,
                    "acc": m["acc"], "perplexity": math.exp(min(m["loss"], 50.0)),
                    "data_wait": data_wait / elapsed, **memory_metrics(self.device),  # [gpu] {} on CPU
                    **{k: v for k, v in m.items() if "/" in k},
                }
                if self.valid_sets and cfg.data.valid_every and state.step % cfg.data.valid_every == 0:
                    results = self.validate()
                    record.update(results)
                    printer(f"validation after step {step}: " + ", ".join(
                        f"{k[4:-5]} loss {v:.4f} (perplexity {results[k[:-5] + '_plex']:.4g})"
                        for k, v in results.items() if k.endswith("_loss")))
                history.append(record)
                failure = None
                try:
                    if step % cfg.trainer.log_every == 0 or state.step == total:
                        printer(format_line(record))
                    if env.is_main:
                        sinks.write(record, step)
                        progress.update(state.step, f"loss {m['loss']:.3f}")
                except RunFolderFull as exc:
                    failure = exc
                stop, failed = self._step_signals(failure is not None)
                if failed:
                    self._stop_after_write_failure(failure)
                quit_now = bool(stop and stop > 0 and state.step >= stop)
                if self.ckpt_manager is not None:
                    due = state.step % every == 0 if math.isfinite(every) else False
                    snap = cfg.ckpt.oss_snapshot_freq
                    final = state.step == total and cfg.ckpt.save_final
                    if due or final or quit_now or (stop and state.step == abs(stop)):
                        self.save()
                        saved_at = state.step
                    elif math.isfinite(snap) and state.step % int(snap) == 0:
                        self.save(snapshot=True)  # the manager alternates the two slots
                self.monitor.step_finished(record)
                if quit_now:
                    self._acted_on_stop_file(stop, printer)
                    break
            self.close()  # background uploads confirmed (and marked) before we return; locks released
        except BaseException as exc:
            self.monitor.exception(exc)
            raise
        finally:
            host_mode.close()
            self.monitor.close()
            rank_log.close()
            self.log = outer_log  # the rank log is closed: later messages (a save after fit) go where they went
            progress.close()
            if sinks is not None:
                sinks.close()
            self.loader.close()
            with contextlib.suppress(Exception):  # after an error: the folders are released all the same
                self.close()
        return {"history": history, "saved_at": saved_at, "state": state.state_dict()}
