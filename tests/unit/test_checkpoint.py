"""Checkpoint manager: DCP save/load, markers, snapshots, keep_last_n, precedence, bad input."""

import json
import pickle

import pytest
import torch

import helpers
from spindle.checkpoint.dcp_io import read_metadata
from spindle.checkpoint.discovery import resolve, scan_completed
from spindle.checkpoint.loading import load_checkpoint, plan_load
from spindle.checkpoint.manager import CheckpointManager
from spindle.config import validate_config
from spindle.errors import SpindleError
from spindle.model.llama import build_model
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer



def tiny_cfg(tmp_path, ckpt=None, **over):
    """The tiny config (tests/helpers.py) with saving on, into tmp_path/ckpt."""
    return helpers.tiny_cfg(tmp_path, **helpers.merge(
        dict(JOB_NAME="t", lr_scheduler={"warmup_ratio": 0.0}, trainer={"seed": 7},
             ckpt={"enable_save_ckpt": True, "save_ckpt_folder": f"local:{tmp_path}/ckpt", **(ckpt or {})}), **over))


def losses(result):
    return [h["loss"] for h in result["history"]]


def test_save_resume_is_exact(tmp_path):
    full = losses(Trainer(tiny_cfg(tmp_path / "a", {"auto_resume": False}), ParallelEnv()).fit())
    b = tmp_path / "b"
    part = Trainer(tiny_cfg(b, {"checkpoint_every": 2}, data={"total_steps": 4}), ParallelEnv())
    # stop after step 2 via the stop file
    (b / "stop").write_text("2")
    part.cfg.ckpt.stop_file_path = str(b / "stop")
    first = losses(part.fit())
    assert len(first) == 2 and (b / "ckpt" / "2.step").is_file()
    assert {p.name for p in (b / "ckpt" / "2").iterdir()} >= {".metadata", "trainer_state.json", "config.json"}
    resumed = Trainer(tiny_cfg(b, {"checkpoint_every": 2}), ParallelEnv())
    assert resumed.state.step == 2
    rest = losses(resumed.fit())
    assert first + rest == full  # bit for bit


def test_every_file_is_durable_before_the_completion_marker(tmp_path, monkeypatch):
    """The order of the real system calls of one save: each file of the step folder (DCP's shards and
    .metadata, the trainer state, config, owner) is fsynced, under its own name or a temp name renamed
    to it, before the `.step` record is renamed into place; nothing is written into the folder after."""
    import os

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def moved(real):
        def move(src, dst, *a, **k):
            events.append(("move", os.path.abspath(src), os.path.abspath(dst)))
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    Trainer(tiny_cfg(tmp_path, {"checkpoint_every": 2}, data={"total_steps": 2}), ParallelEnv()).fit()
    monkeypatch.undo()

    folder, marker = (tmp_path / "ckpt" / "2").resolve(), str((tmp_path / "ckpt" / "2.step").resolve())
    at = next(i for i, e in enumerate(events) if e[0] == "move" and e[2] == marker)
    durable = set()
    for e in events[:at]:
        if e[0] == "fsync":
            durable.add(e[1])
        elif e[1] in durable:  # a synced temp file renamed to its name
            durable.add(e[2])
    files = {str(f) for f in folder.rglob("*") if f.is_file()}
    assert {".metadata", "trainer_state.json", "config.json", ".owner.json"} <= {os.path.basename(f) for f in files}
    assert files <= durable, sorted(files - durable)
    assert str(folder) in durable  # the folder's entries too
    assert not [e for e in events[at + 1:] if str(folder) in e[-1]], events[at + 1:]


def test_negative_stop_file_saves_and_goes_on(tmp_path):
    (tmp_path / "stop").write_text("-2")
    tr = Trainer(tiny_cfg(tmp_path, {"stop_file_path": str(tmp_path / "stop")}), ParallelEnv())
    assert len(tr.fit()["history"]) == 4
    assert [r.step for r in scan_completed(tr.ckpt_manager.storage)] == [2, 4]


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    Trainer(tiny_cfg(tmp_path, {"checkpoint_every": 2}), ParallelEnv()).fit()
    ckpt = tmp_path / "ckpt"
    (ckpt / "4.step").unlink()  # a crash before the marker
    tr = Trainer(tiny_cfg(tmp_path, {"checkpoint_every": 2}), ParallelEnv())
    assert tr.state.step == 2
    with pytest.raises(SpindleError, match="incomplete"):
        resolve(str(ckpt / "4"))
    (ckpt / "2.step").unlink()
    with pytest.raises(SpindleError, match="none is complete"):
        resolve(str(ckpt))


