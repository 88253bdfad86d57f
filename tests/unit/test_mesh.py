"""Launcher parsing and layout checks (pure, no processes)."""

import pytest

from spindle.config import validate_config
from spindle.errors import SpindleError
from spindle.parallel.layout import Layout
from spindle.parallel.launch import first_slurm_host, launcher_env
from spindle.parallel.pipeline import split_layers, stages_of_rank


def cfg(**parallel):
    return validate_config({"parallel": parallel, "model": {"hidden_size": 64, "num_attention_heads": 4,
                                                            "num_kv_attention_heads": 2, "num_layers": 4}})


def test_slurm_nodelist():
    assert first_slurm_host("node[03-05,09],gpu1") == "node03"
    assert first_slurm_host("host-a,host-b") == "host-a"
    assert first_slurm_host("gpu[7]") == "gpu7"


@pytest.mark.parametrize("nodelist, first", [
    ("a[1-2]b", "a1b"),  # a suffix after the brackets (was 'a1')
    ("rack1-[3-4].cluster", "rack1-3.cluster"),  # a prefix ending in '-', a domain suffix (was 'rack1-3')
    ("node[003-010,12],gpu1", "node003"),  # zero-padding kept, a comma list inside and outside brackets
    ("r[2-3]n[07-08]", "r2n07"),  # several bracket groups: the first number of each
    ("r[9]n[5,1]-ib", "r9n5-ib"),  # listed order, not sorted
    ("gpu1,node[1-2]", "gpu1"),  # a plain first host
    (" host-a ", "host-a"),
])
def test_slurm_nodelist_first_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["[1-2]", "node[1-2", "node]1", "n[x-y]", "n[]", ",a", "n[1-2]]x"])
def test_slurm_nodelist_refused(nodelist):
    with pytest.raises(SpindleError, match="SLURM_JOB_NODELIST: cannot read a host from"):
        first_slurm_host(nodelist)


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
        Layout.plan(c.parallel, c.model, world, torch_version="2.13.0")  # layout arithmetic, any torch
    assert message in str(e.value)


def test_pipeline_refused_on_a_torch_whose_pipelining_cannot_run_spindles_stages():
    c = cfg(pipeline=2)
    with pytest.raises(SpindleError) as e:
        Layout.plan(c.parallel, c.model, 2, torch_version="2.11.0+cu130")  # the lent H200s' image
    assert str(e.value).startswith("parallel.pipeline.size=2 needs torch >= 2.13 (this is torch 2.11.0+cu130")
    assert Layout.plan(c.parallel, c.model, 2, torch_version="2.13.0+cpu").pp == 2
    assert Layout.plan(cfg(tensor=2).parallel, c.model, 2, torch_version="2.11.0").tp == 2  # only pipelines


def test_layout_sizes_and_stages():
    c = cfg(tensor=2, pipeline=2, zero1=2)
    d = Layout.plan(c.parallel, c.model, 8, torch_version="2.13.0")
    assert (d.dp, d.pp, d.tp) == (2, 2, 2)
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stages_of_rank(1, 2, 2) == [1, 3]  # looped placement for the interleaved schedule


def test_pipeline_stages_hand_positions_and_labels_on_and_the_last_runs_the_fused_loss():
    """What a stage needs travels through its own arguments: a middle stage returns (hidden, positions,
    labels) for the next; the last runs the fused head + loss (no (N, V) logits): (loss_sum (1,),
    token_loss, correct), the whole model's numbers; with a sharded vocabulary it returns logits."""
    import torch

    from spindle.model.llama import build_model
    from spindle.parallel.pipeline import PipelineStageModel, build_stage_model

    c = cfg()
    c.model.vocab_size = 96
    whole = build_model(c.model.to_args(), seed=c.trainer.seed)
    first = PipelineStageModel(build_stage_model(c, stage=0, num_stages=2, device=torch.device("cpu")))
    last = PipelineStageModel(build_stage_model(c, stage=1, num_stages=2, device=torch.device("cpu")))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    pos = torch.cat([torch.arange(10), torch.arange(6)]).expand(2, 16)  # two documents per row
    with torch.no_grad():
        expected = whole(ids, pos, labels=labels)
        h, pos_on, labels_on = first(ids, pos, labels)
        assert torch.equal(pos_on, pos) and torch.equal(labels_on, labels)
        loss_sum, token_loss, correct = last(h, pos_on, labels_on)
        logits = PipelineStageModel(last.model, fused=False)(h, pos_on, labels_on)
    assert loss_sum.shape == (1,) and token_loss.shape == (32,) and correct.dtype == torch.bool
    torch.testing.assert_close(loss_sum[0], expected.loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_loss, expected.token_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, expected.correct) and logits.shape == (2, 16, 96)


