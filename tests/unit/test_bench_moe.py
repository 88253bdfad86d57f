"""`spindle bench moe`: its dense model has the MoE model's active parameters, and its all-to-all count against
a routing known in advance (the run on the tiny shape: tests/e2e/test_moe_train.py)."""

import torch

from spindle.benchmarks.bench_moe import all_to_all_bytes, bench_config
from spindle.model.flops import parameter_counts
from spindle.model.moe import MoEFeedForward


def test_the_dense_model_has_the_moe_models_active_parameters(tmp_path):
    moe, dense = (parameter_counts(bench_config("small", m, str(tmp_path)).model) for m in (True, False))
    router = 256 * 8  # hidden x experts: all the MoE model adds per layer
    assert moe["active"] - dense["active"] == 4 * router and moe["total"] > 3 * moe["active"] / 2


def test_all_to_all_counts_the_assignments_of_the_other_rank():
    cfg = bench_config("tiny", True, "/tmp").model
    block = MoEFeedForward(cfg.to_args())
    with torch.no_grad():  # on positive inputs every token picks experts 0 and 1, both on rank 0
        block.gate.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -1.0])[:, None].expand(4, 32))
    x = torch.rand(4, 8, 32) + 0.1
    counted = all_to_all_bytes([(block, x)])["per_layer"][0]
    # rows 2 and 3 are rank 1's: each of their 8 tokens sends its 2 assignments to rank 0 and gets them back
    assert counted == {"assignments": 4 * 8 * 2, "remote": 2 * 8 * 2, "forward_bytes": 2 * (2 * 8 * 2) * 32 * 4}
