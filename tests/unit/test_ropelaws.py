"""Scaling-law functions against the paper's formulas and the numbers in reference/rope.md."""

import json
import math

import pytest

from spindle.errors import SpindleError
from spindle.cli.rope import main as rope_main
from spindle.ropelaws import (
    bound_regime,
    critical_base,
    critical_dim,
    extended_bound,
    extrapolation_bound,
    format_rope_report,
    recommend_base,
    rope_report,
    small_base_thresholds,
    tuned_critical_dim,
)


def test_critical_dim_llama2():
    # 64 * log_10000(4096 / 2pi) = 45.03 -> ceil 46 -> 92 (Lemma 1).
    assert critical_dim(128, 4096) == 92
    assert critical_dim(128, 4096, base_pre=10000.0) == 92


def test_critical_dim_small_scale_and_other_base_pre():
    assert critical_dim(64, 256) == 26  # 32 * 0.4025 = 12.88 -> 13
    assert critical_dim(64, 256, base_pre=1000) == 36  # rope.md 4.3 second pre-training base
    assert critical_dim(32, 128) == 12  # rope.md 4.6


def test_critical_dim_is_capped_and_exact_integers_do_not_round_up():
    assert critical_dim(8, 10**9, base_pre=10) == 8
    # log_base(T/2pi) exactly 1/2 * 2 -> (d/2)*log = exactly an integer; noise must not add a pair.
    base = 100.0
    t = 2 * math.pi * 10.0  # log_100(10) = 0.5, (64/2)*0.5 = 16 exactly
    assert critical_dim(64, t, base_pre=base) == 32


def test_extrapolation_bound_published_values():
    assert extrapolation_bound(1e6, 128, 92) == pytest.approx(129027, abs=1)
    table = {1e4: 4712, 2e4: 7754, 4e4: 12762, 8e4: 21003, 1.6e5: 34565, 4e5: 66782,
             5e5: 78400, 6e5: 89377, 1e6: 129027, 1e7: 675196, 1e8: 3533295}
    for base, expected in table.items():
        assert round(extrapolation_bound(base, 128, 92)) == expected


def test_extrapolation_bound_small_scale_table():
    # rope.md 4.3: d=64, T=256, d_extra=26.
    table = {1e4: 265, 3e4: 414, 1e5: 675, 3e5: 1055, 1e6: 1721, 1e7: 4385, 1e8: 11173}
    for base, expected in table.items():
        assert round(extrapolation_bound(base, 64, 26)) == expected
    # 4.6: d=32, T=128, d_extra=12
    assert [round(extrapolation_bound(b, 32, 12)) for b in (1e4, 1e6, 1e8)] == [199, 1117, 6283]
    # 4.3 second base: 2pi * beta^(36/64) ~ 1.1K, 4.1K, 14.9K
    assert [round(extrapolation_bound(b, 64, 36), -2) for b in (1e4, 1e5, 1e6)] == [1100, 4100, 14900]


def test_extrapolation_bound_all_dims_is_unbounded():
    assert extrapolation_bound(500, 64, 64) == math.inf
    assert extrapolation_bound(500, 64, 0) == pytest.approx(2 * math.pi)


def test_critical_base():
    assert critical_base(4096, 16384) == pytest.approx(71738, abs=1)
    assert critical_base(4096, 4096) == pytest.approx(10000)
    assert critical_base(256, 1024) == pytest.approx(3.1e5, rel=0.02)
    # closed form
    assert critical_base(1000, 5000, 500) == pytest.approx(
        500 ** (math.log(5000 / (2 * math.pi)) / math.log(1000 / (2 * math.pi)))
    )


def test_tuned_critical_dim_table():
    got = [tuned_critical_dim(b, 128, 16384) for b in (500, 652, 1304, 2608, 10000, 40000)]
    assert got == [128, 128, 128, 128, 110, 96]


def test_small_base_thresholds():
    b1, b2, b3 = small_base_thresholds(4096)
    assert (round(b1), round(b2), round(b3)) == (2608, 1304, 652)
    assert [round(x) for x in small_base_thresholds(16384)] == [10430, 5215, 2608]
    assert [round(x, 1) for x in small_base_thresholds(256)] == [163.0, 81.5, 40.7]
    # beta3 definition: the slowest pair completes a full turn within T
    d = 64
    assert 2 * math.pi * b3 ** ((d - 2) / d) <= 4096


