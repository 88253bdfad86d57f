"""The native schema: every section of a config file with its defaults and checks, and the whole file.

The `data` and `model` sections live in spindle/config/data.py and model.py; InternEvo's module-level
constants and aliases in spindle/config/internevo.py; loading (runpy, `--set`, error lines) in
spindle/config/load.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from spindle.config.base import MAX_SEED, Section, every_steps, folder_name, path_value
from spindle.config.ckpt_content import ContentName
from spindle.config.data import DataConfig
from spindle.config.long_eval import LongEvalConfig
from spindle.config.model import ModelConfig
from spindle.config.s3 import S3Settings
from spindle.config.trackers import MlflowConfig, WandbConfig, on_or_settings

# --------------------------------------------------------------------------- ckpt

SAVE_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")  # what ckpt.save_on_signals may name


class LoadCkptInfo(Section):
    path: Optional[str] = None
    # which states to load: any of model / sampler / optimizer / scheduler, or "all"
    content: tuple[ContentName, ...] = ("all",)
    # "internevo" / "normal" / "spindle" all mean our own DCP format; "hf" (or InternEvo's "hf_llama")
    # means a Hugging Face Llama folder (model weights only).
    ckpt_type: Literal["internevo", "normal", "spindle", "hf", "hf_llama", "llama"] = "internevo"

    _path = field_validator("path")(path_value)

    @field_validator("content", mode="before")
    @classmethod
    def _content_as_tuple(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v


class CkptConfig(Section):
    enable_save_ckpt: bool = False
    save_ckpt_folder: Optional[str] = None
    load_ckpt_folder: Optional[str] = None  # legacy InternEvo key: same as load_ckpt_info(path=..., content=all)
    load_ckpt_info: Optional[LoadCkptInfo] = None
    checkpoint_every: float = Field(default=math.inf, allow_inf_nan=True)  # steps; inf = only at the end
    auto_resume: bool = True
    async_upload: bool = False
    # dcp.async_save: tensors copied to host memory, written in a thread while training goes on; the
    # checkpoint is marked complete once written, at the next save or at the end of the run
    async_save: bool = False
    async_upload_tmp_folder: str = "/dev/shm/spindle_tmp_ckpt/"
    oss_snapshot_freq: float = Field(default=math.inf, allow_inf_nan=True)
    snapshot_ckpt_folder: Optional[str] = None
    stop_file_path: Optional[str] = None
    keep_last_n: Optional[int] = Field(default=None, ge=1)
    save_final: bool = True  # with saving on: also save at data.total_steps when it is not a checkpoint_every step
    # on load, "hash" checks the SHA-256 of every file the completion record lists; "size" (for checkpoints
    # too large to read twice) checks sizes and the small files' hashes only, and says so
    verify: Literal["hash", "size"] = "hash"
    # object storage (boto3:) connection; credentials are better left to the environment
    s3_endpoint_url: Optional[str] = None
    s3_region: Optional[str] = None
    # the timeouts of spindle/config/s3.py (which says what each bounds), defaults included
    s3_connect_timeout_s: float = Field(default=S3Settings.connect_timeout_s, gt=0, le=600)
    s3_read_timeout_s: float = Field(default=S3Settings.read_timeout_s, gt=0, le=3600)
    # botocore's retries: "standard" or "adaptive" (client-side rate limiting under throttling), and the
    # attempts each request may make, the first included
    s3_retry_mode: Literal["standard", "adaptive"] = S3Settings.retry_mode
    s3_max_attempts: int = Field(default=S3Settings.max_attempts, ge=1, le=20)
    # signals that save at the next step boundary and exit (docs/checkpoints.md, "Saving on a signal"): SIGTERM
    # (a time limit, a preemption), Slurm's early warning with #SBATCH --signal=USR1@120; () for none. The save
    # must be written within the timeout (below the scheduler's grace: Slurm's KillWait is 30 s by default)
    save_on_signals: tuple[str, ...] = ("SIGTERM",)
    save_on_signal_timeout_s: float = Field(default=25.0, gt=0, le=86400)

    @field_validator("save_on_signals", mode="before")
    @classmethod
    def _signal_names(cls, v: Any) -> Any:
        """'SIGUSR1', 'usr1' or a list of them -> ('SIGUSR1',); one of SAVE_SIGNALS each."""
        names = (v,) if isinstance(v, str) else v
        if not isinstance(names, (list, tuple)):
            return v  # pydantic names the expected type
        out = []
        for raw in names:
            name = raw.strip().upper() if isinstance(raw, str) else ""
            name = name if name.startswith("SIG") else "SIG" + name
            if name not in SAVE_SIGNALS:
                raise ValueError(f"{raw!r} is not a signal a run can save on; expected names among "
                                 f"{', '.join(SAVE_SIGNALS)}")
            out.append(name)
        return tuple(dict.fromkeys(out))

    @field_validator("checkpoint_every", "oss_snapshot_freq")
    @classmethod
    def _interval(cls, v: float) -> float:
        return every_steps(v)

    _paths = field_validator("save_ckpt_folder", "load_ckpt_folder", "async_upload_tmp_folder", "snapshot_ckpt_folder",
                             "stop_file_path")(path_value)

    def s3_settings(self) -> S3Settings:
        """The settings every bucket of this run is opened with."""
        return S3Settings(connect_timeout_s=self.s3_connect_timeout_s, read_timeout_s=self.s3_read_timeout_s,
                          retry_mode=self.s3_retry_mode, max_attempts=self.s3_max_attempts)


# --------------------------------------------------------------------------- optimisation


class Fp16ScalerConfig(Section):
    initial_scale: float = Field(default=2.0**16, gt=0, le=2.0**64)
    min_scale: float = Field(default=1.0, gt=0, le=2.0**64)
    growth_interval: int = Field(default=1000, ge=1)


class GradScalerConfig(Section):
    fp16: Fp16ScalerConfig = Field(default_factory=Fp16ScalerConfig)
    growth_factor: float = Field(default=2.0, gt=1)
    backoff_factor: float = Field(default=0.5, gt=0, lt=1)
    max_scale: float = Field(default=2.0**24, gt=0, le=2.0**64)
    hysteresis: int = Field(default=2, ge=1)


class HybridZeroOptimizerConfig(Section):
    overlap_sync_grad: bool = True
    overlap_sync_param: bool = True
    reduce_bucket_size: int = Field(default=512 * 1024 * 1024, ge=1)
    clip_grad_norm: float = Field(default=1.0, ge=0)  # 0 = no clipping


class LossConfig(Section):
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    # InternEvo's weight of the MoE balance loss: becomes model.aux_loss_coeff (config/internevo.py translate_moe);
    # None: not given
    moe_loss_coeff: Optional[float] = Field(default=None, ge=0, le=1e3)


class MoeConfig(Section):
    """InternEvo's top-level `moe` section: the keyword arguments of its MoE layer (model.moe_type picks the
    layer). None: not given, the layer's own default applies. config/internevo.py translate_moe maps each onto
    the model's MoE keys, says it does nothing here, or refuses it (docs/moe.md, "InternEvo configs")."""

    top_k: Optional[int] = Field(default=None, ge=1, le=2**10)
    capacity_factor: Optional[float] = Field(default=None, gt=0, le=2**10)
    eval_capacity_factor: Optional[float] = Field(default=None, gt=0, le=2**10)
    min_capacity: Optional[int] = Field(default=None, ge=0, le=2**30)
    noisy_gate_policy: Optional[Literal["None", "Jitter", "RSample"]] = None
    drop_tokens: Optional[bool] = None
    use_rts: Optional[bool] = None
    parallel_mode: Optional[Literal["tensor", "weight"]] = None  # MegaBlock-D's split of the experts over tp
    multiple_of: Optional[int] = Field(default=None, ge=1, le=2**16)  # MegaBlock's rounding of the expert width


