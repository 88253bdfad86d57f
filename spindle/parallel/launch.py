"""The launch environment: what torchrun or Slurm handed this process, checked before any process group.

`--launcher torch` reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT as
torchrun sets them. `--launcher slurm` reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and takes the
master address from the first host of SLURM_JOB_NODELIST (or SLURM_NODELIST), expanding bracketed
ranges itself instead of shelling out to `scontrol`.

torch's rendezvous turns a bad value into a traceback or a hang (RANK=3 of WORLD_SIZE=2 waits for a
rank that never comes; an unresolvable MASTER_ADDR retries until the group timeout), so every value is
checked here first and a bad one is one line naming the variable and what was expected (`LaunchError`,
exit 2, printed by every process: a rank whose own RANK is wrong cannot know it is not rank 0).

`LauncherWatch`: a rank started by a launcher leaves when the launcher dies. Without it a SIGKILLed
torchrun agent left its ranks training to the last step and saving, with nobody to stop them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Mapping, Optional

from spindle.errors import SpindleError

MAX_WORLD = 1 << 20
# a resolver that does not answer (no DNS reachable) must not hang the start; 30 s covers the usual
# resolv.conf retries (timeout 5 s x attempts 2 x 3 servers)
ADDRESS_TIMEOUT_S = 30.0
SLURM_DEFAULT_PORT = 8888
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2  # linux/prctl.h
PARENT_EXIT_GRACE_S = 2.0  # how long a SIGTERM waits to see whether the launcher is exiting (LauncherWatch)


class LaunchError(SpindleError):
    """A launch variable this process was handed is wrong; each process says its own (see module doc)."""

    every_rank = True


def int_variable(env: Mapping[str, str], name: str, lo: int, hi: int, why: str = "") -> int:
    raw = env.get(name, "")
    text = raw.strip()
    if not re.fullmatch(r"[0-9]{1,9}", text) or not lo <= int(text) <= hi:
        raise LaunchError(f"environment variable {name}={raw!r}: expected an integer in [{lo}, {hi}]{why}")
    return int(text)


def _required(env: Mapping[str, str], names: tuple[str, ...], how: str) -> None:
    for name in names:
        if not env.get(name, "").strip():
            raise LaunchError(f"environment variable {name} is not set (or empty); {how}")


def _address(value: str, what: str) -> str:
    """A host name or an IP address: printable ASCII without spaces (resolved later, in `check_rendezvous`)."""
    if not re.fullmatch(r"[!-~]{1,253}", value.strip()):
        raise LaunchError(f"{what}: expected a host name or an IP address (printable characters, no spaces), "
                          f"got {value!r}")
    return value.strip()


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm host list, as `scontrol show hostnames` would list it first:
    'node[03-05,09],gpu1' -> 'node03', 'a[1-2]b' -> 'a1b', 'rack1-[3-4].cluster' -> 'rack1-3.cluster',
    'r[1-2]n[07-08]' -> 'r1n07'. Commas inside brackets do not separate hosts; each bracket group stands for
    its first number, zero-padding kept (the digits are copied, not converted)."""
    text = nodelist.strip()
    # the first entry: everything up to the first comma outside brackets
    first = re.match(r"(?:[^,\[\]]|\[[^\[\]]*\])*", text).group(0)
    groups = re.findall(r"\[([^\[\]]*)\]", first)
    literal = re.sub(r"\[[^\[\]]*\]", "", first)
    number = r"[0-9]+(?:-[0-9]+)?"
    if not literal or text[len(first):len(first) + 1] not in ("", ",") or not all(
            re.fullmatch(rf"{number}(?:,{number})*", g) for g in groups):
        raise LaunchError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}; expected host names "
                          "such as 'node[03-05],gpu1'")
    return re.sub(r"\[([0-9]+)[^\]]*\]", r"\1", first)


