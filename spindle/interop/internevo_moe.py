"""InternEvo's mixture-of-experts checkpoints (model_type INTERNLM_MoE, its GShard layer), in Spindle's MoE names.

Beside the dense shards, internlm/checkpoint/components.py (try_save_moe_checkpoint) writes one file per expert:

    model_tp{t}_pp{p}.pt                   the dense parts, as an INTERNLM folder's, and each layer's router
                                           blocks.{i}.mlp.moe_layer.gate.wg.weight (E, H), whole on every tensor rank
    model_moe_layer{L}_expert{E}_tp{t}.pt  routed expert E of layer L (the global layer index), tensor rank t's part:
                                           {prefix}.moe_layer.experts.wrapped_experts.{E}.w1/w2/w3.weight, split as
                                           the dense MLP is (gate and up projections by rows, the down one by columns)

    -> layers.{i}.feed_forward.gate.weight (E, H); experts.w1/w3.weight (E, I, H), experts.w2.weight (E, H, I)

Which of w2 / w3 is the down projection is read from the shapes, as for the dense MLP (internevo.py `_up_down`).
MegaBlock's stacked expert parameters and the residual MoE (model.moe_use_residual) are refused in one line.
The routing keys (top_k, the capacity, the balance loss weight) are not in the weights: InternEvo keeps the `moe`
and `loss` sections only in config_file.pt, the config's text, which is parsed for literals here, never run, and
translated as a config file's keys are (config/internevo.py translate_moe). Every file is read with
torch.load(weights_only=True) (internevo.py read_pt).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Callable

import torch

from spindle.errors import SpindleError

EXPERT_FILE = re.compile(r"^model_moe_layer(0|[1-9]\d*)_expert(0|[1-9]\d*)_tp(0|[1-9]\d*)\.pt$")
EXPERT_KEY = re.compile(r"^(?:[A-Za-z0-9_.]+\.)?moe_layer\.experts\.wrapped_experts\.(\d+)\.(w1|w2|w3)\.weight$")
GATE = "blocks.{i}.mlp.moe_layer.gate.wg.weight"
# routing keys that choose at random while training: they shape no weight, and a checkpoint's model keeps none
TRAINING_ONLY = ("use_rts", "noisy_gate_policy")


def expert_files(folder: Path) -> dict[tuple[int, int, int], Path]:
    """(layer, expert, tensor rank) -> its file; a model_moe* name InternEvo does not write is refused."""
    found = {}
    for f in folder.iterdir():
        if f.name.startswith("model_moe"):
            m = EXPERT_FILE.match(f.name)
            if m is None:
                raise SpindleError(f"{f}: not a name InternEvo gives expert files: "
                                   "model_moe_layer{L}_expert{E}_tp{t}.pt, decimal numbers without leading zeros")
            found[tuple(int(x) for x in m.groups())] = f
    return found


def _check_grid(folder: Path, files: dict, layers: int, experts: int, tp: int) -> None:
    for (layer, expert, rank), path in sorted(files.items()):
        if layer >= layers or expert >= experts or rank >= tp:
            raise SpindleError(f"{path}: outside the model's {layers} layers x {experts} experts x tp {tp} "
                               "(model_config.pt, the model_tp*_pp*.pt shards)")
    for layer in range(layers):
        for expert in range(experts):
            for rank in range(tp):
                if (layer, expert, rank) not in files:
                    raise SpindleError(f"{folder}: expert file model_moe_layer{layer}_expert{expert}_tp{rank}.pt "
                                       f"is missing ({layers} layers x {experts} experts x tp {tp})")


def _expert_state(state: dict, expert: int, path: Path) -> dict[str, torch.Tensor]:
    """One expert file's tensors as {"expert.w1.weight": ...}; anything else in it is refused."""
    out = {}
    for key, t in state.items():
        m = EXPERT_KEY.match(key) if isinstance(key, str) else None
        if m is None or int(m.group(1)) != expert or not isinstance(t, torch.Tensor) or t.dim() != 2:
            stacked = isinstance(key, str) and re.search(r"wrapped_experts\.\d+\.w[123]$", key)
            raise SpindleError(f"{path}: {key!r} is not expert {expert}'s w1/w2/w3 weight matrix" +
                               (" (MegaBlock's stacked experts are not read; GShard checkpoints are)" if stacked
                                else f" (...moe_layer.experts.wrapped_experts.{expert}.w1.weight)"))
        out[f"expert.{m.group(2)}.weight"] = t
    missing = [w for w in ("w1", "w2", "w3") if f"expert.{w}.weight" not in out]
    if missing:
        raise SpindleError(f"{path}: no {missing[0]} weight of expert {expert}")
    return out


def _check_dense(sh, c: dict, folder: Path) -> None:
    """The routers are there, and nothing of a residual MoE or of MegaBlock's router is."""
    for key in sh.states[0]:
        if ".mlp.residual_mlp." in key or ".mlp.coefficient." in key:
            raise SpindleError(f"{folder}: {key} is a residual MoE's (model.moe_use_residual), which is not read")
        if key.endswith(".moe_layer.gate.weight"):
            raise SpindleError(f"{folder}: {key} is MegaBlock's router; MegaBlock checkpoints are not read")
    for i in range(c["num_layers"]):
        if not sh.has(GATE.format(i=i)):
            raise SpindleError(f"{folder}: model shards have no router {GATE.format(i=i)} (an MoE layer's)")


