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

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch


CONSOLE_KEYS = [
    "tflops", "step", "loss", "tgs (tokens/gpu/second)", "lr", "loss_scale", "grad_norm", "micro_num",
    "num_consumed_tokens", "inf_nan_skip_batches", "num_samples_in_batch", "largest_length", "largest_batch",
    "smallest_batch", "adam_beta2", "fwd_bwd_time", "mfu", "acc", "perplexity", "data_wait",
    "mem_peak_allocated_gib",  # CUDA only
]
GIB = 2**30


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


def batch_shape_stats(micro_batches: list[dict]) -> dict:
    """InternEvo's num_samples_in_batch, largest_length, largest_batch, smallest_batch."""
    segs = [torch.diff(mb["cu_seqlens"].long()) for mb in micro_batches]
    per_pack = [int(s.numel()) for s in segs]
    return {
        "num_samples_in_batch": sum(per_pack),
        "largest_length": max(int(s.max()) for s in segs),
        "largest_batch": max(per_pack),
        "smallest_batch": min(per_pack),
    }


class MetricSinks:
    """JSONL file and TensorBoard events in the run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, jsonl: bool = True, tensorboard: bool = True, tb_dir: Optional[str] = None):
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if jsonl else None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=tb_dir or str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; degrade rather than die
                self.tb = None

    def write(self, metrics: dict, step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(metrics, default=float) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(float(value)):
                    self.tb.add_scalar(key.split(" ")[0], float(value), step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


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
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