def test_keep_last_n_and_snapshots(tmp_path):
    cfg = tiny_cfg(tmp_path, {"checkpoint_every": 3, "oss_snapshot_freq": 1, "keep_last_n": 1},
                   data={"total_steps": 7})
    tr = Trainer(cfg, ParallelEnv())
    tr.fit()
    refs = [(r.step, r.rel) for r in scan_completed(tr.ckpt_manager.storage)]
    # normal: 3, 6, 7 -> keep 7; snapshots at 4 (slot 0) and 5 (slot 1)
    assert refs == [(4, "snapshot/0/4"), (5, "snapshot/1/5"), (7, "7")]
    assert not (tmp_path / "ckpt" / "3").exists() and not (tmp_path / "ckpt" / "6").exists()
    # auto_resume takes the highest completed step across normal and snapshot folders
    (tmp_path / "ckpt" / "7.step").unlink()
    again = Trainer(cfg, ParallelEnv())
    assert again.state.step == 5


def test_precedence_auto_resume_over_load_ckpt_info(tmp_path):
    Trainer(tiny_cfg(tmp_path / "other"), ParallelEnv()).fit()
    info = {"path": f"local:{tmp_path}/other/ckpt", "content": ["model"]}
    cfg = tiny_cfg(tmp_path, {"load_ckpt_info": info})
    plan = plan_load(cfg.ckpt, CheckpointManager(f"{tmp_path}/ckpt", cfg.ckpt).storage)
    assert plan.content == ("model",) and "load_ckpt_info" in plan.reason and plan.ref.step == 4
    tr = Trainer(cfg, ParallelEnv())
    assert tr.state.step == 0  # model only: counters and sampler start fresh
    tr.fit()
    plan = plan_load(cfg.ckpt, tr.ckpt_manager.storage)
    assert plan.reason.startswith("auto_resume") and "is ignored" in plan.reason


def test_shape_mismatch_names_parameter_and_both_shapes(tmp_path):
    Trainer(tiny_cfg(tmp_path), ParallelEnv()).fit()
    cfg = tiny_cfg(tmp_path, model={"vocab_size": 96})
    model = build_model(cfg.model.to_args())
    with pytest.raises(SpindleError, match=r"tok_embeddings.weight has shape \[64, 32\] in the checkpoint but "
                                           r"\[96, 32\]"):
        load_checkpoint(tmp_path / "ckpt" / "4", model, None, ("model",))


