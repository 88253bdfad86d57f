"""`spindle bench moe` on its tiny shape (no timing assertions: that it runs and what it counts), and its
all-to-all count against a routing known in advance."""

import json

import pytest

import torch

from spindle.benchmarks.bench_moe import all_to_all_bytes, bench_config
from spindle.cli.bench import main as bench_main
from spindle.model.flops import parameter_counts
from spindle.model.moe import MoEFeedForward


def test_the_dense_model_has_the_moe_models_active_parameters(tmp_path):
    moe, dense = (parameter_counts(bench_config("small", m, str(tmp_path)).model) for m in (True, False))
    router = 256 * 8  # hidden x experts: all the MoE model adds per layer
    assert moe["active"] - dense["active"] == 4 * router and moe["total"] > 3 * moe["active"] / 2


@pytest.mark.slow  # about 7 s: two Trainers and the CPU peak probe
def test_tiny_run_reports_ratio_router_share_and_ep2_bytes(tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert bench_main(["moe", "--shape", "tiny", "--rounds", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MoE / dense step time, paired: median" in printed and "of the MoE step" in printed
    result = json.loads(out.read_text())["result"]
    assert set(result["step_s"]) == {"moe", "dense"} and 0 < result["router_share"] < 1
    a2a = result["all_to_all_ep2"]
    assert len(a2a["per_layer"]) == 2 and a2a["step_bytes"] == 2 * a2a["forward_bytes"] > 0
    for layer in a2a["per_layer"]:
        assert layer["assignments"] == 2 * 16 * 2 and 0 < layer["remote"] < layer["assignments"]
        assert layer["forward_bytes"] == 2 * layer["remote"] * 32 * 4


def test_all_to_all_counts_the_assignments_of_the_other_rank():
    cfg = bench_config("tiny", True, "/tmp").model
    block = MoEFeedForward(cfg.to_args())
    with torch.no_grad():  # on positive inputs every token picks experts 0 and 1, both on rank 0
        block.gate.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -1.0])[:, None].expand(4, 32))
    x = torch.rand(4, 8, 32) + 0.1
    counted = all_to_all_bytes([(block, x)])["per_layer"][0]
    # rows 2 and 3 are rank 1's: each of their 8 tokens sends its 2 assignments to rank 0 and gets them back
    assert counted == {"assignments": 4 * 8 * 2, "remote": 2 * 8 * 2, "forward_bytes": 2 * (2 * 8 * 2) * 32 * 4}
