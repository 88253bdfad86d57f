"""Hugging Face interop: `spindle convert to-hf` loads in transformers' LlamaForCausalLM with the same
logits; `spindle convert from-hf` and ckpt_type="hf" start training from a HF Llama folder."""

import json

import pytest
import torch

from spindle.checkpoint.manager import load_checkpoint, resolve
from spindle.cli import main
from spindle.config import validate_config
from spindle.model.llama import build_model
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

transformers = pytest.importorskip("transformers")

QUIET = dict(log=lambda *_: None)


def cfg_for(tmp_path, model=None, ckpt=None, data=None):
    raw = {
        "JOB_NAME": "hf",
        "data": {"seq_len": 16, "micro_bsz": 2, "micro_num": 1, "total_steps": 2, "tokenizer_path": "default",
                 **(data or {})},
        "model": {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
                  "vocab_size": 96, "multiple_of": 16, "max_position_embeddings": 64, "rope_base": 50000.0,
                  "layer_norm_epsilon": 1e-6, **(model or {})},
        "adam": {"lr": 1e-2},
        "trainer": {"run_folder": str(tmp_path), "tensorboard": False, "progress_bar": False, "seed": 3,
                    "num_threads": 1},
        "ckpt": {"enable_save_ckpt": True, **(ckpt or {})},
    }
    return validate_config(raw)


def hf_logits(folder, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


SCALINGS = {
    "plain": None,
    "dynamic": {"use_dynamic_ntk_rope": True},
    "linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "llama3": {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32}},
}


@pytest.mark.parametrize("variant", list(SCALINGS))
def test_to_hf_same_logits(tmp_path, variant):
    dynamic = variant == "dynamic"
    cfg = cfg_for(tmp_path, model=SCALINGS[variant])
    tr = Trainer(cfg, ParallelEnv(), **QUIET)
    tr.fit()
    out = tmp_path / "hf_out"
    assert main(["convert", "to-hf", str(tr.save_dir), str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["rope_theta"] == 50000.0 and conf["rope_parameters"]["rope_theta"] == 50000.0
    hf_cfg = transformers.AutoConfig.from_pretrained(str(out))
    params = getattr(hf_cfg, "rope_parameters", None) or {"rope_theta": hf_cfg.rope_theta, **(hf_cfg.rope_scaling or {})}
    assert params["rope_theta"] == 50000.0
    if dynamic:
        assert params["rope_type"] == "dynamic" and params["factor"] == 1.0
    assert (out / "model.safetensors").is_file()
    assert not (out / "tokenizer.model").exists()  # 1024 ids of the default tokenizer do not fit vocab 96
    # 80 > max_position_embeddings (64): with dynamic NTK the base is rescaled, in both implementations
    ids = torch.randint(0, 96, (2, 80 if dynamic else 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tr.raw_model.eval()(ids)
    diff = (hf_logits(out, ids) - ours).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0},
                                     {"type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16},
                                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling_carried_into_hf_config(scaling):
    from spindle.checkpoint.families import hf_config, model_config_from_hf
    from spindle.config import ModelConfig

    m = ModelConfig(hidden_size=32, num_attention_heads=4, num_layers=1, vocab_size=96, rope_base=5e5,
                    max_position_embeddings=64, rope_scaling=scaling)
    conf = hf_config(m.to_args())
    assert conf["rope_theta"] == 5e5 and conf["rope_scaling"]["rope_type"] == scaling["type"]
    hf = transformers.LlamaConfig(**{k: v for k, v in conf.items() if k not in ("architectures", "model_type")})
    params = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert params["rope_type"] == scaling["type"] and params["factor"] == scaling["factor"]
    assert params.get("rope_theta", getattr(hf, "rope_theta", None)) == 5e5
    back = model_config_from_hf(conf)
    assert back["rope_base"] == 5e5 and back["rope_scaling"]["type"] == scaling["type"]
    assert back["rope_scaling"]["factor"] == scaling["factor"]


def test_round_trip_from_hf_and_ckpt_type_hf(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=20000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    src = tmp_path / "src"
    hf.save_pretrained(str(src))
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits

    # spindle convert from-hf -> a Spindle checkpoint with the same logits
    out = tmp_path / "imported"
    assert main(["convert", "from-hf", str(src), str(out)]) == 0
    storage, ref = resolve(str(out))
    path = out / ref.rel
    mcfg = validate_config(json.loads((path / "config.json").read_text())).model
    assert mcfg.ffn_hidden_size == 80 and mcfg.rope_base == 20000.0
    model = build_model(mcfg.to_args())
    load_checkpoint(path, model, None, ("model",))
    with torch.no_grad():
        assert (model.eval()(ids) - want).abs().max().item() <= 1e-4

    # and back: to-hf of the imported checkpoint reproduces the HF logits
    back = tmp_path / "back"
    assert main(["convert", "to-hf", str(out), str(back)]) == 0
    assert (hf_logits(back, ids) - want).abs().max().item() <= 1e-4

    # training starts from the HF folder directly (ckpt_type="hf") or from the converted checkpoint
    model_over = {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
                  "vocab_size": 96, "mlp_ratio": 2.5, "multiple_of": 16, "max_position_embeddings": 64,
                  "rope_base": 20000.0, "layer_norm_epsilon": 1e-6}
    for info in ({"path": str(src), "ckpt_type": "hf"}, {"path": str(out), "content": "model"}):
        cfg = cfg_for(tmp_path / info.get("ckpt_type", "dcp"), model=model_over, ckpt={"load_ckpt_info": info},
                      data={"tokenizer_path": None})
        tr = Trainer(cfg, ParallelEnv(), **QUIET)
        with torch.no_grad():
            assert (tr.raw_model.eval()(ids) - want).abs().max().item() <= 1e-4
        assert len(tr.fit()["history"]) == 2

    # a config that disagrees with the HF weights: an error naming the parameter and both shapes
    bad = cfg_for(tmp_path / "bad", model=dict(model_over, vocab_size=128),
                  ckpt={"load_ckpt_info": {"path": str(src), "ckpt_type": "hf"}}, data={"tokenizer_path": None})
    with pytest.raises(Exception, match=r"tok_embeddings.weight .*\[96, 32\].*\[128, 32\]"):
        Trainer(bad, ParallelEnv(), **QUIET)


def test_convert_bad_input_exit_code_2(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["convert", "to-hf", str(tmp_path / "junk"), str(tmp_path / "o")]) == 2
    assert "not a Spindle checkpoint" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(tmp_path / "junk"), str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
