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

from spindle.checkpoint.manager import CheckpointManager, load_checkpoint, local_copy, plan_load
from spindle.config import SpindleConfig, parse_skip_batches, save_resolved_config
from spindle.data.loader import build_train_loader, build_valid_sets
from spindle.errors import SpindleError
from spindle.model.flops import internevo_flops_per_step, model_flops_per_token, parameter_counts
from spindle.model.llama import Transformer, build_model
from spindle.parallel.context import local_slice
from spindle.parallel.mesh import ParallelEnv, build_mesh
from spindle.parallel.parallelize import ModelView, apply_data_parallel, apply_model_parallel
from spindle.parallel.pipeline import PipelineChunk, build_schedule, build_stage_model, stages_of_rank
from spindle.train.metrics import MetricSinks, Progress, batch_shape_stats, format_line, resolve_peak_tflops
from spindle.train.host import cpu_training_mode
from spindle.train.monitor import build_monitor
from spindle.train.optim import DynamicLossScaler, beta2_at, build_optimizer, lr_at, set_schedules

COMPUTE_DTYPES = {
    "torch.float32": torch.float32, "torch.tf32": torch.float32, "torch.bfloat16": torch.bfloat16,
    "torch.float16": torch.float16, "torch.half": torch.float16,
}


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
        if cfg.model.dtype == "torch.tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark

        if env.mesh is None:
            env = self.env = build_mesh(env, cfg.parallel, cfg.model)  # layout errors before any work
        if env.is_main:
            save_resolved_config(cfg, self.run_dir)
        self.n_params = parameter_counts(cfg.model)["total"]
        self.schedule = None
        # the fused head + cross-entropy needs the whole vocabulary on this rank and plain labels
        self._fused_loss = env.tp_size == 1 and cfg.loss.label_smoothing == 0
        if env.pp_size > 1:
            self._build_pipeline()
        else:
            model: Transformer = build_model(cfg.model, self.device, seed=cfg.trainer.seed)
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
        self.save_dir = self._save_dir()
        self._restore()
        self.peak, self.peak_source = resolve_peak_tflops(cfg.trainer.peak_tflops, self.device,
                                                          compute_dtype_key(cfg.model.dtype))
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
        self.monitor = build_monitor(cfg, self.run_dir, env.rank, env.is_main, log=lambda m: self.log(m))

    # ------------------------------------------------------------------ setup

    def _save_dir(self):
        """Open the save folder (local or boto3:) and ping it, so a bad path or an unreachable
        endpoint fails now, before any training. Returns its location (a Path, or a URL)."""
        ck = self.cfg.ckpt
        self.ckpt_manager: Optional[CheckpointManager] = None
        if not ck.enable_save_ckpt:
            return None
        folder = ck.save_ckpt_folder or str(self.run_dir / "ckpt")
        self.ckpt_manager = CheckpointManager(folder, ck, is_writer=self.env.is_main,
                                              distributed=self.env.distributed, log=self.log)
        self.ckpt_manager.ping()
        return self.ckpt_manager.location

    def _restore(self) -> None:
        plan = plan_load(self.cfg.ckpt, self.ckpt_manager.storage if self.ckpt_manager else None)
        self.log(f"checkpoint: {plan.reason}")
        if plan.content == ("hf",):
            from spindle.checkpoint.hf import load_hf_weights

            load_hf_weights(self.raw_model, plan.url)
            return
        if plan.ref is None:
            return
        with local_copy(plan.storage, plan.ref) as path:
            ts = load_checkpoint(path, self.raw_model, self.optimizer, plan.content, partial=self.env.pp_size > 1)
        if "scheduler" in plan.content and ts:
            self.state.updates = ts.get("updates", 0)
            if "scaler" in ts and self.scaler.enabled:
                self.scaler.load_state_dict(ts["scaler"])
        if "sampler" in plan.content and ts:
            self.state.step = ts.get("step", 0)
            self.state.num_consumed_tokens = ts.get("num_consumed_tokens", 0)
            self.state.inf_nan_skip_batches = ts.get("inf_nan_skip_batches", 0)
            self.loader.load_state_dict(ts["loader"])

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _build_pipeline(self) -> None:
        """This rank's stages, parallelized like a whole model, and the pipeline schedule."""
        cfg, env = self.cfg, self.env
        num_stages = env.pp_size * cfg.model.num_chunks
        self.stage_ids = stages_of_rank(env.pp_rank, env.pp_size, cfg.model.num_chunks)
        inner = [build_stage_model(cfg, sid, num_stages, self.device) for sid in self.stage_ids]
        self.raw_model = ModelView(inner)
        self.chunks = [PipelineChunk(apply_model_parallel(m, cfg, env)) for m in inner]
        parts = [apply_data_parallel(c, cfg, env) for c in self.chunks]
        self.is_first, self.is_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        self._pp_denom = 1.0
        self._pp_started = False
        vocab = cfg.model.vocab_size

        def loss_fn(logits, labels):
            loss_sum = self._cross_entropy(logits, labels, vocab)
            return loss_sum * (self.scaler.scale / self._pp_denom)

        self.schedule, _ = build_schedule(cfg, env, parts, self.stage_ids, loss_fn, cfg.data.micro_num)
        self.model = parts[0]

    def _cross_entropy(self, logits, labels, vocab: int) -> torch.Tensor:
        """Sum of token losses (vocabulary-parallel inside `_loss_context` when the head is tensor-parallel)."""
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum",
                               label_smoothing=self.cfg.loss.label_smoothing)

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
        if self.env.cp_size > 1:  # each context rank keeps its slice of the sequence (cu_seqlens stay whole)
            mbs = [{k: v if k == "cu_seqlens" else local_slice(v, self.env.cp_rank, self.env.cp_size).contiguous()
                    for k, v in mb.items()} for mb in mbs]
        scale = self.scaler.scale
        t0 = time.perf_counter()
        if self.schedule is not None:
            self._pipeline_forward_backward(mbs, denom, stats)
        for i, mb in enumerate(mbs if self.schedule is None else []):
            sync = contextlib.nullcontext()
            if i < len(mbs) - 1 and hasattr(model, "no_sync"):
                sync = model.no_sync()  # DDP: reduce gradients once, after the last micro-batch
            with sync, self._loss_context():
                if self._fused_loss:  # head + loss over token chunks: no (N, V) logits (spindle/model/loss.py)
                    with self.autocast():
                        out = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], labels=mb["labels"])
                    (out.loss_sum * (scale / denom)).backward()
                    token_loss, correct = out.token_loss, out.correct
                    loss_sum = out.loss_sum
                else:
                    with self.autocast():
                        logits = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"])
                    loss_sum = self._cross_entropy(logits, mb["labels"], logits.shape[-1])
                    (loss_sum * (scale / denom)).backward()
            with torch.no_grad():
                labels = mb["labels"].view(-1)
                valid = labels != -100
                if not self._fused_loss:
                    if isinstance(logits, DTensor):  # vocabulary-sharded logits: the loss total only
                        stats[0, 0] += loss_sum.detach().full_tensor().double()
                        stats[1, 0] += valid.sum()
                        continue
                    flat_logits = logits.float().view(-1, logits.shape[-1])
                    token_loss = F.cross_entropy(flat_logits, labels, ignore_index=-100, reduction="none")
                    correct = (flat_logits.argmax(-1) == labels) & valid
                types = mb["type_ids"].view(-1).clamp(max=n_sources - 1)
                for row, values in enumerate((token_loss, valid, correct)):
                    stats[row].index_add_(0, types, values.to(torch.float64))
        fwd_bwd = time.perf_counter() - t0
        stats[:, -1] = stats[:, :-1].sum(1)
        self._all_reduce(stats, group=self.env.grad_group)

        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.scaler.enabled:
            torch._foreach_mul_([p.grad for p in params], 1.0 / scale)
        grad_norm = self._clip_gradients(params, cfg.hybrid_zero_optimizer.clip_grad_norm)
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
        # per-source numbers need full logits: not under tensor parallelism (vocabulary-sharded) or pipeline
        per_source = self.env.tp_size == 1 and self.schedule is None
        for k, name in enumerate(self.loader.source_names if per_source else []):
            if stats[1, k] > 0:
                out[f"loss/{name}"] = (stats[0, k] / stats[1, k]).item()
                out[f"acc/{name}"] = (stats[2, k] / stats[1, k]).item()
                out[f"tokens/{name}"] = int(stats[1, k])
        return out

    def _pipeline_forward_backward(self, mbs: list[dict], denom: float, stats: torch.Tensor) -> None:
        """One step through the pipeline schedule: micro-batches are rows of one stacked batch."""
        for chunk in self.chunks:
            chunk.set_micro_batches([(mb["position_ids"], mb["cu_seqlens"]) for mb in mbs],
                                    first_step=not self._pp_started)
        self._pp_started = True
        self._pp_denom = denom
        inputs = torch.cat([mb["input_ids"] for mb in mbs])
        labels = torch.cat([mb["labels"] for mb in mbs])
        losses: list[torch.Tensor] = []
        with self.autocast(), self._loss_context():
            if self.is_first and self.is_last:
                self.schedule.step(inputs, target=labels, losses=losses)
            elif self.is_first:
                self.schedule.step(inputs)
            elif self.is_last:
                self.schedule.step(target=labels, losses=losses)
            else:
                self.schedule.step()
        if self.is_last:  # the losses came back scaled by scale / denom: undo it for the log
            stats[0, 0] = sum(l.detach().double() for l in losses) * denom / self.scaler.scale
            stats[1, 0] = sum((mb["labels"] != -100).sum() for mb in mbs)
        if self.env.pp_group is not None:  # the last stage's totals, to every stage (then dp reduces)
            dist.all_reduce(stats, group=self.env.pp_group)

    def _clip_gradients(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm over every stage, tensor and data shard; clip to max_norm (0 = no clip).

        Gradients are grouped by kind (plain tensors; DTensors per mesh and placement) because the
        foreach kernels refuse to mix them under tensor parallelism.
        """
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            g = p.grad
            key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else ("plain",)
            groups.setdefault(key, []).append(g)
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for grads in groups.values():
            n = torch.nn.utils.get_total_norm(grads, foreach=True)
            if isinstance(n, DTensor):
                n = n.full_tensor()
            sq += n.double() ** 2
        if self.env.pp_size > 1:
            dist.all_reduce(sq, group=self.env.pp_group)
        norm = sq.sqrt().float()
        if max_norm > 0 and params:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grads in groups.values():
                torch._foreach_mul_(grads, coef.item())
        return norm

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict:
        if self.schedule is not None:
            return {}  # not run through the pipeline schedule yet (docs/parallelism.md, limits)
        self.model.eval()
        out = {}
        for name, mbs in self.valid_sets.items():
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            for mb in mbs:
                mb = self._to_device(mb)
                total[1] += (mb["labels"] != -100).sum()
                if self.env.cp_size > 1:
                    mb = {k: v if k == "cu_seqlens" else local_slice(v, self.env.cp_rank, self.env.cp_size)
                          .contiguous() for k, v in mb.items()}
                with self.autocast(), self._loss_context():
                    if self._fused_loss:
                        loss_sum = self.model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"],
                                              labels=mb["labels"]).loss_sum.detach()
                    else:
                        logits = self.model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"])
                        loss_sum = self._cross_entropy(logits, mb["labels"], logits.shape[-1]).detach()
                total[0] += (loss_sum.full_tensor() if isinstance(loss_sum, DTensor) else loss_sum).double()
            total[0:1] = self._all_reduce(total[0:1].clone(), group=self.env.grad_group)
            total[1:2] = self._all_reduce(total[1:2].clone())
            loss = (total[0] / total[1].clamp(min=1)).item()
            out[f"val/{name}_loss"] = loss
            out[f"val/{name}_plex"] = math.exp(min(loss, 50.0))
        return out

    # ------------------------------------------------------------------ checkpoint

    def save(self, snapshot_slot: Optional[int] = None) -> str:
        ts = self.state.state_dict() | {"loader": self.loader.state_dict(), "scaler": self.scaler.state_dict()}
        where = self.ckpt_manager.save(self.state.step, self.raw_model, self.optimizer, ts, self.cfg.to_dict(),
                                       snapshot_slot=snapshot_slot)
        self.log(f"checkpoint saved: {where}")
        return where

    def _read_stop_file(self) -> Optional[int]:
        path = self.cfg.ckpt.stop_file_path
        value = torch.zeros(1, dtype=torch.int64)
        if path and self.env.is_main:
            try:
                text = Path(path).read_text().strip()
                value[0] = int(text) if text else 0
            except (OSError, ValueError):
                value[0] = 0
        if self.env.distributed and path:
            dist.broadcast(value, 0)
        return int(value[0]) or None

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        cfg, env, state = self.cfg, self.env, self.state
        total = cfg.data.total_steps
        sinks = MetricSinks(self.run_dir, cfg.trainer.jsonl, cfg.trainer.tensorboard and cfg.enable_tb,
                            cfg.tensorboard_folder) if env.is_main else None
        progress = Progress(total, state.step, cfg.trainer.progress_bar if env.is_main else False)
        # every rank keeps its own log in the run folder; rank 0 also prints to the console
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        rank_log = open(self.run_dir / "logs" / f"rank{env.rank}.log", "a")

        outer_log = self.log

        def printer(line: str) -> None:
            rank_log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank{env.rank} {line}\n")
            rank_log.flush()
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
                    "data_wait": data_wait / elapsed,
                    **{k: v for k, v in m.items() if "/" in k},
                }
                if self.valid_sets and cfg.data.valid_every and state.step % cfg.data.valid_every == 0:
                    record.update(self.validate())
                history.append(record)
                if step % cfg.trainer.log_every == 0 or state.step == total:
                    printer(format_line(record))
                if env.is_main:
                    sinks.write(record, step)
                    progress.update(state.step, f"loss {m['loss']:.3f}")
                stop = self._read_stop_file()
                quit_now = bool(stop and stop > 0 and state.step >= stop)
                if self.ckpt_manager is not None:
                    due = state.step % every == 0 if math.isfinite(every) else False
                    snap = cfg.ckpt.oss_snapshot_freq
                    if due or state.step == total or quit_now or (stop and state.step == abs(stop)):
                        self.save()
                        saved_at = state.step
                    elif math.isfinite(snap) and state.step % int(snap) == 0:
                        self.save(snapshot_slot=(state.step // int(snap)) % 2)  # two alternating slots
                self.monitor.step_finished(record)
                if quit_now:
                    printer(f"stop file {cfg.ckpt.stop_file_path}: stopping at step {state.step}")
                    break
            if self.ckpt_manager is not None:
                self.ckpt_manager.wait()  # background uploads finish (and get their markers) before we return
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
        return {"history": history, "saved_at": saved_at, "state": state.state_dict()}
