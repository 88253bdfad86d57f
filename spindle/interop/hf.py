"""Hugging Face folders, both ways, for every family in `spindle.interop.families`.

    spindle convert to-hf CKPT OUT       safetensors + config.json + generation_config.json + the
                                         run's tokenizer, in the family's own transformers class
                                         (AutoModelForCausalLM loads it, no remote code)
    spindle convert from-hf HF_DIR OUT   a Spindle checkpoint (model only, step 0) to start training
                                         from, via load_ckpt_info(path=OUT, content="model");
                                         or skip the conversion: load_ckpt_info(path=HF_DIR, ckpt_type="hf")

Which weight files a folder holds is decided by its index: `model.safetensors.index.json` names
the files (a Mistral v0.3 folder also holds `consolidated.safetensors`, in Meta's names, which is
not read), else `model.safetensors`, else the `pytorch_model.bin` pair of those. Weights are read
with safetensors or `torch.load(weights_only=True)`: never pickled code, never remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from spindle.interop.families import (
    export_family, family_of, hf_config, hf_tensors_to_ours, model_config_from_hf, ours_to_hf_tensors, to_hf_name,
)
from spindle.interop.weights import assign_weights, full_shapes, model_args, read_safetensors, read_torch_file
from spindle.errors import SpindleError

_INDEXES = (("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def local_dir(path: str | Path) -> Path:
    text = str(path)
    return Path(text[len("local:"):] if text.startswith("local:") else text)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SpindleError(f"{path}: cannot read the {what} ({exc})") from None
    except ValueError as exc:
        raise SpindleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SpindleError(f"{path}: expected a JSON object ({what}), found {type(data).__name__}")
    return data


def read_hf_config(hf_dir: Path) -> dict:
    if not (hf_dir / "config.json").is_file():
        hint = (" (a Meta consolidated.*.pth folder: use ckpt_type='llama')"
                if (hf_dir / "params.json").is_file() else "")
        raise SpindleError(f"{hf_dir}: not a Hugging Face model folder (no config.json){hint}")
    return read_json(hf_dir / "config.json", "model config")


def weight_files(hf_dir: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The weight files the folder's index names (and the index's tensor -> file map), or its single file."""
    for index_name, single in _INDEXES:
        index = hf_dir / index_name
        if index.is_file():
            wmap = read_json(index, "weight index").get("weight_map")
            if not isinstance(wmap, dict) or not wmap or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
                raise SpindleError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
            files = sorted(set(wmap.values()))
            for f in files:
                if Path(f).name != f or f in (".", ".."):
                    raise SpindleError(f"{index}: weight_map names {f!r}, expected a file name in this folder")
                if not (hf_dir / f).is_file():
                    raise SpindleError(f"{index}: weight_map names {f}, which is not in {hf_dir}")
            return [hf_dir / f for f in files], wmap
        if (hf_dir / single).is_file():
            return [hf_dir / single], None
    raise SpindleError(f"{hf_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in this folder")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    files, wmap = weight_files(hf_dir)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        tensors = read_safetensors(f) if f.suffix == ".safetensors" else read_torch_file(f)
        if wmap is None:
            out.update(tensors)
            continue
        for name, file in wmap.items():
            if file == f.name:
                if name not in tensors:
                    raise SpindleError(f"{f}: has no tensor {name}, which the weight index places in it")
                out[name] = tensors[name]
    return out


def _differences(hf_args, args) -> list[str]:
    """What the model config sets differently from config.json without changing a shape."""
    keys = ("rope_base", "rope_scaling", "max_position_embeddings", "layer_norm_epsilon", "sliding_window")
    return [f"model.{k}={getattr(args, k)!r} while config.json gives {getattr(hf_args, k)!r}"
            for k in keys if getattr(args, k) != getattr(hf_args, k)]


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, args=None) -> list[str]:
    """Load a Hugging Face folder's weights into `model` (plain, FSDP2, TP, or a pipeline view with
    `args`); names and shapes must match the model built from the config. Returns notes: settings the
    config gives differently from config.json (RoPE, eps, ...) that the weights cannot check."""
    from spindle.config import ModelConfig

    hf_dir = local_dir(hf_dir)
    args = model_args(model, args)
    hf = read_hf_config(hf_dir)
    fam = family_of(hf, str(hf_dir / "config.json"))
    hf_args = ModelConfig.model_validate(model_config_from_hf(hf, str(hf_dir / "config.json"))).to_args()
    tensors = hf_tensors_to_ours(read_hf_weights(hf_dir), fam, hf_args.num_kv_heads, hf_args.head_dim)
    head, embedding = tensors.get("output.weight"), tensors.get("tok_embeddings.weight")
    if args.tie_word_embeddings and head is not None:
        if embedding is not None and not torch.equal(head, embedding):
            raise SpindleError(f"{hf_dir}: config.json ties the output head to the embedding (tie_word_embeddings: "
                               "true) but the weights hold a distinct lm_head.weight; transformers unties such a "
                               "model: set tie_word_embeddings to false in config.json to load it that way")
        del tensors["output.weight"]  # the tied head is the embedding
    if args.bias_update_rate > 0:  # aux-loss-free balancing starts from no bias (transformers' routers have none)
        for key, shape in full_shapes(args).items():
            if key.endswith(".feed_forward.score_bias"):
                tensors.setdefault(key, torch.zeros(shape))
    name = (lambda n: to_hf_name(n, fam)) if fam.names != "internlm2" else str
    assign_weights(model, tensors, str(hf_dir), name, args)
    return _differences(hf_args, args)


