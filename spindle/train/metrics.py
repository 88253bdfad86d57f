"""Per-step metrics: the seed's key=value line, JSONL and TensorBoard sinks, a progress bar.

The console line keeps InternEvo's keys in InternEvo's order (so log parsers written for it keep
working) and appends ours: mfu, acc, perplexity, data_wait. Formulas:
- tgs = tokens of the step over all data-parallel ranks / world size / step time (padding and
  masked tokens included, as InternEvo counts);
- tflops = InternEvo's get_megatron_flops (see spindle.model.flops) / step time / world size;
- mfu = model FLOPs per token (6 N_matmul + 12 L h s) * tokens / step time / world size / peak
  (conventions: docs/benchmarks.md, "MFU conventions");
- on CUDA, step and fwd_bwd times end with a device synchronisation, and mem_allocated_gib /
  mem_reserved_gib / mem_peak_allocated_gib give this rank's memory per step.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from spindle.config.redact import redact_text
from spindle.errors import SpindleError

logger = logging.getLogger(__name__)

CONSOLE_KEYS = [
    "tflops", "step", "loss", "tgs (tokens/gpu/second)", "lr", "loss_scale", "grad_norm",
    "moe_loss",  # mixture of experts, where InternEvo puts it (loss stays the cross-entropy)
    "micro_num", "num_consumed_tokens", "inf_nan_skip_batches", "num_samples_in_batch", "largest_length",
    "largest_batch", "smallest_batch", "adam_beta2", "fwd_bwd_time", "mfu", "acc", "perplexity", "data_wait",
    "moe_imbalance", "moe_dropped",  # mixture of experts: the largest over the layers (per layer: metrics.jsonl)
    "mem_peak_allocated_gib",  # CUDA only
]
GIB = 2**30


def step_statistics(stats: torch.Tensor, grad_norm: torch.Tensor, source_names: list[str], moe=None) -> dict:
    """The step's loss, accuracy and gradient norm, overall and per source, from the device in one read
    (after the update: the step itself waits for no statistic but whether to update); with `moe` (a
    spindle.train.expert_balance.ExpertBalance) its totals in the same read, and its metrics.

    `stats` is the executors' (3, sources + 1) float64 tensor (summed loss, labelled tokens, hits;
    the last column the total); float64 on the host divides exactly as it would on the device."""
    parts = [stats.flatten(), grad_norm.detach().double().reshape(1)]
    values = torch.cat(parts + ([moe.totals] if moe is not None else [])).tolist()
    moe_metrics = moe.metrics(values[stats.numel() + 1:]) if moe is not None else {}
    values = values[:stats.numel() + 1]
    (loss, count, hits), norm = [values[i * stats.shape[1]:(i + 1) * stats.shape[1]] for i in range(3)], values[-1]
    out = {"loss": loss[-1] / max(count[-1], 1.0), "grad_norm": norm, "acc": hits[-1] / max(count[-1], 1.0)}
    for k, name in enumerate(source_names):
        if count[k] > 0:
            out[f"loss/{name}"], out[f"acc/{name}"] = loss[k] / count[k], hits[k] / count[k]
            out[f"tokens/{name}"] = int(count[k])
    return out | moe_metrics


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a host clock read after it times them (CUDA runs
    asynchronously: without it a step's time is the time to enqueue it). Nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_metrics(device: torch.device) -> dict:
    """This rank's CUDA memory for the step just done: allocated and reserved now, the peak allocated
    since the previous call (whose counter it restarts), in GiB; {} on CPU."""
    if device.type != "cuda":
        return {}
    out = {"mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
           "mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
           "mem_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB}
    torch.cuda.reset_peak_memory_stats(device)
    return {k: round(v, 3) for k, v in out.items()}


def format_value(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or (1e-3 <= abs(v) < 1e6):
            return f"{v:.6g}" if abs(v) < 1 else f"{round(v, 4)}"
        return f"{v:.6g}"
    return str(v)


def format_line(metrics: dict) -> str:
    """One line, `key=value` separated by commas; per-source keys (loss/en ...) stay in JSONL only."""
    return ",".join(f"{k}={format_value(metrics[k])}" for k in CONSOLE_KEYS if k in metrics)


def format_validation(step: int, results: dict, valid_sets: dict) -> str:
    """'validation after step 199: held_out loss 1.8312 (perplexity 6.242, accuracy 0.4861; 16,384 of
    204,800 tokens)', the sets separated by '; '."""
    return f"validation after step {step}: " + "; ".join(
        f"{name} loss {results[f'val/{name}_loss']:.4f} (perplexity {results[f'val/{name}_plex']:.4g}, "
        f"accuracy {results[f'val/{name}_acc']:.4f}; {found.coverage()})" for name, found in valid_sets.items())


def batch_shape_stats(micro_batches) -> dict:
    """InternEvo's num_samples_in_batch, largest_length, largest_batch, smallest_batch: documents (segments)
    per micro-batch and the longest, from where the positions restart (host tensors: no device sync)."""
    lengths = [[n for row in b.document_lengths() for n in row] for b in micro_batches]
    per_pack = [len(x) for x in lengths]
    return {
        "num_samples_in_batch": sum(per_pack),
        "largest_length": max(max(x) for x in lengths),
        "largest_batch": max(per_pack),
        "smallest_batch": min(per_pack),
    }


