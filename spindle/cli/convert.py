"""`spindle convert`: Spindle checkpoints to and from Hugging Face folders and InternEvo checkpoints.

    spindle convert to-hf CKPT OUT [--overwrite] [--tokenizer PATH]
    spindle convert from-hf HF_DIR OUT [--overwrite]
    spindle convert from-internevo SRC OUT [--overwrite]

Nothing is written over what a user saved (spindle/outputs.py): OUT must not exist or be an empty
folder, and never, not even with `--overwrite`, may OUT be the source, lie inside it or contain it, or
be or lie inside a checkpoint. `--overwrite` lets OUT be a non-empty folder and replaces only what the
conversion writes (to-hf: the weights, index and shards, config.json, generation_config.json and the
tokenizer files; from-*: the entries named like the new checkpoint's); a README, another model's folder
or anything else there is kept. The result is written into a hidden sibling folder first and swapped
with OUT in one rename when it is complete, so a failed or killed conversion leaves OUT as it was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

from spindle.checkpoint.discovery import is_remote, strip_prefix
from spindle.cli import options
from spindle.cli.options import OneLineParser
from spindle.errors import SpindleError
from spindle.outputs import StagedFolder, check_output


def hf_folder_entry(name: str) -> bool:
    """What `convert to-hf` writes, and the weight and tokenizer files of an earlier Hugging Face folder
    there: a stale index, shard or tokenizer.json left beside the new files would be read instead of them."""
    from spindle.interop.hf_tokenizer import HF_TOKENIZER_FILES

    return (name in ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                     *HF_TOKENIZER_FILES)
            or re.fullmatch(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors", name) is not None)


def _print_training_hint(path: Path, out: Path) -> None:
    from spindle.config import ModelConfig

    raw = json.loads((path / "config.json").read_text())
    model = raw["model"]
    defaults = ModelConfig().model_dump()
    derived = ModelConfig.model_validate({k: v for k, v in model.items() if k != "head_dim"}).head_dim
    keep = {k: v for k, v in model.items() if v != defaults.get(k) and not (k == "head_dim" and v == derived)}
    print(f"wrote {out / path.name} (+ {path.name}.step)")
    print("train from it with, in your config:")
    print(f"  ckpt = dict(load_ckpt_info=dict(path={str(out)!r}, content=('model',)))")
    print("  model = dict(" + ", ".join(f"{k}={v!r}" for k, v in keep.items()) + ")")
    tokenizer = (raw.get("data") or {}).get("tokenizer_path")
    if tokenizer:  # the ids the weights were trained on: data and `generate` must use the same tokenizer
        print(f"  data = dict(tokenizer_path={tokenizer!r})  # and data prepared with this tokenizer")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = OneLineParser(prog="spindle convert",
                       description="Convert checkpoints to and from Hugging Face and InternEvo.")
    sub = ap.add_subparsers(dest="direction", required=True)
    commands = {
        "to-hf": ("Spindle checkpoint -> Hugging Face folder (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE or "
                  "Qwen3-MoE class)", "ckpt",
                  "checkpoint folder, save folder (latest), local: or boto3:s3://..."),
        "from-hf": ("Hugging Face folder -> Spindle checkpoint (model only, step 0)", "hf_dir",
                    "Llama / Mistral / Qwen2 / Qwen3 / InternLM / InternLM2 / Mixtral / Qwen2-MoE / Qwen3-MoE "
                    "folder"),
        "from-internevo": ("InternEvo checkpoint folder (model_tp*_pp*.pt) -> Spindle checkpoint", "src",
                           "the step folder holding model_tp{t}_pp{p}.pt and model_config.pt"),
    }
    for name, (help_text, source, source_help) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument(source, type=options.path, help=source_help)
        p.add_argument("out", type=options.path, help="a new (or empty) local folder")
        p.add_argument("--overwrite", action="store_true", help="replace OUT when it is a non-empty folder")
        if name == "to-hf":
            p.add_argument("--tokenizer", type=options.path, default=None,
                           help="the tokenizer to write (a path, 'default', 'byte', or 'none' for the weights "
                                "alone): needed when the checkpoint does not record the one it was trained with; "
                                "else it must be that one")
        p.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    source = getattr(args, {"to-hf": "ckpt", "from-hf": "hf_dir", "from-internevo": "src"}[args.direction])
    if is_remote(args.out):
        raise SpindleError(f"OUT {args.out}: conversions write to a local folder")
    target = Path(strip_prefix(args.out)).expanduser().absolute()
    check_output(str(target), [] if is_remote(source) else [strip_prefix(source)], args.overwrite, "OUT")
    if args.direction == "to-hf":
        from spindle.interop.hf import export_hf

        with StagedFolder(str(target), replaces=hf_folder_entry, overwrite=args.overwrite, option="OUT",
                          command="spindle convert to-hf") as stage:
            notes = export_hf(source, Path(stage), args.tokenizer)
        print("\n".join(n.replace(str(stage), str(target)) for n in notes))
        return 0
    if args.direction == "from-hf":
        from spindle.interop.hf import import_hf as write
    else:
        from spindle.interop.internevo import import_internevo as write
    with StagedFolder(str(target), overwrite=args.overwrite, option="OUT",
                      command=f"spindle convert {args.direction}") as stage:
        path = write(source, Path(stage))
    _print_training_hint(target / path.name, target)
    return 0