def export_hf(ckpt: str, out: str | Path, tokenizer: Optional[str] = None) -> list[str]:
    """Write a Spindle checkpoint as a Hugging Face folder with the tokenizer it was trained with (`tokenizer`:
    the `--tokenizer` option, see spindle.data.tokenizer_identity.choose_export_tokenizer); returns notes."""
    from safetensors.torch import save_file

    from spindle.checkpoint.dcp_io import load_tensors
    from spindle.checkpoint.discovery import checkpoint_config, open_checkpoint
    from spindle.interop.hf_tokenizer import write_tokenizer
    from spindle.data.tokenizer_identity import choose_export_tokenizer, local_checkpoint_record
    from spindle.model.llama import build_model

    out = Path(out)
    with open_checkpoint(ckpt) as path:
        cfg = checkpoint_config(path)
        spec, why = choose_export_tokenizer(local_checkpoint_record(path), cfg.data.tokenizer_path, tokenizer,
                                            str(ckpt))
        args = cfg.model.to_args()
        fam = export_family(args)
        model = build_model(args, "cpu")
        load_tensors(path, model, None, ("model",))
    state = {name: t for name, t in model.state_dict().items()
             if not (name == "output.weight" and args.tie_word_embeddings)}
    tensors = {name: t.detach().to(torch.float32).contiguous().clone()  # refuses before anything is written
               for name, t in ours_to_hf_tensors(state, fam).items()}
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(spec, args.vocab_size, out, why)
    config = hf_config(args, tok.bos_id, tok.eos_id)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    if tok.pad_id is not None:
        gen["pad_token_id"] = tok.pad_id
    source, kept = source_generation(cfg)
    if source is not None:  # what the folder the model started from says, eos lists and sampling included
        config.update({k: v for k, v in kept["config"].items() if v is not None})
        gen.update(kept["generation"])
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    notes = [f"generation settings and token ids from {source}"] if source is not None else []
    return [f"wrote {out}: model.safetensors, config.json ({fam.export_class})", *tok.notes, *notes]


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_generation(cfg, depth: int = 8) -> tuple[Optional[Path], dict]:
    """The Hugging Face folder this model started from, followed through the checkpoints it was loaded from
    (each one's config.json names its own start), with its token ids (config.json) and generation_config.json
    as they are (eos id lists such as Llama 3's [128001, 128008, 128009] stay lists); (None, {}) when the
    model did not start from one or the folder is gone."""
    from spindle.checkpoint.discovery import checkpoint_config, is_remote, resolve, strip_prefix
    from spindle.checkpoint.loading import HF_TYPES

    info = cfg.ckpt.load_ckpt_info
    if info is None or not info.path or is_remote(info.path) or depth == 0:
        return None, {}
    path = Path(strip_prefix(info.path))
    if info.ckpt_type not in HF_TYPES:  # a Spindle checkpoint (a step or a save folder): where it started
        try:
            storage, ref = resolve(str(path))
            return source_generation(checkpoint_config(Path(storage.local_path(ref.rel))), depth - 1)
        except SpindleError:
            return None, {}
    try:
        hf = read_hf_config(path)
        gen_file = path / "generation_config.json"
        generation = read_json(gen_file, "generation config") if gen_file.is_file() else {}
    except SpindleError:
        return None, {}
    generation = {k: v for k, v in generation.items() if not k.startswith("_") and k != "transformers_version"}
    for key in TOKEN_IDS:
        if key not in generation and hf.get(key) is not None:
            generation[key] = hf[key]
    return path, {"config": {k: hf.get(k) for k in TOKEN_IDS}, "generation": generation}


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write a Hugging Face folder as a Spindle checkpoint (model weights, step 0) under `out`."""
    from spindle.checkpoint.manager import save_weights_checkpoint
    from spindle.config import validate_config
    from spindle.data.tokenizer import load_tokenizer
    from spindle.data.tokenizer_identity import Recorded, checkpoint_files
    from spindle.model.llama import build_model

    hf_dir = local_dir(hf_dir)
    source = str(hf_dir / "config.json")
    raw = {"model": model_config_from_hf(read_hf_config(hf_dir), source)}
    records = {}
    if any((hf_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raw["data"] = {"tokenizer_path": str(hf_dir.resolve())}
        records = checkpoint_files(Recorded(load_tokenizer(hf_dir.resolve()).identity(), str(hf_dir)))
    # where the weights came from, as a run started from the folder records it: `to-hf` takes the folder's
    # token ids and generation settings from there (source_generation)
    raw["ckpt"] = {"load_ckpt_info": {"path": str(hf_dir.resolve()), "content": ["model"], "ckpt_type": "hf"}}
    cfg = validate_config(raw, source)
    model = build_model(cfg.model.to_args(), "cpu")
    load_hf_weights(model, hf_dir)
    save_weights_checkpoint(str(out), 0, model, cfg.to_dict(), records=records)  # which tokenizer, for to-hf
    return Path(str(out)) / "0"
