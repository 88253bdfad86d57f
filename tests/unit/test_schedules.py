"""LR, beta2 and loss-scale schedules against their closed forms."""

import math

import pytest

from spindle.config import Beta2SchedulerConfig, GradScalerConfig, LrSchedulerConfig
from spindle.train.optim import DynamicLossScaler, beta2_at, lr_at


def test_lr_init_warmup_cosine():
    s = LrSchedulerConfig(total_steps=1000, init_steps=10, warmup_ratio=0.1, eta_min=1e-5)
    base = 1e-3
    assert all(lr_at(k, base, s) == 0.0 for k in range(10))  # zero during init_steps
    # linear warmup over int(1000 * 0.1) = 100 updates, reaching base at its last one
    assert lr_at(10, base, s) == pytest.approx(base / 100)
    assert lr_at(59, base, s) == pytest.approx(base * 50 / 100)
    assert lr_at(109, base, s) == pytest.approx(base)
    # cosine from base to eta_min over the remaining 890 updates
    span = 1000 - 10 - 100
    for k in (110, 300, 555, 999):
        t = k - 110
        expected = 1e-5 + (base - 1e-5) * (1 + math.cos(math.pi * t / span)) / 2
        assert lr_at(k, base, s) == pytest.approx(expected)
    assert lr_at(110 + span, base, s) == pytest.approx(1e-5)
    assert lr_at(5000, base, s) == pytest.approx(1e-5)  # stays at eta_min past the end


def test_lr_no_warmup():
    s = LrSchedulerConfig(total_steps=10, warmup_ratio=0.0, eta_min=0.0)
    assert lr_at(0, 1.0, s) == pytest.approx(1.0)
    assert lr_at(5, 1.0, s) == pytest.approx(0.5)


def test_beta2_schedule():
    assert beta2_at(100, Beta2SchedulerConfig(init_beta2=0.95, c=0)) == 0.95
    s = Beta2SchedulerConfig(init_beta2=0.9, c=0.8)
    for k in (0, 1, 10, 1000):
        assert beta2_at(k, s) == pytest.approx(max(0.9, 1 - 1 / (k + 1) ** 0.8))
    assert beta2_at(0, s) == 0.9 and beta2_at(10_000, s) > 0.999


def scaler(**kw):
    cfg = GradScalerConfig(**{"fp16": {"initial_scale": 2**16, "min_scale": 1, "growth_interval": 4}, **kw})
    return DynamicLossScaler.from_config(cfg, enabled=True)


def test_scaler_hysteresis_backoff_and_min():
    s = scaler(hysteresis=2, backoff_factor=0.5)
    s.update(found_inf=True)
    assert s.scale == 2**16  # first overflow is absorbed by hysteresis
    s.update(found_inf=True)
    assert s.scale == 2**15
    s.update(found_inf=True)  # hysteresis stays exhausted until a growth event
    assert s.scale == 2**14
    s.scale = 1.0
    s.update(found_inf=True)
    assert s.scale == 1.0  # min_scale


def test_scaler_growth_interval_and_max():
    s = scaler(growth_factor=2.0, max_scale=2**17)
    for _ in range(3):
        s.update(found_inf=False)
    assert s.scale == 2**16
    s.update(found_inf=False)
    assert s.scale == 2**17  # grows after growth_interval clean steps
    for _ in range(8):
        s.update(found_inf=False)
    assert s.scale == 2**17  # capped at max_scale
    s.update(found_inf=True)
    assert s.growth_tracker == 0  # an overflow restarts the growth count


@pytest.mark.parametrize("dtype, enabled", [("torch.float16", True), ("torch.bfloat16", False),
                                            ("torch.float32", False)])
def test_scaler_disabled_for_bf16_fp32(tmp_path, dtype, enabled):
    """The trainer scales the loss for fp16 only: bf16 and fp32 have fp32's exponent range."""
    from helpers import tiny_cfg
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    cfg = tiny_cfg(tmp_path, model={"dtype": dtype}, grad_scaler={"fp16": {"initial_scale": 2**16}})
    s = Trainer(cfg, ParallelEnv()).scaler
    assert s.enabled is enabled and s.scale == (2**16 if enabled else 1.0)
    s.update(found_inf=True)
    s.update(found_inf=True)  # hysteresis 2: the second overflow backs off, when scaling is on
    assert s.scale == (2**15 if enabled else 1.0)


def test_scaler_state_roundtrip():
    """Every field of the state travels: hysteresis 1 backs off at once, so the scale, the growth count and
    the hysteresis count all differ from a fresh scaler's."""
    a = scaler(hysteresis=1)
    a.update(True)
    a.update(False)
    fresh = scaler(hysteresis=1).state_dict()
    assert all(a.state_dict()[k] != fresh[k] for k in fresh), (a.state_dict(), fresh)
    b = scaler(hysteresis=1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for found_inf in (True, False, False, False, False):  # and both go on alike
        a.update(found_inf)
        b.update(found_inf)
        assert b.state_dict() == a.state_dict()
