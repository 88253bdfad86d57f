"""Fault injection with real processes, real signals, a real S3 server and a real full disk.

- 20 SIGKILLs at seeded random moments of one training run (checkpoint_every=1, so some land while a
  checkpoint is being written): every auto-resumed life logs the uninterrupted run's per-step losses
  bit for bit, and every resume starts from a checkpoint that had its completion marker.
- The S3 endpoint goes away during an async upload and comes back: training goes on, the upload is
  retried and marked, a resume from S3 is exact.
- A full disk (a 2 MiB tmpfs when mounting works, else ENOSPC injected at fsync) under the checkpoint
  folder: one clear SpindleError, the previous checkpoint intact and resumable.
- NaN injected into the loss and into the gradients: the step is skipped, counted and alerted.
- fp16 overflow: the loss scale backs off.
- One of two torchrun ranks SIGKILLed: the other is ended and torchrun names the failed rank < 60 s.

    .venv/bin/python -m pytest tests/faults -m faults -q -s      # figures are printed with -s
"""

from __future__ import annotations

import json
import math
import os
import random
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import tiny_cfg  # noqa: E402
from s3server import MotoServer, find_moto_server, free_port  # noqa: E402

from spindle.config import validate_config  # noqa: E402
from spindle.errors import SpindleError  # noqa: E402
from spindle.parallel.mesh import ParallelEnv  # noqa: E402
from spindle.train.trainer import Trainer  # noqa: E402

pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in PROXY_VARS:
        env.pop(k, None)
    return env


def read_records(path: Path) -> list[dict]:
    """Every parseable line (a SIGKILL can tear the last line of a life)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# =========================================================================== 20 SIGKILLs

KILLS = 20
TOTAL = 40
KILL_CONFIG = """
JOB_NAME = "kills"
ckpt = dict(enable_save_ckpt=True, checkpoint_every=1, auto_resume=True, keep_last_n=2)
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps={total}, fixed_random_dataset_seqlen=False)
adam = dict(lr=1e-2)
lr_scheduler = dict(warmup_ratio=0.2, total_steps={total})
model = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=96,
             multiple_of=16, max_position_embeddings=32, drop_rate=0.1, attn_drop_rate=0.1)
loss = dict(label_smoothing=0.1)
trainer = dict(run_folder={run!r}, tensorboard=False, progress_bar=False, seed=11, num_threads=1, log_every=1)
"""


def _train_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "spindle.cli", "train", "--config", str(cfg)]


def _kill_setup(tmp: Path, name: str) -> tuple[Path, Path]:
    run = tmp / name
    run.mkdir()
    cfg = run / "config.py"
    cfg.write_text(KILL_CONFIG.format(total=TOTAL, run=str(run)))
    return cfg, run / "kills"


def _markers(ckpt: Path) -> tuple[set[int], set[int]]:
    """(steps with a completion marker, step folders without one)."""
    if not ckpt.is_dir():
        return set(), set()
    marked = {int(p.stem) for p in ckpt.glob("*.step") if p.stem.isdigit()}
    folders = {int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()}
    return marked, folders - marked


def test_twenty_sigkills_every_resume_is_bit_exact(tmp_path):
    cfg_ref, run_ref = _kill_setup(tmp_path, "ref")
    ref = subprocess.run(_train_cmd(cfg_ref), env=child_env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    want = {r["step"]: r["loss"] for r in read_records(run_ref / "metrics.jsonl")}
    assert sorted(want) == list(range(TOTAL))

    cfg, run = _kill_setup(tmp_path, "victim")
    metrics, ckpt = run / "metrics.jsonl", run / "ckpt"
    rng = random.Random(20240607)
    kills, during_write, resumed_from, lives = 0, 0, [], 0
    t0 = time.monotonic()
    while True:
        lives += 1
        assert lives <= KILLS + 5, "too many lives"
        marked_before, _ = _markers(ckpt)
        log = cfg.parent / f"life{lives}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(_train_cmd(cfg), env=child_env(), cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT)
            if kills < KILLS:
                start_lines = len(read_records(metrics))
                target = start_lines + 1 + rng.randint(0, 1)  # after 1-2 fresh steps of this life ...
                delay = rng.uniform(0.0, 0.15)  # ... at a random moment of the next step or its save
                while proc.poll() is None and len(read_records(metrics)) < target:
                    time.sleep(0.005)
                time.sleep(delay)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    kills += 1
                    marked, unmarked = _markers(ckpt)
                    if unmarked and max(unmarked) > max(marked, default=-1):
                        during_write += 1  # killed while writing a checkpoint (folder without its marker)
            rc = proc.wait(timeout=300)
        text = log.read_text()
        m = re.search(r"auto_resume: continuing from \S+/(\d+) \(step (\d+)", text)
        if m:
            step = int(m.group(2))
            # the checkpoint loaded had its marker when this life started, and was the latest marked one
            assert step in marked_before and step == max(marked_before), (step, marked_before)
            resumed_from.append(step)
        else:
            assert not marked_before, text[-2000:]
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, text[-3000:]
    elapsed = time.monotonic() - t0

    records = read_records(metrics)
    assert kills == KILLS and len(resumed_from) >= KILLS
    bad = [(r["step"], r["loss"], want[r["step"]]) for r in records if r["loss"] != want[r["step"]]]
    assert not bad, bad[:5]  # every logged step of every life: bit-exact
    assert {r["step"] for r in records} == set(range(TOTAL))
    assert during_write >= 1, "no kill landed during a checkpoint write; change the seed or the delays"
    print(f"\nFIGURES sigkill: kills={kills} during_checkpoint_write={during_write} lives={lives} "
          f"resumes={len(resumed_from)} steps_logged={len(records)} wall={elapsed:.1f}s")


# =========================================================================== S3 outage


class TcpProxy:
    """127.0.0.1:port -> upstream. `stop()` closes the listener and every open connection (an
    outage: connection refused / reset), `start()` listens on the same port again."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = free_port()
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


