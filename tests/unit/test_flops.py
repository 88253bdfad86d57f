"""FLOP and parameter formulas against InternEvo's published 7B figures."""

import pytest

from spindle.errors import SpindleError

from spindle.config import load_config
from spindle.model.flops import internevo_flops_per_step, model_flops_per_token, parameter_counts
from spindle.parallel.dims import memory_estimate


def test_internevo_7b_flops_per_token():
    cfg = load_config("configs/7B_sft.py").model
    # reference/internevo.md §2: 44.41 GFLOP/token without checkpointing, 58.37 with it
    assert internevo_flops_per_step(cfg, 2048, 1) / 2048 / 1e9 == pytest.approx(44.41, abs=0.01)
    ck = cfg.model_copy(update={"checkpoint": True})
    assert internevo_flops_per_step(ck, 2048, 1) / 2048 / 1e9 == pytest.approx(58.37, abs=0.01)
    # their published table: TGS 4103 -> 182 TFLOPS (no ckpt); TGS 3314 -> 193 TFLOPS (ckpt)
    assert 4103 * internevo_flops_per_step(cfg, 2048, 1) / 2048 / 1e12 == pytest.approx(182.2, abs=0.5)
    assert 3314 * internevo_flops_per_step(ck, 2048, 1) / 2048 / 1e12 == pytest.approx(193.4, abs=0.5)
    # a fraction counts as full recompute there too
    assert internevo_flops_per_step(cfg.model_copy(update={"checkpoint": 0.2}), 2048, 1) == \
        internevo_flops_per_step(ck, 2048, 1)


def test_7b_parameter_count():
    counts = parameter_counts(load_config("configs/7B_sft.py").model)
    # 32 x (4 h^2 + 3 h 11008 + 2 h) + 2 V h + h
    h, v = 4096, 103168
    assert counts["total"] == 32 * (4 * h * h + 3 * h * 11008 + 2 * h) + 2 * v * h + h
    assert 7.0e9 < counts["total"] < 7.5e9


def test_model_flops_matches_cpu_baseline_convention():
    # reference/cpu-baselines.md: 10M model (d256, L8, 4 heads, ffn 688, vocab 8192, untied): 56.82 MFLOP/token
    from spindle.config import ModelConfig

    cfg = ModelConfig(hidden_size=256, num_layers=8, num_attention_heads=4, vocab_size=8192,
                      mlp_ratio=688 / 256, multiple_of=16)
    assert cfg.ffn_hidden_size == 688
    assert model_flops_per_token(cfg, 256) / 1e6 == pytest.approx(56.82, abs=0.01)


def test_memory_estimate_shards():
    cfg = load_config("configs/7B_sft.py")
    with pytest.raises(SpindleError, match="zero1=8 does not divide the data-parallel size 1"):
        memory_estimate(cfg, 1)  # the seed's zero1=8 needs 8 data-parallel ranks, as the real run does
    one = memory_estimate(load_config("configs/7B_sft.py", ["parallel.zero1=1"]), 8)
    eight = memory_estimate(cfg, 8)
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)  # zero1=8 over dp 8
    assert eight["weights"] == one["weights"]
    cp = memory_estimate(load_config("configs/7B_sft.py", ["parallel.context=2", "parallel.zero1=4"]), 8)
    assert cp["activations"] == pytest.approx(eight["activations"] / 2)  # half of every sequence per rank
    assert cp["optimizer"] == pytest.approx(eight["optimizer"])  # sharded over 4 data x 2 context ranks


def test_moe_counts_total_and_active_parameters():
    """A mixture of experts: total is what the built model holds, active what one token passes through, and the
    FLOPs per token count the active matrices only."""
    from spindle.config import ModelConfig
    from spindle.model.llama import build_model, count_parameters

    keys = dict(hidden_size=32, num_layers=3, num_attention_heads=4, vocab_size=64, multiple_of=16)
    moe = ModelConfig(**keys, num_experts=8, top_k=2, moe_intermediate_size=16, num_shared_experts=1,
                      shared_expert_gate=True, first_k_dense=1)
    counts = parameter_counts(moe)
    assert counts["total"] == count_parameters(build_model(moe.to_args(), "meta"))
    routed, layers = 3 * 32 * 16, 2  # one routed expert; the MoE layers (the first is dense)
    assert counts["experts"] == layers * 8 * routed and counts["moe_layers"] == layers
    assert counts["total"] - counts["active"] == layers * 6 * routed  # the 6 experts a token skips
    assert counts["moe_ffn"] == layers * (32 * 8 + 32 + 8 * routed + routed)  # router, shared gate, experts
    dense = parameter_counts(ModelConfig(**keys))
    assert counts["matmul"] - dense["matmul"] == layers * (32 * 8 + 32 + 2 * routed + routed - 3 * 32 * 96)
    assert model_flops_per_token(moe, 16) - model_flops_per_token(ModelConfig(**keys), 16) == \
        6.0 * (counts["matmul"] - dense["matmul"])


def test_moe_memory_splits_the_experts_over_expert_parallel_ranks():
    from spindle.config import validate_config

    def estimate(expert: int, **parallel):
        cfg = validate_config({"model": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
                                         "vocab_size": 128, "num_experts": 8, "moe_intermediate_size": 64},
                               "parallel": {"expert": expert, "zero1": -1, **parallel}})
        return memory_estimate(cfg, 4), parameter_counts(cfg.model)

    (one, counts), (four, _) = estimate(1), estimate(4)
    assert one["weights"] - four["weights"] == pytest.approx(counts["experts"] * 3 / 4 * 4)  # fp32 masters
    assert one["optimizer"] == four["optimizer"] == pytest.approx(counts["total"] * 8 / 4)
    fsdp_one, fsdp_four = estimate(1, fsdp=True)[0], estimate(4, fsdp=True)[0]
    assert fsdp_one["weights"] == fsdp_four["weights"] == pytest.approx(counts["total"] * 4 / 4)
