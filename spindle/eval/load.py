"""Load a trained model for evaluation or generation from a checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from spindle.checkpoint.manager import load_checkpoint, open_checkpoint
from spindle.config import SpindleConfig, validate_config
from spindle.errors import SpindleError
from spindle.model.llama import Transformer, build_model


def parse_rope_override(spec: Optional[str], original_len: int) -> Optional[dict]:
    """'dynamic' | 'ntk:8' | 'linear:4' | 'yarn:16' | 'none' -> a rope_scaling dict (None = keep)."""
    if spec is None:
        return None
    kind, _, factor = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("none", "plain", "default"):
        return {"type": "default"}
    if kind not in ("dynamic", "ntk", "linear", "yarn", "llama3"):
        raise SpindleError(f"--rope-scaling {spec!r}: expected none, dynamic, ntk:F, linear:F, yarn:F or llama3:F")
    try:
        f = float(factor) if factor else 1.0
    except ValueError:
        raise SpindleError(f"--rope-scaling {spec!r}: the factor after ':' must be a number") from None
    return {"type": kind, "factor": f, "original_max_position_embeddings": original_len}


def checkpoint_config(path: Path) -> SpindleConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SpindleError(f"{path}: no config.json beside the checkpoint")
    try:
        raw = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as exc:
        raise SpindleError(f"{cfg_file}: not a readable JSON config ({exc})") from None
    if not isinstance(raw, dict):
        raise SpindleError(f"{cfg_file}: expected a JSON object (the run's config), found {type(raw).__name__}")
    raw.pop("constants", None)
    return validate_config(raw, str(cfg_file))


def load_model_for_eval(ckpt: str, rope_scaling: Optional[str] = None, device: str = "cpu",
                        model_overrides: Optional[dict] = None) -> tuple[Transformer, SpindleConfig]:
    """`ckpt`: a checkpoint folder, a save folder (its latest completed checkpoint), `.../latest`,
    local or boto3:s3://...; the S3 endpoint and keys come from the environment."""
    with open_checkpoint(ckpt) as path:
        cfg = checkpoint_config(path)
        mcfg = cfg.model
        override = parse_rope_override(rope_scaling, cfg.data.seq_len)
        updates = dict(model_overrides or {})
        if override is not None:
            updates["rope_scaling"] = override
            updates["use_dynamic_ntk_rope"] = False
        if updates:
            mcfg = mcfg.model_validate(mcfg.model_dump() | updates)
        model = build_model(mcfg.to_args(), torch.device(device))
        load_checkpoint(path, model, None, ("model",))
    model.eval()
    return model, cfg
