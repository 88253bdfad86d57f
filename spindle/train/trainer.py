"""The training loop: step, accumulate, clip, skip non-finite steps, validate, save, log.

One optimizer step:
  1. fetch `micro_num` micro-batches (the loader prefetches the next step in a thread);
  2. count the valid labels of the whole step (all micro-batches, all data-parallel ranks): N;
  3. for each micro-batch: forward, loss = sum of token losses / N (times dp size, because data
     parallel averages gradients over ranks), backward — so the step's gradient is the gradient of
     the mean token loss of the step, however the tokens are split into micro-batches or ranks;
     a mixture-of-experts model adds its balance loss / micro_num (spindle/train/expert_balance.py);
  4. unscale (fp16), measure the gradient norm, clip; a non-finite loss or norm skips the update;
  5. set lr and beta2 from their schedules, optimizer step (then the MoE balancing bias), loss-scaler update;
  6. log, validate every `valid_every`; save when the checkpoint manager says (its `should_save`: every
     `checkpoint_every`, at the end, on the stop file or a signal).
The training state a checkpoint carries (counters, loader, loss scaler, RNG streams) is one Stateful,
spindle.train.state.TrainingState; the layout is asked (spindle.parallel.layout.Layout), never read.
Lines go through the "spindle" loggers (spindle/logs.py): during a fit into every rank's logs/rank{r}.log and
rank 0's console; a Trainer used without a logging block prints rank 0's lines on stdout (logs.default_console).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch

from spindle.checkpoint.loading import LoadPlan, plan_load, restore
from spindle.checkpoint.manager import CheckpointManager
from spindle.checkpoint.records import select_state
from spindle.config import SpindleConfig, parse_skip_batches, save_resolved_config
from spindle.data.batch import Batch
from spindle.data.loader import build_train_loader, build_valid_sets
from spindle.dtypes import compute_dtype
from spindle.data.tokenizer_identity import checkpoint_files, run_tokenizer
from spindle.errors import SpindleError
from spindle.hardware import cuda_backend_mode, mfu_peak
from spindle.interop.hf_start import model_from_hf_folder
from spindle.interop.tokenizer_check import check_start
from spindle.logs import default_console
from spindle.model.flops import model_flops_per_token, parameter_counts
from spindle.parallel.layout import Layout
from spindle.parallel.mesh import ParallelEnv
from spindle.parallel.setup import build_training
from spindle.train.controls import acted_on_stop_file, saves_at, step_signals, stops_at
from spindle.train.expert_balance import ExpertBalance
from spindle.train.host import RunRNG, cpu_training_mode, torch_threads
from spindle.train.long_eval import LongEval
from spindle.train.metrics import RunFolderFull, format_validation, step_record, step_statistics, synchronize
from spindle.train.monitor import build_monitor
from spindle.train.optim import (
    DynamicLossScaler, beta2_at, build_optimizer, clip_gradients, lr_at, set_schedules, unscale_gradients,
)
from spindle.train.resume_check import check_resume
from spindle.train.run_outputs import RunOutputs
from spindle.train.signals import SignalSave
from spindle.train.state import RunHistory, TrainingState, TrainState
from spindle.train.validation import validate_sets

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: SpindleConfig, env: ParallelEnv | Layout):
        with default_console(env.rank):  # a caller that set no logging up sees rank 0's lines, as print showed
            self._construct(cfg, env)

    def _construct(self, cfg: SpindleConfig, env: ParallelEnv | Layout) -> None:
        cfg = model_from_hf_folder(cfg)  # a start from a Hugging Face folder takes its model from there
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.layout = Layout.build(env, cfg)  # layout errors first; the one object the loop asks about ranks
        self.device = self.layout.device
        # the run's thread count and random generators, in force while it builds and while it fits only
        self.threads = cfg.trainer.num_threads if self.device.type == "cpu" else None
        self.rng = RunRNG(cfg.trainer.seed, self.device)
        try:
            with torch_threads(self.threads), self.rng.active():
                self._build(cfg, self.layout)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: SpindleConfig, layout: Layout) -> None:
        # first: the checkpoint manager's alerts (raised from open / restore on) go to the monitor
        self.monitor = build_monitor(cfg, self.run_dir, layout.rank, layout.is_main)
        self.ckpt_manager = self._open_save_folder()
        self.save_dir = self.ckpt_manager.location if self.ckpt_manager else None
        if layout.is_main:
            save_resolved_config(cfg, self.run_dir)
        self.n_params = parameter_counts(cfg.model)["total"]
        self.skip = parse_skip_batches(cfg.data.skip_batches)
        cache = self.run_dir / "data_cache"
        self.tokenizer = run_tokenizer(cfg.data)  # which tokenizer made the ids; recorded in every checkpoint
        self.loader = build_train_loader(cfg.data, cfg.model.vocab_size, cache, *layout.loader_shard)
        self.valid_sets = build_valid_sets(cfg.data, cfg.model.vocab_size, cache)
        # the layout lives here and in nothing else the loop touches: parallel/setup.py, parallel/executor.py
        self.raw_model, self.model, self.executor = build_training(
            cfg, layout, n_sources=max(1, len(self.loader.source_names)))
        self.expert_balance = ExpertBalance.of(self.raw_model, self.device)  # None for a dense model
        self.optimizer = build_optimizer(self.raw_model, cfg.adam, self.device.type)
        self.scaler = DynamicLossScaler.from_config(cfg.grad_scaler,
                                                    enabled=compute_dtype(cfg.model.dtype).loss_scaling)
        self.state = TrainState()  # the counters
        # what a checkpoint carries besides the weights and the optimizer: saved and restored as one Stateful
        self.training_state = TrainingState(self.state, self.loader, self.scaler, self.rng, layout.record())
        # a measured peak rises to a faster step's rate
        self.mfu_peak = mfu_peak(cfg.trainer.peak_tflops, self.device, compute_dtype(cfg.model.dtype).peak_key)
        self.peak, self.peak_source = self.mfu_peak.tflops, self.mfu_peak.source
        self.long_eval = LongEval(cfg, layout, self.raw_model)  # its data and keys checked now
        self._restore()  # last: nothing may draw from the global RNG between the restore and the first step
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)

    # ------------------------------------------------------------------ setup

    def _open_save_folder(self) -> Optional[CheckpointManager]:
        """Open the save folder (local or boto3:): refuse foreign checkpoints, lock it, ping it, so a bad
        path, a folder in use or an unreachable endpoint fails now, before any training."""
        ck = self.cfg.ckpt
        if not ck.enable_save_ckpt:
            return None
        folder = ck.save_ckpt_folder or str(self.run_dir / "ckpt")
        manager = CheckpointManager(folder, ck, job=self.cfg.JOB_NAME, is_writer=self.layout.is_main,
                                    distributed=self.layout.distributed, alert=self.monitor.alert)
        self.ckpt_manager = manager  # close() releases what open() took, also when open() fails half-way
        manager.open()
        return manager

    def _restore(self) -> None:
        plan: LoadPlan = plan_load(self.cfg.ckpt, self.ckpt_manager.storage if self.ckpt_manager else None)
        logger.info(f"checkpoint: {plan.reason}")
        check_start(plan, self.tokenizer)  # the checkpoint's tokenizer is the data's
        # what the checkpoint cannot carry is refused, every other change said, before anything is moved or read
        saved_state = check_resume(plan, self.cfg, self.layout) if plan.ref is not None else None
        if self.ckpt_manager is not None:
            self.lineage = self.ckpt_manager.adopt(plan)
        args = self.cfg.model.to_args()  # a pipeline rank's view of its stages carries none
        if plan.kind == "hf":
            from spindle.interop.hf import load_hf_weights

            load_hf_weights(self.raw_model, plan.url, args)
        elif plan.kind == "internevo":
            from spindle.interop.internevo import load_internevo

            ck = load_internevo(self.raw_model, plan.url, args)
            for note in ck.notes:
                logger.info(f"checkpoint: {note}")
            self.training_state.load_state_dict(select_state(ck.trainer_state(), plan.content))
        elif plan.ref is not None:  # the one path: tensors (model, optimizer, RNG streams) and the trainer state
            restore(plan, self.raw_model, self.optimizer, self.training_state, saved_state,
                    partial=self.layout.pipelined)

    def close(self) -> None:
        """Confirm the last uploads and release the save folder (fit() does this when it ends)."""
        if getattr(self, "ckpt_manager", None) is not None:
            self.ckpt_manager.close()

    # ------------------------------------------------------------------ one step

    def train_step(self, micro_batches: list[Batch]) -> dict:
        cfg, layout = self.cfg, self.layout
        batches = [b.to(self.device) for b in micro_batches]
        # the valid labels of the whole step, over all micro-batches and data-parallel ranks
        n_valid = layout.sum_over_data_ranks(sum(b.num_labels() for b in batches).to(torch.float64))
        # gradients are averaged over data x context ranks: scale the loss up by their number. The scale
        # stays on the device (fp32, as a Python float would be rounded in the fp32 loss product)
        scale = self.scaler.scale
        loss_scale = (scale / (n_valid.clamp(min=1) / layout.gradient_ranks)).float()
        moe = self.expert_balance
        t0 = time.perf_counter()
        if moe is None:
            stats = self.executor.forward_backward(batches, loss_scale)
        else:  # the balance loss joins each micro-batch's backward; its routing statistics are kept
            moe.start_step(scale, len(batches))
            stats = self.executor.forward_backward(batches, loss_scale, balance=moe)
        synchronize(self.device)  # the kernels, not their enqueueing
        fwd_bwd = time.perf_counter() - t0
        stats[:, -1] = stats[:, :-1].sum(1)
        layout.sum_over_gradient_ranks(stats)
        if moe is not None:  # every rank the same step load, so every rank moves its bias alike
            layout.sum_over_data_ranks(moe.totals)

        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.scaler.enabled:  # grouped by tensor kind: TP mixes DTensor and plain gradients
            unscale_gradients(params, 1.0 / scale)
        grad_norm = clip_gradients(params, cfg.hybrid_zero_optimizer.clip_grad_norm, self.device, layout.norm_group)
        # the step's one host sync before the update: update or skip (a non-finite loss or norm);
        # the loss is finite exactly when its sum is (the token count is at least 1)
        finite = bool(torch.isfinite(stats[0, -1]) & torch.isfinite(grad_norm))
        lr = lr_at(self.state.updates, cfg.adam.lr, cfg.lr_scheduler)
        beta2 = beta2_at(self.state.updates, cfg.beta2_scheduler)
        if finite:
            set_schedules(self.optimizer, lr, beta2)
            self.optimizer.step()
            if moe is not None:  # aux-loss-free balancing, outside the gradient: only after a step taken
                moe.update_bias()
            self.state.updates += 1
        else:
            self.state.inf_nan_skip_batches += 1
        self.scaler.update(found_inf=not finite)
        self.optimizer.zero_grad(set_to_none=True)
        return step_statistics(stats, grad_norm, self.loader.source_names, moe) | {
            "lr": lr, "adam_beta2": beta2, "loss_scale": scale, "fwd_bwd_time": round(fwd_bwd, 3), "finite": finite}

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict:
        """val/{set}_loss, _acc, _plex and _tokens for every validation set (spindle/train/validation.py)."""
        return validate_sets(self.executor, self.valid_sets, self.cfg.data.valid_micro_num, self.layout, self.device,
                             self.layout.sum_over_gradient_ranks)

    def _evaluations(self, step: int) -> dict:
        """After `step`: the validation sets every `data.valid_every` steps, the long evaluations when due."""
        results, every = {}, self.cfg.data.valid_every
        if self.valid_sets and every and self.state.step % every == 0:
            results = self.validate()
            logger.info(format_validation(step, results, self.valid_sets))
        return results | self.long_eval(self.state.step)  # {} unless due (spindle/train/long_eval.py)

    # ------------------------------------------------------------------ checkpoint

    def save(self, snapshot: bool = False) -> str:
        where = self.ckpt_manager.save(self.state.step, self.raw_model, self.optimizer, self.training_state,
                                       self.cfg.to_dict(), snapshot=snapshot, records=checkpoint_files(self.tokenizer))
        logger.info(f"checkpoint saved: {where}")
        return where

    def _save_if_due(self, last: bool, stop: bool) -> Optional[str]:
        """Save when the checkpoint manager says (its cadence); where a checkpoint (not a snapshot) went, else None."""
        kind = self.ckpt_manager.should_save(self.state.step, last, stop) if self.ckpt_manager else None
        if kind is None:
            return None
        where = self.save(snapshot=kind == "snapshot")  # the manager alternates the two snapshot slots
        if kind == "snapshot":
            return None
        self.saved_at = self.state.step
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

    def _host_mode(self) -> contextlib.ExitStack:
        """The process-wide settings a fit runs under, undone when it ends: on the CPU flush denormals and keep
        freed memory for reuse (spindle/train/host.py), the run's threads and RNG streams, and [gpu] TF32 for
        torch.tf32 and the cudnn keys."""
        cfg, mode = self.cfg, contextlib.ExitStack()
        mode.enter_context(cpu_training_mode(self.device.type == "cpu"))
        mode.enter_context(torch_threads(self.threads))
        mode.enter_context(self.rng.active())
        mode.enter_context(cuda_backend_mode(self.device, cfg.model.dtype, cfg.cudnn_deterministic,
                                            cfg.cudnn_benchmark))
        return mode

    def _run_step(self) -> Optional[dict]:
        """One step: its batches, the update, the counters; its record (validation and long evaluations when due),
        None for a step `data.skip_batches` skips."""
        state, step = self.state, self.state.step
        self.monitor.step_started(step)
        t_start = time.perf_counter()
        batch = self.loader.next_step(step)
        data_wait = time.perf_counter() - t_start
        if step in self.skip:
            state.step += 1
            return None
        m = self.train_step(batch)
        state.step += 1
        synchronize(self.device)  # [gpu] the optimizer's kernels too
        elapsed = time.perf_counter() - t_start
        if m.pop("finite"):
            state.num_consumed_tokens += self.layout.tokens_per_step(sum(b.tokens for b in batch))
        record = step_record(m, step, batch, elapsed, data_wait, state, self.layout, self.cfg, self.flops_per_token,
                             self.mfu_peak)
        return record | self._evaluations(step)

    def _end_of_step(self, record: dict, outputs: RunOutputs, signal_save: SignalSave) -> bool:
        """Write the step's line and metrics, agree with every rank on the stop file, a failed write and a signal,
        save when the manager says; True when the run stops here."""
        cfg, step, done = self.cfg, record["step"], self.state.step
        failure = outputs.write_step(record, step, done)
        stop, failed, signalled = step_signals(cfg.ckpt.stop_file_path, self.layout, failure is not None,
                                               signal_save.requested)
        if failed:
            self._stop_after_write_failure(failure)
        quit_now = stops_at(stop, done)
        saved_to = self._save_if_due(last=done == cfg.data.total_steps,
                                     stop=quit_now or bool(signalled) or saves_at(stop, done))
        self.monitor.step_finished(record)
        if signalled:  # every rank, at the step they agreed on
            signal_save.leave(signalled, done, saved_to)
        elif quit_now:
            acted_on_stop_file(cfg.ckpt.stop_file_path, stop, done, self.ckpt_manager is not None,
                               self.layout.is_main)
        return bool(signalled) or quit_now

    def fit(self) -> dict:
        """Train to data.total_steps (or a stop); the steps' records (bounded: spindle.train.state.RunHistory),
        the step of the last checkpoint saved, and the counters."""
        with default_console(self.layout.rank):  # as in __init__: lines a fit's own block does not take
            return self._fit()

    def _fit(self) -> dict:
        state, total, layout = self.state, self.cfg.data.total_steps, self.layout
        outputs = RunOutputs(self.cfg, self.run_dir, layout.rank, layout.is_main, state.step)
        rank_lines = contextlib.ExitStack()
        rank_lines.enter_context(outputs.logging())  # every rank keeps its own log; rank 0 also prints
        history, self.saved_at = RunHistory(), None
        self.monitor.start()
        host_mode = self._host_mode()
        if state.step >= total:
            logger.info(f"already at data.total_steps={total} (the run resumed at step {state.step}): nothing to "
                        "train; raise data.total_steps to train further")
        # SIGTERM (and ckpt.save_on_signals) saves at the next step boundary: spindle/train/signals.py
        signal_save = SignalSave.from_config(self.cfg.ckpt, self.ckpt_manager is not None, layout,
                                             self.monitor.alert).install()
        try:
            while state.step < total:
                record = self._run_step()
                if record is None:
                    continue
                history.add(record)
                if self._end_of_step(record, outputs, signal_save):
                    break
            self.close()  # background uploads confirmed (and marked) before we return; locks released
        except BaseException as exc:
            self.monitor.exception(exc)
            raise
        finally:
            signal_save.restore()  # before the monitor's: each puts back the handler it found
            host_mode.close()
            self.monitor.close()
            rank_lines.close()  # the rank log closes: later lines (a save after fit) go where they went before
            outputs.close()
            self.loader.close()
            with contextlib.suppress(Exception):  # after an error: the folders are released all the same
                self.close()
        signal_save.exit_if_stopped()  # SystemExit(128 + the signal) once all is closed
        return {"history": history.records(), "steps": history.steps, "saved_at": self.saved_at,
                "state": state.state_dict()}
