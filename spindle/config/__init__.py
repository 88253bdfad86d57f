"""The typed config: the native schema, InternEvo's keys, loading (see the modules of this package)."""

from spindle.config.base import Section
from spindle.config.data import BatchRanges, DataConfig, parse_rampup, parse_skip_batches
from spindle.config.load import apply_overrides, load_config, parse_override, read_config_file, \
    save_resolved_config, validate_config
from spindle.config.long_eval import LongEvalConfig
from spindle.config.model import DTYPES, ModelConfig, RopeScalingConfig
from spindle.config.schema import (
    AdamConfig, AlertConfig, Beta2SchedulerConfig, CkptConfig, Fp16ScalerConfig, GradScalerConfig,
    HybridZeroOptimizerConfig, LoadCkptInfo, LossConfig, LrSchedulerConfig, MonitorConfig, ParallelConfig,
    PipelineConfig, SpindleConfig, TensorConfig, TrainerConfig, ZeroConfig,
)

__all__ = [
    "AdamConfig", "AlertConfig", "BatchRanges", "Beta2SchedulerConfig", "CkptConfig", "DTYPES", "DataConfig",
    "Fp16ScalerConfig", "GradScalerConfig", "HybridZeroOptimizerConfig", "LoadCkptInfo", "LongEvalConfig", "LossConfig",
    "LrSchedulerConfig", "ModelConfig", "MonitorConfig", "ParallelConfig", "PipelineConfig", "RopeScalingConfig",
    "Section", "SpindleConfig", "TensorConfig", "TrainerConfig", "ZeroConfig", "apply_overrides", "load_config",
    "parse_override", "parse_rampup", "parse_skip_batches", "read_config_file", "save_resolved_config",
    "validate_config",
]