class AdamConfig(Section):
    lr: float = Field(default=1e-4, ge=0, le=1e3)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    adam_beta2_c: float = Field(default=0.0, ge=0)
    adam_eps: float = Field(default=1e-8, gt=0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0, le=1e3)
    # InternEvo decays every parameter; the usual practice (and ours) exempts norms and biases.
    decay_norm_and_bias: bool = False
    fused: Optional[bool] = None  # None: fused AdamW on CPU and CUDA, foreach elsewhere


class LrSchedulerConfig(Section):
    total_steps: Optional[int] = Field(default=None, ge=1)  # defaults to data.total_steps
    init_steps: int = Field(default=0, ge=0, le=10**12)
    warmup_ratio: float = Field(default=0.01, ge=0, le=1)
    eta_min: float = Field(default=1e-5, ge=0)
    last_epoch: int = Field(default=-1, ge=-1, le=10**12)


class Beta2SchedulerConfig(Section):
    init_beta2: Optional[float] = Field(default=None, ge=0, lt=1)  # defaults to adam.adam_beta2
    c: Optional[float] = Field(default=None, ge=0)  # defaults to adam.adam_beta2_c
    cur_iter: int = Field(default=-1, ge=-1, le=10**12)


# --------------------------------------------------------------------------- parallel


