"""Process-wide CPU settings for the duration of a training run, switched back afterwards.

Two things made CPU steps much slower than their matmuls, both measured here (docs/LOG.md):

- Denormal floats (|x| < 1.2e-38, common in AdamW state and small gradients after some steps) take
  a microcode slow path on x86: the demo's step went from 0.27 s to 0.47 s after ~60 steps.
  `torch.set_flush_denormal(True)` flushes them to zero — but only on the calling thread and on
  threads started after it: OpenMP's worker threads copy the mode of the thread that creates them.
  `spindle train` therefore sets it first thing (spindle/cli/train.py), before any parallel CPU work; a
  script that builds a `Trainer` itself should call `torch.set_flush_denormal(True)` before its
  first torch operation to get the same speed.
- glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and
  returns it on free, so each step page-faults its large activations and gradients in again
  (zero-filling them in the kernel). At the 10M benchmark shapes this setting is worth ~3.5 % of the
  step (most of the cost was the logits, which spindle.model.loss no longer allocates).
  `mallopt(M_MMAP_MAX, 0)` + a huge `M_TRIM_THRESHOLD` keep freed memory in the heap for reuse,
  which is what a caching allocator does on GPUs. The resident size stays at its peak; it is
  returned with `malloc_trim` when the run ends.

Both are process-wide state, hence a context manager around `Trainer.fit` and the benchmarks. So
are torch's thread count and its random generators: `torch_threads` and `RunRNG` below keep a run's
settings to the run (a script that builds a Trainer finds its own afterwards).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Iterator, Optional

import torch

# glibc's mallopt parameter numbers (malloc.h) and its defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library if it is glibc (mallopt's numbers are glibc's), else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError outside glibc
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def cpu_training_mode(enabled: bool = True) -> Iterator[bool]:
    """Flush denormals and keep freed memory for reuse while the block runs; yields whether the
    allocator setting took effect (False off glibc)."""
    if not enabled:
        yield False
        return
    libc = _glibc()
    tuned = bool(libc) and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    torch.set_flush_denormal(True)
    try:
        yield tuned
    finally:
        torch.set_flush_denormal(False)
        if tuned:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count (`trainer.num_threads`) for the block, the previous one after it."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RunRNG:
    """The generators a run draws from (dropout), kept apart from the process's, and a Stateful
    (torch.distributed.checkpoint.stateful) the checkpoint saves and restores as the tensors rng.cpu and, on a
    GPU, rng.cuda. `with rng.active():` puts the run's states in place (CPU and the CUDA device's); when the
    block ends it keeps them and gives the process its own back. Seeded from `trainer.seed`. Inside the block
    `state_dict` / `load_state_dict` read and set the generators themselves (a save or resume during the run),
    outside it the states the run keeps."""

    def __init__(self, seed: int, device: torch.device):
        self.cuda = [device] if device.type == "cuda" else []
        self._active = False
        with torch.random.fork_rng(devices=self.cuda):
            torch.manual_seed(seed)
            self._held = self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        for d in self.cuda:
            state["cuda"] = torch.cuda.get_rng_state(d)
        return state

    def _write(self, state: dict[str, torch.Tensor]) -> None:
        if "cpu" in state:
            torch.set_rng_state(state["cpu"])
        for d in self.cuda:
            if "cuda" in state:
                torch.cuda.set_rng_state(state["cuda"], d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """"cpu" (and "cuda" on a GPU run): the generators' states now."""
        return self._read() if self._active else dict(self._held)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The states a checkpoint holds (a generator it does not hold keeps its own)."""
        if self._active:
            self._write(state)
        else:
            self._held |= {k: v for k, v in state.items() if k in self._held}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda):
            self._write(self._held)
            self._active = True
            try:
                yield
            finally:
                self._held, self._active = self._read(), False
