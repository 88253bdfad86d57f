"""The typed config: every section of an InternEvo-style Python config file, with defaults.

A config file is plain Python, exactly as the seed guide writes it: module-level constants
(`JOB_NAME`, `SEQ_LEN`, ...) and dicts (`model`, `data`, `ckpt`, ...). Loading executes the file
(it is code: trust it as you trust a script you run), keeps every global that is not a dunder,
module, class or function, and validates the result against the pydantic schema below
(unknown keys are errors, every key has a default).

Errors come out as one `SpindleError` line naming the file, the key path and what was expected.
"""

from __future__ import annotations

import ast
import bisect
import collections.abc
import difflib
import json
import math
import runpy
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spindle.errors import SpindleError


class Section(BaseModel):
    """Base of every section: unknown keys are errors; values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- ckpt


class LoadCkptInfo(Section):
    path: Optional[str] = None
    # which states to load: any of model / sampler / optimizer / scheduler, or "all"
    content: tuple[Literal["model", "sampler", "optimizer", "scheduler", "all"], ...] = ("all",)
    # "internevo" / "normal" / "spindle" all mean our own DCP format; "hf" (or InternEvo's "hf_llama")
    # means a Hugging Face Llama folder (model weights only).
    ckpt_type: Literal["internevo", "normal", "spindle", "hf", "hf_llama", "llama"] = "internevo"

    @field_validator("content", mode="before")
    @classmethod
    def _content_as_tuple(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v


class CkptConfig(Section):
    enable_save_ckpt: bool = False
    save_ckpt_folder: Optional[str] = None
    load_ckpt_folder: Optional[str] = None  # legacy InternEvo key: same as load_ckpt_info(path=..., content=all)
    load_ckpt_info: Optional[LoadCkptInfo] = None
    checkpoint_every: float = math.inf  # steps; inf = only at the end (when saving is enabled)
    auto_resume: bool = True
    async_upload: bool = False
    async_upload_tmp_folder: str = "/dev/shm/spindle_tmp_ckpt/"
    oss_snapshot_freq: float = math.inf
    snapshot_ckpt_folder: Optional[str] = None
    stop_file_path: Optional[str] = None
    keep_last_n: Optional[int] = Field(default=None, ge=1)
    save_final: bool = True  # save when training ends (also when enable_save_ckpt is False: model weights only)
    # object storage (boto3:) connection; credentials are better left to the environment
    s3_endpoint_url: Optional[str] = None
    s3_region: Optional[str] = None
    # an endpoint that is down fails within the connect timeout; one that accepts connections but never
    # answers, within the read timeout (each try; start-up makes two)
    s3_connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    s3_read_timeout_s: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("checkpoint_every", "oss_snapshot_freq")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be a positive number of steps (or float('inf'))")
        return v


# --------------------------------------------------------------------------- data


def _count(**bounds):
    """An integer key of the data section: a real int only (no True for 1, no 2048.0)."""
    return Field(strict=True, **bounds)


class DataConfig(Section):
    type: Literal["tokenized", "streaming", "text", "dummy"] = "tokenized"
    seq_len: int = _count(default=2048, ge=2)
    micro_num: int = _count(default=1, ge=1)
    micro_bsz: int = _count(default=1, ge=1)
    valid_micro_num: Optional[int] = _count(default=None, ge=1)  # defaults to micro_num
    valid_every: int = _count(default=0, ge=0)  # 0 = no validation
    pack_sample_into_one: bool = False
    total_steps: int = _count(default=50000, ge=1)
    skip_batches: str = ""  # "1-5,9": batch_count values to skip
    rampup_batch_size: str = ""  # "start incr every": micro_num ramps from start by incr every N steps
    min_length: int = _count(default=0, ge=0)
    min_length_dict: dict[str, Annotated[int, Field(strict=True, ge=0)]] = Field(default_factory=dict)
    train_folder: Optional[str] = None  # None: a seeded random dataset, as InternEvo does
    valid_folder: Optional[str] = None
    empty_cache_and_diag_interval: int = _count(default=50, ge=0)
    diag_outlier_ratio: float = Field(default=1.1, gt=0, allow_inf_nan=False)
    use_packed_dataset: bool = True
    fixed_random_dataset_seqlen: bool = True
    num_worker: int = _count(default=0, ge=0)
    seed: int = _count(default=1024, ge=0, lt=2**63)  # numpy seeds are non-negative
    # streaming (Hugging Face datasets) and raw text
    tokenizer_path: Optional[str] = None
    content_name: str = "text"
    subset_name: Optional[str] = None
    split: str = "train"  # streaming: the split trained on (e.g. "train_sft")
    valid_split: Optional[str] = None  # streaming: a split of the dataset to validate on (e.g. "validation")
    # raw text folders (type="text"): which files, and how a file becomes documents
    text_glob: str = "**/*.txt"
    text_exclude: tuple[str, ...] = ()
    max_text_bytes: Optional[int] = _count(default=None, ge=1)
    # per-source sampling weights by folder name, e.g. {"en": 1.0, "code": 0.5}
    source_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("skip_batches")
    @classmethod
    def _skip_batches(cls, v: str) -> str:
        parse_skip_batches(v)  # raises ValueError with the reason
        return v

    @field_validator("rampup_batch_size")
    @classmethod
    def _rampup(cls, v: str) -> str:
        parse_rampup(v)
        return v

    @field_validator("source_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"the weight of {name!r} must be a finite number > 0 (leave a source out to "
                                 f"give it weight 0)")
        return v

    @field_validator("text_glob")
    @classmethod
    def _glob(cls, v: str) -> str:
        if not v.strip() or v.startswith(("/", "\\")) or ".." in v.replace("\\", "/").split("/"):
            raise ValueError("expected a non-empty pattern relative to train_folder, like '**/*.txt'")
        return v

    @field_validator("content_name", "split", "valid_split", "subset_name", "tokenizer_path", "train_folder",
                     "valid_folder")
    @classmethod
    def _non_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("expected a non-empty string (or leave the key out)")
        return v

    @field_validator("text_exclude")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not part.strip() for part in v):
            raise ValueError("expected non-empty folder or file names")
        return v

    @model_validator(mode="after")
    def _streaming_keys(self) -> "DataConfig":
        if self.type != "streaming":
            if self.split != "train":
                raise ValueError("'split' selects a split of a streamed dataset and needs type='streaming'")
            if self.valid_split is not None:
                raise ValueError("'valid_split' selects a split of a streamed dataset and needs type='streaming'")
        return self

    @property
    def packed_length(self) -> int:
        return self.seq_len * self.micro_bsz


class BatchRanges(collections.abc.Set):
    """A set of batch_count values held as merged inclusive ranges: `"0-99999999999"` is one pair,
    not a set of 10^11 ints. Membership is a bisect; iterating and `==` behave like a set."""

    def __init__(self, ranges: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._starts = [a for a, _ in merged]
        self._ranges = [(a, b) for a, b in merged]

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, int):
            return False
        k = bisect.bisect_right(self._starts, x) - 1
        return k >= 0 and x <= self._ranges[k][1]

    def __iter__(self):
        for a, b in self._ranges:
            yield from range(a, b + 1)

    def __len__(self) -> int:
        return sum(b - a + 1 for a, b in self._ranges)

    def __repr__(self) -> str:
        return f"BatchRanges({self._ranges})"


def parse_skip_batches(spec: str) -> BatchRanges:
    """'1-5,9' -> {1,2,3,4,5,9} (InternEvo's BatchSkipper syntax), as ranges."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"expected ranges like '1-5,9', got {spec!r}") from None
        if b < a:
            raise ValueError(f"range {part!r} ends before it starts")
        ranges.append((a, b))
    return BatchRanges(ranges)


def parse_rampup(spec: str) -> Optional[tuple[int, int, int]]:
    """'start incr every' -> (start, incr, every): micro_num grows from start by incr every N steps."""
    if not spec.strip():
        return None
    parts = spec.split()
    try:
        start, incr, every = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected three integers 'start increment every_steps', got {spec!r}") from None
    if start < 1 or incr < 0 or every < 1:
        raise ValueError(f"need start >= 1, increment >= 0, every_steps >= 1, got {spec!r}")
    return start, incr, every


# --------------------------------------------------------------------------- optimisation


class Fp16ScalerConfig(Section):
    initial_scale: float = Field(default=2.0**16, gt=0)
    min_scale: float = Field(default=1.0, gt=0)
    growth_interval: int = Field(default=1000, ge=1)


class GradScalerConfig(Section):
    fp16: Fp16ScalerConfig = Field(default_factory=Fp16ScalerConfig)
    growth_factor: float = Field(default=2.0, gt=1)
    backoff_factor: float = Field(default=0.5, gt=0, lt=1)
    max_scale: float = Field(default=2.0**24, gt=0)
    hysteresis: int = Field(default=2, ge=1)


class HybridZeroOptimizerConfig(Section):
    overlap_sync_grad: bool = True
    overlap_sync_param: bool = True
    reduce_bucket_size: int = Field(default=512 * 1024 * 1024, ge=1)
    clip_grad_norm: float = Field(default=1.0, ge=0)  # 0 = no clipping


class LossConfig(Section):
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    moe_loss_coeff: float = 0.0


class AdamConfig(Section):
    lr: float = Field(default=1e-4, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    adam_beta2_c: float = Field(default=0.0, ge=0)
    adam_eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    # InternEvo decays every parameter; the usual practice (and ours) exempts norms and biases.
    decay_norm_and_bias: bool = False
    fused: Optional[bool] = None  # None: fused AdamW on CPU and CUDA, foreach elsewhere


class LrSchedulerConfig(Section):
    total_steps: Optional[int] = Field(default=None, ge=1)  # defaults to data.total_steps
    init_steps: int = Field(default=0, ge=0)
    warmup_ratio: float = Field(default=0.01, ge=0, le=1)
    eta_min: float = Field(default=1e-5, ge=0)
    last_epoch: int = -1


class Beta2SchedulerConfig(Section):
    init_beta2: Optional[float] = Field(default=None, ge=0, lt=1)  # defaults to adam.adam_beta2
    c: float = Field(default=0.0, ge=0)
    cur_iter: int = -1


# --------------------------------------------------------------------------- model

DTYPES = ("torch.float32", "torch.tf32", "torch.bfloat16", "torch.float16", "torch.half")


class RopeScalingConfig(Section):
    type: Literal["default", "linear", "dynamic", "ntk", "yarn", "llama3", "longrope"] = "default"
    factor: float = Field(default=1.0, gt=0)
    original_max_position_embeddings: Optional[int] = Field(default=None, ge=1)
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # longrope: per-frequency factors (head_dim / 2 each) within / beyond the original length
    short_factor: Optional[list[float]] = None
    long_factor: Optional[list[float]] = None

    @model_validator(mode="before")
    @classmethod
    def _rope_type_alias(cls, data: Any) -> Any:
        # transformers writes "rope_type"; InternEvo writes "type"
        if isinstance(data, dict) and "rope_type" in data and "type" not in data:
            data = dict(data)
            data["type"] = data.pop("rope_type")
        return data

    def as_dict(self) -> dict:
        """type, factor, original length, and the parameters that differ from their defaults: each type
        rejects the other types' parameters, and a config read back from JSON has every field set."""
        keep = ("type", "factor", "original_max_position_embeddings")
        if self.type == "llama3":  # required by llama3 (transformers has no defaults for them)
            keep += ("low_freq_factor", "high_freq_factor")
        return {k: v for k, v in self.model_dump(exclude_none=True).items()
                if k in keep or v != type(self).model_fields[k].default}


class ModelConfig(Section):
    checkpoint: Union[bool, float] = False  # activation checkpointing: bool, or the fraction of layers
    num_attention_heads: int = Field(default=32, ge=1)
    num_kv_attention_heads: Optional[int] = Field(default=None, ge=1)  # None = num_attention_heads
    embed_split_hidden: bool = True
    vocab_size: int = Field(default=103168, ge=2)
    embed_grad_scale: float = 1.0
    parallel_output: bool = True
    hidden_size: int = Field(default=4096, ge=1)
    num_layers: int = Field(default=32, ge=1)
    mlp_ratio: float = Field(default=8 / 3, gt=0)
    multiple_of: int = Field(default=256, ge=1)  # the SwiGLU hidden size is rounded up to this
    apply_post_layer_norm: bool = False
    dtype: str = "torch.float32"
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    layer_norm_epsilon: float = Field(default=1e-5, gt=0)
    use_flash_attn: bool = True  # SDPA picks the flash kernel where the hardware has one
    num_chunks: int = Field(default=1, ge=1)  # >1: interleaved pipeline schedule
    no_bias: bool = True  # InternEvo's switch: no bias anywhere (the three keys below default to it)
    qkv_bias: Optional[bool] = None  # biases of wq/wk/wv (None: not no_bias); Qwen2: True with o/MLP False
    o_bias: Optional[bool] = None  # bias of wo (None: not no_bias)
    mlp_bias: Optional[bool] = None  # biases of w1/w2/w3 (None: not no_bias)
    qk_norm: bool = False  # RMSNorm of every q and k head over head_dim before RoPE (Qwen3)
    head_dim: Optional[int] = Field(default=None, ge=2)  # None: hidden_size / num_attention_heads
    sliding_window: Optional[int] = Field(default=None, ge=1)  # Mistral; longer sequences are refused
    tie_word_embeddings: bool = False
    use_swiglu: bool = True
    use_fp32_norm: bool = False
    drop_rate: float = Field(default=0.0, ge=0, lt=1)
    attn_drop_rate: float = Field(default=0.0, ge=0, lt=1)
    rope_base: float = Field(default=10000.0, gt=1)
    rope_scaling: Optional[RopeScalingConfig] = None
    use_dynamic_ntk_rope: bool = False  # the seed's switch: means rope_scaling={"type": "dynamic"}
    max_position_embeddings: int = Field(default=2048, ge=1)
    logn_attn: bool = False  # log-scaled attention: q *= max(1, log_{logn_ref_len}(pos + 1))
    logn_ref_len: Optional[int] = Field(default=None, ge=2)  # None = max_position_embeddings
    init_std: float = Field(default=0.02, gt=0)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES and f"torch.{v}" not in DTYPES:
            raise ValueError(f"expected one of {', '.join(DTYPES)}")
        return v if v.startswith("torch.") else f"torch.{v}"

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: Union[bool, float]) -> Union[bool, float]:
        if not isinstance(v, bool) and not 0.0 <= v <= 1.0:
            raise ValueError("expected True/False or a fraction of layers in [0, 1]")
        return v

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads or self.hidden_size < 2 * self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple (>= 2x) of num_attention_heads "
                                 f"({self.num_attention_heads}), or give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads  # re-validates once, now set
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_kv_attention_heads ({self.kv_heads})"
            )
        if self.no_bias and any(getattr(self, k) for k in ("qkv_bias", "o_bias", "mlp_bias")):
            raise ValueError("no_bias=True means no bias anywhere; set no_bias=False to turn biases on by group "
                             "(qkv_bias / o_bias / mlp_bias)")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_attention_heads or self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU hidden size: int(hidden * mlp_ratio) rounded up to `multiple_of` (7B: 11008)."""
        raw = int(self.hidden_size * self.mlp_ratio)
        return self.multiple_of * ((raw + self.multiple_of - 1) // self.multiple_of)

    @property
    def num_checkpointed_layers(self) -> int:
        if isinstance(self.checkpoint, bool):
            return self.num_layers if self.checkpoint else 0
        return int(self.num_layers * self.checkpoint)

    def effective_rope_scaling(self) -> Optional[dict]:
        """rope_scaling as a plain dict, with the seed's `use_dynamic_ntk_rope` folded in."""
        if self.rope_scaling is not None and self.rope_scaling.type != "default":
            return self.rope_scaling.as_dict()
        if self.use_dynamic_ntk_rope:
            return {"type": "dynamic", "factor": 1.0, "original_max_position_embeddings": self.max_position_embeddings}
        return None

    def to_args(self):
        """The model's plain `ModelArgs`: every size resolved, every bias switch explicit."""
        from spindle.model.llama import ModelArgs

        def bias(key: str) -> bool:
            value = getattr(self, key)
            return (not self.no_bias) if value is None else value

        return ModelArgs(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
            ffn_hidden_size=self.ffn_hidden_size, norm_type=self.norm_type,
            layer_norm_epsilon=self.layer_norm_epsilon, norm_bias=not self.no_bias,
            qkv_bias=bias("qkv_bias"), o_bias=bias("o_bias"), mlp_bias=bias("mlp_bias"), qk_norm=self.qk_norm,
            use_swiglu=self.use_swiglu, apply_post_layer_norm=self.apply_post_layer_norm,
            tie_word_embeddings=self.tie_word_embeddings, drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate, rope_base=self.rope_base, rope_scaling=self.effective_rope_scaling(),
            max_position_embeddings=self.max_position_embeddings,
            logn_ref_len=(self.logn_ref_len or self.max_position_embeddings) if self.logn_attn else None,
            sliding_window=self.sliding_window, init_std=self.init_std,
        )


