"""Seed-compatible entry point: `python train.py --config CONFIG --launcher torch|slurm`.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --config ./configs/7B_sft.py --launcher torch
    srun -p PART -N 2 -n 16 --ntasks-per-node=8 python train.py --config ./configs/7B_sft.py --launcher slurm

Same job as `spindle train`; InternEvo's default launcher is slurm, ours is whatever environment
is present (torchrun's variables, else a single process).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing
    from spindle.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