def test_extended_bound_two_regimes():
    # beta > beta0: pre-training d_extra (92) governs
    assert extended_bound(1e6, 128, 4096, 16384) == pytest.approx(129027, abs=1)
    # beta <= beta0: bound is the tuning length
    assert extended_bound(40000, 128, 4096, 16384) == 16384
    assert extended_bound(500, 128, 4096, 16384) == 16384
    # tune_len defaults to train_len, where beta0 = base_pre
    assert extended_bound(1e6, 128, 4096) == pytest.approx(129027, abs=1)
    assert extended_bound(10000, 128, 4096) == 4096
    # continuity: just above beta0 the bound is already >= T_tune (ceil makes it slightly larger)
    beta0 = critical_base(4096, 16384)
    assert extended_bound(beta0 * 1.0001, 128, 4096, 16384) >= 16384


def test_bound_regime():
    assert bound_regime(1e6, 128, 4096, 16384) == "large"
    assert bound_regime(40000, 128, 4096, 16384) == "tuned"
    assert bound_regime(500, 128, 4096, 16384) == "small"
    assert bound_regime(20, 64, 256, 256) == "small"


def test_recommend_base():
    rec = recommend_base(128, 4096, 100000, tune_len=16384)
    assert rec["regime"] == "large"
    assert 2 * math.pi * rec["base"] ** (92 / 128) == pytest.approx(100000)
    assert rec["base_rounded"] >= rec["base"]
    assert rec["bound"] >= 100000
    assert rec["small_base"] == pytest.approx(16384 / (2 * math.pi))
    # target within the tuned length: keep the pre-training base
    rec = recommend_base(128, 4096, 8000, tune_len=16384)
    assert rec["regime"] == "within_tune_len" and rec["base"] == 10000
    # small scale: 1721 at 1e6 -> target 1721 needs ~1e6
    rec = recommend_base(64, 256, 1721)
    assert rec["base"] == pytest.approx(1e6, rel=0.01)


@pytest.mark.parametrize(
    "call",
    [
        lambda: critical_dim(127, 4096),
        lambda: critical_dim(0, 4096),
        lambda: critical_dim(128, 0),
        lambda: critical_dim(128, -5),
        lambda: critical_dim(128, 4096, base_pre=1),
        lambda: critical_base(4096, 1024),
        lambda: extrapolation_bound(1e6, 128, 93),
        lambda: extrapolation_bound(0.5, 128, 92),
        lambda: small_base_thresholds(0),
        lambda: recommend_base(128, 4096, -1),
        lambda: rope_report(128, 4096, bases=[0.0]),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(SpindleError):
        call()


def test_rope_report_and_format():
    rep = rope_report(128, 4096, tune_len=16384, target_len=100000, bases=[500, 1e6])
    json.dumps(rep)  # serialisable
    assert rep["critical_dim"] == 92
    assert rep["critical_base"] == pytest.approx(71738, abs=1)
    assert [r["regime"] for r in rep["bases"]] == ["small", "large"]
    text = format_rope_report(rep)
    assert "92/128" in text and "71,738" in text and "129,027" in text
    default = rope_report(64, 256)
    assert any(r["base"] == 10000 for r in default["bases"])


def test_rope_main(capsys):
    assert rope_main(["--head-dim", "128", "--train-len", "4096", "--base", "1e6", "500000"]) == 0
    out = capsys.readouterr().out
    assert "129,027" in out and "78,400" in out
    assert rope_main(["--head-dim", "64", "--train-len", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["critical_dim"] == 26


@pytest.mark.parametrize(
    "argv",
    [
        ["--head-dim", "127", "--train-len", "4096"],
        ["--head-dim", "128", "--train-len", "0"],
        ["--head-dim", "128"],
        ["--head-dim", "x", "--train-len", "4096"],
        ["--head-dim", "128", "--train-len", "4096", "--tune-len", "1024"],
    ],
)
def test_rope_main_bad_args(argv):
    with pytest.raises(SpindleError):
        rope_main(argv)
