"""Gradient accumulation under FSDP2 reduces once per step (gloo, torchrun, a spy on FSDP2's collectives):
with zero1 (parameters kept gathered through backward) a step of 4 micro-batches does one all-gather and one
reduce-scatter per FSDP group, where synchronising every micro-batch did 4 of each, with the same gradients;
ZeRO-3 (zero1=dict(fsdp=True)) keeps its per-micro-batch reduce-scatters (sharded gradient memory)."""

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.runs("fsdp_collectives")]
MICRO = 4


@pytest.fixture(scope="module")
def counts(layout_runs):
    return layout_runs["fsdp_collectives"].output()  # fsdp_collectives.py, in the launch of 2 processes


def same_gradients(result):
    for name, g in result["grads"]["every_micro_batch"].items():
        torch.testing.assert_close(result["grads"]["gradient_sync"][name], g, rtol=1e-5, atol=1e-6)


def test_zero1_step_gathers_and_reduces_once_per_group(counts):
    z = counts["zero1"]
    groups = z["groups"]
    assert groups == 3  # two blocks and the root
    assert z["calls"]["every_micro_batch"] == [{"all_gather": MICRO * groups,
                                               "reduce_scatter": MICRO * groups}]
    assert z["calls"]["gradient_sync"] == [{"all_gather": groups, "reduce_scatter": groups}] * 2
    same_gradients(z)


def test_zero3_keeps_reducing_every_micro_batch(counts):
    f = counts["fsdp"]
    assert [c["reduce_scatter"] for c in f["calls"]["gradient_sync"]] == [MICRO * f["groups"]] * 2
    same_gradients(f)
