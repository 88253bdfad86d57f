"""Config loading: the seed's file loads unchanged; each kind of bad input is one clear error."""

import math
from pathlib import Path

import pytest

from spindle.config import load_config, parse_rampup, parse_skip_batches, validate_config
from spindle.errors import SpindleError


def write(tmp_path, text, name="cfg.py"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_seed_7b_config_loads_unchanged():
    cfg = load_config("configs/7B_sft.py")
    assert cfg.JOB_NAME == "7b_train"
    assert cfg.model.hidden_size == 4096 and cfg.model.num_layers == 32 and cfg.model.vocab_size == 103168
    assert cfg.model.ffn_hidden_size == 11008  # int(4096 * 8/3) rounded up to 256, as LLaMA-7B
    assert cfg.parallel.zero1.size == 8 and cfg.parallel.pipeline.interleaved_overlap
    assert cfg.ckpt.load_ckpt_info.content == ("model",)
    assert cfg.ckpt.oss_snapshot_freq == 25
    assert cfg.data.valid_micro_num == 4 and cfg.lr_scheduler.total_steps == 50000
    assert cfg.beta2_scheduler.init_beta2 == 0.95
    assert cfg.grad_scaler.fp16.initial_scale == 2**16 and cfg.grad_scaler.hysteresis == 2
    assert cfg.constants["SEQ_LEN"] == 2048  # module constants are kept, not interpreted
    assert cfg.model.dtype == "torch.float16"


def test_defaults_for_every_key():
    cfg = validate_config({})
    assert cfg.data.seq_len == 2048 and cfg.data.micro_num == 1 and cfg.data.train_folder is None
    assert math.isinf(cfg.ckpt.checkpoint_every)
    assert cfg.model.kv_heads == cfg.model.num_attention_heads


def test_unknown_key_names_path_and_closest(tmp_path):
    p = write(tmp_path, "model = dict(num_layerz=2)\n")
    with pytest.raises(SpindleError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "model.num_layerz: unknown key" in msg and "did you mean 'model.num_layers'" in msg


def test_unknown_nested_key(tmp_path):
    p = write(tmp_path, "grad_scaler = dict(fp16=dict(initial_scal=4))\n")
    with pytest.raises(SpindleError, match=r"grad_scaler\.fp16\.initial_scal: unknown key; did you mean "
                                           r"'grad_scaler\.fp16\.initial_scale'"):
        load_config(p)


def test_unknown_top_level_lowercase_key(tmp_path):
    p = write(tmp_path, "modle = dict()\n")
    with pytest.raises(SpindleError, match=r"modle: unknown key; did you mean 'model'"):
        load_config(p)


def test_wrong_type_names_key_expected_and_given(tmp_path):
    p = write(tmp_path, "data = dict(micro_bsz='two')\n")
    with pytest.raises(SpindleError) as e:
        load_config(p)
    msg = str(e.value)
    assert "data.micro_bsz" in msg and "integer" in msg and "'two'" in msg


def test_out_of_range(tmp_path):
    p = write(tmp_path, "data = dict(micro_bsz=0)\n")
    with pytest.raises(SpindleError, match=r"data\.micro_bsz: .*greater than or equal to 1.*got 0"):
        load_config(p)


def test_bad_dtype_lists_choices(tmp_path):
    p = write(tmp_path, "model = dict(dtype='torch.float8')\n")
    with pytest.raises(SpindleError, match=r"model\.dtype: expected one of .*torch\.bfloat16.*got 'torch\.float8'"):
        load_config(p)


def test_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "JOB_NAME = 'x'\nmodel = dict(\n  hidden_size=64,,\n)\n")
    with pytest.raises(SpindleError) as e:
        load_config(p)
    assert f"{p}:3: config does not parse" in str(e.value)


def test_runtime_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "A = 1\nB = undefined_name + 1\n")
    with pytest.raises(SpindleError, match=rf"{p}:2: error while running the config: NameError"):
        load_config(p)


def test_missing_file():
    with pytest.raises(SpindleError, match="config file not found"):
        load_config("/nonexistent/cfg.py")


def test_overrides(tmp_path):
    p = write(tmp_path, "data = dict(micro_bsz=2)\nmodel = dict(num_layers=8)\n")
    cfg = load_config(p, ["data.micro_bsz=4", "model.num_layers=2", "JOB_NAME=over", "ckpt.checkpoint_every=inf"])
    assert cfg.data.micro_bsz == 4 and cfg.model.num_layers == 2 and cfg.JOB_NAME == "over"
    with pytest.raises(SpindleError, match=r"with --set overrides.*data\.micro_bzs: unknown key"):
        load_config(p, ["data.micro_bzs=4"])
    with pytest.raises(SpindleError, match="expected KEY=VALUE"):
        load_config(p, ["data.micro_bsz"])