@pytest.fixture
def gpus(monkeypatch):
    """A node whose processes each see `n` CUDA devices (monkeypatched; no CUDA needed)."""
    import torch

    for var in ("CUDA_VISIBLE_DEVICES", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                "MASTER_PORT"):  # set first so that monkeypatch restores them (init_distributed exports them)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)

    def visible(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


@pytest.mark.parametrize("count, local, visible, expected", [
    (8, 3, None, 3),  # one node, every process sees all 8 devices
    (1, 3, "5", 0),  # srun --gpus-per-task=1: task 3 sees only its own device
    (2, 3, "6,7", 1),  # srun --gpus-per-task=2: its own pair
    (4, 2, "0,1,2,3", 2),
])
def test_cuda_device_of_a_local_rank(gpus, monkeypatch, count, local, visible, expected):
    import torch

    from spindle.parallel.mesh import cuda_device

    gpus(count)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert cuda_device(local) == torch.device("cuda", expected)


def test_more_local_ranks_than_devices_is_one_clear_error(gpus, monkeypatch):
    from spindle.parallel.mesh import cuda_device

    gpus(1)
    with pytest.raises(SpindleError, match="local rank 1 but this process sees 1 CUDA device.*CUDA_VISIBLE_DEVICES is "
                                           "not set"):
        cuda_device(1)
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: all its processes see the same devices
    with pytest.raises(SpindleError, match="4 processes on this node .* 2 visible CUDA device"):
        cuda_device(0)
    gpus(0)
    with pytest.raises(SpindleError, match="no CUDA device is visible"):
        cuda_device(0)


def test_slurm_task_with_one_visible_device_uses_cuda_0(gpus, monkeypatch):
    """srun with 4 tasks per node, each bound to one GPU: SLURM_LOCALID=3 used to become cuda:3."""
    import torch
    import torch.distributed as dist

    from spindle.parallel import mesh

    gpus(1)
    for k, v in {"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "n[1-2]",
                 "CUDA_VISIBLE_DEVICES": "3"}.items():
        monkeypatch.setenv(k, v)
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("pg", kw))
    monkeypatch.setattr(mesh, "check_rendezvous", lambda *a: None)  # n1 is no host here
    env = mesh.init_distributed("slurm", port=29999)
    assert env.device == calls["device"] == torch.device("cuda", 0)
    assert (env.rank, env.world_size, env.local_rank, calls["pg"]["backend"]) == (7, 8, 3, "nccl")


# ----------------------------------------------------------------------------- InternEvo's parallel keys


def test_zero1_fsdp_asks_for_full_sharding():
    from spindle.parallel.layout import Layout, full_sharding

    assert full_sharding(cfg(zero1=dict(fsdp=True)).parallel) and full_sharding(cfg(fsdp=True).parallel)
    assert not full_sharding(cfg(zero1=8).parallel)

    def shard(**kw):
        c = cfg(**kw)
        return Layout.plan(c.parallel, c.model, 4).shard

    assert shard(zero1=dict(size=2, fsdp=True)) == 4  # ZeRO-3 over all of dp
    assert shard(zero1=2) == 2  # hybrid: shards of 2, replicated twice
    assert shard(zero1=-1) == 4
