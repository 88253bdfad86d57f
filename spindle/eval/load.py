"""Load a trained model for evaluation or generation: a Spindle checkpoint, or a foreign folder
(Hugging Face, InternEvo, Meta Llama) read in place with the same parity as `spindle convert`."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from spindle.checkpoint.dcp_io import load_tensors
from spindle.checkpoint.discovery import checkpoint_config, open_checkpoint
from spindle.config import SpindleConfig, validate_config
from spindle.config.rope_types import parse_rope_spec
from spindle.errors import SpindleError
from spindle.model.llama import Transformer, build_model


def parse_rope_override(spec: Optional[str], original_len: int) -> Optional[dict]:
    """--rope-scaling SPEC (spindle.config.rope_types.parse_rope_spec) -> a rope_scaling dict (None = keep)."""
    return None if spec is None else parse_rope_spec(spec, original_len)


def foreign_kind(path: str) -> Optional[str]:
    """'hf', 'internevo' or 'llama' (Meta) for a local folder of that format; None for Spindle's own."""
    from spindle.interop.hf import local_dir, weight_files
    from spindle.checkpoint.loading import is_internevo_folder
    from spindle.interop.meta import is_meta_folder

    if str(path).startswith(("boto3:", "s3://")):
        return None
    p = local_dir(path)
    if not p.is_dir() or (p / ".metadata").is_file():
        return None
    if is_internevo_folder(p):
        return "internevo"
    if is_meta_folder(p) and not (p / "config.json").is_file():
        return "llama"
    if (p / "config.json").is_file():
        try:
            weight_files(p)
        except SpindleError:
            return None
        return "hf"
    return None


def _foreign(kind: str, path: str) -> tuple[SpindleConfig, Callable[[torch.nn.Module], None]]:
    """The config of a foreign folder (its own length as data.seq_len) and how to fill a model from it."""
    from spindle.interop.hf import load_hf_weights, local_dir, read_hf_config
    from spindle.interop.weights import assign_weights

    p = local_dir(path)
    if kind == "hf":
        from spindle.interop.families import model_config_from_hf

        section, fill = model_config_from_hf(read_hf_config(p), str(p / "config.json")), \
            (lambda m: load_hf_weights(m, p))
    elif kind == "internevo":
        from spindle.interop.internevo import read_internevo

        ck = read_internevo(p)
        section, fill = ck.model, (lambda m: assign_weights(m, ck.state_dict, str(p)))
    else:
        from spindle.interop.meta import read_meta

        section, tensors = read_meta(p)
        fill = lambda m: assign_weights(m, tensors, str(p))  # noqa: E731
    data = {"seq_len": max(2, section.get("max_position_embeddings", 2048))}
    if any((p / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        data["tokenizer_path"] = str(p)
    return validate_config({"model": section, "data": data}, str(p)), fill


def load_model_for_eval(ckpt: str, rope_scaling: Optional[str] = None, device: str = "cpu",
                        model_overrides: Optional[dict] = None) -> tuple[Transformer, SpindleConfig]:
    """`ckpt`: a checkpoint folder, a save folder (its latest completed checkpoint), `.../latest`,
    local or boto3:s3://... (the S3 endpoint and keys come from the environment); or a local Hugging
    Face / InternEvo / Meta Llama folder."""
    kind = foreign_kind(ckpt)
    with contextlib.ExitStack() as stack:
        if kind is None:
            path = stack.enter_context(open_checkpoint(ckpt))
            cfg = checkpoint_config(path)
            fill = lambda m: load_tensors(path, m, None, ("model",))  # noqa: E731
        else:
            cfg, fill = _foreign(kind, ckpt)
        mcfg = cfg.model
        override = parse_rope_override(rope_scaling, cfg.data.seq_len)
        updates = dict(model_overrides or {})
        if override is not None:
            updates["rope_scaling"] = override
            updates["use_dynamic_ntk_rope"] = False
        if updates:
            mcfg = mcfg.model_validate(mcfg.model_dump() | updates)
        model = build_model(mcfg.to_args(), torch.device(device))
        fill(model)
    model.eval()
    return model, cfg


def load_model(path: str, device: str = "cpu") -> tuple[Transformer, SpindleConfig]:
    """A model, in eval mode, and its config, from any folder Spindle reads.

    `path` is a Spindle checkpoint (a step folder, a save folder for its latest completed step,
    `.../latest`, `local:` or `boto3:s3://...`), a Hugging Face folder (Llama, Mistral, Qwen2, Qwen3,
    InternLM, InternLM2), an InternEvo checkpoint folder (model_tp*_pp*.pt + model_config.pt) or a
    Meta Llama folder (consolidated.*.pth + params.json). The model is a plain
    `spindle.model.llama.Transformer` on `device`; `model(input_ids)` gives logits (B, L, vocab).
    The config is a `SpindleConfig`: the run's for a Spindle checkpoint, else one whose `model`
    section describes the folder (and `data.tokenizer_path` its tokenizer, when it has one).

        model, cfg = spindle.load_model("runs/demo/ckpt")
        logits = model(torch.tensor([[1, 2, 3]]))
    """
    return load_model_for_eval(path, device=device)


def checkpoint_tokenizer(url: str) -> Optional[str]:
    """The `load_tokenizer` spec of the tokenizer a Spindle checkpoint records (`generate`); None for a
    foreign folder (Hugging Face, InternEvo: their config names their tokenizer) or a checkpoint without one."""
    from spindle.checkpoint.discovery import resolve
    from spindle.data.tokenizer_identity import read_checkpoint_record, recorded_spec

    if foreign_kind(url) is not None:
        return None
    storage, ref = resolve(url)
    recorded = read_checkpoint_record(lambda name: storage.read_bytes(f"{ref.rel}/{name}"),
                                      f"{storage.url.rstrip('/')}/{ref.rel}")
    return None if recorded is None else recorded_spec(recorded)
