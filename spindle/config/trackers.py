"""The experiment-tracker keys of the `monitor` section (spindle/train/trackers.py runs them):

    monitor = dict(wandb=True)                                   # Weights & Biases, its own defaults
    monitor = dict(wandb=dict(project="rope", mode="offline"))   # a run folder `wandb sync` uploads later
    monitor = dict(mlflow=True)                                  # MLflow, a file store in {run_dir}/mlruns
    monitor = dict(mlflow=dict(tracking_uri="http://mlflow.internal:5000", experiment_name="rope"))

`True` means the settings' defaults, `False` or None (the default) no tracker. Credentials are not keys here:
they stay in the environment (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...) or the tools' own login files, so no
config file or config.json ever holds them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import field_validator

from spindle.config.base import Section, path_value


def on_or_settings(v: Any) -> Any:
    """`True` -> the defaults ({}), `False` / None -> off (None), a dict or a section as it is."""
    if v is True:
        return {}
    if v is False or v is None:
        return None
    if isinstance(v, (dict, Section)):
        return v
    raise ValueError(f"expected True, False or a dict of its settings, not a {type(v).__name__}")


class WandbConfig(Section):
    project: str = "spindle"
    entity: Optional[str] = None  # None: the account's default entity
    name: Optional[str] = None  # the run's display name; None: JOB_NAME
    group: Optional[str] = None
    job_type: Optional[str] = None
    notes: Optional[str] = None
    tags: tuple[str, ...] = ()
    # None: wandb's own choice (WANDB_MODE, else online); "offline" writes a run folder and contacts nothing
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    dir: Optional[str] = None  # where wandb/ with the run folders goes; None: the run folder

    _paths = field_validator("dir")(path_value)


class MlflowConfig(Section):
    # None: MLFLOW_TRACKING_URI when set, else a file store in {run_dir}/mlruns (docs/reliability.md says why)
    tracking_uri: Optional[str] = None
    experiment_name: Optional[str] = None  # None: JOB_NAME
    run_name: Optional[str] = None  # None: JOB_NAME
    tags: dict[str, str] = {}

    _paths = field_validator("tracking_uri")(path_value)  # a path or a URI: on one line, not empty