class ZeroConfig(Section):
    size: int = Field(default=-1, ge=-1, le=2**20)  # -1/0: whole data-parallel group; 1: no sharding; k: groups of k
    fsdp: bool = False


class TensorConfig(Section):
    size: int = Field(default=1, ge=1, le=2**12)
    mode: Literal["mtp", "msp", "fsp", "isp"] = "mtp"


class PipelineConfig(Section):
    size: int = Field(default=1, ge=1, le=2**12)
    interleaved_overlap: bool = False
    schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"] = "1f1b"


class WeightConfig(Section):
    """InternEvo's weight parallel (with tensor mode "isp"): translated to FSDP sharding (config/internevo.py)."""

    size: int = Field(default=1, ge=1, le=2**12)
    overlap: bool = False
    memory_pool: bool = False


class ExpertConfig(Section):
    """Expert parallelism (docs/moe.md): each MoE layer's experts split over `size` data-parallel ranks, tokens
    sent to their experts' ranks and back by all-to-all. InternEvo's key; -1: all the data-parallel ranks."""

    size: int = Field(default=1, ge=-1, le=2**12)
    # InternEvo's no_tp=True keeps the experts whole on every tensor rank: the only way here (docs/moe.md),
    # so False is refused by the layout when tensor parallelism is on
    no_tp: bool = True

    @field_validator("size")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("expected -1 (all the data-parallel ranks), 1 (no expert parallelism) or a size >= 2")
        return v