ACCESS, SECRET = "AKIDFAULTTEST", "fault-suite-secret-never-printed"
OUTAGE_S = 1.5


def _s3_cfg(tmp_path: Path, folder, total, **ckpt):
    return validate_config({
        "JOB_NAME": "s3fault",
        "data": {"seq_len": 16, "micro_bsz": 2, "micro_num": 1, "total_steps": total},
        "model": {"hidden_size": 64, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
                  "vocab_size": 512, "multiple_of": 16, "max_position_embeddings": 16},
        "adam": {"lr": 1e-2},
        "lr_scheduler": {"total_steps": 10},
        "trainer": {"run_folder": str(tmp_path), "tensorboard": False, "progress_bar": False, "seed": 5,
                    "num_threads": 1},
        "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": folder,
                 "async_upload_tmp_folder": str(tmp_path / "stage"), **ckpt},
    })


def test_s3_outage_during_async_upload(tmp_path, monkeypatch, spindle_lines):
    exe = find_moto_server()
    if exe is None:
        pytest.skip("moto_server not installed")
    for k in PROXY_VARS:
        monkeypatch.delenv(k, raising=False)
    with MotoServer(exe) as server:
        proxy = TcpProxy(server.port)
        proxy.start()
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("S3_ACCESS_KEY_ID", ACCESS)
        monkeypatch.setenv("S3_SECRET_ACCESS_KEY", SECRET)
        import boto3

        bucket = f"fault-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        url = f"boto3:s3://{bucket}/run"
        full = [h["loss"] for h in Trainer(_s3_cfg(tmp_path / "ref", None, 10), ParallelEnv()).fit()["history"]]

        lines = spindle_lines
        lines.clear()  # from here on
        # botocore's standard retries, 10 attempts: up to a minute of patience, far more than the outage
        tr = Trainer(_s3_cfg(tmp_path, url, 8, checkpoint_every=4, async_upload=True, s3_max_attempts=10),
                     ParallelEnv())
        st = tr.ckpt_manager.storage
        calls = {"upload": 0, "failed": 0}

        def count_attempt(caught_exception=None, **_):  # each request's attempt, before botocore decides to retry
            calls["upload"] += 1
            calls["failed"] += caught_exception is not None
            return None  # the decision stays botocore's

        st._client.meta.events.register_first("needs-retry.s3.PutObject", count_attempt)
        outage = {"steps_during": 0, "down": False}
        real_save, real_step = tr.save, tr.train_step

        def save(*a, **kw):
            where = real_save(*a, **kw)
            if tr.state.step == 4:  # the upload of step 4 has just been queued: take the endpoint down
                proxy.stop()
                outage["down"] = True
                threading.Timer(OUTAGE_S, lambda: (proxy.start(), outage.update(down=False))).start()
            return where

        def step(mbs):
            out = real_step(mbs)
            if outage["down"]:
                time.sleep(0.3)
                outage["steps_during"] += 1
            return out

        tr.save, tr.train_step = save, step
        first = [h["loss"] for h in tr.fit()["history"]]
        assert outage["steps_during"] >= 2, "training did not go on during the outage"
        assert calls["failed"] >= 1, "the outage never hit an upload"  # and botocore's retries carried it
        files = st.list_files("")
        assert {"4.step", "8.step", "4/.metadata", "8/.metadata"} <= set(files)

        second = Trainer(_s3_cfg(tmp_path, url, 10, checkpoint_every=4, async_upload=True), ParallelEnv())
        assert second.state.step == 8
        rest = [h["loss"] for h in second.fit()["history"]]
        assert first + rest == full  # bit for bit
        assert not any(SECRET in l or ACCESS in l for l in lines)
        proxy.stop()
        print(f"\nFIGURES s3_outage: outage={OUTAGE_S}s steps_trained_during_outage={outage['steps_during']} "
              f"put_attempts={calls['upload']} failed_put_attempts={calls['failed']} resume_exact=True")


