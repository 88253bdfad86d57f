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

from spindle.checkpoint.loading import LoadPlan, plan_load, restore
from spindle.checkpoint.manager import CheckpointManager
from spindle.config import SpindleConfig, parse_skip_batches, save_resolved_config
from spindle.data.batch import Batch
from spindle.data.loader import build_train_loader, build_valid_sets
from spindle.dtypes import compute_dtype
from spindle.data.tokenizer_identity import checkpoint_files, run_tokenizer
from spindle.errors import SpindleError
from spindle.hardware import cuda_backend_mode, mfu_peak
from spindle.interop.hf_start import model_from_hf_folder
from spindle.interop.tokenizer_check import check_start
from spindle.model.flops import model_flops_per_token, parameter_counts
from spindle.parallel.layout import Layout
from spindle.parallel.mesh import ParallelEnv
from spindle.parallel.setup import build_training
from spindle.train.controls import acted_on_stop_file, step_signals
from spindle.train.host import RunRNG, cpu_training_mode, torch_threads
from spindle.train.long_eval import LongEval
from spindle.train.metrics import (
    LineFile, MetricSinks, Progress, RunFolderFull, continue_tensorboard, format_line, format_validation, step_record,
    step_statistics, synchronize,
)
from spindle.train.monitor import build_monitor
from spindle.train.signals import SignalSave
from spindle.train.optim import (
    DynamicLossScaler, beta2_at, build_optimizer, clip_gradients, lr_at, set_schedules, unscale_gradients,
)
from spindle.train.resume_check import check_resume, run_layout
from spindle.train.validation import validate_sets


@dataclass
class TrainState:
    """Counters that go into every checkpoint."""

    step: int = 0  # batch_count: the next batch to train (skipped batches included)
    updates: int = 0  # successful optimizer updates (drives the LR / beta2 schedules)
    num_consumed_tokens: int = 0
    inf_nan_skip_batches: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict, content: tuple[str, ...]) -> None:
        """The counters a checkpoint's content restores: the schedule position with "scheduler", the data
        position and consumed tokens with "sampler" (a verified trainer_state.json: every key present)."""
        if "scheduler" in content:
            self.updates = state["updates"]
        if "sampler" in content:
            self.step, self.num_consumed_tokens = state["step"], state["num_consumed_tokens"]
            self.inf_nan_skip_batches = state["inf_nan_skip_batches"]


