"""The RoPE registry (spindle/config/rope_types.py) walked type by type: each name has its function, its
parameters and their defaults in one entry, and every consumer (config, rotary math, Hugging Face mapping,
evaluation variants) answers from that entry."""

import math

import pytest
import torch

from spindle.config import ModelConfig
from spindle.config.model import RopeScalingConfig
from spindle.config.rope_types import PARAM_DEFAULTS, ROPE_TYPES, RopeInputs, filled_defaults, parse_variant
from spindle.interop.families import _HF_ROPE_KEYS
from spindle.model.rope import rope_inv_freq
from spindle.model.rotary import RotaryEmbedding

D, BASE, ORIG = 64, 10000.0, 256


def example(name: str) -> dict:
    """A complete dict of type `name`: a factor of 4 where it takes one, every default filled in."""
    t = ROPE_TYPES[name]
    sc = {"type": name, **t.defaults}
    if "factor" in t.params:
        sc["factor"] = 4.0
    if "original_max_position_embeddings" in t.params:
        sc["original_max_position_embeddings"] = ORIG
    if name == "longrope":
        sc.update(short_factor=[1.0] * (D // 2), long_factor=[1.0 + n / 8 for n in range(D // 2)])
    return sc


@pytest.mark.parametrize("name", sorted(ROPE_TYPES))
def test_each_type_is_one_entry(name):
    t, sc = ROPE_TYPES[name], example(name)
    assert set(t.defaults) <= set(t.params) and set(t.required) <= set(t.defaults)
    # rope_inv_freq is the registry's function, rounded to fp32 once
    inv, att = rope_inv_freq(D, BASE, sc, seq_len=4 * ORIG)
    expo = torch.arange(0, D, 2, dtype=torch.float64) / D
    raw, raw_att = t.inv_freq(RopeInputs(sc, BASE, D, expo, 4 * ORIG, None))
    assert inv.dtype == torch.float32 and inv.shape == (D // 2,) and torch.equal(inv, raw.to(torch.float32))
    assert att == raw_att and math.isfinite(att) and att > 0 and bool((inv > 0).all())
    # a default left out is the default (those the math needs named are filled in by configs and command lines)
    for key in set(t.defaults) - set(t.required):
        left_out = {k: v for k, v in sc.items() if k != key}
        given = rope_inv_freq(D, BASE, {**sc, key: t.defaults[key]}, seq_len=4 * ORIG)[0]
        assert torch.equal(rope_inv_freq(D, BASE, left_out, seq_len=4 * ORIG)[0], given), key
    assert filled_defaults(name) == {k: t.defaults[k] for k in t.required}
    # length dependence as declared: the model recomputes per length exactly for these types
    short, _ = rope_inv_freq(D, BASE, sc, seq_len=ORIG // 2)
    assert (not torch.equal(short, inv)) == t.varies_with_length
    assert RotaryEmbedding(D, BASE, sc, max_position_embeddings=ORIG).varies_with_length == t.varies_with_length
    # the config takes the type with the registry's defaults; the evaluation variants read its length dependence
    cfg = RopeScalingConfig(type=name)
    assert all(getattr(cfg, k) == v for k, v in t.defaults.items())
    assert parse_variant("plain", ORIG).per_length is False
    if name in ("dynamic", "linear", "ntk", "yarn", "llama3"):
        assert parse_variant(f"{name}:4" if name != "dynamic" else name, ORIG).per_length == t.varies_with_length
    # the Hugging Face mapping exports what transformers reads of it
    if t.in_transformers and name != "default":
        assert set(_HF_ROPE_KEYS[name]) <= set(t.params)


def test_one_default_per_parameter():
    seen = {}
    for t in ROPE_TYPES.values():
        for key, value in t.defaults.items():
            assert seen.setdefault(key, value) == value, key
    assert seen == PARAM_DEFAULTS
    fields = RopeScalingConfig.model_fields
    assert all(fields[k].default == v for k, v in PARAM_DEFAULTS.items())


def test_transformers_knows_the_types_it_is_said_to():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name, t in ROPE_TYPES.items():
        if name == "default":  # transformers computes it outside that table in some versions
            continue
        assert (name in ROPE_INIT_FUNCTIONS) == t.in_transformers, name


def test_config_round_trip_keeps_what_the_math_needs():
    for name in ROPE_TYPES:
        m = ModelConfig(hidden_size=128, num_attention_heads=2, rope_scaling=example(name) | {"type": name})
        scaling = m.effective_rope_scaling()
        if name == "default":
            assert scaling is None
            continue
        assert all(scaling[k] == v for k, v in filled_defaults(name).items())
        rope_inv_freq(D, BASE, scaling, max_position_embeddings=ORIG)  # accepted as written
