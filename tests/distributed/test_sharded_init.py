"""Start-up that scales (gloo, torchrun): the trainer's models are built on the meta device, sharded (FSDP2,
tensor parallelism, pipeline stages) and only then allocated and initialised, each rank its own shards, with
exactly the values of the whole model's per-name init."""

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.runs("sharded_init")]


@pytest.fixture(scope="module")
def layouts(layout_runs):
    return layout_runs["sharded_init"].output()  # sharded_init.py, in the launch of 2 processes


@pytest.mark.parametrize("name", ["fsdp", "tp", "tp_tied", "pp"])
def test_sharded_init_is_the_whole_init(layouts, name):
    result = layouts[name]
    assert set(result["params"]) == set(result["reference"])
    for key, value in result["reference"].items():
        assert torch.equal(result["params"][key], value), key


@pytest.mark.parametrize("name", ["fsdp", "tp", "tp_tied", "pp"])
def test_each_rank_allocates_about_half(layouts, name):
    """One allocation per rank, at the size of its shards: building the whole model first on every rank
    allocated all of it (29,632 elements here; tensor parallelism replicates the norms)."""
    total = sum(t.numel() for t in layouts[name]["reference"].values())
    for per_rank in layouts[name]["allocated"]:
        assert len(per_rank) == 1 and 0.45 * total < per_rank[0] < 0.55 * total, (per_rank, total)


def test_tied_head_is_still_the_embedding_under_tensor_parallelism(layouts):
    assert layouts["tp_tied"]["tied"] and layouts["tp_tied"]["tied_when_materialised_first"]
