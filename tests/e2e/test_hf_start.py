"""A run started from a Hugging Face folder takes its model from the folder's config.json (issue 24, point 4):
keys the config leaves out are read from it, structural conflicts are one line naming both keys, what a
continued training may change is kept and said; `head_dim: null` and a tied config whose file holds a
distinct head are read as transformers reads them (or refused in one line)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import collecting
from spindle.cli import main
from spindle.config import validate_config
from spindle.logs import quiet
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_folder(tmp_path, kind="llama", **over):
    """A tiny random transformers model saved as a hub folder; returns (folder, model)."""
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_scaling=dict(LLAMA3_ROPE, rope_theta=10000.0), **over)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, **over)
        model = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path / f"hf-{kind}"
    model.save_pretrained(folder)
    return folder, model.eval()


def start(tmp_path, folder, model=None, lines=None):
    cfg = validate_config({
        "model": model or {}, "data": {"seq_len": 16, "micro_bsz": 1, "total_steps": 2},
        "trainer": {"run_folder": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
        "ckpt": {"load_ckpt_info": {"path": str(folder), "content": ["model"], "ckpt_type": "hf"}},
    })
    with collecting(lines) if lines is not None else quiet():
        return Trainer(cfg, ParallelEnv())


def logits_difference(trainer, hf_model) -> float:
    x = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (trainer.raw_model.eval()(x) - hf_model(x).logits).abs().max().item()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_config_without_a_model_section_trains_the_folders_model(tmp_path, kind):
    folder, hf_model = hf_folder(tmp_path, kind)
    lines = []
    trainer = start(tmp_path, folder, lines=lines)
    assert logits_difference(trainer, hf_model) < 1e-4
    assert any("from " in line and "config.json: model " in line and "num_kv_attention_heads" in line
               for line in lines), lines


def test_a_hand_written_model_without_rope_scaling_keeps_the_folders_scaling(tmp_path):
    """Before: plain RoPE without a word (logits 1.24 off transformers at positions past 16)."""
    folder, hf_model = hf_folder(tmp_path)
    written = {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
               "vocab_size": 64, "mlp_ratio": 1.5, "multiple_of": 48, "max_position_embeddings": 64}
    trainer = start(tmp_path, folder, written)
    assert trainer.cfg.model.rope_scaling is not None
    assert logits_difference(trainer, hf_model) < 1e-4


def test_a_conflicting_structural_key_names_both_keys(tmp_path, capsys):
    folder, _ = hf_folder(tmp_path)
    config = tmp_path / "start.py"
    config.write_text(f"model = dict(num_kv_attention_heads=4)\n"
                      f"data = dict(seq_len=16, micro_bsz=1, total_steps=1)\n"
                      f"trainer = dict(run_folder={str(tmp_path / 'runs')!r}, tensorboard=False)\n"
                      f"ckpt = dict(load_ckpt_info=dict(path={str(folder)!r}, content=('model',), ckpt_type='hf'))\n")
    for argv in (["train", "--config", str(config)], ["train", "--config", str(config), "--dry-run"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "model.num_kv_attention_heads gives num_kv_heads=4" in err and "num_key_value_heads gives 2" in err \
            and "\n" not in err, err


def test_a_changed_rope_base_is_kept_and_said(tmp_path):
    folder, _ = hf_folder(tmp_path)
    lines = []
    trainer = start(tmp_path, folder, {"rope_base": 500000.0}, lines=lines)
    assert trainer.cfg.model.rope_base == 500000.0
    assert any("model.rope_base=500000.0 while" in line and "rope_theta=10000.0" in line for line in lines), lines


def test_head_dim_null_is_hidden_over_heads(tmp_path):
    folder, hf_model = hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["head_dim"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert logits_difference(start(tmp_path, folder), hf_model) < 1e-4


def test_a_tied_config_with_a_distinct_head_in_the_file_is_refused(tmp_path):
    from spindle.errors import SpindleError

    folder, _ = hf_folder(tmp_path)  # untied weights: lm_head differs from the embedding
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpindleError, match="hold a distinct lm_head.weight"):
        start(tmp_path, folder)


def add_generation_config(folder):
    """Llama 3's pattern: several end-of-turn ids, and sampling defaults."""
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=1, eos_token_id=[2, 8, 9])
    (folder / "config.json").write_text(json.dumps(config))
    generation = {"bos_token_id": 1, "eos_token_id": [2, 8, 9], "do_sample": True, "temperature": 0.6,
                  "top_p": 0.9, "transformers_version": "5.0.0"}
    (folder / "generation_config.json").write_text(json.dumps(generation))


@pytest.mark.parametrize("route", ["convert from-hf", "train from the folder"])
def test_export_keeps_the_source_folders_generation_settings(tmp_path, route):
    """Before: the eos list collapsed to one id of the tokenizer's (generation did not stop at <|eot_id|>)."""
    folder, _ = hf_folder(tmp_path)
    add_generation_config(folder)
    if route == "convert from-hf":
        assert main(["convert", "from-hf", str(folder), str(tmp_path / "ck")]) == 0
        ckpt = tmp_path / "ck" / "0"
    else:
        raw = {"data": {"seq_len": 16, "micro_bsz": 1, "total_steps": 1},
               "trainer": {"run_folder": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
               "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": str(tmp_path / "ck"),
                        "load_ckpt_info": {"path": str(folder), "content": ["model"], "ckpt_type": "hf"}}}
        Trainer(validate_config(raw), ParallelEnv()).fit()
        ckpt = tmp_path / "ck" / "1"
    # the folder ships no tokenizer, so the export names none (tests/e2e/test_tokenizer_identity.py)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "out"), "--tokenizer", "none"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [2, 8, 9] and config["bos_token_id"] == 1
    assert generation["eos_token_id"] == [2, 8, 9] and generation["temperature"] == 0.6
    assert generation["top_p"] == 0.9 and generation["do_sample"] is True
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert loaded.eos_token_id == [2, 8, 9]
