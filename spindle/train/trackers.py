"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases (`monitor.wandb`) and MLflow
(`monitor.mlflow`), on rank 0, fed by the metrics sink (spindle.train.metrics.MetricSinks).

Each tracker gets the scalars TensorBoard gets (spindle.train.metrics.scalar_metrics) at the same steps, and the
resolved config, secrets hidden (spindle.config.redact, as config.json), as its parameters: W&B's run config
nested, MLflow's params flattened ('model.hidden_size'). The trackers' run ids are kept in {run_dir}/trackers.json,
so a fit that resumes (starts past step 0) continues the same tracker runs.

A tracker is a library's run behind one small interface (`log`, `close`, `run_id`, `where`), the library imported
inside it: a run that never names a tracker never imports one. A tracker that fails — its library missing, its
start, a step's log or its close raising — is reported as one alert line (the monitor's alert path: console, rank
log, alert file, webhook) and dropped: training goes on without it, never stops for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from spindle.config.redact import redact
from spindle.config.trackers import MlflowConfig, WandbConfig
from spindle.errors import SpindleError
from spindle.extras import require
from spindle.fileio import write_atomic

logger = logging.getLogger(__name__)
MLFLOW = "MLflow tracking"
RUN_IDS_FILE = "trackers.json"  # {tracker name: its run id}, in the run folder
# what MLflow accepts in a metric or param name (its validate_param_and_metric_name, without ':' for Windows)
_MLFLOW_NAME_REFUSED = re.compile(r"[^/\w.\- ]")
_MLFLOW_BATCH = 100  # MLflow takes at most 100 params (1000 metrics) in one log_batch


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{'model.hidden_size': '32', 'data.train_folder': '...'}: every leaf of a nested config, non-strings as JSON
    (an empty dict is a leaf, '{}')."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def mlflow_name(name: str) -> str:
    """A metric or param name as MLflow stores it: '/' becomes '.' and the characters it refuses '_'
    ('loss/en' -> 'loss.en', 'val/ppl@4096' -> 'val.ppl_4096'). Its file store keeps a metric as a file named by
    it, so 'loss' and 'loss/en' (the overall loss and a source's) cannot both be stored with the '/'."""
    return _MLFLOW_NAME_REFUSED.sub("_", name.replace("/", "."))