# --------------------------------------------------------------------------- parallel


class ZeroConfig(Section):
    size: int = -1  # <= 0: shard optimizer state over the whole data-parallel group; 1: no sharding; k: groups of k
    fsdp: bool = False


class TensorConfig(Section):
    size: int = Field(default=1, ge=1)
    mode: Literal["mtp", "msp", "fsp", "isp"] = "mtp"


class PipelineConfig(Section):
    size: int = Field(default=1, ge=1)
    interleaved_overlap: bool = False
    schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"] = "1f1b"


class ParallelConfig(Section):
    zero1: ZeroConfig = Field(default_factory=ZeroConfig)
    tensor: TensorConfig = Field(default_factory=TensorConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sequence_parallel: bool = False
    context: int = Field(default=1, ge=1)  # context-parallel size (ours)
    fsdp: bool = False  # full sharding of parameters, gradients and optimizer state (FSDP2)

    @field_validator("zero1", mode="before")
    @classmethod
    def _zero1_int(cls, v: Any) -> Any:
        return {"size": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("tensor", "pipeline", mode="before")
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
    loss_spike_ratio: float = Field(default=1.5, gt=1)
    stuck_timeout_s: float = Field(default=300.0, gt=0)
    heartbeat_every: int = Field(default=50, ge=1)


class MonitorConfig(Section):
    alert: AlertConfig = Field(default_factory=AlertConfig)


# --------------------------------------------------------------------------- trainer (ours)


class TrainerConfig(Section):
    """Run-level settings that InternEvo keeps on the command line or hard-codes."""

    run_folder: str = "runs"  # the run goes to {run_folder}/{JOB_NAME}
    seed: int = 1024
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    peak_tflops: Optional[float] = Field(default=None, gt=0)  # MFU denominator per device; None = table / measured
    log_every: int = Field(default=1, ge=1)
    progress_bar: Optional[bool] = None  # None: when stdout is a terminal
    jsonl: bool = True
    tensorboard: bool = True
    sample_prompt: Optional[str] = None  # printed with a greedy continuation when training ends
    sample_tokens: int = Field(default=48, ge=0)
    num_threads: Optional[int] = Field(default=None, ge=1)  # torch intra-op threads on CPU


# --------------------------------------------------------------------------- the whole file

# Module-level constants the seed guide writes. They are plain variables used inside the file;
# other all-caps names are accepted too (users add their own), lower-case names must be known keys.
KNOWN_CONSTANTS = {
    "JOB_NAME", "DO_ALERT", "SEQ_LEN", "HIDDEN_SIZE", "NUM_ATTENTION_HEAD", "NUM_KV_ATTENTION_HEAD", "MLP_RATIO",
    "NUM_LAYER", "VOCAB_SIZE", "MODEL_ONLY_FOLDER", "SAVE_CKPT_FOLDER", "LOAD_CKPT_FOLDER", "CHECKPOINT_EVERY",
    "TRAIN_FOLDER", "VALID_FOLDER",
}


class SpindleConfig(Section):
    JOB_NAME: str = "spindle"
    DO_ALERT: bool = False
    model_type: Literal["INTERNLM", "INTERNLM2_PUBLIC", "LLAMA2", "LLAMA"] = "INTERNLM"
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
    cudnn_deterministic: bool = False
    cudnn_benchmark: bool = False
    use_fp32_norm: bool = False
    metric_dtype: str = "fp32"
    enable_tb: bool = True
    tensorboard_folder: Optional[str] = None
    resume_tb_folder: Optional[str] = None
    # user constants (SEQ_LEN, TRAIN_FOLDER, ...): kept for reference, not interpreted
    constants: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _derived_defaults(self) -> "SpindleConfig":
        # Fill the keys whose defaults are other keys, as InternEvo's sanity check does.
        if self.data.valid_micro_num is None:
            self.data.valid_micro_num = self.data.micro_num
        if self.lr_scheduler.total_steps is None:
            self.lr_scheduler.total_steps = self.data.total_steps
        if self.beta2_scheduler.init_beta2 is None:
            self.beta2_scheduler.init_beta2 = self.adam.adam_beta2
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.run_folder) / self.JOB_NAME

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _collect_globals(namespace: dict) -> dict:
    """InternEvo's rule: every global that is not a dunder, module, class or function is a key."""
    out = {}
    for key, value in namespace.items():
        if key.startswith("__") or isinstance(value, (types.ModuleType, type, types.FunctionType)):
            continue
        out[key] = value
    return out


def _split_constants(raw: dict) -> tuple[dict, dict]:
    keys, constants = {}, {}
    for key, value in raw.items():
        if key in SpindleConfig.model_fields:
            keys[key] = value
        elif key.isupper() or key in KNOWN_CONSTANTS:
            constants[key] = value
        else:
            keys[key] = value  # validation reports it as unknown, with the closest valid key
    return keys, constants


def _section_model(path: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model at a key path, to suggest the closest valid key."""
    model: Any = SpindleConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # drop pydantic's union-branch labels (e.g. 'bool', 'float') from the path
    clean = tuple(p for p in loc if p not in ("bool", "float", "int", "str", "constrained-float", "tagged-union"))
    key = ".".join(str(p) for p in clean) or "<config>"
    if err["type"] == "extra_forbidden":
        parent = _section_model(clean[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(clean[-1]), list(parent.model_fields), n=1, cutoff=0.5)
            if close:
                hint = f"; did you mean '{'.'.join(str(p) for p in clean[:-1] + (close[0],))}'?"
        return f"{key}: unknown key{hint}"
    given = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {given!r})"


def validate_config(raw: dict, source: str = "<config>") -> SpindleConfig:
    keys, constants = _split_constants(raw)
    if isinstance(keys.get("constants", {}), dict):  # else the schema reports `constants` (fuzz: constants=None)
        keys.setdefault("constants", {}).update(constants)
    try:
        return SpindleConfig.model_validate(keys)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpindleError(f"{source}: {first}{more}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'data.micro_bsz=4' -> (['data', 'micro_bsz'], 4). Values are Python literals, else strings."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpindleError(f"--set {item!r}: expected KEY=VALUE, e.g. data.micro_bsz=4")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None, "inf": math.inf}.get(text.lower(), text)
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw, default=_jsonable))  # deep copy through plain types
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def read_config_file(path: str | Path) -> dict:
    """Execute a Python config file and return its keys; syntax and runtime errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise SpindleError(f"config file not found: {path}")
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise SpindleError(f"{path}:{exc.lineno}: config does not parse: {exc.msg}") from None
    try:
        namespace = runpy.run_path(str(path), run_name="__spindle_config__")
    except SpindleError:
        raise
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one clear line
        line = _user_line(exc, path)
        raise SpindleError(f"{path}{f':{line}' if line else ''}: error while running the config: "
                           f"{type(exc).__name__}: {exc}") from None
    return _collect_globals(namespace)


def _user_line(exc: BaseException, path: Path) -> Optional[int]:
    tb, line = exc.__traceback__, None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SpindleConfig:
    """Load a Python config file (or only defaults when path is None) with `--set` overrides."""
    raw = read_config_file(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " (with --set overrides)"
    return validate_config(raw, source)


def save_resolved_config(cfg: SpindleConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.json"
    out.write_text(json.dumps(cfg.to_dict(), indent=2, default=_jsonable) + "\n")
    return out