def test_heads_must_divide(tmp_path):
    p = write(tmp_path, "model = dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=3)\n")
    with pytest.raises(SpindleError, match="num_attention_heads \\(4\\) must be divisible by num_kv_attention_heads"):
        load_config(p)


def test_config_globals_rule(tmp_path):
    # modules, functions and classes in a config file are not keys (InternEvo's rule)
    p = write(tmp_path, "import os\ndef helper():\n    return 1\nclass K: pass\nJOB_NAME = 'j' + str(helper())\n")
    assert load_config(p).JOB_NAME == "j1"


def test_skip_and_rampup_parsing(tmp_path):
    assert parse_skip_batches("1-3,9") == {1, 2, 3, 9}
    assert parse_skip_batches("") == set()
    assert parse_rampup("2 2 10") == (2, 2, 10)
    p = write(tmp_path, "data = dict(skip_batches='5-2')\n")
    with pytest.raises(SpindleError, match="data.skip_batches: range '5-2' ends before it starts"):
        load_config(p)


def test_use_dynamic_ntk_rope_means_dynamic():
    cfg = validate_config({"model": {"use_dynamic_ntk_rope": True, "max_position_embeddings": 4096}})
    assert cfg.model.effective_rope_scaling() == {"type": "dynamic", "factor": 1.0,
                                                  "original_max_position_embeddings": 4096}
    cfg = validate_config({"model": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}})
    assert cfg.model.effective_rope_scaling()["type"] == "yarn"


# ----------------------------------------------------------------------------- InternEvo's keys

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_internevo_7b_internlm2_config_loads_with_its_modes_mapped_and_the_rest_reported():
    from spindle.cli.train import dry_run_report

    cfg = load_config(FIXTURES / "internevo_7B_internlm2.py")
    assert cfg.parallel.context == 2 and cfg.parallel.tensor.size == 1 and cfg.parallel.fsdp  # isp + weight
    notes = " ".join(cfg._compat_notes)
    for key in ("parallel.tensor mode='isp'", "parallel.weight size 2", "model.use_flash_attn",
                "hybrid_zero_optimizer.overlap_sync_grad", "generation", "monitor.tensorboard"):
        assert key in notes, key
    assert cfg.beta2_scheduler.c == cfg.adam.adam_beta2_c
    report = dry_run_report(cfg, 8)
    assert "data 4 x context 2 x pipeline 1 x tensor 1" in report and "7,737,708,544" in report
    with pytest.raises(SpindleError, match="world size 1 is not divisible"):
        dry_run_report(cfg, 1)


@pytest.mark.parametrize("mode, tp, sp", [("mtp", 2, False), ("msp", 2, True), ("fsp", 2, True)])
def test_tensor_modes_map_to_tensor_and_sequence_parallel(mode, tp, sp):
    cfg = validate_config({"parallel": {"tensor": {"size": 2, "mode": mode}}})
    assert cfg.parallel.tensor.size == tp and cfg.parallel.sequence_parallel is sp and cfg.parallel.context == 1


@pytest.mark.parametrize("raw, key", [
    ({"data": {"use_packed_dataset": False}}, "data.use_packed_dataset=False"),
    ({"ckpt": {"snapshot_ckpt_folder": "local:/elsewhere"}}, "ckpt.snapshot_ckpt_folder"),
    ({"lr_scheduler": {"last_epoch": 10}}, "lr_scheduler.last_epoch=10"),
    ({"beta2_scheduler": {"cur_iter": 3}}, "beta2_scheduler.cur_iter=3"),
])
def test_keys_that_would_need_a_missing_mode_are_refused(raw, key):
    with pytest.raises(SpindleError, match=key):
        validate_config(raw)


def test_keys_without_effect_are_reported_only_when_given():
    assert validate_config({})._compat_notes == []
    cfg = validate_config({"data": {"num_worker": 4}, "metric_dtype": "fp32"})
    assert [n.split(" ")[0] for n in cfg._compat_notes] == ["data.num_worker", "metric_dtype"]
    # norms run in fp32 whatever use_fp32_norm says: given anywhere, the key says so
    for raw in ({"use_fp32_norm": False}, {"model": {"use_fp32_norm": True}}):
        notes = validate_config(raw)._compat_notes
        assert len(notes) == 1 and "norms always run in fp32" in notes[0] and "use_fp32_norm" in notes[0]


def test_skip_batches_as_the_seed_writes_it_on_the_command_line():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "7B_sft.py", ["data.skip_batches=3"])
    assert cfg.data.skip_batches == "3"