class ParallelConfig(Section):
    zero1: ZeroConfig = Field(default_factory=ZeroConfig)
    tensor: TensorConfig = Field(default_factory=TensorConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sequence_parallel: bool = False
    context: int = Field(default=1, ge=1, le=2**12)  # context-parallel size (ours)
    weight: WeightConfig = Field(default_factory=WeightConfig)
    expert: ExpertConfig = Field(default_factory=ExpertConfig)
    fsdp: bool = False  # full sharding of parameters, gradients and optimizer state (FSDP2)
    # how long a collective (or the rendezvous) waits for the other ranks before the job stops with one line
    timeout_s: float = Field(default=600.0, gt=0, le=7 * 86400)

    @field_validator("zero1", mode="before")
    @classmethod
    def _zero1_int(cls, v: Any) -> Any:
        return {"size": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("tensor", "pipeline", "expert", mode="before")
    @classmethod
    def _size_int(cls, v: Any) -> Any:
        return {"size": v} if isinstance(v, int) and not isinstance(v, bool) else v


# --------------------------------------------------------------------------- monitor


class AlertConfig(Section):
    enable_feishu_alert: bool = False
    feishu_alert_address: Optional[str] = None
    light_monitor_address: Optional[str] = None
    alert_file_path: Optional[str] = None
    webhook_format: Literal["feishu", "slack", "json"] = "feishu"
    loss_spike_ratio: float = Field(default=1.5, gt=1, le=1e6)
    stuck_timeout_s: float = Field(default=300.0, gt=0, le=7 * 86400)
    heartbeat_every: int = Field(default=50, ge=1)

    _paths = field_validator("alert_file_path")(path_value)


class MonitorConfig(Section):
    alert: AlertConfig = Field(default_factory=AlertConfig)
    tensorboard: Optional[dict] = None  # InternEvo's writer queue (queue_max_length): no effect here
    # experiment trackers (spindle/config/trackers.py): True, or a dict of their settings
    wandb: Optional[WandbConfig] = None
    mlflow: Optional[MlflowConfig] = None

    _trackers = field_validator("wandb", "mlflow", mode="before")(on_or_settings)


# --------------------------------------------------------------------------- trainer (ours)


class TrainerConfig(Section):
    """Run-level settings that InternEvo keeps on the command line or hard-codes."""

    run_folder: str = "runs"  # the run goes to {run_folder}/{JOB_NAME}
    seed: int = Field(default=1024, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    # MFU denominator per device; None = table / measured
    peak_tflops: Optional[float] = Field(default=None, gt=0, le=1e6)
    log_every: int = Field(default=1, ge=1, le=10**12)
    progress_bar: Optional[bool] = None  # None: when stdout is a terminal
    jsonl: bool = True
    tensorboard: bool = True
    sample_prompt: Optional[str] = None  # printed with a sampled continuation when training ends
    sample_tokens: int = Field(default=48, ge=0, le=2**16)
    sample_temperature: float = Field(default=0.8, ge=0, le=100)  # 0: greedy
    sample_top_p: float = Field(default=0.95, gt=0, le=1)
    num_threads: Optional[int] = Field(default=None, ge=1)  # torch intra-op threads on CPU

    _paths = field_validator("run_folder")(path_value)

    @field_validator("num_threads")
    @classmethod
    def _threads_here(cls, v: Optional[int]) -> Optional[int]:
        cores = os.cpu_count() or 1
        if v is not None and v > cores:
            raise ValueError(f"this machine has {cores} cores; more threads than cores only slows training down")
        return v


# --------------------------------------------------------------------------- the whole file


class SpindleConfig(Section):
    JOB_NAME: str = "spindle"
    # INTERNLM_MoE: the INTERNLM model with MoE layers (model.num_experts > 1, the `moe` section)
    model_type: Literal["INTERNLM", "INTERNLM2_PUBLIC", "LLAMA2", "LLAMA", "INTERNLM_MoE"] = "INTERNLM"
    ckpt: CkptConfig = Field(default_factory=CkptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    grad_scaler: GradScalerConfig = Field(default_factory=GradScalerConfig)
    hybrid_zero_optimizer: HybridZeroOptimizerConfig = Field(default_factory=HybridZeroOptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    adam: AdamConfig = Field(default_factory=AdamConfig)
    lr_scheduler: LrSchedulerConfig = Field(default_factory=LrSchedulerConfig)
    beta2_scheduler: Beta2SchedulerConfig = Field(default_factory=Beta2SchedulerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    long_eval: LongEvalConfig = Field(default_factory=LongEvalConfig)
    cudnn_deterministic: bool = False
    cudnn_benchmark: bool = False
    use_fp32_norm: bool = False
    metric_dtype: str = "fp32"
    enable_tb: bool = True
    tensorboard_folder: Optional[str] = None
    resume_tb_folder: Optional[str] = None
    generation: Optional[dict] = None  # InternEvo's generation tool settings: no effect here (spindle generate)
    moe: Optional[MoeConfig] = None  # InternEvo's MoE layer keys, translated onto model.* (config/internevo.py)
    # user constants (SEQ_LEN, TRAIN_FOLDER, ...): kept for reference, not interpreted
    constants: dict[str, Any] = Field(default_factory=dict)
    # keys the file gave that are accepted for compatibility and do nothing here (config/internevo.py)
    _compat_notes: list[str] = PrivateAttr(default_factory=list)

    _job_name = field_validator("JOB_NAME")(folder_name)
    _paths = field_validator("tensorboard_folder", "resume_tb_folder")(path_value)

    @model_validator(mode="after")
    def _derived_defaults(self) -> "SpindleConfig":
        # Fill the keys whose defaults are other keys, as InternEvo's sanity check does.
        if self.data.valid_micro_num is None:
            self.data.valid_micro_num = self.data.micro_num
        if self.lr_scheduler.total_steps is None:
            self.lr_scheduler.total_steps = self.data.total_steps
        if self.beta2_scheduler.init_beta2 is None:
            self.beta2_scheduler.init_beta2 = self.adam.adam_beta2
        if self.beta2_scheduler.c is None:
            self.beta2_scheduler.c = self.adam.adam_beta2_c
        if self.long_eval.enabled and not self.data.valid_every:
            raise ValueError("long_eval.lengths / passkey_lengths: they run every data.valid_every steps; "
                             "set data.valid_every >= 1")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.run_folder) / self.JOB_NAME

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")
