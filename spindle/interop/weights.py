"""Foreign weights into our model: reading tensor files safely, checking names and shapes, and
loading a full (unsharded) state dict into a plain, FSDP2 or tensor-parallel model.

Loading goes through `torch.distributed.checkpoint.state_dict.set_model_state_dict` with
`full_state_dict=True`: every rank holds the full tensors and DCP cuts out each rank's shard
(FSDP2's Shard(0), TP's column / row shards), so the same call serves every layout. A pipeline
stage takes the tensors of its own layers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from spindle.errors import SpindleError


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or one line naming it (a bad header, a truncated file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SpindleError(f"{path}: not a readable safetensors file ({exc})") from None


def read_torch_file(path: Path, what: str = "state dict") -> dict:
    """A torch.save file of tensors (weights_only: no pickled code runs), or one line naming it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise SpindleError(f"{path}: not a readable torch {what} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(obj, dict):
        raise SpindleError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def full_shapes(args) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of the whole model with ModelArgs `args` (built on the meta device)."""
    from spindle.model.llama import Transformer

    with torch.device("meta"):
        whole = Transformer(args)
    return {k: tuple(v.shape) for k, v in whole.state_dict().items()}


def model_args(model: torch.nn.Module, args=None):
    """The ModelArgs of `model`; a pipeline rank's view of its stages has none, so pass them."""
    args = args if args is not None else getattr(model, "args", None)
    if args is None:
        raise SpindleError(f"{type(model).__name__} carries no ModelArgs; pass args= (cfg.model.to_args())")
    return args


def assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                   foreign_name: Callable[[str], str] = str, args=None) -> None:
    """Load our-named full tensors into `model` (plain, FSDP2, TP or a pipeline stage's view).

    Every tensor of the whole model must be present with its exact shape (a tied output head may be
    missing); a tensor the model does not have is an error (more layers than model.num_layers?).
    `foreign_name` names a parameter as the source file calls it, for the messages.
    """
    args = model_args(model, args)
    tensors = dict(tensors)
    shapes = full_shapes(args)
    if "output.weight" in shapes and "output.weight" not in tensors and "tok_embeddings.weight" in tensors \
            and args.tie_word_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    for name, shape in shapes.items():
        if name not in tensors:
            raise SpindleError(f"{source}: no tensor for parameter {name} ({foreign_name(name)})")
        if tuple(tensors[name].shape) != shape:
            raise SpindleError(f"{source}: parameter {name} ({foreign_name(name)}) has shape "
                               f"{list(tensors[name].shape)} in the weights but {list(shape)} in the model "
                               "built from the config")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise SpindleError(f"{source}: tensor {extra[0]} does not exist in the model built from the config "
                           "(more layers than model.num_layers, or a switch such as qk_norm / biases off?)")
    own = get_model_state_dict(model)  # this stage's names, without wrapper prefixes (no gather)
    mine = {name: tensors[name].to(own[name].dtype) for name in own}
    set_model_state_dict(model, mine, options=StateDictOptions(full_state_dict=True, strict=True))