def test_truncated_and_foreign_checkpoints(tmp_path):
    Trainer(tiny_cfg(tmp_path), ParallelEnv()).fit()
    path = tmp_path / "ckpt" / "4"
    model = build_model(tiny_cfg(tmp_path).model.to_args())
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(SpindleError, match=str(path)):
        load_checkpoint(path, model, None, ("model",))
    meta = path / ".metadata"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(SpindleError, match="truncated"):
        load_checkpoint(path, model, None, ("model",))
    # a torch.save file and an empty folder are not checkpoints
    torch.save({"w": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(SpindleError, match="not a Spindle checkpoint"):
        resolve(str(tmp_path / "foreign.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpindleError, match="not a Spindle checkpoint"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(SpindleError, match="does not exist"):
        resolve(str(tmp_path / "nowhere"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_metadata_unpickler_refuses_code(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(SpindleError, match="refusing to load builtins.print"):
        read_metadata(tmp_path / "1")


def test_trainer_state_is_json(tmp_path):
    Trainer(tiny_cfg(tmp_path), ParallelEnv()).fit()
    ts = json.loads((tmp_path / "ckpt" / "4" / "trainer_state.json").read_text())
    assert ts["step"] == 4 and ts["updates"] == 4 and "loader" in ts
    assert json.loads((tmp_path / "ckpt" / "4" / "config.json").read_text())["model"]["vocab_size"] == 64


def test_first_wave_checkpoint_still_loads(tmp_path, spindle_lines):
    """tests/fixtures/ckpt_v1: written by the first wave (marker = the step number, no lineage): it loads
    with all its state, and a run continuing it writes the current format beside it."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "ckpt_v1"
    ckpt = tmp_path / "ckpt_v1"
    shutil.copytree(fixture, ckpt)
    old = {p.name: p.read_bytes() for p in (ckpt / "2").iterdir()}
    cfg = validate_config({
        "JOB_NAME": "legacy",
        "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": str(ckpt), "checkpoint_every": 2},
        "data": {"seq_len": 16, "micro_num": 1, "micro_bsz": 2, "total_steps": 4},
        "model": {"hidden_size": 16, "num_attention_heads": 2, "num_layers": 1, "vocab_size": 64, "multiple_of": 16},
        "adam": {"lr": 1e-2},
        "trainer": {"run_folder": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
    })
    lines = spindle_lines
    tr = Trainer(cfg, ParallelEnv())
    assert tr.state.step == 2 and tr.state.updates == 2 and tr.loader.position == 2
    assert any("continuing from" in ln and "/2 (step 2, all state)" in ln for ln in lines)
    tr.fit()
    record = json.loads((ckpt / "4.step").read_text())
    assert record["lineage"] == "first-wave" and record["step"] == 4 and "trainer_state.json" in record["files"]
    assert {p.name: p.read_bytes() for p in (ckpt / "2").iterdir()} == old


@pytest.mark.parametrize("written_on, resumed_on", [("gpu", "cpu"), ("cpu", "gpu"), ("gpu", "gpu")])
def test_a_checkpoint_moves_between_cpu_and_gpu_machines(tmp_path, monkeypatch, written_on, resumed_on, spindle_lines):
    """A "GPU machine" here is one whose RNG states include a CUDA generator's (a ByteTensor) and whose
    torch.cuda.set_rng_state records what it is given. Written on one kind and resumed on the other, the
    CPU generator comes back bit for bit and the CUDA state is skipped with a note (it was once a missing
    `rng.cuda` key reported as a damaged checkpoint); GPU to GPU restores it."""
    from spindle.train.host import RunRNG

    cpu_only, cpu_load, cuda_state, restored = RunRNG.state_dict, RunRNG.load_state_dict, \
        torch.arange(16, dtype=torch.uint8), []

    def gpu_load(rng, state):
        if "cuda" in state:
            restored.append(state["cuda"].clone())
        cpu_load(rng, {k: v for k, v in state.items() if k != "cuda"})

    def machine(kind):  # the run's RNG streams (a Stateful) with and without a CUDA generator's
        if kind == "gpu":
            monkeypatch.setattr(RunRNG, "state_dict", lambda rng: {**cpu_only(rng), "cuda": cuda_state.clone()})
            monkeypatch.setattr(RunRNG, "load_state_dict", gpu_load)
        else:
            monkeypatch.setattr(RunRNG, "state_dict", cpu_only)
            monkeypatch.setattr(RunRNG, "load_state_dict", cpu_load)

    full = losses(Trainer(tiny_cfg(tmp_path / "a", {"auto_resume": False}), ParallelEnv()).fit())
    b = tmp_path / "b"
    machine(written_on)
    part = Trainer(tiny_cfg(b, {"checkpoint_every": 2, "stop_file_path": str(b / "stop")}), ParallelEnv())
    (b / "stop").write_text("2")
    first = losses(part.fit())
    saved = {k for k in read_metadata(b / "ckpt" / "2").state_dict_metadata if k.startswith("rng.")}
    assert saved == ({"rng.cpu", "rng.cuda"} if written_on == "gpu" else {"rng.cpu"})
    machine(resumed_on)
    lines = spindle_lines
    lines.clear()  # from here on
    resumed = Trainer(tiny_cfg(b, {"checkpoint_every": 2}), ParallelEnv())
    assert resumed.state.step == 2 and first + losses(resumed.fit()) == full
    notes = [line for line in lines if "RNG state" in line]
    if (written_on, resumed_on) == ("gpu", "cpu"):
        assert notes == ["checkpoint: the checkpoint's cuda RNG state is not restored (no cuda device here)"]
    elif (written_on, resumed_on) == ("cpu", "gpu"):
        assert notes == ["checkpoint: no cuda RNG state in the checkpoint (written on a machine without one); "
                         "the cuda generator keeps its seed"] and restored == []
    else:
        assert notes == [] and len(restored) == 1 and torch.equal(restored[0], cuda_state)


def test_async_save_resumes_bit_exact(tmp_path):
    """ckpt.async_save: the stop-file run saves at step 2 in the background, is marked complete when it
    ends, and resuming from it gives the uninterrupted run's losses bit for bit."""
    full = losses(Trainer(tiny_cfg(tmp_path / "a", {"auto_resume": False}), ParallelEnv()).fit())
    b = tmp_path / "b"
    part = Trainer(tiny_cfg(b, {"checkpoint_every": 2, "async_save": True, "stop_file_path": str(b / "stop")}),
                   ParallelEnv())
    (b / "stop").write_text("2")
    first = losses(part.fit())
    assert (b / "ckpt" / "2.step").is_file()
    resumed = Trainer(tiny_cfg(b, {"checkpoint_every": 2, "async_save": True}), ParallelEnv())
    assert resumed.state.step == 2
    assert first + losses(resumed.fit()) == full


def test_async_save_marks_complete_only_after_the_write(tmp_path, monkeypatch):
    """On a 1-rank gloo group: the save returns while DCP still writes (held here); the record appears
    only after the write finished, and holds the tensors as they were at save(), not as training left them."""
    import threading
    from concurrent.futures import Future

    import torch.distributed as dist

    from spindle.checkpoint import manager as manager_module
    from spindle.config import CkptConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    gate, order = threading.Event(), []
    real = manager_module.write_tensors

    def held_write(*args, **kwargs):
        inner, held = real(*args, **kwargs), Future()
        assert isinstance(inner, Future)  # DCP's own asynchronous save ran

        def release():
            gate.wait()
            inner.result()
            order.append("tensors written")
            held.set_result(None)

        threading.Thread(target=release, daemon=True).start()
        return held

    commit = CheckpointManager._commit_files
    monkeypatch.setattr(manager_module, "write_tensors", held_write)
    monkeypatch.setattr(CheckpointManager, "_commit_files", lambda self, ref: (order.append("record"),
                                                                              commit(self, ref)))
    try:
        model = build_model(tiny_cfg(tmp_path).model.to_args(), seed=1)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        mgr = CheckpointManager(str(tmp_path / "ck"), CkptConfig(async_save=True), distributed=True)
        where = mgr.save(1, model, None, {"step": 1}, {})
        assert "background" in where and not (tmp_path / "ck" / "1.step").exists()
        with torch.no_grad():  # training goes on while the tensors are written
            for p in model.parameters():
                p.add_(1.0)
        gate.set()
        mgr.close()
        assert order == ["tensors written", "record"] and (tmp_path / "ck" / "1.step").is_file()
    finally:
        dist.destroy_process_group()
    fresh = build_model(tiny_cfg(tmp_path).model.to_args(), seed=2)
    load_checkpoint(tmp_path / "ck" / "1", fresh, None, ("model",))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_staging_folder_is_checked_for_space(tmp_path, monkeypatch):
    """The staging folder (/dev/shm by default) is refused with one line when it lacks the room for this
    rank's checkpoint (weights + two AdamW moments), before anything is written into it."""
    from collections import namedtuple

    from spindle.checkpoint import staging as staging_module
    from spindle.checkpoint.manager import _state_bytes
    from spindle.checkpoint.staging import Staging
    from spindle.checkpoint.storage import open_storage
    from spindle.config import CkptConfig

    model = build_model(tiny_cfg(tmp_path).model.to_args(), seed=1)
    opt = torch.optim.AdamW(model.parameters())
    need = _state_bytes(model, opt)
    assert need == 3 * 4 * sum(p.numel() for p in model.parameters())  # fp32 weights and two moments
    stage = Staging(open_storage(str(tmp_path / "remote")), CkptConfig(async_upload_tmp_folder=str(tmp_path / "shm")))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(staging_module.shutil, "disk_usage", lambda p: Usage(2**30, 2**30 - need + 1, need - 1))
    with pytest.raises(SpindleError, match="free for staging a checkpoint.*async_upload_tmp_folder"):
        stage.folder("3", need)
    assert not (stage.root / "3").exists()
    monkeypatch.setattr(staging_module.shutil, "disk_usage", lambda p: Usage(2**30, 0, need))
    assert stage.folder("3", need).is_dir() and not any((stage.root / "3").iterdir())


def test_a_save_killed_before_dcp_renamed_its_metadata_is_an_unfinished_save_of_ours(tmp_path):
    """DCP writes `.metadata.tmp` and renames it: a SIGKILL between the two leaves a step folder with the
    shards and `.metadata.tmp` and no record. That is Spindle's own unfinished save (auto-resume goes on
    from the last complete step, and the folder is rewritten), never a folder someone else wrote."""
    from spindle.checkpoint.discovery import inspect_folder
    from spindle.checkpoint.storage.local import LocalStorage

    Trainer(tiny_cfg(tmp_path, {"checkpoint_every": 2}), ParallelEnv()).fit()
    ckpt = tmp_path / "ckpt"
    (ckpt / "4.step").unlink()
    (ckpt / "4" / ".metadata").rename(ckpt / "4" / ".metadata.tmp")
    for name in ("trainer_state.json", "config.json", ".owner.json"):
        (ckpt / "4" / name).unlink()
    contents = inspect_folder(LocalStorage(str(ckpt)))
    assert contents.foreign == [] and "4" in contents.incomplete
    again = Trainer(tiny_cfg(tmp_path, {"checkpoint_every": 2}), ParallelEnv())
    assert again.state.step == 2
    again.fit()
    assert (ckpt / "4.step").is_file() and not (ckpt / "4" / ".metadata.tmp").exists()
