"""Experiment trackers (spindle/train/trackers.py) with the real libraries, offline: W&B in offline mode (its run
folder read back record by record) and MLflow's local file store (read back with MlflowClient). One run of 3 steps
and its resume to 5 are shared by the tests; a tracker that fails at start, at a step or for want of its library
is one alert line and the run trains to the end. Nothing here contacts a network: WANDB_MODE=offline, mode
"offline" in the config, and MLflow's store is a folder."""

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from helpers import run_cli as spindle, tiny_config_text

pytest.importorskip("wandb", reason="pip install -e '.[test]' (the [track] extra)")
pytest.importorskip("mlflow", reason="pip install -e '.[test]' (the [track] extra)")

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # a WANDB_API_KEY's shape; offline, nothing checks it
HOOK_SECRET = "hooksecret0123456789"
JOB = "tracked"


def wandb_env(home: Path) -> dict:
    """No network, and every wandb folder under the test's own (its settings and caches too)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": API_KEY,
            "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data"), "WANDB_ARTIFACT_DIR": str(home / "artifacts")}


def write_config(folder: Path, total_steps: int, **sections) -> Path:
    path = folder / f"steps{total_steps}.py"
    path.write_text(tiny_config_text(folder / "runs", JOB_NAME=JOB, data={"total_steps": total_steps},
                                     lr_scheduler={"total_steps": 5}, ckpt={"enable_save_ckpt": True}, **sections))
    return path


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A run of 3 steps with both trackers, then its resume to 5: (run folder, the two runs' stdout)."""
    tmp = tmp_path_factory.mktemp("trackers")
    monitor = {"wandb": {"mode": "offline", "project": "spindle-tests"}, "mlflow": True,
               "alert": {"feishu_alert_address": f"https://open.feishu.cn/open-apis/bot/v2/hook/{HOOK_SECRET}"}}
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        for name, value in wandb_env(tmp / "wandb_home").items():
            mp.setenv(name, value)
        for steps in (3, 5):
            r = spindle("train", "--config", write_config(tmp, steps, monitor=monitor))
            assert r.returncode == 0, r.stderr
            outs.append(r.stdout)
    return tmp / "runs" / JOB, outs


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte header:
    checksum, length, type 1 full / 2 first / 3 middle / 4 last) after W&B's 7-byte file header, each record a
    wandb_internal.Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(folder: Path) -> tuple[dict[int, dict], dict]:
    """({step: {key: value}}, the run's config) of one offline run folder: the history records, and the config
    the run record carries."""
    (log,) = folder.glob("run-*.wandb")
    for _ in range(50):  # wandb-core's writer closes the file a moment after run.finish() returns
        records = wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    history, config = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates})
    return history, config


@pytest.mark.slow  # the shared run and its resume, with W&B's service start (about 20-40 s)
def test_wandb_offline_run_folders_hold_the_scalars_and_the_config_and_the_resume_continues_the_run(tracked):
    run_dir, outs = tracked
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    # one folder per start, both of the one run id: `wandb sync` uploads them into one run
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders), folders
    assert f"wandb: offline run {run_id} in {folders[0]} (upload it with: wandb sync {folders[0]})" in outs[0]
    losses = jsonl_losses(run_dir)
    for folder, steps in zip(folders, ([0, 1, 2], [3, 4])):
        history, config = wandb_history(folder)
        assert sorted(history) == steps
        assert {s: history[s]["loss"] for s in steps} == {s: losses[s] for s in steps}  # the same floats
        assert {"lr", "grad_norm", "tgs", "acc", "perplexity"} <= set(history[steps[0]])
        assert config["model"]["hidden_size"] == 32 and config["data"]["total_steps"] == (5 if steps[0] else 3)


@pytest.mark.slow  # the shared run and its resume, with W&B's service start (about 20-40 s)
def test_mlflow_file_store_holds_the_scalars_and_the_params_in_one_run_through_the_resume(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir, outs = tracked
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    uri = (run_dir / "mlruns").resolve().as_uri()
    assert f"mlflow: run {run_id} of experiment" in outs[0] and f"mlflow: run {run_id} of experiment" in outs[1]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == JOB
    assert client.get_experiment(run.info.experiment_id).name == JOB
    losses = jsonl_losses(run_dir)
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == losses  # steps 0..4
    assert sorted(losses) == [0, 1, 2, 3, 4]
    # the source's loss beside the overall one: '/' is '.' in MLflow names (its file store keeps one file a name)
    assert {"lr", "grad_norm", "tgs", "acc", "loss.random", "acc.random"} <= set(run.data.metrics)
    params = run.data.params
    assert params["model.hidden_size"] == "32" and params["JOB_NAME"] == JOB
    # params cannot change: the first start's value stays, the resume's is a tag
    assert params["data.total_steps"] == "3" and run.data.tags["changed_on_resume/data.total_steps"] == "5"


@pytest.mark.slow  # the shared run and its resume, with W&B's service start (about 20-40 s)
def test_no_secret_reaches_a_file_of_the_run(tracked):
    run_dir, _ = tracked
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert API_KEY.encode() not in data and HOOK_SECRET.encode() not in data, path


def failing_mlflow_log(monkeypatch):
    """The tracking server goes away after the run started: every metrics batch raises."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            raise MlflowException("API request to http://mlflow.internal:5000 failed\nwith a long story")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


@pytest.mark.parametrize("case, monitor, says", [
    ("no library", {"wandb": True}, "monitor.wandb: could not start (W&B tracking needs the Python package "
                                    "'wandb', which is not installed: pip install 'spindle[track]'); training goes on "
                                    "without it"),
    ("unwritable store", {"mlflow": {"tracking_uri": "{tmp}/a_file/mlruns"}}, "monitor.mlflow: could not start ("),
    ("log fails", {"mlflow": True}, "monitor.mlflow: could not log step 0 (MlflowException: API request to "
                                    "http://mlflow.internal:5000 failed); training goes on without it"),
], ids=["no library", "unwritable store", "log fails"])
def test_a_failing_tracker_is_one_alert_line_and_training_finishes(tmp_path, monkeypatch, case, monitor, says):
    (tmp_path / "a_file").write_text("not a folder")
    if case == "no library":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    if case == "log fails":
        failing_mlflow_log(monkeypatch)
    monitor = {k: {**v, "tracking_uri": v["tracking_uri"].format(tmp=tmp_path)} if isinstance(v, dict) else v
               for k, v in monitor.items()}
    config = tmp_path / "c.py"
    config.write_text(tiny_config_text(tmp_path / "runs", monitor=monitor))
    r = spindle("train", "--config", config)
    assert r.returncode == 0, r.stderr
    alerts = [line for line in (r.stdout + r.stderr).splitlines() if "alert:" in line]
    assert len(alerts) == 1 and alerts[0].startswith("alert: tracker: ") and says in alerts[0], alerts
    assert len((tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()) == 4  # every step


@pytest.mark.parametrize("value, says", [
    ("'yes'", "expected True, False or a dict of its settings, not a str"),
    ("dict(mode='airplane')", "monitor.wandb.mode"),
    ("dict(projekt='x')", "monitor.wandb.projekt"),
])
def test_bad_tracker_keys_are_one_line(tmp_path, value, says):
    config = tmp_path / "c.py"
    config.write_text(tiny_config_text(tmp_path / "runs") + f"monitor = dict(wandb={value})\n")
    r = spindle("train", "--config", config)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
