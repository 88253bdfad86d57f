"""InternEvo's MoE checkpoints (model_type INTERNLM_MoE, GShard): the dense shards model_tp{t}_pp{p}.pt with each
layer's router, and model_moe_layer{L}_expert{E}_tp{t}.pt per expert, cut here from a random Spindle MoE model the
way InternEvo's ranks save them (internlm/checkpoint/components.py try_save_moe_checkpoint: the global layer index in
the file name, the stage-local block index and the global expert index in the keys, experts split over tensor ranks
as the dense MLP is). Read back with ckpt_type="internevo" and `spindle convert from-internevo`, the logits are the
source model's. Nothing of InternEvo is imported or run."""

from __future__ import annotations

import json
import types

import pytest
import torch

from spindle.checkpoint.loading import load_checkpoint
from spindle.cli import main
from spindle.config import ModelConfig, validate_config
from spindle.interop.internevo import load_internevo_weights, read_internevo
from spindle.model.llama import build_model

pytest.importorskip("transformers")  # internevo_folders builds its dense cases from transformers

from internevo_folders import LAYERS, X, shard_of, stages  # noqa: E402
from internevo_folders import internevo_config_class as config_class  # noqa: E402

EXPERTS, WIDTH = 4, 96
MOE = dict(hidden_size=64, num_attention_heads=4, num_layers=LAYERS, vocab_size=96, max_position_embeddings=64,
           mlp_ratio=WIDTH / 64, multiple_of=WIDTH, num_experts=EXPERTS, top_k=2, capacity_factor=1.0,
           min_capacity=4, aux_loss_coeff=0.1)
CONFIG_TEXT = ("model_type = 'INTERNLM_MoE'\nmoe = dict(top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0, "
               "min_capacity=4, noisy_gate_policy=None, drop_tokens=True, use_rts=True)\n"
               "loss = dict(label_smoothing=0, moe_loss_coeff=0.1)\n")


@pytest.fixture
def internevo_config_class():
    with config_class() as config:
        yield config


def source_model():
    model = build_model(ModelConfig.model_validate(MOE).to_args())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def internevo_dense(sd: dict) -> dict:
    """The dense parts and routers in InternEvo's INTERNLM names, global layer indices, unsharded."""
    full = {"embedding.weight": sd["tok_embeddings.weight"], "norm.weight": sd["norm.weight"],
            "head.weight": sd["output.weight"]}
    for i in range(LAYERS):
        ours, b = f"layers.{i}.", f"blocks.{i}."
        full[b + "mixer.Wqkv.weight"] = torch.cat([sd[ours + f"attention.w{x}.weight"] for x in "qkv"])
        full[b + "mixer.out_proj.weight"] = sd[ours + "attention.wo.weight"]
        full[b + "norm1.weight"] = sd[ours + "attention_norm.weight"]
        full[b + "norm2.weight"] = sd[ours + "ffn_norm.weight"]
        full[b + "mlp.moe_layer.gate.wg.weight"] = sd[ours + "feed_forward.gate.weight"]
    return full


def write_moe_folder(folder, model, tp: int, pp: int, config_class, config_text=CONFIG_TEXT, **model_config):
    """What InternEvo's ranks save: per (tp, pp) rank its dense shard under NaiveAMPModel's `model.` prefix, and
    per MoE layer of its stage and expert that rank's part of the expert (w1 gate, w3 up: rows; w2 down: columns)."""
    folder.mkdir(parents=True)
    sd = model.state_dict()
    full = internevo_dense(sd)
    for s, layers in enumerate(stages(pp)):
        for r in range(tp):
            shard = {}
            for name, t in full.items():
                parts = name.split(".")
                if parts[0] == "blocks":
                    if int(parts[1]) not in layers:
                        continue
                    name_here = ".".join(["blocks", str(int(parts[1]) - layers.start), *parts[2:]])
                elif (name == "embedding.weight" and s != 0) or (name != "embedding.weight" and s != pp - 1):
                    continue  # the embedding lives on the first stage, norm and head on the last
                else:
                    name_here = name
                shard["model." + name_here] = t if ".gate.wg." in name else shard_of(name, t, tp, r, False)
            torch.save(shard, folder / f"model_tp{r}_pp{s}.pt")
            for i in layers:
                w = {x: sd[f"layers.{i}.feed_forward.experts.{x}.weight"] for x in ("w1", "w2", "w3")}
                for e in range(EXPERTS):
                    key = f"model.blocks.{i - layers.start}.mlp.moe_layer.experts.wrapped_experts.{e}."
                    torch.save({key + "w1.weight": w["w1"][e].chunk(tp, 0)[r].clone(),
                                key + "w3.weight": w["w3"][e].chunk(tp, 0)[r].clone(),
                                key + "w2.weight": w["w2"][e].chunk(tp, 1)[r].clone()},
                               folder / f"model_moe_layer{i}_expert{e}_tp{r}.pt")
    torch.save(config_class(**{**dict(num_attention_heads=4, hidden_size=64, num_layers=LAYERS, vocab_size=96,
                                      mlp_ratio=WIDTH / 64, layer_norm_epsilon=1e-5, dtype=torch.bfloat16,
                                      num_chunks=1, embed_split_hidden=False, checkpoint=False,
                                      num_experts=EXPERTS, moe_use_residual=False, moe_type="GShard"),
                                   **model_config}), folder / "model_config.pt")
    torch.save({"batch_count": 41, "num_consumed_tokens": 4096, "inf_nan_skip_batches": 0, "step_count": 41},
               folder / "context.pt")
    if config_text is not None:
        torch.save(config_text, folder / "config_file.pt")
    torch.save({"step": 41}, folder / "41.step")
    return folder


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_moe_shards_load_to_the_source_logits(tmp_path, internevo_config_class, tp, pp):
    model = source_model()
    folder = write_moe_folder(tmp_path / "ckpt" / "41", model, tp, pp, internevo_config_class)
    ck = read_internevo(folder)
    m = ck.model
    assert (m["num_experts"], m["top_k"], m["norm_topk_prob"], m["capacity_factor"], m["min_capacity"],
            m["aux_loss_coeff"], m["moe_intermediate_size"]) == (EXPERTS, 2, True, 1.0, 4, 0.1, WIDTH)
    loaded = build_model(ModelConfig.model_validate(ck.model).to_args())
    notes = load_internevo_weights(loaded, folder)
    with torch.no_grad():
        want, got = model(X), loaded.eval()(X)
    assert (got - want).abs().max().item() == 0.0
    assert any("InternEvo MoE: 4 experts in each of 4 layers" in n for n in notes)
    assert ck.step == 42