def read_moe(folder: Path, sh, c: dict, model_type: str, readers: tuple[Callable, Callable], notes: list[str],
             sd: dict[str, torch.Tensor]) -> dict:
    """Puts the routers and experts of every layer into `sd` under our names and returns the model keys of the
    MoE ({} for a dense folder). `sh`: the merged dense shards (internevo._Shards); `readers`: internevo's
    read_pt(path, what) and _up_down(shards, prefix, hidden, model_type, notes), which names the up projection."""
    read, up_down = readers
    files = expert_files(folder)
    num_experts = c.get("num_experts") or 1
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise SpindleError(f"{folder / 'model_config.pt'}: num_experts must be a positive int, got {num_experts!r}")
    if not files:
        if num_experts > 1:
            raise SpindleError(f"{folder}: model_config.pt says num_experts={num_experts} but the folder holds no "
                               "model_moe_layer{L}_expert{E}_tp{t}.pt expert files")
        return {}
    if num_experts < 2 or model_type != "INTERNLM":
        raise SpindleError(f"{folder}: expert files beside a {model_type} model with num_experts={num_experts} "
                           "(model_config.pt); InternEvo's INTERNLM_MoE (num_experts >= 2) is read")
    if c.get("moe_use_residual"):
        raise SpindleError(f"{folder / 'model_config.pt'}: moe_use_residual=True (a residual MoE) is not read")
    if c.get("moe_type", "GShard") != "GShard":
        raise SpindleError(f"{folder / 'model_config.pt'}: moe_type={c['moe_type']!r}: MegaBlock checkpoints are "
                           "not read; GShard ones are")
    tp = len(sh.states)
    _check_grid(folder, files, c["num_layers"], num_experts, tp)
    _check_dense(sh, c, folder)
    shards = type(sh)  # internevo._Shards: concatenation along the split dimension
    for i in range(c["num_layers"]):
        w1, w3, w2 = [], [], []
        for e in range(num_experts):
            part = shards([_expert_state(read(files[(i, e, t)], "expert weights"), e, files[(i, e, t)])
                           for t in range(tp)], folder)
            up, down = up_down(part, "expert", c["hidden_size"], model_type, notes)
            w1.append(part.cat("expert.w1.weight", 0))
            w3.append(part.cat(f"expert.{up}.weight", 0))
            w2.append(part.cat(f"expert.{down}.weight", 1))
        prefix = f"layers.{i}.feed_forward"
        try:
            sd.update({f"{prefix}.gate.weight": sh.one(GATE.format(i=i)), f"{prefix}.experts.w1.weight":
                        torch.stack(w1), f"{prefix}.experts.w3.weight": torch.stack(w3),
                        f"{prefix}.experts.w2.weight": torch.stack(w2)})
        except RuntimeError:  # torch.stack: experts of one layer with different shapes
            raise SpindleError(f"{folder}: the experts of layer {i} have different shapes") from None
    notes.append(f"InternEvo MoE: {num_experts} experts in each of {c['num_layers']} layers (GShard)")
    return dict(routing_keys(folder, num_experts, notes), moe_intermediate_size=w1[0].shape[0])


def _literal_sections(folder: Path, notes: list[str]) -> dict:
    """The `moe` and `loss` sections of config_file.pt (the config's text), literal keyword values only."""
    f = folder / "config_file.pt"
    if not f.is_file():
        notes.append("note: no config_file.pt: the routing keys are InternEvo's defaults (GShard top-1, capacity "
                     "factor 1.0, moe_loss_coeff 1.0)")
        return {}
    try:  # a string: weights_only unpickles no code
        text = torch.load(f, map_location="cpu", weights_only=True)
        tree = ast.parse(text if isinstance(text, str) else "")
    except Exception:  # noqa: BLE001 - an unreadable copy of the config text loses only the routing keys
        notes.append("note: config_file.pt is not a readable config text: the routing keys are InternEvo's defaults")
        return {}
    sections: dict = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in ("moe", "loss") and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "id", None) == "dict":
            sections[target.id] = {}
            for kw in (k for k in node.value.keywords if k.arg is not None):
                try:
                    sections[target.id][kw.arg] = ast.literal_eval(kw.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    notes.append(f"note: config_file.pt: {target.id}.{kw.arg} is not a literal; its default is used")
    return sections


def routing_keys(folder: Path, num_experts: int, notes: list[str]) -> dict:
    """Spindle's model keys for the routing config_file.pt gives (through translate_moe, as a config's)."""
    from spindle.config.internevo import translate_moe

    sections = _literal_sections(folder, notes)
    moe = {k: v for k, v in sections.get("moe", {}).items() if k not in TRAINING_ONLY}
    moe["use_rts"] = False  # random token selection shapes training, not the weights (TRAINING_ONLY)
    raw = {"model_type": "INTERNLM_MoE", "model": {"num_experts": num_experts}, "moe": moe,
           "loss": {k: v for k, v in sections.get("loss", {}).items() if k == "moe_loss_coeff"}}
    translate_moe(raw, str(folder / "config_file.pt"))
    return raw["model"]
