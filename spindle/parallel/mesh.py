"""The process group: from the launch environment (checked in `spindle.parallel.launch`) to a `ParallelEnv`.

A single process with neither launcher's variables runs without a process group at all. Collectives
wait at most `parallel.timeout_s` for the other ranks; a rank that stops answering (frozen, hung, cut
off) or goes away ends the job with one line on the rank that noticed (`PeerLost`) instead of a gloo
traceback or a 600 s wait.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from spindle.errors import SpindleError
from spindle.parallel.launch import MAX_WORLD, LaunchError, check_rendezvous, chosen_launcher_env, int_variable

# what gloo, the TCP store and NCCL's watchdog say when a peer did not answer in time / went away (not
# any "timed out": a DataLoader's or an HTTP client's own timeouts are no peer's doing)
_TIMED_OUT = re.compile(r"timed out waiting|socket has timed out|waiting for clients|wait timeout|"
                        r"collective operation timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)


class PeerLost(SpindleError):
    """Another rank stopped answering or went away: the job failed (exit 1), not the input; said by the
    rank that noticed, whichever it is."""

    exit_code = 1
    every_rank = True


def peer_failure(exc: BaseException, rank: int, timeout_s: float) -> Optional[PeerLost]:
    """The one line for a collective that failed because of another rank, None for any other error."""
    messages, seen = [], exc
    while seen is not None and len(messages) < 8:  # the error and what it was raised from
        messages.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(messages)
    if _TIMED_OUT.search(text):
        return PeerLost(f"rank {rank}: another rank did not answer within parallel.timeout_s={timeout_s:g} s "
                        "(stopped, hung or cut off); the job stops. Raise parallel.timeout_s if a step or a "
                        "save legitimately takes longer")
    if _PEER_GONE.search(text):
        return PeerLost(f"rank {rank}: another rank closed its connection (it exited or was killed); the job "
                        "stops. That rank's own output says why")
    return None


@dataclass(frozen=True)
class ParallelEnv:
    """This process as the launcher started it (or one process alone): no layout; `Layout.build` (in
    spindle/parallel/layout.py) makes the layout of a config over these processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def cuda_device(local_rank: int) -> torch.device:
    """The CUDA device of the process with this local rank, among the devices it can see.

    A launcher that gives each task its own devices (srun --gpus-per-task, --gpu-bind; it sets
    CUDA_VISIBLE_DEVICES per task) leaves a task one visible device, cuda:0, whatever its local rank:
    so a local rank past the visible count maps modulo the count when CUDA_VISIBLE_DEVICES is set.
    Without it, or under torchrun (which starts LOCAL_WORLD_SIZE processes that all see the same
    devices), more processes than devices on a node is an error here, not an invalid device ordinal
    later. Two tasks handed the same CUDA_VISIBLE_DEVICES by hand cannot be told apart from here;
    NCCL refuses them at the first collective ("Duplicate GPU detected")."""
    environ = os.environ
    count = torch.cuda.device_count()
    if count == 0:
        raise SpindleError("CUDA is available but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                           f"{environ.get('CUDA_VISIBLE_DEVICES')!r}); use trainer.device='cpu'")
    local_world = int_variable(environ, "LOCAL_WORLD_SIZE", 1, MAX_WORLD) \
        if environ.get("LOCAL_WORLD_SIZE", "").strip() else 0
    if local_world > count:
        raise SpindleError(f"{local_world} processes on this node (LOCAL_WORLD_SIZE) but {count} visible CUDA "
                           f"device(s): start at most {count} per node (torchrun --nproc_per_node={count})")
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if environ.get("CUDA_VISIBLE_DEVICES"):
        return torch.device("cuda", local_rank % count)
    raise SpindleError(f"local rank {local_rank} but this process sees {count} CUDA device(s) and "
                       "CUDA_VISIBLE_DEVICES is not set: start at most one process per device on a node, or have "
                       "the launcher give each task its own devices (srun --gpus-per-task=1)")


def init_distributed(launcher: Optional[str] = None, backend: Optional[str] = None, port: Optional[int] = None,
                     device: str = "auto", timeout_s: float = 600.0) -> ParallelEnv:
    """Start the process group (when there is more than one process, or a launcher asked for it). Every
    launch value is checked first (`spindle.parallel.launch`): a bad one is one line, before any group."""
    variables = chosen_launcher_env(launcher, port)
    if device == "cuda" and not torch.cuda.is_available():
        raise SpindleError(f"trainer.device='cuda' but this machine has no usable CUDA device (torch "
                           f"{torch.__version__}); use trainer.device='auto' or 'cpu'")
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "nccl" and not want_cuda:
        raise SpindleError("--backend nccl needs CUDA devices; on CPU use --backend gloo (the default there)")
    if not variables:
        dev = cuda_device(0) if want_cuda else torch.device("cpu")
        return ParallelEnv(device=dev)
    check_rendezvous(variables, port)
    os.environ.update(variables)
    rank, world = int(variables["RANK"]), int(variables["WORLD_SIZE"])
    local = int(variables["LOCAL_RANK"])
    backend = backend or ("nccl" if want_cuda else "gloo")
    dev = cuda_device(local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:  # torch's DistError family
            where = f"{variables['MASTER_ADDR']}:{variables['MASTER_PORT']}"
            if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
                raise LaunchError(f"MASTER_PORT {variables['MASTER_PORT']}: the port is in use on this host; "
                                   "expected a free port for rank 0's rendezvous (choose another)") from None
            if _TIMED_OUT.search(str(exc)):
                raise PeerLost(f"rank {rank}: not every one of the {world} ranks reached the rendezvous at {where} "
                               f"within parallel.timeout_s={timeout_s:g} s; the job stops") from None
            raise
    return ParallelEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def leave_together(timeout_s: float = 30.0) -> None:
    """After an error every rank met (a refused folder, a layout error): wait, briefly, for the others, so
    all exit with the same code instead of the launcher killing the slower ones. Returns after
    `timeout_s` when a rank does not come (its error was its own)."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - a rank that does not come: we leave anyway
        pass


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
