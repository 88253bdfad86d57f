"""Every parallel layout reproduces the single-process losses on the same global batch (gloo, torchrun).

The single-process reference takes micro_num * dp micro-batches per step: the global sampler hands
data-parallel rank r the r-th slice of the same consecutive packs, so both see identical data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed.marks import layouts, needs_pipeline_torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(Path(__file__).with_name("tiny.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.dist


def run(tmp_path: Path, name: str, nproc: int, overrides: list[str], timeout: int = 240) -> list[float]:
    return [r["loss"] for r in records(tmp_path, name, nproc, overrides, timeout)[0]]


def records(tmp_path: Path, name: str, nproc: int, overrides: list[str], timeout: int = 240) -> tuple[list, str]:
    """The run's metrics.jsonl records and its console output."""
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():  # bench/gpu.sh: NCCL, a GPU per rank
        pytest.skip(f"{name}: {nproc} processes, {torch.cuda.device_count()} GPUs")
    folder = tmp_path / name
    args = ["train.py", "--config", CONFIG, "--launcher", "torch", "--set", f"trainer.run_folder={folder}",
            *overrides]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lines = (folder / "tiny" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines], r.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), "single", 1, [])


LAYOUTS = {
    # name: (processes, overrides); data.micro_num is per data-parallel rank
    "dp2": (2, ["data.micro_num=4"]),
    "dp2_zero1": (2, ["data.micro_num=4", "parallel.zero1=-1"]),
    "fsdp2": (2, ["data.micro_num=4", "parallel.fsdp=True"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=True"]),
    "pp2_1f1b": (2, ["parallel.pipeline.size=2"]),
    "pp2_interleaved": (2, ["parallel.pipeline.size=2", "model.num_chunks=2"]),
    "pp2_gpipe": (2, ["parallel.pipeline.size=2", "parallel.pipeline.schedule=gpipe"]),
    "pp2_zero_bubble": (2, ["parallel.pipeline.size=2", "model.num_chunks=2", "parallel.pipeline.schedule=zero_bubble"]),
    "dp2_tp2": (4, ["data.micro_num=4", "parallel.tensor=2"]),
    "dp2_pp2": (4, ["data.micro_num=4", "parallel.pipeline.size=2"]),
    "cp2": (2, ["parallel.context=2"]),  # context parallel: each rank holds half of every sequence
    "dp2_cp2": (4, ["data.micro_num=4", "parallel.context=2"]),
    "cp2_tp2_sp": (4, ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=True"]),
    "cp2_tp2": (4, ["parallel.context=2", "parallel.tensor=2"]),
    "pp2_cp2": (4, ["parallel.pipeline.size=2", "parallel.context=2"]),
    # three-way, 8 processes: hybrid FSDP over (dp_replicate, dp_shard x cp) next to the tp DTensors
    "dp2_tp2_cp2": (8, ["data.micro_num=4", "parallel.tensor=2", "parallel.context=2"]),
    "tp2_pp2_cp2": (8, ["parallel.tensor=2", "parallel.pipeline.size=2", "parallel.context=2"]),
}


@pytest.mark.parametrize("name", layouts(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference, name):
    nproc, overrides = LAYOUTS[name]
    losses = run(tmp_path, name, nproc, overrides)
    assert len(losses) == len(reference) == 10
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(diffs) < 1e-4, f"{name}: {losses} vs {reference}"
    assert reference[-1] < reference[0]


@pytest.mark.parametrize("name, overrides", [
    ("micro_num_1", ["data.micro_num=1"]),  # fewer micro-batches than stages: 1F1B runs as GPipe
    ("rampup", ["data.micro_num=4", "data.rampup_batch_size=1 1 3"]),  # micro_num 1, 2, 3, 4 over the steps
])
@needs_pipeline_torch
def test_pipeline_takes_the_micro_batch_counts_internevo_accepts(tmp_path, name, overrides):
    single = run(tmp_path, f"{name}_single", 1, overrides)
    staged = run(tmp_path, f"{name}_pp2", 2, [*overrides, "parallel.pipeline.size=2"])
    assert len(staged) == len(single) == 10
    assert max(abs(a - b) for a, b in zip(staged, single)) < 1e-4, (staged, single)


def test_context_parallel_on_packed_rows_with_documents_across_the_rank_boundary(tmp_path):
    """Random document lengths (16 .. 512 tokens) packed into 32-token rows: documents start and end inside
    the rows, and under head-tail slicing (rank 0 holds tokens [0, 8) and [24, 32), rank 1 [8, 24)) they
    span both ranks. Two context ranks give the one-process losses."""
    import torch

    from spindle.config import load_config
    from spindle.data.loader import build_train_loader
    from spindle.parallel.context import balanced_indices

    packed = ["data.fixed_random_dataset_seqlen=False"]
    cfg = load_config(CONFIG, packed)
    loader = build_train_loader(cfg.data, cfg.model.vocab_size, tmp_path / "cache", prefetch=False)
    length = cfg.data.seq_len
    owner = torch.zeros(length, dtype=torch.long)
    owner[balanced_indices(1, 2, length)] = 1
    starts = crossing = 0
    for step in range(10):
        for b in loader.next_step(step):
            for row in b.position_ids:
                doc = torch.cumsum((row == 0).long(), 0)
                starts += int((row[1:] == 0).sum())  # a document begins inside the row
                # documents of this row with tokens on both ranks, one of them not the whole row
                crossing += sum(len(set(owner[doc == d].tolist())) == 2 and int((doc == d).sum()) < length
                                for d in doc.unique().tolist())
    loader.close()
    assert starts >= 10 and crossing >= 10, (starts, crossing)
    single = run(tmp_path, "packed_single", 1, packed)
    cp = run(tmp_path, "packed_cp2", 2, [*packed, "parallel.context=2"])
    assert len(cp) == len(single) == 10
    assert max(abs(a - b) for a, b in zip(cp, single)) < 1e-4, (cp, single)


@pytest.mark.parametrize("name, overrides", [
    ("dp2", ["data.micro_num=4"]),  # rank 0 evaluates the training model itself
    ("cp2", ["parallel.context=2"]),  # a plain copy (whole_model): the context-parallel kernel gathers
])
def test_long_context_metrics_under_two_ranks(tmp_path, name, overrides):
    (tmp_path / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    keys = ["data.valid_every=5", "model.vocab_size=258", "data.tokenizer_path=byte",
            f"long_eval={{'lengths': [32, 96], 'variants': ['plain', 'yarn'], 'data': ['{tmp_path / 'doc.txt'}'], "
            "'passkey_lengths': [256], 'passkey_depths': [0.5], 'passkey_samples': 1, 'chunk': 40}"]
    single, _ = records(tmp_path, "le_single", 1, keys)
    layout, stdout = records(tmp_path, f"le_{name}", 2, [*keys, *overrides])
    names = {"val/ppl@32", "val/ppl@96", "val/ppl@32/yarn", "val/ppl@96/yarn", "val/passkey@256",
             "val/passkey@256/yarn"}
    assert [sorted(names & set(r)) for r in layout] == [sorted(names) if r["step"] in (4, 9) else [] for r in layout]
    for a, b in zip(single, layout):
        for k in names & set(a):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (k, a[k], b[k])
    assert stdout.count("long-context eval after step") == 2  # rank 0 prints once per evaluation