def _batches(items: list, size: int = _MLFLOW_BATCH) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class WandbTracker:
    """A W&B run: wandb.init with the config, `run.log(scalars, step=step)`, `run.finish`. Offline mode writes
    {dir}/wandb/offline-run-*-{id}/, which `wandb sync` uploads; a resumed fit passes the saved id with
    resume='allow' (online: the same run continues; offline: one more folder of the same id, synced into it)."""

    name = "wandb"

    def __init__(self, settings: WandbConfig, job: str, run_dir: Path, config: dict, resume_id: Optional[str]):
        wandb = require("wandb", "track", "W&B tracking")
        # console off: Spindle's lines are in logs/rank0.log already (and wandb's stdout wrapper would take the
        # progress bar's); silent: this module says where the run went, in one line
        run_settings = wandb.Settings(console="off", silent=True)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, name=settings.name or job, group=settings.group,
            job_type=settings.job_type, notes=settings.notes, tags=list(settings.tags) or None, mode=settings.mode,
            dir=settings.dir or str(run_dir), id=resume_id, resume="allow" if resume_id else None, config=config,
            allow_val_change=True, reinit="create_new", settings=run_settings)
        self.run_id = self.run.id
        offline = self.run.settings._offline
        folder = self.run.settings.sync_dir
        self.where = (f"offline run {self.run_id} in {folder} (upload it with: wandb sync {folder})" if offline
                      else f"run {self.run_id} ({self.run.settings.mode}): {self.run.url or folder}")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; its other local store (sqlite)
    needs SQLAlchemy and Alembic, which mlflow-skinny leaves out. The variable is set only while the store is
    built (MLflow reads it there and keeps the store), and only where the user did not set it."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in ("", "file") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MlflowTracker:
    """An MLflow run through MlflowClient (no fluent API: no process-wide active run): the experiment by name, a
    run with the flattened config as params, each step's metrics in one log_batch, set_terminated at the end. A
    resumed fit reopens the saved run; its params are immutable, so keys it lacks are added and changed values are
    kept as tags `changed_on_resume/{key}`."""

    name = "mlflow"

    def __init__(self, settings: MlflowConfig, job: str, run_dir: Path, config: dict, resume_id: Optional[str]):
        entities = require("mlflow.entities", "track", MLFLOW)
        Param, RunTag, self.Metric = entities.Param, entities.RunTag, entities.Metric
        MlflowException = require("mlflow.exceptions", "track", MLFLOW).MlflowException
        MlflowClient = require("mlflow.tracking", "track", MLFLOW).MlflowClient
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        with _file_store_allowed(uri):
            self.client = client = MlflowClient(tracking_uri=uri)
            run = None
            if resume_id:
                with contextlib.suppress(MlflowException):  # gone, or another store: a new run
                    run = client.get_run(resume_id)
            if run is None:
                experiment = settings.experiment_name or job
                found = client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else client.create_experiment(experiment)
                run = client.create_run(experiment_id, run_name=settings.run_name or job, tags=dict(settings.tags))
            else:
                client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        had = run.data.params
        params = {mlflow_name(k): v for k, v in flat_params(config).items()}
        new = [Param(k, v) for k, v in params.items() if k not in had]
        changed = [RunTag(f"changed_on_resume/{k}", v) for k, v in params.items() if k in had and had[k] != v]
        for part in _batches(new):
            client.log_batch(self.run_id, params=part)
        for part in _batches(changed):
            client.log_batch(self.run_id, tags=part)
        self.where = f"run {self.run_id} of experiment {run.info.experiment_id} in {uri}"

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(mlflow_name(k), v, now, step) for k, v in scalars.items()]
        for part in _batches(metrics):
            self.client.log_batch(self.run_id, metrics=part)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _reason(exc: BaseException) -> str:
    """The first line of what a library raised (theirs run to pages), with its type unless it is ours."""
    lines = str(exc).strip().splitlines()
    text = lines[0][:300] if lines else ""
    if isinstance(exc, SpindleError):  # ours (a package missing): a whole line already
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Trackers:
    """The trackers a config names, as one sink. They start at the first `log` (inside the fit's logging, so their
    lines reach the rank log too), continuing the runs trackers.json names when `resumed`; `alert(kind, message)`
    is the monitor's (spindle.train.monitor.Monitor.alert)."""

    def __init__(self, cfg, run_dir: Path, resumed: bool, alert: Optional[Callable[..., object]] = None):
        self.cfg, self.run_dir, self.resumed = cfg, Path(run_dir), resumed
        self.wanted = [name for name in TRACKERS if getattr(cfg.monitor, name) is not None]
        self.alert = alert or (lambda kind, message: logger.warning(f"alert: {kind}: {message}"))
        self.running: dict[str, object] = {}
        self.started = False

    def __bool__(self) -> bool:
        return bool(self.wanted)

    def _saved_ids(self) -> dict[str, str]:
        path = self.run_dir / RUN_IDS_FILE
        try:
            ids = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.alert("tracker", f"{path}: not readable as JSON ({exc}); the trackers start new runs")
            return {}
        return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}

    def _start(self) -> None:
        self.started = True
        saved = self._saved_ids()
        config = redact(self.cfg.to_dict())
        for name in self.wanted:
            try:
                tracker = TRACKERS[name](getattr(self.cfg.monitor, name), self.cfg.JOB_NAME, self.run_dir, config,
                                         saved.get(name) if self.resumed else None)
            except Exception as exc:  # noqa: BLE001 - whatever a tracker raises, training goes on
                self._drop(name, "could not start", exc)
                continue
            self.running[name] = tracker
            logger.info(f"{name}: {tracker.where}")
        if self.running:
            ids = saved | {name: tracker.run_id for name, tracker in self.running.items()}
            try:
                write_atomic(self.run_dir / RUN_IDS_FILE, (json.dumps(ids, indent=2) + "\n").encode())
            except (OSError, SpindleError) as exc:  # disk_error's one line, or the OSError itself
                self.alert("tracker", f"{exc}; a resume of this run will start new tracker runs")

    def _drop(self, name: str, what: str, exc: BaseException) -> None:
        self.running.pop(name, None)
        self.alert("tracker", f"monitor.{name}: {what} ({_reason(exc)}); training goes on without it")

    def log(self, scalars: dict[str, float], step: int) -> None:
        if not self.started:
            self._start()
        for name, tracker in list(self.running.items()):
            try:
                tracker.log(scalars, step)
            except Exception as exc:  # noqa: BLE001
                self._drop(name, f"could not log step {step}", exc)

    def close(self, failed: bool = False) -> None:
        for name, tracker in list(self.running.items()):
            try:
                tracker.close(failed)
            except Exception as exc:  # noqa: BLE001
                self._drop(name, "could not close its run", exc)
        self.running.clear()