def step_record(m: dict, step: int, batch, elapsed: float, data_wait: float, state, layout, cfg,
                flops_per_token: float, peak) -> dict:
    """The metrics of one step, InternEvo's keys first (see the module docstring for the formulas)."""
    from spindle.model.flops import internevo_flops_per_step

    tokens_global = layout.tokens_per_step(sum(b.tokens for b in batch))
    sequences = sum(b.rows for b in batch) * layout.dp
    flops = internevo_flops_per_step(cfg.model, cfg.data.seq_len, sequences)
    tgs = tokens_global / layout.world_size / elapsed
    return {
        "tflops": flops / elapsed / layout.world_size / 1e12, "step": step, "loss": m["loss"],
        "tgs (tokens/gpu/second)": round(tgs, 2), "lr": m["lr"], "loss_scale": m["loss_scale"],
        "grad_norm": m["grad_norm"], **{k: m[k] for k in ("moe_loss",) if k in m}, "micro_num": len(batch),
        "num_consumed_tokens": state.num_consumed_tokens,
        "inf_nan_skip_batches": state.inf_nan_skip_batches, **batch_shape_stats(batch),
        "adam_beta2": m["adam_beta2"], "fwd_bwd_time": m["fwd_bwd_time"],
        "mfu": peak.utilization(flops_per_token * tgs / 1e12),  # a spindle.hardware.MfuPeak: at most 1 if measured
        "acc": m["acc"], "perplexity": math.exp(min(m["loss"], 50.0)),
        "data_wait": data_wait / elapsed, **{k: m[k] for k in ("moe_imbalance", "moe_dropped") if k in m},
        **memory_metrics(layout.device),  # {} on CPU
        **{k: v for k, v in m.items() if "/" in k},
    }


class RunFolderFull(SpindleError):
    """A write into the run folder (metrics, logs) failed: the disk is full, or the folder went away."""


class LineFile:
    """An append-only text file written a whole line at a time: a line that cannot be written in full
    (a full disk) is cut off again, so the file never holds half a record. Every line goes through
    redact_text first: what lands in a run folder (rank logs, metrics.jsonl) holds no secret (a JSON line
    stays JSON)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_line(self, line: str) -> None:
        data = (redact_text(line) + "\n").encode()
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (short write)")
        except OSError as exc:
            try:
                os.ftruncate(self.fd, end)
            except OSError:
                pass
            raise RunFolderFull(f"{self.path}: {exc.strerror or exc} while writing it") from None

    def close(self) -> None:
        os.close(self.fd)


def continue_tensorboard(previous: Optional[str], tb_dir: Path) -> None:
    """InternEvo's resume_tb_folder: the earlier run's event files are copied into this run's TensorBoard
    folder (once, when it has none), so the curves go on where they stopped."""
    if not previous:
        return
    src = Path(previous)
    if not src.is_dir():
        raise SpindleError(f"resume_tb_folder {previous}: not a folder")
    tb_dir.mkdir(parents=True, exist_ok=True)
    if any(tb_dir.glob("events.out.tfevents.*")):
        return
    copied = 0
    for f in src.rglob("events.out.tfevents.*"):
        dest = tb_dir / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
        copied += 1
    logger.info(f"tensorboard: {copied} event file(s) of {previous} copied into {tb_dir} (resume_tb_folder)")


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """A step record's numbers as the series TensorBoard and the trackers plot: finite values only, `step` left out
    (it is their x axis), each named by its key's first word ('tgs (tokens/gpu/second)' -> 'tgs')."""
    return {key.split(" ")[0]: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(float(value))}


class MetricSinks:
    """JSONL file and TensorBoard events in the run folder, and the experiment trackers (spindle.train.trackers.
    Trackers, which never raise: a failing tracker is alerted and dropped); rank 0 only."""

    def __init__(self, run_dir: Path, jsonl: bool = True, tensorboard: bool = True, tb_dir: Optional[str] = None,
                 trackers=None):
        self.jsonl = LineFile(run_dir / "metrics.jsonl") if jsonl else None
        self.trackers = trackers or None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=tb_dir or str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; degrade rather than die
                self.tb = None

    def write(self, metrics: dict, step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write_line(json.dumps(metrics, default=float))
        if self.tb is not None or self.trackers is not None:
            scalars = scalar_metrics(metrics)
            if self.tb is not None:
                for name, value in scalars.items():
                    self.tb.add_scalar(name, value, step)
            if self.trackers is not None:
                self.trackers.log(scalars, step)

    def close(self, failed: bool = False) -> None:
        """`failed`: the fit is ending on an error (a tracker marks its run so)."""
        if self.trackers is not None:
            self.trackers.close(failed)
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:  # its events could not be flushed (a full disk): metrics.jsonl has them
                pass


class Progress:
    """A rich progress bar with ETA when stdout is a terminal; nothing otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: Optional[bool] = None):
        enabled = sys.stdout.isatty() if enabled is None else enabled
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def print(self, line: str) -> None:
        line = redact_text(line)  # the console is often kept in a file too (a batch job's output)
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
