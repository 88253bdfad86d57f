"""Launcher parsing and layout checks (pure, no processes)."""

import pytest

from spindle.config import validate_config
from spindle.errors import SpindleError
from spindle.parallel.mesh import check_layout, first_slurm_host, launcher_env
from spindle.parallel.pipeline import split_layers, stages_of_rank


def cfg(**parallel):
    return validate_config({"parallel": parallel, "model": {"hidden_size": 64, "num_attention_heads": 4,
                                                            "num_kv_attention_heads": 2, "num_layers": 4}})


def test_slurm_nodelist():
    assert first_slurm_host("node[03-05,09],gpu1") == "node03"
    assert first_slurm_host("host-a,host-b") == "host-a"
    assert first_slurm_host("gpu[7]") == "gpu7"


def test_slurm_env(monkeypatch):
    for k, v in {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                 "SLURM_JOB_NODELIST": "sh-idc[10-11]"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    env = launcher_env("slurm", 8888)
    assert env == {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "sh-idc10", "MASTER_PORT": "8888"}
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(SpindleError, match="SLURM_PROCID is not set"):
        launcher_env("slurm", None)


@pytest.mark.parametrize("world, parallel, message", [
    (6, {"tensor": 4}, "world size 6 is not divisible by tensor (4) x pipeline (1)"),
    (8, {"tensor": 8}, "parallel.tensor.size=8 must divide model.num_attention_heads (4) and the KV heads (2)"),
    (8, {"tensor": 4}, "must divide model.num_attention_heads (4) and the KV heads (2)"),
    (6, {"pipeline": 3}, "model.num_layers (4) is not divisible by pipeline.size (3)"),
    (8, {"zero1": 3}, "parallel.zero1=3 does not divide the data-parallel size 8"),
])
def test_layout_errors(world, parallel, message):
    c = cfg(**parallel)
    with pytest.raises(SpindleError) as e:
        check_layout(c.parallel, c.model, world)
    assert message in str(e.value)


def test_layout_sizes_and_stages():
    c = cfg(tensor=2, pipeline=2, zero1=2)
    assert check_layout(c.parallel, c.model, 8) == (2, 2, 2)
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stages_of_rank(1, 2, 2) == [1, 3]  # looped placement for the interleaved schedule
