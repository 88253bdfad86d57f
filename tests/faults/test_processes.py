"""Processes end cleanly (issue 22, point 6): a dead launcher, a frozen rank, a bad launch environment, a busy
port, an unresolvable address, a planted lock file and the S3 lease of a dead run.

The launch values are checked in-process (`spindle.cli.main`, a process group would be made only past
the checks: reaching it fails the test); real processes only where the point is one: the exit code, a
SIGKILLed torchrun agent, a SIGSTOPped rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from faults.test_faults import RANK_CONFIG, _children_by_rank  # a 2-rank job, its ranks found through /proc
from s3server import free_port
from spindle.checkpoint.lock import LOCK_FILE, FolderLock, owner_info
from spindle.checkpoint.storage import S3Settings, open_storage
from spindle.cli import main
from spindle.errors import SpindleError

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_ID",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


@pytest.fixture
def launch_env(monkeypatch):
    """A clean launch environment, restored afterwards (init_distributed exports what it read)."""
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def use(**values):
        for name, value in values.items():
            if value is not None:
                monkeypatch.setenv(name, value)
    return use


@pytest.fixture
def no_process_group(monkeypatch):
    """Reaching init_process_group means a bad value went through."""
    import torch.distributed as dist

    def made(**kw):
        raise AssertionError(f"a process group was made with {kw}")
    monkeypatch.setattr(dist, "init_process_group", made)


def job_config(tmp_path: Path) -> str:
    path = tmp_path / "ranks.py"
    path.write_text(RANK_CONFIG.format(run=str(tmp_path / "runs")))
    return str(path)


def train_in_process(tmp_path, capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["train", "--config", job_config(tmp_path), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not (tmp_path / "runs").exists()  # nothing written
    return code, err


TORCH = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
SLURM = dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_JOB_NODELIST="127.0.0.1")


@pytest.mark.parametrize("launcher, values, expected", [
    ("torch", dict(RANK="3"), "RANK='3': expected an integer in [0, 1] (below WORLD_SIZE=2)"),
    ("torch", dict(RANK="abc"), "RANK='abc': expected an integer in [0, 1]"),
    ("torch", dict(RANK="-1"), "RANK='-1': expected an integer in [0, 1]"),
    ("torch", dict(WORLD_SIZE="0", RANK="0"), "WORLD_SIZE='0': expected an integer in [1, 1048576]"),
    ("torch", dict(WORLD_SIZE="two"), "WORLD_SIZE='two': expected an integer"),
    ("torch", dict(RANK=None), "environment variable RANK is not set"),
    ("torch", dict(MASTER_PORT="70000"), "MASTER_PORT='70000': expected an integer in [1, 65535]"),
    ("torch", dict(MASTER_PORT="http"), "MASTER_PORT='http': expected an integer in [1, 65535]"),
    ("torch", dict(MASTER_PORT=None), "environment variable MASTER_PORT is not set"),
    ("torch", dict(MASTER_ADDR=None), "environment variable MASTER_ADDR is not set"),
    ("torch", dict(MASTER_ADDR="two words"), "MASTER_ADDR: expected a host name or an IP address"),
    ("torch", dict(LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"), "LOCAL_RANK='2': expected an integer in [0, 1]"),
    ("torch", dict(LOCAL_WORLD_SIZE="3"), "LOCAL_WORLD_SIZE='3': expected an integer in [1, 2]"),
    ("slurm", dict(SLURM_PROCID="x"), "SLURM_PROCID='x': expected an integer in [0, 1]"),
    ("slurm", dict(SLURM_PROCID="2"), "SLURM_PROCID='2': expected an integer in [0, 1] (below SLURM_NTASKS=2)"),
    ("slurm", dict(SLURM_NTASKS="0"), "SLURM_NTASKS='0': expected an integer in [1, 1048576]"),
    ("slurm", dict(SLURM_LOCALID="-3"), "SLURM_LOCALID='-3': expected an integer in [0, 1]"),
    ("slurm", dict(MASTER_PORT="0"), "MASTER_PORT='0': expected an integer in [1, 65535]"),
    ("slurm", dict(SLURM_JOB_NODELIST="[1-2]"), "SLURM_JOB_NODELIST: cannot read a host from '[1-2]'"),
])
def test_bad_launch_value_is_one_line_before_any_process_group(tmp_path, capsys, launch_env, no_process_group,
                                                               launcher, values, expected):
    launch_env(**{**(TORCH if launcher == "torch" else SLURM), **values})  # None: not set
    code, err = train_in_process(tmp_path, capsys, "--launcher", launcher)
    assert code == 2 and len(err) == 1 and err[0].startswith("spindle: error: ") and expected in err[0], err


def test_bad_launch_value_in_dry_run_is_one_line(tmp_path, capsys, launch_env):
    launch_env(WORLD_SIZE="0", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    assert main(["train", "--config", job_config(tmp_path), "--dry-run"]) == 2
    assert "WORLD_SIZE='0': expected an integer in [1, 1048576]" in capsys.readouterr().err


@pytest.mark.slow
def test_rank_past_the_world_size_exits_2_at_once(tmp_path):
    """The one real process for the exit path (it used to wait for a rank 3 of 2 that never came)."""
    env = child_env(RANK="3", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "train.py", "--config", job_config(tmp_path), "--launcher", "torch"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("spindle: error: environment variable RANK='3': expected an integer in [0, 1] "
                                   "(below WORLD_SIZE=2)")
    assert not (tmp_path / "runs").exists()


def test_busy_port_is_one_line(tmp_path, capsys, launch_env, no_process_group):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launch_env(**{**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
        code, err = train_in_process(tmp_path, capsys, "--launcher", "slurm", "--port", str(port))
    assert code == 2 and err == [f"spindle: error: --port {port}: the port is in use on this host; expected a free "
                                 "port for rank 0's rendezvous (choose another)"], err


def test_unresolvable_master_addr_is_one_line_within_the_bound(tmp_path, capsys, launch_env, no_process_group):
    from spindle.parallel.launch import ADDRESS_TIMEOUT_S

    launch_env(**{**TORCH, "MASTER_ADDR": "no-such-host.invalid"})  # .invalid never resolves (RFC 6761)
    t0 = time.monotonic()
    code, err = train_in_process(tmp_path, capsys, "--launcher", "torch")
    took = time.monotonic() - t0
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "spindle: error: MASTER_ADDR='no-such-host.invalid': cannot be resolved"), err
    assert took < ADDRESS_TIMEOUT_S + 10, took


def test_resolver_that_never_answers_is_cut_at_the_bound(monkeypatch):
    from spindle.parallel import launch

    monkeypatch.setattr(launch.socket, "getaddrinfo", lambda *a, **k: time.sleep(30))
    t0 = time.monotonic()
    with pytest.raises(SpindleError, match=r"MASTER_ADDR='slow.example': the name resolver gave no answer within "
                                           r"0.5 s"):
        launch.resolve_address("slow.example", "MASTER_ADDR", timeout_s=0.5)
    assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- real torchrun jobs


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Job:
    """A 2-rank torchrun job of RANK_CONFIG whose output is collected as it comes."""

    def __init__(self, tmp_path: Path, *overrides: str):
        cfg = job_config(tmp_path)
        torchrun = str(Path(sys.executable).parent / "torchrun")
        args = ["--set", *overrides] if overrides else []
        self.proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--config",
                                      cfg, "--launcher", "torch", *args], cwd=REPO, env=child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.metrics = tmp_path / "runs" / "ranks" / "metrics.jsonl"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for_steps(self, n: int) -> dict[int, int]:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text[-3000:]
            if self.metrics.is_file() and len(self.metrics.read_text().splitlines()) >= n:
                ranks = _children_by_rank(self.proc.pid)
                assert set(ranks) == {0, 1}, ranks
                return ranks
            time.sleep(0.1)
        raise AssertionError(f"no {n} steps within 180 s: {self.text[-3000:]}")

    def first_line_with(self, text: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if text in line:
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} within {timeout_s} s: {self.text[-3000:]}")

    def close(self, ranks: dict[int, int]) -> None:
        for pid in [self.proc.pid, *ranks.values()]:
            if not _gone(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank processes")
def test_killed_launcher_takes_its_ranks_with_it(tmp_path):
    """SIGKILL of torchrun's agent: both ranks used to train on to the last step and save."""
    job = Job(tmp_path)
    ranks = {}
    try:
        ranks = job.wait_for_steps(2)
        t_kill = time.monotonic()
        os.kill(job.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_gone(pid) for pid in ranks.values()):
            time.sleep(0.1)
        took = time.monotonic() - t_kill
        assert all(_gone(pid) for pid in ranks.values()), f"ranks still running 30 s after: {job.text[-3000:]}"
        job.reader.join(timeout=10)  # the ranks held the pipe: closed once both are gone
    finally:
        job.close(ranks)
    # found in the whole text, not per line: the two ranks write to one pipe, and a rank's line can land in the
    # middle of the other's (its monitor's `alert: sigterm ...` line) on a loaded machine
    said = re.findall(r"spindle: error: rank \d+: its launcher \(pid \d+\) exited; this rank stops too", job.text)
    assert sorted(said) == sorted(f"spindle: error: rank {r}: its launcher (pid {job.proc.pid}) exited; this rank "
                                  "stops too" for r in (0, 1)), job.text[-3000:]
    assert "Traceback" not in job.text, job.text[-3000:]
    steps = len(job.metrics.read_text().splitlines())
    print(f"\nFIGURES launcher_kill: both ranks gone {took:.1f} s after SIGKILL of the agent, {steps} steps logged")


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank processes")
def test_frozen_rank_ends_the_job_within_parallel_timeout_s(tmp_path):
    """SIGSTOP of rank 1: rank 0 used to wait 600 s (a fixed collective timeout) in a gloo call."""
    timeout_s = 8
    job = Job(tmp_path, f"parallel.timeout_s={timeout_s}")
    ranks = {}
    try:
        ranks = job.wait_for_steps(2)
        t_stop = time.monotonic()
        os.kill(ranks[1], signal.SIGSTOP)
        said_at = job.first_line_with("did not answer within parallel.timeout_s", timeout_s + 30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _gone(ranks[0]):  # the survivor leaves on its own
            time.sleep(0.1)
        left_after = time.monotonic() - t_stop
        os.kill(ranks[1], signal.SIGKILL)  # what torchrun does after its 30 s grace (SIGTERM waits on a stopped rank)
        rc = job.proc.wait(timeout=60)
    finally:
        job.close(ranks)
    job.reader.join(timeout=10)
    waited = said_at - t_stop
    print(f"\nFIGURES frozen_rank: the line came {waited:.1f} s after SIGSTOP, rank 0 gone after {left_after:.1f} s "
          f"(parallel.timeout_s={timeout_s})")
    lines = [line for _, line in job.lines if "spindle: error:" in line]
    assert lines == [f"spindle: error: rank 0: another rank did not answer within parallel.timeout_s={timeout_s} s "
                     "(stopped, hung or cut off); the job stops. Raise parallel.timeout_s if a step or a save "
                     "legitimately takes longer\n"], job.text[-3000:]
    assert rc != 0 and timeout_s <= waited < timeout_s + 10 and left_after < timeout_s + 30, (rc, waited, left_after)
    assert "/spindle/" not in job.text, job.text[-3000:]  # no traceback of ours (torchrun prints its own report)


# ----------------------------------------------------------------------------- locks


def test_lock_file_planted_as_a_link_is_refused_and_the_user_file_keeps_its_bytes(tmp_path):
    precious = tmp_path / "thesis.tex"
    precious.write_bytes(b"four years of work\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / LOCK_FILE).symlink_to(precious)
    lock = FolderLock(open_storage(str(ckpt)), "job")
    with pytest.raises(SpindleError, match=r"\.spindle\.lock: is a symbolic link; Spindle does not write"):
        lock.acquire()
    assert precious.read_bytes() == b"four years of work\n"
    (ckpt / LOCK_FILE).unlink()
    os.link(precious, ckpt / LOCK_FILE)  # a hard link to it: the same file under another name
    with pytest.raises(SpindleError, match=r"\.spindle\.lock: is one of 2 names of the same file"):
        lock.acquire()
    assert precious.read_bytes() == b"four years of work\n"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def s3_folder(moto_server, monkeypatch):
    import boto3

    for name in ("AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"spindle-{uuid.uuid4().hex[:10]}"
    keys = dict(aws_access_key_id="AKIASPINDLETEST0001", aws_secret_access_key="secret-of-the-test")
    boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1", **keys).create_bucket(Bucket=bucket)
    return open_storage(f"boto3:s3://{bucket}/ckpt", endpoint_url=moto_server.endpoint, access_key=keys[
        "aws_access_key_id"], secret_key=keys["aws_secret_access_key"],
        settings=S3Settings(max_attempts=2))


def test_s3_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(s3_folder, spindle_lines):
    dead = {**owner_info("killed"), "pid": _dead_pid()}  # refreshed a moment ago, by a process now gone
    s3_folder.write_bytes(LOCK_FILE, json.dumps(dead).encode())
    said = spindle_lines
    said.clear()  # from here on
    t0 = time.monotonic()
    lock = FolderLock(s3_folder, "next").acquire()
    try:
        assert time.monotonic() - t0 < 10
        assert said == [f"checkpoint: taking over the lease of a run that is gone (job 'killed', pid {dead['pid']} "
                        f"on {dead['host']}, since " + said[0].split(", since ")[1]]
        assert json.loads(s3_folder.read_bytes(LOCK_FILE))["job"] == "next"
    finally:
        lock.release()


@pytest.mark.parametrize("who", ["live here", "another machine"])
def test_s3_lease_of_a_live_or_unknown_owner_is_still_refused(s3_folder, who):
    from spindle.checkpoint.lock import _process_start

    owner = {**owner_info("running"), "pid": os.getppid(), "pid_start": _process_start(os.getppid())}  # alive
    if who == "another machine":
        owner.update(pid=_dead_pid(), machine="another-boot/pid:[1]")  # a pid that cannot be checked from here
    s3_folder.write_bytes(LOCK_FILE, json.dumps(owner).encode())
    with pytest.raises(SpindleError, match="this save folder is in use by job 'running'"):
        FolderLock(s3_folder, "next").acquire()


def test_only_a_peer_that_timed_out_or_hung_up_becomes_the_peer_line():
    from spindle.parallel.mesh import peer_failure

    gloo = "[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms for recv operation to complete"
    assert "did not answer within parallel.timeout_s=8 s" in str(peer_failure(RuntimeError(gloo), 0, 8))
    store = "Timed out after 61 seconds waiting for clients. 1/2 clients joined."
    assert peer_failure(RuntimeError(store), 1, 60) is not None
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5")
    assert "another rank closed its connection" in str(peer_failure(wrapped, 0, 8))
    assert peer_failure(RuntimeError("DataLoader timed out after 5 seconds"), 0, 8) is None
    assert peer_failure(RuntimeError("shape mismatch"), 0, 8) is None
