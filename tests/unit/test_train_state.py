"""The training state as Stateful objects through one checkpoint path, the checkpoint manager's cadence, the
bounded step history, the lineage written once, and the monitor in place before the save folder is opened
(issue 26 points 1, 3 and 6)."""

import hashlib
import json

import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from helpers import step_cfg as tiny_cfg
from spindle.checkpoint.manager import CheckpointManager
from spindle.checkpoint.records import COUNTERS, select_state
from spindle.config import CkptConfig
from spindle.parallel.mesh import ParallelEnv
from spindle.train.host import RunRNG
from spindle.train.state import RunHistory, TrainState
from spindle.train.trainer import Trainer



def saving(tmp_path, ckpt=None, **sections):
    """The training-step config with saving on, into tmp_path/ckpt."""
    ckpt = {"enable_save_ckpt": True, "save_ckpt_folder": f"local:{tmp_path}/ckpt", **(ckpt or {})}
    return tiny_cfg(tmp_path, ckpt=ckpt, **sections)


def test_every_part_of_the_training_state_is_a_stateful(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), ParallelEnv())
    for part in (tr.state, tr.training_state, tr.rng, tr.loader, tr.scaler):
        assert isinstance(part, Stateful), type(part)
    assert set(tr.state.state_dict()) == set(COUNTERS)
    saved = tr.training_state.state_dict()
    assert set(saved) == set(COUNTERS) | {"loader", "scaler", "layout"}  # trainer_state.json, no lineage
    copy = TrainState()
    copy.load_state_dict({"step": 7, "updates": 5})
    assert (copy.step, copy.updates, copy.num_consumed_tokens) == (7, 5, 0)


def test_a_load_restores_what_its_content_selects():
    state = {"step": 4, "updates": 3, "num_consumed_tokens": 99, "inf_nan_skip_batches": 1,
             "loader": {"position": 4}, "scaler": {"scale": 2.0, "growth_tracker": 0, "hysteresis_tracker": 0},
             "layout": {"dp": 1}, "lineage": "abc"}
    assert select_state(state, ("model",)) == {}
    assert select_state(state, ("scheduler",)) == {"updates": 3, "scaler": state["scaler"]}
    assert set(select_state(state, ("sampler",))) == {"step", "num_consumed_tokens", "inf_nan_skip_batches",
                                                      "loader"}


def test_run_rng_is_restored_explicitly_inside_and_outside_the_run():
    rng = RunRNG(3, torch.device("cpu"))
    with rng.active():
        first = torch.rand(4)
    saved = rng.state_dict()
    with rng.active():
        second = torch.rand(4)
    rng.load_state_dict(saved)  # outside the run: the state it keeps
    with rng.active():
        assert torch.equal(torch.rand(4), second)
        rng.load_state_dict(saved)  # inside the run: the generator itself
        assert torch.equal(torch.rand(4), second)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("step, last, stop, kind", [
    (1, False, False, None), (2, False, False, "checkpoint"), (3, False, False, "snapshot"),
    (6, False, False, "checkpoint"), (5, True, False, "checkpoint"), (5, False, True, "checkpoint"),
    (9, False, False, "snapshot"),
])
def test_the_manager_decides_when_to_save(tmp_path, step, last, stop, kind):
    manager = CheckpointManager(str(tmp_path / "ck"), CkptConfig(checkpoint_every=2, oss_snapshot_freq=3))
    assert manager.should_save(step, last, stop) == kind
    final_off = CheckpointManager(str(tmp_path / "ck"), CkptConfig(save_final=False))
    assert final_off.should_save(5, True, False) is None


def test_history_keeps_the_first_the_last_validation_and_the_recent_steps():
    history = RunHistory(keep=3)
    for step in range(10):
        history.add({"step": step, "loss": float(step)} | ({"val/en_loss": 1.0} if step == 2 else {}))
    assert history.steps == 10
    assert [r["step"] for r in history.records()] == [0, 2, 7, 8, 9]
    short = RunHistory(keep=3)
    for step in range(3):
        short.add({"step": step, "loss": 0.0})
    assert [r["step"] for r in short.records()] == [0, 1, 2]


def test_fit_returns_a_bounded_history(tmp_path, monkeypatch):
    monkeypatch.setattr("spindle.train.trainer.RunHistory", lambda: RunHistory(keep=2))
    result = Trainer(tiny_cfg(tmp_path, data={"total_steps": 5}), ParallelEnv()).fit()
    assert result["steps"] == 5 and [r["step"] for r in result["history"]] == [0, 3, 4]


def test_the_lineage_is_written_once_and_older_states_holding_it_still_load(tmp_path):
    cfg = saving(tmp_path, {"checkpoint_every": 2}, data={"total_steps": 2})
    Trainer(cfg, ParallelEnv()).fit()
    ckpt = tmp_path / "ckpt"
    record = json.loads((ckpt / "2.step").read_text())
    state_file = ckpt / "2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert "lineage" not in state and json.loads((ckpt / "2" / ".owner.json").read_text())["lineage"] == \
        record["lineage"]
    # as checkpoints were written before: the lineage in the trainer state too (the record matching it)
    state_file.write_bytes(json.dumps(state | {"lineage": record["lineage"]}, indent=1).encode())
    data = state_file.read_bytes()
    record["files"]["trainer_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "2.step").write_text(json.dumps(record))
    more = saving(tmp_path, {"checkpoint_every": 2}, data={"total_steps": 4})
    resumed = Trainer(more, ParallelEnv())
    assert resumed.state.step == 2 and resumed.lineage == record["lineage"]
    resumed.fit()
    assert json.loads((ckpt / "4.step").read_text())["lineage"] == record["lineage"]


def test_an_alert_while_the_save_folder_opens_reaches_the_monitor(tmp_path, monkeypatch):
    """The checkpoint manager's alert callback is the monitor's: built before the save folder is opened (it
    reached for `self.monitor` before the monitor existed, an AttributeError)."""
    real_open = CheckpointManager.open

    def open_with_alert(manager):
        manager.alert("checkpoint_upload", "an upload left by the last run failed")
        return real_open(manager)

    monkeypatch.setattr(CheckpointManager, "open", open_with_alert)
    tr = Trainer(saving(tmp_path, {}), ParallelEnv())
    assert [a["kind"] for a in tr.monitor.sent] == ["checkpoint_upload"]
    tr.close()