def test_routing_keys_default_to_internevos_without_the_config_text(tmp_path, internevo_config_class):
    folder = write_moe_folder(tmp_path / "41", source_model(), 1, 1, internevo_config_class, config_text=None)
    ck = read_internevo(folder)
    assert (ck.model["top_k"], ck.model["norm_topk_prob"], ck.model["aux_loss_coeff"]) == (1, False, 1.0)
    assert any("no config_file.pt: the routing keys are InternEvo's defaults" in n for n in ck.notes)


def test_from_internevo_cli_converts_a_moe_checkpoint(tmp_path, internevo_config_class, capsys):
    model = source_model()
    folder = write_moe_folder(tmp_path / "41", model, 2, 2, internevo_config_class)
    out = tmp_path / "spindle"
    assert main(["convert", "from-internevo", str(folder), str(out)]) == 0
    cfg = validate_config(json.loads((out / "42" / "config.json").read_text()))
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.aux_loss_coeff) == (EXPERTS, 2, 0.1)
    loaded = build_model(cfg.model.to_args())
    load_checkpoint(out / "42", loaded, None, ("model",))
    with torch.no_grad():
        assert (loaded.eval()(X) - model(X)).abs().max().item() == 0.0
    assert "tp=2 x pp=2" in capsys.readouterr().out


def _rename(folder, old, new):
    (folder / old).rename(folder / new)


def _swap_expert(folder):  # expert 3's tensors in expert 2's file
    state = torch.load(folder / "model_moe_layer1_expert3_tp0.pt", weights_only=True)
    torch.save(state, folder / "model_moe_layer1_expert2_tp0.pt")


def _stacked(folder):  # MegaBlock keeps one stacked parameter per projection, without `.weight`
    torch.save({"model.blocks.0.mlp.moe_layer.experts.wrapped_experts.0.w1": torch.zeros(4, 64, 96)},
               folder / "model_moe_layer0_expert0_tp0.pt")


def _dense_key(folder, key):
    state = torch.load(folder / "model_tp0_pp0.pt", weights_only=True)
    state[key] = torch.zeros(2, 64)
    torch.save(state, folder / "model_tp0_pp0.pt")


DAMAGE = [
    ("a name with ..", lambda f: _rename(f, "model_moe_layer0_expert0_tp0.pt", "model_moe_layer..0_expert0_tp0.pt"),
     "model_moe_layer..0_expert0_tp0.pt: not a name InternEvo gives expert files"),
    ("a leading zero", lambda f: _rename(f, "model_moe_layer1_expert0_tp0.pt", "model_moe_layer01_expert0_tp0.pt"),
     "model_moe_layer01_expert0_tp0.pt: not a name InternEvo gives expert files"),
    ("a layer past the model", lambda f: _rename(f, "model_moe_layer1_expert0_tp0.pt",
                                                 "model_moe_layer9_expert0_tp0.pt"),
     "model_moe_layer9_expert0_tp0.pt: outside the model's 4 layers x 4 experts x tp 1"),
    ("a missing expert", lambda f: (f / "model_moe_layer1_expert2_tp0.pt").unlink(),
     "expert file model_moe_layer1_expert2_tp0.pt is missing"),
    ("no experts at all", lambda f: [p.unlink() for p in f.glob("model_moe_*.pt")],
     "model_config.pt says num_experts=4 but the folder holds no model_moe_layer"),
    ("pickled code", lambda f: torch.save({"x": types.SimpleNamespace(a=1)}, f / "model_moe_layer2_expert1_tp0.pt"),
     "model_moe_layer2_expert1_tp0.pt: not a readable torch expert weights"),
    ("another expert's tensors", _swap_expert, "is not expert 2's w1/w2/w3 weight matrix"),
    ("MegaBlock's stacked experts", _stacked, "MegaBlock's stacked experts are not read"),
    ("a residual MoE", lambda f: _dense_key(f, "model.blocks.0.mlp.coefficient.weight"),
     "is a residual MoE's (model.moe_use_residual), which is not read"),
    ("a dense model_config", lambda f: torch.save({"num_attention_heads": 4, "hidden_size": 64, "num_layers": 4,
                                                   "vocab_size": 96, "num_experts": 1}, f / "model_config.pt"),
     "expert files beside a INTERNLM model with num_experts=1"),
]


@pytest.mark.parametrize("damage, message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_bad_moe_folders_are_one_line(tmp_path, internevo_config_class, capsys, damage, message):
    folder = write_moe_folder(tmp_path / "41", source_model(), 1, 1, internevo_config_class)
    damage(folder)
    assert main(["convert", "from-internevo", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
