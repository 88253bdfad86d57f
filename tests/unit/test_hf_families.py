"""Every Hugging Face family, both ways, against transformers' logits (fp32, max |diff| <= 1e-5).

Each case builds its own tiny folder with random weights under the family's real tensor names and
config.json fields (transformers writes Llama / Mistral / Qwen2 / Qwen3; the InternLM folders, whose
classes are remote code, are written here and compared with transformers' Llama on the same weights
re-laid-out by this test). Logits are compared at 48 positions, beyond the 32 (or 16) positions
where RoPE scaling starts. Then the imported model trains a few AdamW steps, `spindle convert to-hf`
exports it, and AutoModelForCausalLM (no remote code) gives the trained model's logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from spindle.interop.families import model_config_from_hf
from spindle.interop.hf import import_hf, load_hf_weights
from spindle.checkpoint.manager import CheckpointManager
from spindle.cli import main
from spindle.config import CkptConfig, ModelConfig, validate_config
from spindle.model.llama import build_model

transformers = pytest.importorskip("transformers")

from hf_folders import SIZES, hf_case, randomize  # noqa: E402

TOL = 1e-5
LENGTH = 48
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 16, "factor": 4.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i for i in range(8)]}
LLAMA_ROPES = {
    "plain": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": LONGROPE,
}


def ids(n=LENGTH, batch=2, seed=0):
    return torch.randint(0, SIZES["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


def ours_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


CASES = {
    **{f"llama_{k}": ("llama", dict(rope=v, attention_bias=k == "yarn", mlp_bias=k == "yarn"))
       for k, v in LLAMA_ROPES.items()},
    "mistral_v01_window": ("mistral", dict(sliding_window=64, max_position_embeddings=128)),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, rope=LLAMA_ROPES["yarn"])),
    "qwen3": ("qwen3", dict(head_dim=24, rope_theta=1e6)),
    "qwen3_bias_dynamic": ("qwen3", dict(head_dim=24, attention_bias=True, rope=LLAMA_ROPES["dynamic"])),
}


def import_and_compare(folder, want):
    hf = json.loads((folder / "config.json").read_text())
    mcfg = ModelConfig.model_validate(model_config_from_hf(hf))
    model = build_model(mcfg.to_args(), seed=7)
    load_hf_weights(model, folder)
    diff = (ours_logits(model, ids()) - want).abs().max().item()
    return model, mcfg, diff


def train_export_compare(tmp_path, model, mcfg, expect_class):
    """A few AdamW steps on our model, `convert to-hf`, transformers' logits = ours."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(3):
        x = ids(seed=10 + step)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / "trained"
    cfg = validate_config({"model": mcfg.model_dump(), "data": {"tokenizer_path": "byte"}})
    CheckpointManager(str(ckpt), CkptConfig()).save(3, model, None, {"step": 3}, cfg.to_dict())
    out = tmp_path / "exported"
    assert main(["convert", "to-hf", str(ckpt), str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == expect_class
    diff = (hf_logits(hf, ids()) - ours_logits(model, ids())).abs().max().item()
    return diff


EXPORT_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize("case", list(CASES))
def test_family_imports_and_exports_with_transformers_logits(tmp_path, case):
    kind, extra = CASES[case]
    ref = hf_case(kind, **dict(extra))
    folder = tmp_path / "hf"
    ref.save_pretrained(str(folder))
    want = hf_logits(ref, ids())
    model, mcfg, diff = import_and_compare(folder, want)
    assert diff <= TOL, f"{case}: import max |diff| {diff:.2e}"
    assert want.abs().max() > 1.0  # the weights are far from init: differences would show
    back = train_export_compare(tmp_path, model, mcfg, EXPORT_CLASS[kind])
    print(f"PARITY {case}: import {diff:.2e}, trained + exported {back:.2e}")  # docs/interop.md (pytest -s)
    assert back <= TOL, f"{case}: export max |diff| {back:.2e}"


def test_mistral_v03_folder_reads_only_the_indexed_files(tmp_path):
    """v0.3 folders hold consolidated.safetensors (Meta names) next to the sharded HF files."""
    from safetensors.torch import save_file

    ref = hf_case("mistral", sliding_window=None, vocab_size=96)
    folder = tmp_path / "hf"
    ref.save_pretrained(str(folder), max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    save_file({"tok_embeddings.weight": torch.zeros(3, 3), "layers.0.attention.wq.weight": torch.zeros(2, 2)},
              str(folder / "consolidated.safetensors"))
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    model, mcfg, diff = import_and_compare(folder, hf_logits(ref, ids()))
    print(f"PARITY mistral_v03_index: import {diff:.2e}")
    assert diff <= TOL and mcfg.sliding_window is None


# --------------------------------------------------------------------------- InternLM (remote-code folders)


def write_remote_code_folder(folder, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def internlm_v1_folder(tmp_path):
    """An InternLM v1 HF folder (q/k/v/o bias, no MLP bias, `rotary` dict) and its Llama twin."""
    config = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True,
              "auto_map": {"AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
              "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32,
              "rotary": {"base": 20000, "type": "dynamic", "scaling_factor": 2.0}}
    # InternLM v1 has no GQA: k/v use every head. Its tensor names are Llama's.
    ref_cfg = transformers.LlamaConfig(**dict(SIZES, num_key_value_heads=4), max_position_embeddings=32,
                                       attention_bias=True, mlp_bias=False,
                                       rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 20000.0})
    ref = transformers.LlamaForCausalLM(ref_cfg)
    randomize(ref, 3)
    write_remote_code_folder(tmp_path / "internlm", config, {k: v.clone() for k, v in ref.state_dict().items()})
    return tmp_path / "internlm", ref


def test_internlm_v1_folder_reads_as_llama_with_attention_bias(tmp_path):
    folder, ref = internlm_v1_folder(tmp_path)
    model, mcfg, diff = import_and_compare(folder, hf_logits(ref, ids()))
    assert diff <= TOL, diff
    assert (mcfg.qkv_bias, mcfg.o_bias, mcfg.mlp_bias, mcfg.rope_scaling.type) == (True, True, False, "dynamic")
    back = train_export_compare(tmp_path, model, mcfg, "LlamaForCausalLM")
    print(f"PARITY internlm_v1: import {diff:.2e}, trained + exported {back:.2e}")
    assert back <= TOL


def fuse_internlm2_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int, head_dim: int):
    """wq/wk/wv -> InternLM2's wqkv: for each KV group, its q heads, then its k head, then its v head."""
    q_per_kv = q.shape[0] // head_dim // kv_heads
    rows = []
    for g in range(kv_heads):
        for j in range(q_per_kv):
            head = g * q_per_kv + j
            rows.append(q[head * head_dim:(head + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


INTERNLM2_NAMES = {"model.embed_tokens.weight": "model.tok_embeddings.weight", "lm_head.weight": "output.weight",
                   "model.norm.weight": "model.norm.weight"}
INTERNLM2_LAYER = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                   "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
                   "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def internlm2_folder(tmp_path, bias):
    """An InternLM2 HF folder (grouped wqkv, w1/w3/w2, tok_embeddings, output) and its Llama twin."""
    ref_cfg = transformers.LlamaConfig(**SIZES, max_position_embeddings=32, attention_bias=bias, mlp_bias=False,
                                       rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    ref = transformers.LlamaForCausalLM(ref_cfg)
    randomize(ref, 5)
    sd = ref.state_dict()
    hd, kv = 16, 2
    tensors = {new: sd[old] for old, new in INTERNLM2_NAMES.items()}
    for n in range(2):
        p = f"model.layers.{n}."
        for old, new in INTERNLM2_LAYER.items():
            for suffix in ("weight", "bias"):
                if p + old + "." + suffix in sd:
                    tensors[f"{p}{new}.{suffix}"] = sd[f"{p}{old}.{suffix}"]
        for suffix in ("weight", "bias") if bias else ("weight",):
            q, k, v = (sd[f"{p}self_attn.{x}_proj.{suffix}"] for x in "qkv")
            tensors[f"{p}attention.wqkv.{suffix}"] = fuse_internlm2_qkv(q, k, v, kv, hd)
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": bias,
              "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 32, "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    write_remote_code_folder(tmp_path / "internlm2", config, tensors)
    return tmp_path / "internlm2", ref


@pytest.mark.parametrize("bias", [False, True])
def test_internlm2_folder_splits_the_grouped_wqkv(tmp_path, bias):
    folder, ref = internlm2_folder(tmp_path, bias)
    model, mcfg, diff = import_and_compare(folder, hf_logits(ref, ids()))
    assert diff <= TOL, diff
    back = train_export_compare(tmp_path, model, mcfg, "LlamaForCausalLM")
    print(f"PARITY internlm2 bias={bias}: import {diff:.2e}, trained + exported {back:.2e}")
    assert back <= TOL


# --------------------------------------------------------------------------- the table's edges


def test_from_hf_cli_keeps_the_family_switches(tmp_path):
    ref = hf_case("qwen2", tie_word_embeddings=True)
    ref.save_pretrained(str(tmp_path / "hf"))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    saved = json.loads((tmp_path / "ck" / "0" / "config.json").read_text())["model"]
    assert (saved["no_bias"], saved["qkv_bias"], saved["o_bias"], saved["mlp_bias"]) == (False, True, False, False)
    assert saved["tie_word_embeddings"] is True
    path = import_hf(tmp_path / "hf", tmp_path / "ck2")
    assert (path / "config.json").is_file()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": "64"}, "hidden_size must be a positive int"),
    ({"num_attention_heads": None}, "num_attention_heads is missing"),
    ({"use_sliding_window": True}, "sliding-window layers"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be a dict"),
    ({"attention_bias": "yes"}, "attention_bias must be true or false"),
])
def test_config_json_problems_are_one_line(tmp_path, capsys, change, message):
    ref = hf_case("qwen3", head_dim=24)
    ref.save_pretrained(str(tmp_path / "hf"))
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    conf.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_yarn_default_factor_is_written_out_as_transformers_computes_it():
    hf = {"model_type": "llama", **SIZES, "max_position_embeddings": 64,
          "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 16}}
    hf["num_hidden_layers"] = 2
    sc = model_config_from_hf(hf)["rope_scaling"]
    assert sc["factor"] == 4.0 and sc["original_max_position_embeddings"] == 16
    assert math.isclose(model_config_from_hf(dict(hf, rope_scaling=None))["rope_base"], 10000.0)
