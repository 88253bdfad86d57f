"""Every training and torchrun script the layout tests look at, run once per session in one launch per world
size (tests/distributed/train_many.py), and only those the selected tests declare (`@pytest.mark.runs(...)`).

Before: 49 launches of `train.py` / torchrun for tests/distributed (23 in test_parity.py alone, two of them
8 processes on 2 cores), each paying torch's start-up per rank, and the one-process reference trained again in
every module. Now a test asks `layout_runs["dp2"]`: the first request for a world size launches all the
wanted jobs of that size, in the order of JOBS; a job that resumes another's checkpoint (`after`) has that
job's world launched first and gets a copy of its checkpoint folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from distributed.family_matrix import LAYOUTS as FAMILY_LAYOUTS

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TINY = str(HERE / "tiny.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}


@dataclass(frozen=True)
class Job:
    world: int
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE of a training ({out}, {folder} and setup names filled in)
    config: str = TINY
    job_name: str = "tiny"  # the config's JOB_NAME: metrics.jsonl is in {folder}/{job_name}/
    script: str = ""  # instead of a training: a module of this folder whose run(*args) is called on every rank
    args: tuple[str, ...] = ()
    setup: str = ""  # files made once before the launch (SETUPS)
    after: str = ""  # a job whose checkpoint ({out}/{after}/ckpt) this one resumes from, in its own copy


M2 = "data.micro_num=2"  # per data-parallel rank: 2 ranks x 2 = tiny.py's 4
PP2, CP2, TP2, SP = ("parallel.pipeline.size=2", "parallel.context=2", "parallel.tensor=2",
                      "parallel.sequence_parallel=True")
# the parity layouts: data.micro_num is per data-parallel rank, so every layout sees the same global batch
LAYOUTS = {
    "dp2": Job(2, (M2,)),
    "dp2_zero1": Job(2, (M2, "parallel.zero1=-1")),
    "fsdp2": Job(2, (M2, "parallel.fsdp=True")),
    "tp2": Job(2, (TP2,)),
    "tp2_sp": Job(2, (TP2, SP)),
    "pp2_1f1b": Job(2, (PP2,)),
    "pp2_interleaved": Job(2, (PP2, "model.num_chunks=2")),
    "pp2_gpipe": Job(2, (PP2, "parallel.pipeline.schedule=gpipe")),
    "pp2_zero_bubble": Job(2, (PP2, "model.num_chunks=2", "parallel.pipeline.schedule=zero_bubble")),
    "cp2": Job(2, (CP2,)),  # context parallel: each rank holds half of every sequence
    "dp2_tp2": Job(4, (M2, TP2)),
    # 4 micro-batches a rank (against single_m8): with 2, as many as stages, the DDP stage fails in torch's
    # reducer ("rebuilt parameter indices size is not same", torch 2.13; docs/LOG.md)
    "dp2_pp2": Job(4, ("data.micro_num=4", PP2)),
    "dp2_cp2": Job(4, (M2, CP2)),
    "cp2_tp2_sp": Job(4, (CP2, TP2, SP)),
    "cp2_tp2": Job(4, (CP2, TP2)),
    "pp2_cp2": Job(4, (PP2, CP2)),
    # three-way, 8 processes (one launch for both): hybrid FSDP over (dp_replicate, dp_shard x cp) next to tp
    "dp2_tp2_cp2": Job(8, (M2, TP2, CP2)),
    "tp2_pp2_cp2": Job(8, (TP2, PP2, CP2)),
}
# mixture of experts (docs/moe.md): 4 experts of which each token takes 2, one gated shared expert, the first
# layer dense; every layout against the one-process run with dp x the micro-batches (MOE_LAYOUTS)
MOE = ("model.num_experts=4", "model.top_k=2", "model.moe_intermediate_size=48", "model.num_shared_experts=1",
       "model.shared_expert_gate=True", "model.first_k_dense=1", "model.z_loss_coeff=0.001")
CAPACITY = ("model.capacity_factor=1.0", "model.min_capacity=1")  # GShard's dropping, under expert parallelism
EP2, SHARDED = "parallel.expert=2", "parallel.zero1=-1"
# DeepSeek-V3's balancing: the bias moved by the step's load summed over ranks (every rank the same bias)
BIAS = ("model.bias_update_rate=0.01", "model.router_score=sigmoid", "model.aux_loss_per_sequence=True")
MOE_LAYOUTS = {
    # plain dp2, ep2 + ZeRO and tp2 + SP of the HF MoE families are in the family matrix (family_matrix.py)
    "moe_ep2_fsdp": ("moe_single", Job(2, (*MOE, M2, EP2, "parallel.fsdp=True"))),
    "moe_ep2_capacity": ("moe_capacity_single", Job(2, (*MOE, *CAPACITY, M2, EP2, SHARDED))),
    "moe_ep2_bias": ("moe_bias_single", Job(2, (*MOE, *BIAS, M2, EP2, SHARDED))),
    "moe_ep2_tp2": ("moe_single", Job(4, (*MOE, M2, EP2, SHARDED, TP2))),
    "moe_ep4": ("moe_single", Job(4, (*MOE, "data.micro_num=1", "parallel.expert=-1", SHARDED))),
}
# the one-process run each parity layout is compared with (default "single": the same global batch)
REFERENCE = {"dp2_pp2": "single_m8"}
LONG_EVAL = ("data.valid_every=5", "long_eval={'lengths': [32, 96], 'variants': ['plain', 'yarn'], "
             "'data': ['{le_doc}'], 'passkey_lengths': [256], 'passkey_depths': [0.5], 'passkey_samples': 1, "
             "'chunk': 40}")
PACKED = "data.fixed_random_dataset_seqlen=False"
PACKED_BATCH = "data.micro_num=8"  # enough packs that 10+ documents cross the rank boundary (test_parity)
RAMPUP = ("data.micro_num=4", "data.rampup_batch_size=1 1 3")  # micro_num 1, 2, 3, 4 over the steps
FP16, BF16 = (("model.dtype=torch.float16", "data.total_steps=3"),
              (M2, "model.dtype=torch.bfloat16", "data.total_steps=3"))
LR = "lr_scheduler.total_steps=10"
SAVE = ("ckpt.enable_save_ckpt=True", "ckpt.save_ckpt_folder=local:{folder}/ckpt", "ckpt.checkpoint_every=5", LR)
RESUME = ("ckpt.enable_save_ckpt=True", "ckpt.save_ckpt_folder=local:{folder}/ckpt", "ckpt.auto_resume=True", LR)
PPM = dict(config="{ppm_config}", job_name="ppm", setup="ppm")
SOURCES = ("hf:{sources}/qwen3", "internevo:{sources}/internevo/41")

JOBS = {
    "single": Job(1),  # the one-process reference of every tiny.py layout
    "single_m8": Job(1, ("data.micro_num=8",)),  # ... and of dp2_pp2's (REFERENCE)
    **LAYOUTS,
    "moe_single": Job(1, MOE),
    "moe_capacity_single": Job(1, (*MOE, *CAPACITY)),
    "moe_bias_single": Job(1, (*MOE, *BIAS)),
    **{name: job for name, (_, job) in MOE_LAYOUTS.items()},
    "micro_num_1_single": Job(1, ("data.micro_num=1",)),  # fewer micro-batches than stages: 1F1B runs as GPipe
    "micro_num_1_pp2": Job(2, ("data.micro_num=1", PP2)),
    "rampup_single": Job(1, RAMPUP),
    "rampup_pp2": Job(2, (*RAMPUP, PP2)),
    "packed_single": Job(1, (PACKED, PACKED_BATCH)),
    "packed_cp2": Job(2, (PACKED, PACKED_BATCH, CP2)),
    "le_single": Job(1, LONG_EVAL, setup="le_doc"),
    "le_dp2": Job(2, (*LONG_EVAL, M2), setup="le_doc"),  # rank 0 evaluates the training model itself
    "le_cp2": Job(2, (*LONG_EVAL, CP2), setup="le_doc"),  # a plain copy (whole_model): the CP kernel gathers
    "layout_error": Job(2, ("parallel.tensor=4",)),
    "fp16_single": Job(1, FP16),
    "fp16_tp2": Job(2, (TP2, *FP16)),
    "bf16_dp2": Job(2, BF16),
    "bf16_zero1": Job(2, (*BF16, "parallel.zero1=-1")),
    "reshard_dp2_tp2": Job(4, (M2, TP2, "data.total_steps=5", *SAVE)),
    "reshard_single": Job(1, RESUME, after="reshard_dp2_tp2"),
    "reshard_pp2": Job(2, (*RESUME, PP2), after="reshard_dp2_tp2"),
    "ppm_single": Job(1, **PPM),
    "ppm_pp2_1f1b": Job(2, (PP2,), **PPM),
    "ppm_pp2_interleaved": Job(2, (PP2, "model.num_chunks=2"), **PPM),
    "ppm_tp2_sp": Job(2, (TP2, SP), **PPM),
    "ppm_pp2_cp2": Job(4, (PP2, CP2), **PPM),
    # the same global batches as ppm_single (2 packs a step); validation split over the two ranks
    "ppm_dp2": Job(2, ("data.micro_num=1",), **PPM),
    "fsdp_collectives": Job(2, script="fsdp_collectives", args=("{folder}.pt",)),
    "precision_layouts": Job(2, script="precision_layouts", args=("{folder}.pt",)),
    "sharded_init": Job(2, script="sharded_init", args=("{folder}.pt",)),
    "load_sharded_tp": Job(2, script="load_sharded", args=("tp", "{folder}.pt", *SOURCES), setup="sources"),
    "load_sharded_fsdp": Job(1, script="load_sharded", args=("fsdp", "{folder}.pt", *SOURCES), setup="sources"),
    # the family x layout matrix (family_matrix.py): every family folder under every layout of a world size
    **{f"families_world{world}": Job(world, script="family_matrix", setup="families",
                                     args=(",".join(n for n, (w, _, _) in FAMILY_LAYOUTS.items() if w == world),
                                           "{families}", "{folder}.pt"))
       for world in sorted({w for w, _, _ in FAMILY_LAYOUTS.values()})},
}


class Result:
    """One job's exit code (rank 0's; every rank had it, or the launch stopped), its ranks' stdout and
    stderr in rank order (as torchrun interleaves them), and what it wrote."""

    def __init__(self, folder: Path, job: Job, rc, stdout: str, stderr: str):
        self.folder, self.job, self.rc, self.stdout, self.stderr = folder, job, rc, stdout, stderr

    def ok(self) -> "Result":
        assert self.rc == 0, f"{self.folder.name}: exit code {self.rc}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"
        return self

    @property
    def records(self) -> list[dict]:
        lines = (self.ok().folder / self.job.job_name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    def output(self):
        """What a script job saved on rank 0."""
        return torch.load(self.ok().folder.with_suffix(".pt"), weights_only=False)


class LayoutRuns:
    def __init__(self, out: Path, wanted: set[str]):
        unknown = wanted - set(JOBS)
        assert not unknown, f"@pytest.mark.runs names jobs that layout_runs.JOBS does not have: {sorted(unknown)}"
        self.out, self.wanted = out, set(wanted)
        self.wanted |= {JOBS[n].after for n in wanted if JOBS[n].after}
        self.places: dict[str, str] = {"out": str(out)}  # what {name} stands for in a job's arguments
        self.made: set[str] = set()  # SETUPS run so far
        self.done: dict[str, Result] = {}
        self.launched: dict[int, str] = {}  # world size -> "" once launched, or why its launch failed

    def __getitem__(self, name: str) -> Result:
        assert name in self.wanted, f"{name}: declare it with @pytest.mark.runs({name!r}) on the test"
        job = JOBS[name]
        for needed in (name, job.after) if job.after else (name,):
            if not runnable(JOBS[needed].world):  # bench/gpu.sh: a GPU per rank
                pytest.skip(f"{needed}: {JOBS[needed].world} processes, {torch.cuda.device_count()} GPUs")
        if job.after and job.after not in self.done:
            self[job.after]
        if job.world not in self.launched:
            try:
                self.launched[job.world] = ""
                self.launch(job.world)
            except Exception as exc:  # the tests of every job of this world say why, not only the first
                self.launched[job.world] = f"{type(exc).__name__}: {exc}"
                raise
        if self.launched[job.world]:
            pytest.fail(f"{name}: the launch of world {job.world} failed: {self.launched[job.world]}")
        return self.done[name]

    def launch(self, world: int) -> None:
        names = [n for n in JOBS if n in self.wanted and JOBS[n].world == world
                 and (not JOBS[n].after or runnable(JOBS[JOBS[n].after].world))]
        for n in names:  # a world's jobs that resume another world's checkpoint: that one first
            if JOBS[n].after and JOBS[n].after not in self.done:
                self[JOBS[n].after]
        jobs = []
        for n in names:
            job = JOBS[n]
            if job.setup and job.setup not in self.made:
                self.made.add(job.setup)
                self.places.update(SETUPS[job.setup](self.out / f"setup_{job.setup}"))
            places = {**self.places, "folder": str(self.out / n)}
            fill = lambda text: fill_in(text, places)  # noqa: E731
            if job.after:
                shutil.copytree(self.out / job.after / "ckpt", self.out / n / "ckpt")
            if job.script:
                jobs.append({"name": n, "script": job.script, "args": [fill(a) for a in job.args]})
            else:
                jobs.append({"name": n, "train": ["--config", fill(job.config), "--launcher", "torch",
                                                  "--set", f"trainer.run_folder={places['folder']}",
                                                  *map(fill, job.overrides)]})
        plan = self.out / f"world{world}.json"
        plan.write_text(json.dumps({"out": str(self.out), "jobs": jobs}))
        script = str(HERE / "train_many.py")
        cmd = [sys.executable, script, str(plan)] if world == 1 else \
            [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={world}",
             script, str(plan)]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120 + 120 * len(jobs))
        for n in names:
            ranks = range(world)
            rc = self.out / f"{n}.rank0.rc"
            read = lambda kind: "".join((self.out / f"{n}.rank{r}.{kind}").read_text()  # noqa: E731
                                        for r in ranks if (self.out / f"{n}.rank{r}.{kind}").is_file())
            stderr = read("err")
            if not rc.is_file():  # the launch stopped before or in this job
                stderr += f"\n[launch of world {world} exited {r.returncode}]\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            self.done[n] = Result(self.out / n, JOBS[n], int(rc.read_text()) if rc.is_file() else None,
                                  read("out"), stderr)


def runnable(world: int) -> bool:
    """On CUDA (bench/gpu.sh: NCCL, a GPU per rank) a world needs as many GPUs; on CPU any world runs."""
    return not torch.cuda.is_available() or world <= torch.cuda.device_count()


def fill_in(text: str, places: dict) -> str:
    """{name} -> places[name] for each name of `places` (not str.format: a --set value holds dict braces)."""
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def make_le_doc(folder: Path) -> dict:
    folder.mkdir(parents=True)
    (folder / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return {"le_doc": str(folder / "doc.txt")}


def make_ppm(folder: Path) -> dict:
    from distributed.layout_data import write_ppm_config

    return {"ppm_config": str(write_ppm_config(folder))}


def make_sources(folder: Path) -> dict:
    from distributed.layout_data import write_sources

    write_sources(folder)
    return {"sources": str(folder)}


def make_families(folder: Path) -> dict:
    from family_folders import write_family_folders

    write_family_folders(folder)
    return {"families": str(folder)}


SETUPS = {"le_doc": make_le_doc, "ppm": make_ppm, "sources": make_sources, "families": make_families}