# =========================================================================== full disk


def _disk_cfg(tmp_path: Path, folder: Path, total: int):
    return tiny_cfg(tmp_path, JOB_NAME="disk", data={"total_steps": total}, lr_scheduler={"total_steps": 6},
                    ckpt={"enable_save_ckpt": True, "save_ckpt_folder": str(folder), "checkpoint_every": 2,
                          "auto_resume": True})


def _try_tmpfs(path: Path, size: str = "2m") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_full_disk_clear_error_previous_checkpoint_intact(tmp_path, monkeypatch):
    mnt = tmp_path / "small_disk"
    real_disk = _try_tmpfs(mnt)
    folder = mnt / "ckpt"
    try:
        full = [h["loss"] for h in Trainer(_disk_cfg(tmp_path / "ref", tmp_path / "refckpt", 6),
                                           ParallelEnv()).fit()["history"]]
        tr = Trainer(_disk_cfg(tmp_path, folder, 6), ParallelEnv())
        real_save = tr.save

        def save(*a, **kw):
            if tr.state.step == 4:  # after the step-2 checkpoint: fill the disk
                if real_disk:
                    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
                    with open(mnt / "filler", "wb") as f:
                        f.write(b"\0" * max(0, free - 64 * 1024))  # leave 64 KiB: less than a checkpoint
                else:
                    import errno

                    def enospc(fd):
                        raise OSError(errno.ENOSPC, "No space left on device")

                    monkeypatch.setattr(os, "fsync", enospc)
            return real_save(*a, **kw)

        tr.save = save
        with pytest.raises(SpindleError) as err:
            tr.fit()
        monkeypatch.undo()
        msg = str(err.value)
        assert "no space left" in msg.lower() and "4" in msg, msg
        assert sorted(int(p.stem) for p in folder.glob("*.step")) == [2]  # step 4 never marked
        if real_disk:
            (mnt / "filler").unlink()
        again = Trainer(_disk_cfg(tmp_path, folder, 6), ParallelEnv())
        assert again.state.step == 2
        rest = [h["loss"] for h in again.fit()["history"]]
        assert full[:2] + rest == full
        print(f"\nFIGURES full_disk: mode={'tmpfs 2 MiB' if real_disk else 'ENOSPC injected at fsync'} "
              f"error={msg!r}")
    finally:
        if real_disk:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_run_folder_stops_with_one_line_and_saves_the_checkpoint(tmp_path):
    """The run folder (metrics, logs) fills up while the checkpoint folder has room: one line, no torn
    metrics line, and the state of the last finished step saved where it can be."""
    runs = tmp_path / "runs_disk"
    if not _try_tmpfs(runs, "1m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        cfg = _disk_cfg(runs, tmp_path / "ckpt", 40)
        cfg.ckpt.checkpoint_every = math.inf
        tr = Trainer(cfg, ParallelEnv())
        real_step = tr.train_step

        def step(mbs):
            if tr.state.step == 3:  # fill the run folder's disk before step 3's metrics are written
                try:
                    with open(runs / "filler", "wb") as f:
                        while True:
                            f.write(b"x" * 4096)
                            f.flush()
                except OSError:
                    pass  # full; the logs' last pages still have some room
            return real_step(mbs)

        tr.train_step = step
        with pytest.raises(SpindleError) as err:
            tr.fit()
        msg = str(err.value)
        assert "\n" not in msg and "No space left on device" in msg, msg
        lines = (runs / "disk" / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(ln)["step"] for ln in lines]  # whole lines only: every one parses
        stopped = len(steps) + 1  # the step whose record could not be written
        assert steps == list(range(len(steps))) and 3 <= len(steps) < 40, steps
        assert f"training stopped after step {stopped}" in msg and f"checkpoint of step {stopped} saved" in msg, msg
        assert (tmp_path / "ckpt" / f"{stopped}.step").is_file()
        print(f"\nFIGURES full_run_folder: error={msg!r}")
    finally:
        subprocess.run(["umount", str(runs)], capture_output=True)


# =========================================================================== NaN, fp16


def _nan_cfg(tmp_path: Path, alerts: Path, **model):
    return tiny_cfg(tmp_path, JOB_NAME="nan", data={"total_steps": 8}, model=model,
                    grad_scaler={"fp16": {"initial_scale": 2.0**40}, "hysteresis": 1, "max_scale": 2.0**40},
                    monitor={"alert": {"alert_file_path": str(alerts)}})


def test_nan_in_loss_and_gradients_skipped_counted_alerted(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    tr = Trainer(_nan_cfg(tmp_path, alerts), ParallelEnv())
    snapshots = {}

    def nan_logits(module, inputs, out):  # NaN in the final hidden states, hence the loss, at step 2
        return out * float("nan") if tr.state.step == 2 else out

    def grad_hook(g):  # NaN in one gradient (the loss stays finite) at step 5
        return g * float("nan") if tr.state.step == 5 else g

    tr.raw_model.norm.register_forward_hook(nan_logits)
    tr.raw_model.tok_embeddings.weight.register_hook(grad_hook)
    real_step = tr.train_step

    def step(mbs):
        snapshots[tr.state.step] = [p.detach().clone() for p in tr.raw_model.parameters()]
        return real_step(mbs)

    tr.train_step = step
    res = tr.fit()
    hist = res["history"]
    assert res["state"]["inf_nan_skip_batches"] == 2 and res["state"]["updates"] == 6
    assert not math.isfinite(hist[2]["loss"]) and not math.isfinite(hist[5]["grad_norm"])
    for s in (2, 5):  # the update was skipped: parameters after the step == before it
        assert all(torch.equal(a, b) for a, b in zip(snapshots[s], snapshots[s + 1]))
    assert all(math.isfinite(h["loss"]) for i, h in enumerate(hist) if i != 2)
    assert math.isfinite(hist[5]["loss"])
    got = [(a["kind"], a["step"]) for a in map(json.loads, alerts.read_text().splitlines())]
    assert got == [("non_finite", 2), ("non_finite", 5)]
    print(f"\nFIGURES nan: injected=2 skipped={res['state']['inf_nan_skip_batches']} alerts={len(got)}")


def test_fp16_overflow_backs_off_the_scale(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    tr = Trainer(_nan_cfg(tmp_path, alerts, dtype="torch.float16"), ParallelEnv())
    tr.cfg.data.total_steps = 40
    hist = tr.fit()["history"]
    scales = [h["loss_scale"] for h in hist]
    overflow = [not math.isfinite(h["grad_norm"]) for h in hist]
    assert overflow[0] and scales[0] == 2.0**40
    for i in range(1, len(hist)):  # hysteresis 1: every overflow halves the scale, a finite step keeps it
        assert scales[i] == (scales[i - 1] / 2 if overflow[i - 1] else scales[i - 1])
    first_ok = overflow.index(False)  # the scale came down far enough for a real update
    assert tr.state.updates == overflow.count(False) and tr.state.inf_nan_skip_batches == sum(overflow)
    assert sum(overflow[first_ok:]) <= 3 and all(math.isfinite(h["loss"]) for h in hist)
    print(f"\nFIGURES fp16: overflows={sum(overflow)} scale {scales[0]:.3g} -> {scales[first_ok]:.3g}")


# =========================================================================== a rank dies

RANK_CONFIG = """
JOB_NAME = "ranks"
data = dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=100000, train_folder=None, seed=11)
model = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=1, vocab_size=64,
             multiple_of=16, max_position_embeddings=32, dtype="torch.float32")
trainer = dict(seed=5, tensorboard=False, progress_bar=False, num_threads=1, run_folder={run!r})
"""


def _children_by_rank(parent: int) -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank processes")
def test_one_of_two_ranks_killed_the_other_exits_naming_it(tmp_path):
    cfg = tmp_path / "ranks.py"
    cfg.write_text(RANK_CONFIG.format(run=str(tmp_path)))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = child_env()
    env["TORCHELASTIC_ERROR_FILE"] = str(tmp_path / "error.json")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--config", str(cfg),
                             "--launcher", "torch"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        metrics = tmp_path / "ranks" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(read_records(metrics)) < 3:
            assert proc.poll() is None, "".join(output)[-3000:]
            time.sleep(0.1)
        ranks = _children_by_rank(proc.pid)
        assert set(ranks) == {0, 1}, ranks
        t_kill = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        rc = proc.wait(timeout=90)
        took = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = "".join(output)
    assert rc != 0
    assert took < 60, f"torchrun took {took:.1f}s"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", text) and "Signal 9 (SIGKILL)" in text, text[-3000:]
    for pid in ranks.values():  # no rank is left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    print(f"\nFIGURES rank_kill: torchrun exited rc={rc} {took:.1f}s after SIGKILL of rank 1, naming it")
