"""Launcher parsing and layout checks (pure, no processes)."""

import pytest

from spindle.config import validate_config
from spindle.errors import SpindleError
from spindle.parallel.dims import ParallelDims
from spindle.parallel.mesh import first_slurm_host, launcher_env
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
        ParallelDims.plan(c.parallel, c.model, world)
    assert message in str(e.value)


def test_layout_sizes_and_stages():
    c = cfg(tensor=2, pipeline=2, zero1=2)
    d = ParallelDims.plan(c.parallel, c.model, 8)
    assert (d.dp, d.pp, d.tp) == (2, 2, 2)
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stages_of_rank(1, 2, 2) == [1, 3]  # looped placement for the interleaved schedule


def test_last_pipeline_stage_runs_the_fused_loss_when_given_labels():
    """No (N, V) logits on the last stage: with labels it returns (loss_sum (1,), token_loss, correct),
    the same numbers as the whole model's fused loss; position info is consumed once per forward."""
    import torch

    from spindle.model.llama import build_model
    from spindle.parallel.pipeline import PipelineChunk, build_stage_model

    c = cfg()
    c.model.vocab_size = 96
    whole = build_model(c.model.to_args(), seed=c.trainer.seed)
    last = build_stage_model(c, stage=1, num_stages=2, device=torch.device("cpu"))
    chunk = PipelineChunk(last, label_smoothing=0.0)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        h = whole.tok_embeddings(ids)
        cos, sin, q_scale = whole.rotary(pos, None)
        from spindle.model.attention import dense_layout

        for k in ("0", "1"):
            h = whole.layers[k](h, cos, sin, q_scale, dense_layout(2, 16, h.device))
        expected = whole(ids, pos, None, labels=labels)
        chunk.set_micro_batches([(pos, None, labels), (pos, None, None)], first_step=False)
        loss_sum, token_loss, correct = chunk(h)
        logits = chunk(h)  # no labels listed for this micro-batch: logits as before
    assert loss_sum.shape == (1,) and token_loss.shape == (32,) and correct.dtype == torch.bool
    torch.testing.assert_close(loss_sum[0], expected.loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_loss, expected.token_loss, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 16, 96)
    chunk.check_consumed()
    with pytest.raises(RuntimeError, match="called 3 times for 2 micro-batches"):
        chunk(h)
