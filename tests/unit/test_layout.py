"""The one layout object (spindle/parallel/layout.py): every layout the run refuses, `--dry-run` refuses with the
same line, because both ask the same `Layout.plan`; and a layout, once built, cannot be changed."""

import dataclasses

import pytest

from helpers import tiny_config_text
from spindle.cli import main
from spindle.parallel.layout import Layout
from spindle.parallel.mesh import ParallelEnv

NPROC_HINT = " (--dry-run --nproc N plans for N processes)"  # where the process count decides

# (processes, config sections, the one line, whether the process count decides)
REFUSED = [
    (2, {"model": {"num_experts": 4, "mlp_bias": False, "num_layers": 2}, "parallel": {"pipeline": {"size": 2}}},
     "model.num_experts=4 with parallel.pipeline.size=2: mixture-of-experts models do not pipeline yet "
     "(docs/moe.md); use pipeline.size=1", False),
    (2, {"model": {"num_experts": 4, "mlp_bias": False}, "parallel": {"context": 2}},
     "model.num_experts=4 with parallel.context=2: mixture-of-experts models have no context parallelism yet "
     "(docs/moe.md); use context=1", False),
    (2, {"model": {"num_layers": 2, "tie_word_embeddings": True}, "parallel": {"pipeline": {"size": 2}}},
     "model.tie_word_embeddings cannot be used with pipeline parallelism (parallel.pipeline.size=2: the embedding "
     "and the head live on different stages)", False),
    (2, {"parallel": {"expert": 2, "zero1": -1}},
     "parallel.expert.size=2 needs a mixture-of-experts model (model.num_experts > 0)", False),
    (4, {"model": {"num_experts": 4, "mlp_bias": False}, "parallel": {"expert": 4, "zero1": -1, "tensor": 2}},
     "parallel.expert.size=4 must divide the data-parallel size 2: the experts are split over data-parallel ranks",
     True),
    (2, {"model": {"num_experts": 3, "top_k": 1, "norm_topk_prob": False, "mlp_bias": False},
         "parallel": {"expert": 2, "zero1": -1}},
     "parallel.expert.size=2 must divide model.num_experts (3)", False),
    (2, {"model": {"num_experts": 4, "mlp_bias": False}, "parallel": {"expert": -1, "zero1": 1}},
     "parallel.expert.size=-1 needs parameters sharded over every data-parallel rank: parallel.zero1=-1 or "
     "parallel.fsdp=True (this layout has zero1=1)", False),
    (4, {"model": {"num_experts": 4, "mlp_bias": False},
         "parallel": {"expert": {"size": 2, "no_tp": False}, "zero1": -1, "tensor": 2}},
     "parallel.expert.no_tp=False: experts split by tensor parallelism are not built; with tensor parallelism the "
     "experts stay whole on every tensor rank (no_tp=True)", False),
    (2, {"parallel": {"tensor": {"size": 4}}},
     "parallel: world size 2 is not divisible by tensor (4) x pipeline (1)", True),
    (4, {"parallel": {"tensor": {"size": 4}}},
     "parallel.tensor.size=4 must divide model.num_attention_heads (4) and the KV heads (2)", False),
    (2, {"model": {"num_layers": 3}, "parallel": {"pipeline": {"size": 2}}},
     "model.num_layers (3) is not divisible by pipeline.size (2) x model.num_chunks (1)", False),
    (2, {"parallel": {"zero1": 4}},
     "parallel.zero1=4 does not divide the data-parallel size 2 (world 2 / tensor 1 / pipeline 1)", True),
    (2, {"data": {"seq_len": 6}, "parallel": {"context": 2}},
     "data.seq_len (6) must be divisible by 2 x parallel.context (4): context parallelism gives every rank two "
     "chunks of each row (head and tail)", False),
]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("spindle: error:")]


@pytest.mark.parametrize("world, sections, line, with_world", REFUSED, ids=[r[2][:40] for r in REFUSED])
def test_the_run_and_the_dry_run_refuse_a_layout_with_the_same_line(tmp_path, monkeypatch, capsys, world, sections,
                                                                    line, with_world):
    """The run is `spindle train` in this process; for more than one process `init_distributed` is replaced by
    the launch it would return (rank 0 of `world`, no process group): the layout is refused before any
    collective, so no group is needed to reach the refusal."""
    config = tmp_path / "job.py"
    config.write_text(tiny_config_text(tmp_path / "runs", **sections))
    if world > 1:
        monkeypatch.setattr("spindle.parallel.mesh.init_distributed",
                            lambda *args, **kwargs: ParallelEnv(rank=0, world_size=world))
    assert main(["train", "--config", str(config)]) == 2
    run = error_lines(capsys.readouterr().err)
    assert main(["train", "--config", str(config), "--dry-run", "--nproc", str(world)]) == 2
    dry = error_lines(capsys.readouterr().err)
    assert run == [f"spindle: error: {line}"]
    assert dry == [f"spindle: error: {line}" + (NPROC_HINT if with_world else "")]
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_a_layout_is_frozen_and_one_process_by_default():
    layout = Layout()
    assert (layout.world, layout.dp, layout.tp, layout.pp, layout.cp, layout.is_main, layout.distributed) == \
        (1, 1, 1, 1, 1, True, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.dp = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelEnv().world_size = 2
