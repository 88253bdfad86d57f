"""Long-context metrics while training (spindle/train/long_eval.py): the numbers are those of the eval code,
the model comes back as it was, the training RNG is untouched; the `long_eval` keys and metric names."""

import json
import math
import random

import pytest
import torch

from spindle.config import LongEvalConfig, ModelConfig, validate_config
from spindle.data.tokenizer import load_tokenizer
from spindle.errors import SpindleError
from spindle.eval.curves import metric_key, parse_key, read_curves
from spindle.eval.passkey import make_sample, score_sample
from spindle.eval.perplexity import set_rope, token_losses
from spindle.model.llama import build_model
from spindle.train.long_eval import long_context_metrics

T = 16  # training length of the toy


def toy():
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, num_kv_attention_heads=1, num_layers=2, vocab_size=258,
                      mlp_ratio=2, multiple_of=16, max_position_embeddings=T, init_std=0.5)
    return build_model(cfg.to_args(), seed=3)


def ppl(nll, length):
    return math.exp(float(nll[:, : length - 1].double().mean()))


def test_perplexity_by_length_is_that_of_token_losses_for_every_variant():
    model = toy().train()
    windows = torch.randint(0, 258, (2, 64), generator=torch.Generator().manual_seed(0))
    le = LongEvalConfig(lengths=[16, 32, 64], variants=["plain", "ntk:4", "yarn"], chunk=24)
    rotary = model.rotary
    got = long_context_metrics(model, windows, None, le, T)
    assert set(got) == {metric_key("ppl", L, v) for L in (16, 32, 64) for v in ("plain", "ntk:4", "yarn")}
    assert model.training and model.rotary is rotary  # the training model comes back as it was

    plain, _ = token_losses(model, windows, chunk=64)
    ntk, _ = token_losses(set_rope(model, {"type": "ntk", "factor": 4.0}, None), windows, chunk=64)
    model.rotary = rotary
    for L in (16, 32, 64):
        assert got[f"val/ppl@{L}"] == pytest.approx(ppl(plain, L), rel=1e-5)
        assert got[f"val/ppl@{L}/ntk:4"] == pytest.approx(ppl(ntk, L), rel=1e-5)
        # per-length YaRN: factor L / T, one pass over the first L tokens
        yarn = {"type": "yarn", "factor": L / T, "original_max_position_embeddings": T} if L > T else None
        nll, _ = token_losses(set_rope(model, yarn, None), windows[:, :L], chunk=64)
        model.rotary = rotary
        assert got[f"val/ppl@{L}/yarn"] == pytest.approx(ppl(nll, L), rel=1e-5)
    assert got["val/ppl@16/yarn"] == pytest.approx(got["val/ppl@16"], rel=1e-6)  # factor 1 below T
    assert got["val/ppl@64/ntk:4"] != pytest.approx(got["val/ppl@64"], rel=1e-3)  # the variant acts


def test_passkey_accuracy_is_the_mean_of_scored_samples():
    model = toy().eval()
    tok = load_tokenizer("byte")
    le = LongEvalConfig(passkey_lengths=[256, 300], passkey_depths=[0.0, 1.0], passkey_samples=2, seed=4,
                        chunk=100)
    got = long_context_metrics(model, None, tok, le, T)
    assert set(got) == {"val/passkey@256", "val/passkey@300"}
    for L in (256, 300):
        scores = [score_sample(model, tok, make_sample(tok, L, d, 4, n), "teacher", 100)["correct"]
                  for d in (0.0, 1.0) for n in range(2)]
        assert got[f"val/passkey@{L}"] == sum(scores) / 4
    assert not model.training


def test_passkey_metric_follows_the_answers(monkeypatch):
    """Scoring that says 'correct' for depth 0 only gives 0.5 over depths (0, 1): the metric is the grid's mean."""
    import spindle.eval.passkey as pk

    monkeypatch.setattr(pk, "score_sample", lambda m, t, s, mode, chunk: {"correct": s["depth"] == 0.0, "logp": 0.0})
    le = LongEvalConfig(passkey_lengths=[256], passkey_depths=[0.0, 1.0], passkey_samples=3)
    assert long_context_metrics(toy(), None, load_tokenizer("byte"), le, T) == {"val/passkey@256": 0.5}


