"""Run several jobs in one launch: `torchrun --nproc_per_node=N train_many.py PLAN.json` (or plain `python
train_many.py PLAN.json` for one process, without a process group, as `python train.py` runs).

A process start-up with torch costs about 5 s per rank on the 2-core CI machine, and most layout tests train
for less than that: one launch per world size runs every training (and every script of this folder) of that
size in turn. Each training is `spindle train` as the seed's `train.py` calls it; its device mesh is built
from its own config, only the process group (started by the first job) is kept between jobs.

PLAN.json: {"out": FOLDER, "jobs": [{"name": ..., "train": [ARGV...]} | {"name": ..., "script": MODULE,
"args": [...]}]}. Each rank writes FOLDER/NAME.rank{r}.out / .err (its stdout and stderr, at the file
descriptor level) and FOLDER/NAME.rank{r}.rc (the exit code). A job that raises, or ends with another exit
code on some rank than on rank 0, ends the launch: the process group could no longer be trusted (a rank left
waiting in a collective the others never enter), and the jobs after it have no .rc file.
"""

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

import spindle.parallel.mesh as mesh
from spindle.cli import main


def run_job(job: dict) -> int:
    if "train" in job:
        return main(["train", *job["train"]])
    importlib.import_module(job["script"]).run(*job.get("args", ()))
    return 0


def redirected(path: Path, fd: int):
    """Point file descriptor `fd` at `path`; returns the saved descriptor to restore it with."""
    saved = os.dup(fd)
    with open(path, "w") as f:
        os.dup2(f.fileno(), fd)
    return saved


def main_many(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    out = Path(plan["out"])
    rank = int(os.environ.get("RANK", "0"))
    end_group = mesh.shutdown
    mesh.shutdown = lambda: None  # `spindle train` ends the process group when it returns: kept for the next job
    sync = None
    if "RANK" in os.environ:  # started as the jobs would start it; a group of its own to compare exit codes on
        mesh.init_distributed("torch")
        sync = dist.new_group(backend="gloo")
    for job in plan["jobs"]:
        name = job["name"]
        sys.stdout.flush(), sys.stderr.flush()
        saved = [redirected(out / f"{name}.rank{rank}.out", 1), redirected(out / f"{name}.rank{rank}.err", 2)]
        failed = False
        try:
            rc = run_job(job)
        except BaseException:  # noqa: BLE001 - reported in the job's .err, then the launch ends
            traceback.print_exc()
            rc, failed = 1, True
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        (out / f"{name}.rank{rank}.rc").write_text(str(rc))
        if failed:
            os._exit(1)  # torchrun stops the other ranks instead of letting them wait for this one
        if sync is not None:  # every rank done with this job, and with the same code, before the next
            codes = [None] * dist.get_world_size()
            dist.all_gather_object(codes, rc, group=sync)
            if len(set(codes)) > 1:
                print(f"train_many: {name} ended with exit codes {codes} on ranks 0..: stopping", file=sys.stderr)
                os._exit(1)
    end_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts of this folder
    main_many(sys.argv[1])
