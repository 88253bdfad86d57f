"""The training state a checkpoint carries besides the model and the optimizer, and what a fit keeps of its steps.

Every part is a Stateful (torch.distributed.checkpoint.stateful: `state_dict` / `load_state_dict`) saved and
restored through one path, the checkpoint manager and spindle.checkpoint.loading.restore:
- `TrainState`: the counters (step, updates, consumed tokens, skipped steps), their keys those of
  spindle.checkpoint.records.COUNTERS;
- the loader's position and the fp16 loss scaler (their own state dicts);
- the RNG streams (spindle.train.host.RunRNG), saved as tensors by DCP.
`TrainingState` gathers them: its state dict is trainer_state.json, its `rng` what DCP saves beside the
weights. Which part a load restores (the `content` of load_ckpt_info) is said once, in records.py.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from spindle.checkpoint.records import COUNTERS

HISTORY_KEEP = 1000  # step records a fit returns at most (the first, the last ones, the last validation)


class TrainState:
    """The counters that go into every checkpoint (attributes named by records.COUNTERS, all 0 at the start):
    `step` the next batch to train (skipped batches included), `updates` the successful optimizer updates (they
    drive the lr / beta2 schedules), `num_consumed_tokens`, `inf_nan_skip_batches`."""

    __slots__ = tuple(COUNTERS)

    def __init__(self) -> None:
        for key in COUNTERS:
            setattr(self, key, 0)

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        """The counters `state` holds (a load restores those its content selects; the others stay)."""
        for key in COUNTERS:
            if key in state:
                setattr(self, key, state[key])


class TrainingState:
    """trainer_state.json as one Stateful (the counters at its top level, "loader", "scaler", and "layout": the
    run's layout, recorded for the next resume to compare, never restored) and `rng`, the Stateful DCP saves as
    tensors beside the weights (the RNG streams)."""

    def __init__(self, counters: TrainState, loader, scaler, rng, layout: dict):
        self.counters, self.loader, self.scaler, self.rng, self.layout = counters, loader, scaler, rng, layout

    def state_dict(self) -> dict:
        return self.counters.state_dict() | {"loader": self.loader.state_dict(), "scaler": self.scaler.state_dict(),
                                             "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        """What a load selected (spindle.checkpoint.records.select_state): the parts `state` holds."""
        self.counters.load_state_dict(state)
        if "scaler" in state and self.scaler.enabled:
            self.scaler.load_state_dict(state["scaler"])
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])


class RunHistory:
    """What a fit keeps of its step records, bounded (a million-step run does not hold a million dicts): the
    first, the last `keep`, and the last that holds validation results — what the run's summary reads
    (spindle.cli.train.loss_summary: first loss, last ones, last held-out losses) — and `steps`, how many
    steps it trained."""

    def __init__(self, keep: int = HISTORY_KEEP):
        self.first: Optional[dict] = None
        self.recent: deque[dict] = deque(maxlen=keep)
        self.last_validation: Optional[dict] = None
        self.steps = 0

    def add(self, record: dict) -> None:
        self.steps += 1
        if self.first is None:
            self.first = record
        if any(key.startswith("val/") for key in record):
            self.last_validation = record
        self.recent.append(record)

    def records(self) -> list[dict]:
        """In step order: all of them for a run of up to `keep` steps, else the first, the last validated one
        and the last `keep`."""
        kept = [r for r in (self.first, self.last_validation) if r is not None and not _within(r, self.recent)]
        unique = {id(r): r for r in kept}
        return sorted(unique.values(), key=lambda r: r["step"]) + list(self.recent)


def _within(record: dict, recent: deque) -> bool:
    return bool(recent) and recent[0]["step"] <= record["step"]
