"""Mixture-of-experts Hugging Face families (spindle/interop/hf_moe.py), both ways, against transformers' logits.

Each case builds a tiny folder with transformers' own class (random weights far from init, save_pretrained),
reads it (`spindle convert from-hf`, and the `ckpt_type="hf"` start's config completion), compares our logits
with transformers' (fp32, <= 1e-4; the figures printed are ~1e-6), converts the checkpoint back
(`spindle convert to-hf`), reloads it with AutoModelForCausalLM and compares again. The fused expert layout
transformers 5 keeps in memory (save_original_format=False) is read too. The cases walk the family table: a
new MoE row without a case fails here. DeepSeek-V3 and GPT-OSS are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from spindle.cli import main
from spindle.config import ModelConfig, validate_config
from spindle.interop.families import FAMILIES, model_config_from_hf
from spindle.interop.hf import load_hf_weights
from spindle.model.llama import build_model

transformers = pytest.importorskip("transformers")

from hf_folders import randomize  # noqa: E402

TOL = 1e-4
SIZES = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, experts_implementation="eager")
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.002)

# case -> (family, transformers config class, model class, config keys)
CASES = {
    "mixtral": ("mixtral", "MixtralConfig", "MixtralForCausalLM",
                dict(MOE, intermediate_size=48, num_local_experts=4, sliding_window=None)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(MOE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                       num_experts=4)),
    # only the last of four layers MoE: decoder_sparse_step 2, mlp_only_layers [1] -> first_k_dense 2, moe_every 2
    "qwen2_moe_pattern": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                          dict(MOE, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_hidden_layers=4,
                               shared_expert_intermediate_size=40, decoder_sparse_step=2, mlp_only_layers=[1],
                               norm_topk_prob=True, qkv_bias=False)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(MOE, intermediate_size=96, moe_intermediate_size=32, num_experts=4, head_dim=24,
                       norm_topk_prob=True)),
    "qwen3_moe_first_dense": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                              dict(MOE, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                   num_hidden_layers=3, mlp_only_layers=[0], attention_bias=True,
                                   num_experts_per_tok=3)),
}


def ids(seed=0):
    return torch.randint(0, SIZES["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(seed))


def hf_model(case: str):
    _, config_class, model_class, keys = CASES[case]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**dict(SIZES, **keys)))
    randomize(model, 1)
    return model.eval()


def hf_logits(model):
    with torch.no_grad():
        return model(ids()).logits


def our_model(folder):
    hf = json.loads((folder / "config.json").read_text())
    mcfg = ModelConfig.model_validate(model_config_from_hf(hf))
    model = build_model(mcfg.to_args(), seed=7)
    load_hf_weights(model, folder)
    return model.eval(), mcfg


def max_diff(model, want) -> float:
    with torch.no_grad():
        return (model(ids()) - want).abs().max().item()


def test_every_moe_family_has_a_case():
    assert {f.name for f in FAMILIES if f.moe is not None} == {family for family, *_ in CASES.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_family_from_hf_and_back_with_transformers_logits(tmp_path, case, capsys):
    ref = hf_model(case)
    folder = tmp_path / "hf"
    ref.save_pretrained(str(folder))  # one tensor per expert, as every transformers version writes
    assert not any("gate_up_proj" in name for name in _tensor_names(folder))
    want = hf_logits(ref)
    assert want.abs().max() > 1.0  # far from init: a wrong mapping shows
    model, mcfg = our_model(folder)
    into = max_diff(model, want)
    assert into <= TOL, f"{case}: import max |diff| {into:.2e}"
    args = mcfg.to_args()
    assert [args.is_moe_layer(i) for i in range(args.num_layers)] == \
        [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in ref.model.layers]
    assert args.aux_loss_coeff == pytest.approx(0.002 * args.top_k)  # transformers' loss is top_k times ours

    assert main(["convert", "from-hf", str(folder), str(tmp_path / "ck")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "ck"), str(tmp_path / "back"), "--tokenizer", "none"]) == 0
    capsys.readouterr()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32,
                                                             experts_implementation="eager").eval()
    assert type(back).__name__ == CASES[case][2]
    theirs, ours = back.config.to_dict(), ref.config.to_dict()
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                "mlp_only_layers", "router_aux_loss_coef", "qkv_bias", "attention_bias"):
        want_value = ours.get(key)
        assert theirs.get(key) == (pytest.approx(want_value) if isinstance(want_value, float) else want_value), key
    out = (hf_logits(back) - want).abs().max().item()
    print(f"PARITY {case}: import {into:.2e}, from-hf + to-hf {out:.2e}")  # docs/interop.md (pytest -s)
    assert out <= TOL, f"{case}: export max |diff| {out:.2e}"


def _tensor_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_the_fused_expert_layout_reads_too(tmp_path, case):
    """transformers 5 holds the experts fused ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) and writes them
    so with save_original_format=False."""
    ref = hf_model(case)
    ref.save_pretrained(str(tmp_path / "hf"), save_original_format=False)
    names = _tensor_names(tmp_path / "hf")
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names), names
    model, _ = our_model(tmp_path / "hf")
    diff = max_diff(model, hf_logits(ref))
    print(f"PARITY {case} fused: import {diff:.2e}")
    assert diff <= TOL


def test_a_run_started_from_the_folder_takes_its_moe_keys(tmp_path):
    """ckpt_type="hf": a config without a model section gets the folder's experts; a structural key that
    differs is one line naming both keys."""
    from spindle.errors import SpindleError
    from spindle.interop.hf_start import model_from_hf_folder

    ref = hf_model("qwen2_moe_pattern")
    ref.save_pretrained(str(tmp_path / "hf"))

    def cfg(model):
        return validate_config({"model": model, "ckpt": {"load_ckpt_info": {
            "path": str(tmp_path / "hf"), "content": ["model"], "ckpt_type": "hf"}}})

    done = model_from_hf_folder(cfg({}))
    m = done.model
    assert (m.num_experts, m.top_k, m.num_shared_experts, m.shared_expert_gate, m.first_k_dense, m.moe_every) == \
        (4, 2, 1, True, 2, 2)
    model = build_model(done.model.to_args(), seed=3)
    load_hf_weights(model, tmp_path / "hf")
    assert max_diff(model.eval(), hf_logits(ref)) <= TOL
    with pytest.raises(SpindleError, match="model.num_experts gives num_experts=8 but .* num_local_experts / "
                                           "num_experts gives 4") as err:
        model_from_hf_folder(cfg({"num_experts": 8}))
    assert "\n" not in str(err.value)
    kept = model_from_hf_folder(cfg({"aux_loss_coeff": 0.05}))  # a continued training may weigh the loss anew
    assert kept.model.aux_loss_coeff == 0.05


# --------------------------------------------------------------------------- refusals, one line each


def write_config(folder, config: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("config_class, arch", [("DeepseekV3Config", "DeepseekV3ForCausalLM"),
                                                ("GptOssConfig", "GptOssForCausalLM")])
def test_unbuilt_architectures_are_refused_in_one_line(tmp_path, capsys, config_class, arch):
    config = getattr(transformers, config_class)(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                 vocab_size=96)
    config.architectures = [arch]
    config.save_pretrained(str(tmp_path / "hf"))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{arch} (model_type" in err and "is not built in Spindle yet" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, change, message", [
    ("qwen2_moe", {"mlp_only_layers": [1], "num_hidden_layers": 3},
     "mlp_only_layers [1] makes layers [1] dense after MoE layer 0"),
    ("qwen2_moe", {"mlp_only_layers": [0, 1]}, "leave none of the 2 layers a mixture of experts"),
    ("qwen2_moe", {"mlp_only_layers": "0"}, "mlp_only_layers must be a list of layer indices"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok (5) must be at most num_experts (4)"),
    ("qwen3_moe", {"num_experts_per_tok": 1}, "num_experts_per_tok 1 with renormalised weights"),
    ("qwen3_moe", {"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
    ("mixtral", {"router_jitter_noise": 0.01}, "router_jitter_noise 0.01 is not supported"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts must be a positive int"),
    ("mixtral", {"router_aux_loss_coef": -1}, "router_aux_loss_coef must be a number >= 0"),
])
def test_moe_config_json_problems_are_one_line(tmp_path, capsys, case, change, message):
    family, _, model_class, keys = CASES[case]
    config = {"model_type": family, "architectures": [model_class], **SIZES, **keys, "hidden_act": "silu"}
    config.pop("experts_implementation")
    config.update(change)
    write_config(tmp_path / "hf", config)
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "config.json" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


MOE_MODEL = dict(hidden_size=32, num_attention_heads=4, num_layers=2, vocab_size=64, num_experts=4, top_k=2,
                 moe_intermediate_size=16)


@pytest.mark.parametrize("model, message", [
    (dict(router_score="sigmoid"), "model.router_score='sigmoid'"),
    (dict(capacity_factor=1.25), "model.capacity_factor=1.25"),
    (dict(num_shared_experts=1), "qwen2_moe: no gated shared expert"),
    (dict(bias_update_rate=0.01), "feed_forward.score_bias (aux-loss-free balancing, model.bias_update_rate) is not"),
])
def test_what_no_moe_family_expresses_is_refused_in_one_line(tmp_path, capsys, model, message):
    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig

    cfg = validate_config({"model": dict(MOE_MODEL, **model), "data": {"tokenizer_path": "byte"}})
    net = build_model(cfg.model.to_args(), seed=0)
    for bias in [m.score_bias for m in net.moe_blocks() if m.score_bias is not None]:
        bias.fill_(0.5)  # after training with aux-loss-free balancing
    CheckpointManager(str(tmp_path / "ck"), CkptConfig()).save(1, net, None, {"step": 1}, cfg.to_dict())
    assert main(["convert", "to-hf", str(tmp_path / "ck"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Spindle's own MoE models, to-hf


NATIVE = {  # model switches -> the class to-hf writes
    "mixtral": (dict(bias_update_rate=0.01), "MixtralForCausalLM"),  # a zero balancing bias is dropped
    "qwen2_moe": (dict(num_layers=4, first_k_dense=1, moe_every=2, num_shared_experts=2,
                       shared_expert_intermediate_size=8, shared_expert_gate=True, norm_topk_prob=False,
                       no_bias=False, qkv_bias=True, o_bias=False, mlp_bias=False), "Qwen2MoeForCausalLM"),
    "qwen3_moe": (dict(num_layers=3, first_k_dense=1, qk_norm=True, norm_topk_prob=False, top_k=3),
                  "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_spindle_moe_models_export_with_transformers_logits(tmp_path, capsys, case):
    """Our stacked experts written one per expert, two shared experts of width 8 as Qwen2-MoE's one of 16,
    first_k_dense / moe_every as mlp_only_layers / decoder_sparse_step."""
    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig

    switches, expect_class = NATIVE[case]
    cfg = validate_config({"model": dict(MOE_MODEL, vocab_size=SIZES["vocab_size"], **switches),
                           "data": {"tokenizer_path": "byte"}})
    model = build_model(cfg.model.to_args(), seed=0)
    with torch.no_grad():  # far from init, so a wrong mapping shows
        gen = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    CheckpointManager(str(tmp_path / "ck"), CkptConfig()).save(1, model, None, {"step": 1}, cfg.to_dict())
    assert main(["convert", "to-hf", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32,
                                                           experts_implementation="eager").eval()
    assert type(hf).__name__ == expect_class
    diff = max_diff(model.eval(), hf_logits(hf))
    print(f"PARITY {case} (Spindle's own) to-hf: {diff:.2e}")
    assert diff <= TOL
