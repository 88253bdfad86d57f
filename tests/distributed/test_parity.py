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

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(Path(__file__).with_name("tiny.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.dist


def run(tmp_path: Path, name: str, nproc: int, overrides: list[str], timeout: int = 240) -> list[float]:
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
    return [json.loads(l)["loss"] for l in lines]


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


@pytest.mark.parametrize("name", list(LAYOUTS))
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
def test_pipeline_takes_the_micro_batch_counts_internevo_accepts(tmp_path, name, overrides):
    single = run(tmp_path, f"{name}_single", 1, overrides)
    staged = run(tmp_path, f"{name}_pp2", 2, [*overrides, "parallel.pipeline.size=2"])
    assert len(staged) == len(single) == 10
    assert max(abs(a - b) for a, b in zip(staged, single)) < 1e-4, (staged, single)