class Trainer:
    def __init__(self, cfg: SpindleConfig, env: ParallelEnv, log=print):
        cfg = model_from_hf_folder(cfg, log)  # a start from a Hugging Face folder takes its model from there
        self.cfg, self.env, self.log = cfg, env, log
        self.run_dir = cfg.run_dir
        self.device = env.device
        # the run's thread count and random generators, in force while it builds and while it fits only
        self.threads = cfg.trainer.num_threads if self.device.type == "cpu" else None
        self.rng = RunRNG(cfg.trainer.seed, self.device)
        env = self.env = Layout.build(env, cfg)  # layout errors first
        try:
            with torch_threads(self.threads), self.rng.active():
                self._build(cfg, env)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: SpindleConfig, env: Layout) -> None:
        self.ckpt_manager = self._open_save_folder()
        self.save_dir = self.ckpt_manager.location if self.ckpt_manager else None
        if env.is_main:
            save_resolved_config(cfg, self.run_dir)
        self.n_params = parameter_counts(cfg.model)["total"]
        self.skip = parse_skip_batches(cfg.data.skip_batches)
        cache = self.run_dir / "data_cache"
        self.tokenizer = run_tokenizer(cfg.data)  # which tokenizer made the ids; recorded in every checkpoint
        self.loader = build_train_loader(cfg.data, cfg.model.vocab_size, cache, env.dp_rank, env.dp_size)
        self.valid_sets = build_valid_sets(cfg.data, cfg.model.vocab_size, cache)
        # the layout lives here and in nothing else the loop touches: parallel/setup.py, parallel/executor.py
        self.raw_model, self.model, self.executor = build_training(
            cfg, env, n_sources=max(1, len(self.loader.source_names)), log=self.log)
        self.optimizer = build_optimizer(self.raw_model, cfg.adam, self.device.type)
        self.scaler = DynamicLossScaler.from_config(cfg.grad_scaler,
                                                    enabled=compute_dtype(cfg.model.dtype).loss_scaling)
        self.state = TrainState()
        self.mfu_peak = mfu_peak(cfg.trainer.peak_tflops, self.device, compute_dtype(cfg.model.dtype).peak_key,
                                 lambda line: self.log(line))  # a measured peak rises to a faster step's rate
        self.peak, self.peak_source = self.mfu_peak.tflops, self.mfu_peak.source
        self.long_eval = LongEval(cfg, env, self.raw_model, self.log)  # its data and keys checked now
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
                                    distributed=self.env.distributed, log=self.log,
                                    alert=lambda kind, msg: self.monitor.alert(kind, msg))
        self.ckpt_manager = manager  # close() releases what open() took, also when open() fails half-way
        manager.open()
        return manager

    def _restore(self) -> None:
        plan: LoadPlan = plan_load(self.cfg.ckpt, self.ckpt_manager.storage if self.ckpt_manager else None)
        self.log(f"checkpoint: {plan.reason}")
        check_start(plan, self.tokenizer)  # the checkpoint's tokenizer is the data's
        # what the checkpoint cannot carry is refused, every other change said, before anything is moved or read
        loader_state = check_resume(plan, self.cfg, self.env, self.log) if plan.ref is not None else None
        if self.ckpt_manager is not None:
            self.lineage = self.ckpt_manager.adopt(plan)
        args = self.cfg.model.to_args()  # a pipeline rank's view of its stages carries none
        if plan.kind == "hf":
            from spindle.interop.hf import load_hf_weights

            load_hf_weights(self.raw_model, plan.url, args)
            return
        if plan.kind == "internevo":
            from spindle.interop.internevo import load_internevo

            ck = load_internevo(self.raw_model, plan.url, args)
            for note in ck.notes:
                self.log(f"checkpoint: {note}")
            self.state.load_state_dict(ck.trainer_state(), plan.content)
            return
        if plan.ref is None:
            return
        ts = restore(plan, self.raw_model, self.optimizer, partial=self.env.pp_size > 1, log=self.log)
        self.state.load_state_dict(ts, plan.content)
        if "scheduler" in plan.content and "scaler" in ts and self.scaler.enabled:
            self.scaler.load_state_dict(ts["scaler"])
        if "sampler" in plan.content:
            self.loader.load_state_dict(loader_state)

    def close(self) -> None:
        """Confirm the last uploads and release the save folder (fit() does this when it ends)."""
        if getattr(self, "ckpt_manager", None) is not None:
            self.ckpt_manager.close()

    def _all_reduce(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """Sum over the data-parallel group (default), or over `group`."""
        if self.env.distributed:
            dist.all_reduce(t, group=group or self.env.dp_group)
        return t

    # ------------------------------------------------------------------ one step

    def train_step(self, micro_batches: list[Batch]) -> dict:
        cfg = self.cfg
        batches = [b.to(self.device) for b in micro_batches]
        # the valid labels of the whole step, over all micro-batches and data-parallel ranks
        n_valid = self._all_reduce(sum(b.num_labels() for b in batches).to(torch.float64))
        # gradients are averaged over data x context ranks: scale the loss up by their number. The scale
        # stays on the device (fp32, as a Python float would be rounded in the fp32 loss product)
        scale = self.scaler.scale
        loss_scale = (scale / (n_valid.clamp(min=1) / (self.env.dp_size * self.env.cp_size))).float()
        t0 = time.perf_counter()
        stats = self.executor.forward_backward(batches, loss_scale)
        synchronize(self.device)  # the kernels, not their enqueueing
        fwd_bwd = time.perf_counter() - t0
        stats[:, -1] = stats[:, :-1].sum(1)
        self._all_reduce(stats, group=self.env.grad_group)

        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.scaler.enabled:  # grouped by tensor kind: TP mixes DTensor and plain gradients
            unscale_gradients(params, 1.0 / scale)
        grad_norm = clip_gradients(params, cfg.hybrid_zero_optimizer.clip_grad_norm, self.device,
                                   self.env.pp_group if self.env.pp_size > 1 else None)
        # the step's one host sync before the update: update or skip (a non-finite loss or norm);
        # the loss is finite exactly when its sum is (the token count is at least 1)
        finite = bool(torch.isfinite(stats[0, -1]) & torch.isfinite(grad_norm))
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
        return step_statistics(stats, grad_norm, self.loader.source_names) | {
            "lr": lr, "adam_beta2": beta2, "loss_scale": scale, "fwd_bwd_time": round(fwd_bwd, 3), "finite": finite}

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict:
        """val/{set}_loss, _acc, _plex and _tokens for every validation set (spindle/train/validation.py)."""
        return validate_sets(self.executor, self.valid_sets, self.cfg.data.valid_micro_num, self.env, self.device,
                             lambda t: self._all_reduce(t, group=self.env.grad_group))

    # ------------------------------------------------------------------ checkpoint

    def save(self, snapshot: bool = False) -> str:
        ts = self.state.state_dict() | {"loader": self.loader.state_dict(), "scaler": self.scaler.state_dict(),
                                        "layout": run_layout(self.env)}
        where = self.ckpt_manager.save(self.state.step, self.raw_model, self.optimizer, ts,
                                       self.cfg.to_dict(), snapshot=snapshot, records=checkpoint_files(self.tokenizer))
        self.log(f"checkpoint saved: {where}")
        return where

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
        host_mode.enter_context(torch_threads(self.threads))
        host_mode.enter_context(self.rng.active())
        # [gpu] TF32 for torch.tf32 and the cudnn keys, for this fit only (were process-wide, set in __init__)
        host_mode.enter_context(cuda_backend_mode(self.device, cfg.model.dtype, cfg.cudnn_deterministic,
                                                  cfg.cudnn_benchmark))
        if state.step >= total:
            self.log(f"already at data.total_steps={total} (the run resumed at step {state.step}): nothing to train; "
                     "raise data.total_steps to train further")
        # SIGTERM (and ckpt.save_on_signals) saves at the next step boundary: spindle/train/signals.py
        signal_save = SignalSave.from_config(cfg.ckpt, self.ckpt_manager is not None, env, self.monitor.alert).install()
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
                tokens_global = sum(b.tokens for b in batch) * env.dp_size
                if m.pop("finite"):
                    state.num_consumed_tokens += tokens_global
                record = step_record(m, step, batch, elapsed, data_wait, state, env, cfg, self.flops_per_token,
                                     self.mfu_peak)
                if self.valid_sets and cfg.data.valid_every and state.step % cfg.data.valid_every == 0:
                    results = self.validate()
                    record.update(results)
                    printer(format_validation(step, results, self.valid_sets))
                record.update(self.long_eval(state.step, printer))  # {} unless due (spindle/train/long_eval.py)
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
                stop, failed, signalled = step_signals(cfg.ckpt.stop_file_path, env, failure is not None,
                                                       signal_save.requested)
                if failed:
                    self._stop_after_write_failure(failure)
                quit_now = bool(stop and stop > 0 and state.step >= stop)
                if self.ckpt_manager is not None:
                    due = state.step % every == 0 if math.isfinite(every) else False
                    snap = cfg.ckpt.oss_snapshot_freq
                    final = state.step == total and cfg.ckpt.save_final
                    if due or final or quit_now or signalled or (stop and state.step == abs(stop)):
                        saved_to = self.save()
                        saved_at = state.step
                    elif math.isfinite(snap) and state.step % int(snap) == 0:
                        self.save(snapshot=True)  # the manager alternates the two slots
                self.monitor.step_finished(record)
                if signalled:  # every rank, at the step they agreed on
                    signal_save.leave(signalled, state.step, saved_to if saved_at == state.step else None, printer)
                    break
                if quit_now:
                    acted_on_stop_file(cfg.ckpt.stop_file_path, stop, state.step, self.ckpt_manager is not None,
                                       env.is_main, printer)
                    break
            self.close()  # background uploads confirmed (and marked) before we return; locks released
        except BaseException as exc:
            self.monitor.exception(exc)
            raise
        finally:
            signal_save.restore()  # before the monitor's: each puts back the handler it found
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
        signal_save.exit_if_stopped(self.log)  # SystemExit(128 + the signal) once all is closed
        return {"history": history, "saved_at": saved_at, "state": state.state_dict()}