def launcher_env(launcher: str, port: Optional[int], environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The rendezvous variables for init_process_group, from the launcher's environment, every value
    checked (integers, ranges, rank below world size, port in 1..65535); {} for a single process."""
    env = os.environ if environ is None else environ
    if launcher == "slurm":
        _required(env, ("SLURM_PROCID", "SLURM_NTASKS"), "--launcher slurm reads it: run under srun, or use "
                  "--launcher torch")
        world = int_variable(env, "SLURM_NTASKS", 1, MAX_WORLD)
        rank = int_variable(env, "SLURM_PROCID", 0, world - 1, f" (below SLURM_NTASKS={world})")
        local = int_variable(env, "SLURM_LOCALID", 0, world - 1) if env.get("SLURM_LOCALID", "").strip() else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = _address(env["MASTER_ADDR"], "environment variable MASTER_ADDR") if env.get("MASTER_ADDR") \
            else _address(first_slurm_host(nodelist), "the first host of SLURM_JOB_NODELIST")
        if port is None and env.get("MASTER_PORT", "").strip():
            port = int_variable(env, "MASTER_PORT", 1, 65535)
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "MASTER_ADDR": addr,
                "MASTER_PORT": str(port or SLURM_DEFAULT_PORT)}
    if launcher != "torch" or ("RANK" not in env and "WORLD_SIZE" not in env):
        return {}  # plain `python train.py --launcher torch`: one process
    _required(env, ("RANK", "WORLD_SIZE", "MASTER_ADDR") + (() if port else ("MASTER_PORT",)),
              "--launcher torch reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun sets them all)")
    world = int_variable(env, "WORLD_SIZE", 1, MAX_WORLD)
    rank = int_variable(env, "RANK", 0, world - 1, f" (below WORLD_SIZE={world})")
    local_world = world
    if env.get("LOCAL_WORLD_SIZE", "").strip():
        local_world = int_variable(env, "LOCAL_WORLD_SIZE", 1, world, f" (at most WORLD_SIZE={world})")
    local = 0
    if env.get("LOCAL_RANK", "").strip():
        local = int_variable(env, "LOCAL_RANK", 0, local_world - 1, f" (below LOCAL_WORLD_SIZE={local_world})")
    port = port or int_variable(env, "MASTER_PORT", 1, 65535)
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
            "MASTER_ADDR": _address(env["MASTER_ADDR"], "environment variable MASTER_ADDR"),
            "MASTER_PORT": str(port)}


def chosen_launcher_env(launcher: Optional[str], port: Optional[int]) -> dict[str, str]:
    """What `init_distributed` starts from: the named launcher's variables, else torchrun's when RANK is set."""
    if launcher:
        return launcher_env(launcher, port)
    return launcher_env("torch", port) if "RANK" in os.environ else {}


def resolve_address(host: str, what: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """`host` resolves on this machine within `timeout_s` (getaddrinfo has no timeout of its own, so it runs
    in a daemon thread that is left behind if the resolver never answers)."""
    outcome: dict[str, BaseException] = {}

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=lookup, name="spindle-resolve", daemon=True)
    thread.start()
    thread.join(timeout_s)
    expected = "expected a host name or address this machine can resolve (the host of rank 0)"
    if thread.is_alive():
        raise LaunchError(f"{what}={host!r}: the name resolver gave no answer within {timeout_s:g} s; {expected}")
    if "error" in outcome:
        exc = outcome["error"]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LaunchError(f"{what}={host!r}: cannot be resolved ({reason}); {expected}")


def check_port_free(port: int, what: str) -> None:
    """The port rank 0's rendezvous store will listen on (all interfaces) is free here."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is no conflict
        probe.bind(("", port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LaunchError(f"{what} {port}: the port is in use on this host; expected a free port for rank 0's "
                              "rendezvous (choose another)") from None
        if exc.errno == errno.EACCES:
            raise LaunchError(f"{what} {port}: this user may not listen on it; expected a port above 1023") from None
        raise LaunchError(f"{what} {port}: cannot listen on it ({exc.strerror})") from None
    finally:
        probe.close()


def check_rendezvous(variables: Mapping[str, str], port_option: Optional[int],
                     address_timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Before init_process_group: MASTER_ADDR resolves (within a bound) and, where this process will host
    the rendezvous store (rank 0, unless torchrun's agent hosts it), its port is free."""
    resolve_address(variables["MASTER_ADDR"], "MASTER_ADDR", address_timeout_s)
    hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if variables["RANK"] == "0" and hosts_store:
        check_port_free(int(variables["MASTER_PORT"]), "--port" if port_option else "MASTER_PORT")


def started_by_launcher(launcher: Optional[str]) -> bool:
    """torchrun's agent (TORCHELASTIC_RUN_ID) or srun's slurmstepd (SLURM_STEP_ID) is this process's parent.
    Processes started by hand with launcher variables (tests, mpirun scripts) are left alone."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return True
    return launcher == "slurm" and bool(os.environ.get("SLURM_STEP_ID"))


def launcher_exited(parent: int) -> bool:
    """The parent changed or is exiting. The kernel signals when the parent's thread exits, and the children
    of a process with more threads may first go to one of its other, also dying threads (same pid), so
    the parent's own state is read too, for a short while, before a SIGTERM is taken as an ordinary one."""
    deadline = time.monotonic() + PARENT_EXIT_GRACE_S
    while True:
        if os.getppid() != parent:
            return True
        try:
            state = open(f"/proc/{parent}/stat").read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def launcher_watched() -> bool:
    """A LauncherWatch is armed in this process: the kernel sends it SIGTERM when its parent dies (what
    spindle.train.signals asks before it takes a SIGTERM as a request to save)."""
    if not sys.platform.startswith("linux"):
        return False
    deathsig = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(deathsig), 0, 0, 0) == 0 and deathsig.value == signal.SIGTERM


class LauncherWatch:
    """While armed, this process stops with one line when its launcher (the parent seen at start) exits.

    The kernel sends SIGTERM on the parent's death (prctl PR_SET_PDEATHSIG); the handler tells that apart
    from any other SIGTERM by the parent pid having changed, and any other SIGTERM keeps its usual meaning
    (the previous handler, else the default: terminated). A launcher that died before `arm` is caught by
    the same check right after the request. Linux only; elsewhere `arm` does nothing."""

    def __init__(self, parent: int, rank: int):
        self.parent, self.rank = parent, rank
        self._previous = None
        self._armed = False

    def arm(self) -> "LauncherWatch":
        if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
            return self
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return self
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._armed = True
        os.register_at_fork(after_in_child=self._not_in_a_child)
        if os.getppid() != self.parent:  # gone before the request: no signal will come
            self._leave()
        return self

    def _not_in_a_child(self) -> None:
        """A process forked from this rank (the worker pool of spindle.data.prepare) is not the rank: it gets
        the SIGTERM it had before. With this handler a pool worker took Pool.terminate()'s SIGTERM for the
        launcher's death, and one could outlive it, the rank waiting for it forever."""
        if not self._armed:
            return
        self._armed = False
        try:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        except ValueError:  # signal.signal refused outside the main thread: the child keeps the handler
            pass

    def disarm(self) -> None:
        if not self._armed:
            return
        self._armed = False
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)

    def _leave(self) -> None:
        try:
            print(f"spindle: error: rank {self.rank}: its launcher (pid {self.parent}) exited; this rank stops "
                  "too", file=sys.stderr, flush=True)
        except OSError:
            pass  # the launcher held the other end of the pipe
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # end as SIGTERM always ended a rank (nothing half-written is marked)

    def _launcher_gone(self) -> bool:
        return launcher_exited(self.parent)

    def _on_sigterm(self, signum, frame) -> None:
        if self._launcher_gone():
            self._leave()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if previous in (None, signal.SIG_DFL):
            os.kill(os.getpid(), signal.SIGTERM)