def test_the_training_rng_is_not_touched(tmp_path, spindle_lines):
    from spindle.parallel.layout import Layout
    from spindle.train.long_eval import LongEval

    (tmp_path / "a.txt").write_text("hello world, " * 40)
    cfg = validate_config({"data": {"valid_every": 2, "seq_len": T, "tokenizer_path": "byte"},
                           "model": {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 1, "vocab_size": 258,
                                     "multiple_of": 16, "max_position_embeddings": T, "drop_rate": 0.5},
                           "long_eval": {"lengths": [32], "data": [str(tmp_path / "a.txt")],
                                         "passkey_lengths": [256], "passkey_depths": [0.5], "passkey_samples": 1}})
    model = build_model(cfg.model.to_args(), seed=0).train()
    lines = spindle_lines
    le = LongEval(cfg, Layout(), model)
    torch.manual_seed(123)
    random.seed(5)
    before, py_before = torch.get_rng_state(), random.getstate()
    assert le(3) == {}  # not a valid_every step
    out = le(4)
    assert set(out) == {"val/ppl@32", "val/passkey@256"} and all(math.isfinite(v) for v in out.values())
    assert torch.equal(torch.get_rng_state(), before) and random.getstate() == py_before
    assert model.training
    assert lines[-1].startswith("long-context eval after step 3: ppl@32 ")


@pytest.mark.parametrize("section, message", [
    ({"lengths": [64]}, "set data.valid_every >= 1"),
    ({"lengths": [1]}, "long_eval.lengths.0: Input should be greater than or equal to 2"),
    ({"lengths": [64.5]}, "long_eval.lengths.0:"),
    ({"variants": ["plain", "warp:2"]}, "long_eval.variants: variant 'warp:2': unknown part"),
    ({"variants": []}, "long_eval.variants: expected at least one variant"),
    ({"passkey_depths": [0.5, 2]}, "long_eval.passkey_depths.1: Input should be less than or equal to 1"),
    ({"passkey_depths": [float("nan")]}, "long_eval.passkey_depths.0: Input should be a finite number"),
    ({"windows": True}, "long_eval.windows: expected an integer, not a bool"),
    ({"passkey_mode": "guess"}, "long_eval.passkey_mode:"),
    ({"lenghts": [4]}, "long_eval.lenghts: unknown key; did you mean 'long_eval.lengths'?"),
])
def test_bad_long_eval_keys_are_one_line(section, message):
    data = {} if section == {"lengths": [64]} else {"valid_every": 1}
    with pytest.raises(SpindleError) as e:
        validate_config({"data": data, "long_eval": section})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_long_eval_refuses_at_start(tmp_path):
    from spindle.parallel.layout import Layout
    from spindle.train.long_eval import LongEval

    base = {"data": {"valid_every": 1, "seq_len": T, "tokenizer_path": "byte"},
            "model": {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 1, "vocab_size": 258,
                      "multiple_of": 16}}
    model = build_model(validate_config(base).model.to_args(), seed=0)
    cases = [({"lengths": [32]}, "long_eval.data is required: the config names no data folder"),
             ({"passkey_lengths": [20]}, "long_eval.passkey_lengths: 20: too short for the passkey template"),
             ({"lengths": [32], "data": [str(tmp_path / "none")]}, f"long_eval.data {tmp_path / 'none'}: not found")]
    for section, message in cases:
        with pytest.raises(SpindleError, match="^" + message.replace("(", r"\(")):
            LongEval(validate_config({**base, "long_eval": section}), Layout(), model)
    small = {**base, "model": {**base["model"], "vocab_size": 100}, "long_eval": {"passkey_lengths": [256]}}
    with pytest.raises(SpindleError, match="the tokenizer has 258 ids, model.vocab_size is 100"):
        LongEval(validate_config(small), Layout(), build_model(validate_config(small).model.to_args()))


def test_metric_names_and_reading_them_back(tmp_path):
    assert metric_key("ppl", 4096) == "val/ppl@4096" and metric_key("passkey", 8192, "yarn") == "val/passkey@8192/yarn"
    assert parse_key("val/ppl@4096/dynamic+logn") == ("ppl", 4096, "dynamic+logn")
    assert parse_key("val/en_loss") is None and parse_key("val/ppl@x") is None
    rows = [{"step": 1, "loss": 3.0}, {"step": 3, "val/ppl@32": 9.0, "val/ppl@64": 12.0, "val/passkey@256/yarn": 0.5},
            {"step": 5, "val/ppl@32": 7.0, "val/ppl@64": float("nan")}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curves = read_curves(str(tmp_path))
    assert curves == {"ppl": {"plain": {3: {32: 9.0, 64: 12.0}, 5: {32: 7.0}}}, "passkey": {"yarn": {3: {256: 0.5}}}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SpindleError, match="no val/ppl@L or val/passkey@L records"):
        read_curves(str(tmp_path / "metrics.jsonl"))
