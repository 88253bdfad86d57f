"""Rotary embeddings: every scaling type against float64 closed forms and transformers' numbers."""

import math

import numpy as np
import pytest
import torch

from spindle.errors import SpindleError
from spindle.model.rope import rope_cos_sin, rope_inv_freq
from spindle.model.rotary import RotaryEmbedding, apply_rotary, logn_scale

D = 64
BASE = 10000.0


def plain(d=D, base=BASE):
    return np.array([base ** (-2 * n / d) for n in range(d // 2)], dtype=np.float64)


def close(t: torch.Tensor, ref, rtol=1e-6):
    ref = np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(t.double().numpy(), ref, rtol=rtol, atol=0)


# ---------------------------------------------------------------- inv_freq closed forms


def test_default_and_none():
    for sc in (None, {"type": "default"}, {"rope_type": "default"}):
        inv, att = rope_inv_freq(D, BASE, sc)
        assert inv.dtype == torch.float32 and inv.shape == (D // 2,)
        close(inv, plain())
        assert att == 1.0


def test_linear():
    inv, att = rope_inv_freq(D, BASE, {"type": "linear", "factor": 4.0})
    close(inv, plain() / 4)
    assert att == 1.0


def test_ntk_fixed():
    inv, _ = rope_inv_freq(D, BASE, {"type": "ntk", "factor": 8})
    base2 = BASE * 8 ** (D / (D - 2))
    close(inv, plain(base=base2))
    # NTK keeps the fastest pair and divides the slowest by exactly the factor.
    assert inv[0].item() == 1.0
    assert inv[-1].item() == pytest.approx(plain()[-1] / 8, rel=1e-6)


def test_dynamic_identity_then_grows():
    sc = {"type": "dynamic", "factor": 2.0}
    for seq_len in (None, 1, 100, 256):
        inv, _ = rope_inv_freq(D, BASE, sc, seq_len=seq_len, max_position_embeddings=256)
        close(inv, plain())
    inv, att = rope_inv_freq(D, BASE, sc, seq_len=1000, max_position_embeddings=256)
    alpha = 2.0 * 1000 / 256 - 1.0
    close(inv, plain(base=BASE * alpha ** (D / (D - 2))))
    assert att == 1.0
    # explicit original_max_position_embeddings wins over max_position_embeddings
    inv2, _ = rope_inv_freq(D, BASE, {**sc, "original_max_position_embeddings": 256}, 1000, 99999)
    assert torch.equal(inv, inv2)
    # factor defaults to 1 (InternEvo's use_dynamic_ntk_rope): alpha = l / L
    inv3, _ = rope_inv_freq(D, BASE, {"type": "dynamic"}, seq_len=1024, max_position_embeddings=256)
    close(inv3, plain(base=BASE * 4.0 ** (D / (D - 2))))


def _yarn_ref(d, base, factor, orig, beta_fast=32, beta_slow=1, truncate=True):
    def cdim(n):
        return d * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = cdim(beta_fast), cdim(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for n, f in enumerate(plain(d, base)):
        ramp = min(max((n - lo) / (hi - lo), 0.0), 1.0)
        out.append(f * (1 - ramp) + f / factor * ramp)
    return out


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn(truncate):
    sc = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256, "truncate": truncate}
    inv, att = rope_inv_freq(D, BASE, sc)
    close(inv, _yarn_ref(D, BASE, 16.0, 256, truncate=truncate))
    assert att == pytest.approx(0.1 * math.log(16) + 1)
    # fastest pairs untouched, slowest fully interpolated
    assert inv[0].item() == 1.0
    assert inv[-1].item() == pytest.approx(plain()[-1] / 16, rel=1e-6)


def test_yarn_attention_factor_variants():
    base_sc = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    _, att = rope_inv_freq(128, 1e4, {**base_sc, "attention_factor": 0.5})
    assert att == 0.5
    _, att = rope_inv_freq(128, 1e4, {**base_sc, "mscale": 1.0, "mscale_all_dim": 0.5})
    assert att == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))
    # factor from max_position_embeddings / original when absent
    inv, att = rope_inv_freq(
        128, 1e4, {"type": "yarn", "original_max_position_embeddings": 4096}, max_position_embeddings=4096 * 8
    )
    assert att == pytest.approx(0.1 * math.log(8) + 1)
    close(inv, _yarn_ref(128, 1e4, 8.0, 4096))
    inv, _ = rope_inv_freq(128, 1e4, {**base_sc, "beta_fast": 16, "beta_slow": 2})
    close(inv, _yarn_ref(128, 1e4, 40.0, 4096, 16, 2))


def test_llama3():
    sc = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    inv, att = rope_inv_freq(128, 500000.0, sc)
    ref = []
    for f in plain(128, 500000.0):
        wl = 2 * math.pi / f
        if wl < 8192 / 4:
            ref.append(f)
        elif wl > 8192 / 1:
            ref.append(f / 8)
        else:
            s = (8192 / wl - 1) / (4 - 1)
            ref.append((1 - s) * f / 8 + s * f)
    close(inv, ref)
    assert att == 1.0
    # all three bands occur for this config
    p = plain(128, 500000.0)
    ratio = inv.double().numpy() / p
    assert (np.isclose(ratio, 1)).any() and (np.isclose(ratio, 1 / 8)).any()
    assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()


def test_longrope():
    short = [1.0 + 0.01 * i for i in range(D // 2)]
    long = [1.0 + 0.5 * i for i in range(D // 2)]
    sc = {"type": "longrope", "short_factor": short, "long_factor": long, "factor": 4.0,
          "original_max_position_embeddings": 256}
    inv, att = rope_inv_freq(D, BASE, sc, seq_len=200)
    close(inv, plain() / np.array(short))
    inv, _ = rope_inv_freq(D, BASE, sc, seq_len=257)
    close(inv, plain() / np.array(long))
    assert att == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))


@pytest.mark.parametrize(
    "args",
    [
        (63, BASE, None),
        (0, BASE, None),
        (D, 1.0, None),
        (D, BASE, {"type": "bogus"}),
        (D, BASE, {"type": "linear"}),
        (D, BASE, {"type": "linear", "factor": -1}),
        (D, BASE, {"type": "yarn", "factor": 4.0, "beta_fsat": 8, "original_max_position_embeddings": 256}),
        (D, BASE, {"type": "yarn", "factor": 4.0}),  # no original length anywhere
        (D, BASE, {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 256}),
        (D, BASE, {"type": "linear", "rope_type": "yarn", "factor": 2.0}),
        (D, BASE, {"type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
        (D, BASE, {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                   "original_max_position_embeddings": 256, "factor": 2.0}),
    ],
)
def test_bad_configs_raise(args):
    with pytest.raises(SpindleError):
        rope_inv_freq(*args)


def test_rope_theta_alias_accepted():
    inv, _ = rope_inv_freq(D, BASE, {"rope_type": "linear", "factor": 2.0, "rope_theta": BASE})
    close(inv, plain() / 2)


# ---------------------------------------------------------------- against transformers


def _hf(d, base, sc, mpe, seq_len=None):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=d * 4, num_attention_heads=4, head_dim=d, max_position_embeddings=mpe,
        rope_theta=base, rope_scaling=dict(sc),
    )
    kind = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling")
    kind = kind.get("rope_type", kind.get("type"))
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)


HF_CASES = [
    ({"rope_type": "linear", "factor": 4.0}, 4096, None),
    ({"rope_type": "dynamic", "factor": 2.0}, 4096, 3000),
    ({"rope_type": "dynamic", "factor": 2.0}, 4096, 50000),
    ({"rope_type": "dynamic", "factor": 1.0}, 4096, 1_000_000),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}, 32768, None),
    ({"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
      "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}, 131072, None),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 131072, None),
]


@pytest.mark.parametrize("sc,mpe,seq_len", HF_CASES)
@pytest.mark.parametrize("d,base", [(128, 500000.0), (64, 10000.0)])
def test_matches_transformers(sc, mpe, seq_len, d, base):
    ref, ref_att = _hf(d, base, sc, mpe, seq_len)
    inv, att = rope_inv_freq(d, base, sc, seq_len=seq_len, max_position_embeddings=mpe)
    # HF forms the power in fp32, we in float64 rounded once: a few fp32 ulps apart at most.
    torch.testing.assert_close(inv, ref.float(), rtol=1e-6, atol=0)
    assert att == pytest.approx(float(ref_att), rel=1e-12)


def test_longrope_matches_transformers():
    short = [1.0 + 0.01 * i for i in range(32)]
    long = [1.0 + 0.3 * i for i in range(32)]
    sc = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
          "original_max_position_embeddings": 4096}
    for seq_len in (None, 8192):
        ref, ref_att = _hf(64, 10000.0, sc, 4096 * 4, seq_len)
        inv, att = rope_inv_freq(64, 10000.0, sc, seq_len=seq_len, max_position_embeddings=4096 * 4)
        torch.testing.assert_close(inv, ref.float(), rtol=1e-6, atol=0)
        assert att == pytest.approx(float(ref_att), rel=1e-12)


# ---------------------------------------------------------------- cos / sin / apply


def test_cos_sin_layout_and_precision_to_1e6():
    inv, _ = rope_inv_freq(128, 10000.0)
    pos = torch.tensor([[0, 1, 4095, 123_457, 999_999, 1_000_000]], dtype=torch.long)
    cos, sin = rope_cos_sin(pos, inv)
    assert cos.shape == (1, 6, 128) and cos.dtype == torch.float32 and sin.dtype == torch.float32
    # closed form in float64, with the fp32 inv_freq values taken as exact
    ang = pos.double()[0, :, None] * inv.double()[None, :]
    ref_c, ref_s = torch.cos(ang), torch.sin(ang)
    for half in (slice(0, 64), slice(64, 128)):  # rotate_half layout: cat(freqs, freqs)
        assert (cos[0, :, half].double() - ref_c).abs().max() < 1e-6
        assert (sin[0, :, half].double() - ref_s).abs().max() < 1e-6


def test_cos_sin_attention_factor_and_batch():
    inv, att = rope_inv_freq(D, BASE, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    pos = torch.stack([torch.arange(10), torch.arange(5, 15)])
    cos, sin = rope_cos_sin(pos, inv, att)
    c1, s1 = rope_cos_sin(pos, inv)
    torch.testing.assert_close(cos, c1 * att)
    torch.testing.assert_close(sin, s1 * att)
    torch.testing.assert_close(cos[1, :5], c1[0, 5:] * att)


def test_apply_rotary_closed_form_and_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, D)
    pos = torch.arange(7).repeat(2, 1) * 1000
    inv, _ = rope_inv_freq(D, BASE)
    cos, sin = rope_cos_sin(pos, inv)
    y = apply_rotary(x, cos, sin)
    # pair n = (x[n], x[n + D/2]) rotated by angle pos * inv[n]
    ang = pos.double()[..., None] * inv.double()  # (B, L, D/2)
    a, b = x[..., : D // 2].double(), x[..., D // 2 :].double()
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    ref = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    assert (y.double() - ref).abs().max() < 1e-5
    # norm-preserving and relative: <R(m)q, R(n)k> depends only on m - n
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    yb = apply_rotary(x.bfloat16(), cos, sin)
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - y).abs().max() < 0.05


def test_rotary_is_relative():
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    inv, _ = rope_inv_freq(D, BASE)

    def dot(m, n):
        cm, sm = rope_cos_sin(torch.tensor([[m]]), inv)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), inv)
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum().item()

    assert dot(10, 3) == pytest.approx(dot(500_007, 500_000), abs=1e-4)


def test_logn_scale():
    pos = torch.tensor([[0, 1, 255, 256, 1023, 65535]])
    s = logn_scale(pos, 256)
    assert s.dtype == torch.float32 and s.shape == (1, 6)
    ref = [max(1.0, math.log(p + 1) / math.log(256)) for p in pos[0].tolist()]
    close(s[0], ref)
    assert s[0, :3].tolist() == [1.0, 1.0, 1.0]  # identity up to pos = ref_len - 1
    assert s[0, -1].item() == pytest.approx(2.0)
    with pytest.raises(SpindleError):
        logn_scale(pos, 1)


# ---------------------------------------------------------------- module


def test_module_static_matches_functions():
    sc = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    rope = RotaryEmbedding(D, BASE, sc, max_position_embeddings=512, logn_ref_len=128)
    pos = torch.arange(300).unsqueeze(0)
    cos, sin, q_scale = rope(pos)
    inv, att = rope_inv_freq(D, BASE, sc, max_position_embeddings=512)
    c, s = rope_cos_sin(pos, inv, att)
    assert torch.equal(cos, c) and torch.equal(sin, s)
    assert torch.equal(q_scale, logn_scale(pos, 128))
    assert "inv_freq" not in rope.state_dict()
    assert RotaryEmbedding(D, BASE)(pos)[2] is None


def test_module_dynamic_has_no_history():
    rope = RotaryEmbedding(D, BASE, {"type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    short = torch.arange(50).unsqueeze(0)
    mid = torch.arange(100).unsqueeze(0)
    fresh_mid = rope(mid)[0]
    rope(torch.arange(1000).unsqueeze(0))  # a long call must not change later results
    assert torch.equal(rope(mid)[0], fresh_mid)
    inv, _ = rope_inv_freq(D, BASE, {"type": "dynamic", "factor": 2.0}, seq_len=100, max_position_embeddings=64)
    assert torch.equal(fresh_mid, rope_cos_sin(mid, inv)[0])
    # within the original length: plain RoPE
    assert torch.equal(rope(short)[0], rope_cos_sin(short, rope_inv_freq(D, BASE)[0])[0])
    # explicit seq_len overrides max(position)+1 (e.g. one decode step at position 99)
    step = torch.tensor([[99]])
    assert torch.equal(rope(step)[0], fresh_mid[:, 99:])
    assert torch.equal(rope(step, seq_len=100)[0], fresh_mid[:, 99:])


def test_module_internevo_dynamic_flag():
    rope = RotaryEmbedding(D, BASE, None, max_position_embeddings=64, use_dynamic_ntk=True)
    assert rope.scaling == {"type": "dynamic", "factor": 1.0}
    pos = torch.arange(256).unsqueeze(0)
    inv = rope_inv_freq(D, BASE * 4.0 ** (D / (D - 2)))[0]
    torch.testing.assert_close(rope(pos)[0], rope_cos_sin(pos, inv)[0], rtol=0, atol=1e-6)
    with pytest.raises(SpindleError):
        RotaryEmbedding(D, BASE, None, use_dynamic_ntk=True)  # needs max_position_embeddings
    with pytest.raises(SpindleError):
        RotaryEmbedding(D, BASE, {"type": "linear", "factor": 2.0}, 64, use_dynamic_ntk=True)


def test_module_meta_construction_then_to_empty():
    sc = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}
    with torch.device("meta"):
        rope = RotaryEmbedding(128, 500000.0, sc, max_position_embeddings=2048)
    assert rope.inv_freq.is_meta
    rope.to_empty(device="cpu")
    rope.init_buffers()
    torch.testing.assert_close(rope.inv_freq, rope_inv_freq(128, 500000.0, sc)[0], rtol=0, atol=0)
    pos = torch.arange(10).unsqueeze(0)
    ref = RotaryEmbedding(128, 500000.0, sc, max_position_embeddings=2048)(pos)
    out = rope(pos)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # reset_parameters is the same hook; after a dtype cast of the model the buffer is restored
    rope.to(torch.bfloat16)
    assert torch.equal(rope(pos)[0], ref[0])
    rope.reset_parameters()
    assert rope.inv_freq.dtype == torch.float32


def test_module_bad_logn_ref():
    with pytest.raises(SpindleError):
        RotaryEmbedding(D, BASE, logn_ref_len=1)


@pytest.mark.parametrize(
    "sc",
    [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
     {"rope_type": "dynamic", "factor": 2.0}],
)
def test_cos_sin_match_transformers_llama_rotary(sc):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=1024,
        rope_theta=10000.0, rope_scaling=None if sc is None else dict(sc),
    )
    hf = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(3000).unsqueeze(0)
    ref_cos, ref_sin = hf(torch.zeros(1, 1, dtype=torch.float32), pos)
    cos, sin, _ = RotaryEmbedding(64, 10000.0, sc, max_position_embeddings=1024)(pos)
    # HF forms the angle in fp32 (error ~ ulp(3000 rad)/2 = 1.2e-4); ours is exact to 1e-7.
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=5e-4)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=5e-4)
