"""`spindle eval tasks --ckpt ... --tasks ...`: lm-evaluation-harness tasks on a checkpoint, scores printed.

A thin wrapper over `lm_eval.simple_evaluate` with the `spindle` model (spindle/eval/harness.py); every
other lm-eval option stays on lm-eval's own command line (`python -m spindle.eval.harness run ...`).
Tasks are looked up in --include-path first and in lm-eval's own tasks only when one is not there
(indexing lm-eval's thousands of task files takes a while).
"""

from __future__ import annotations

import argparse
import json
import os

from spindle.cli import options
from spindle.errors import SpindleError
from spindle.eval.lm_tasks import EVAL_TASKS, task_manager
from spindle.extras import require



def add_parser(sub) -> None:
    t = sub.add_parser("tasks", help="lm-evaluation-harness tasks on the checkpoint (pip install 'spindle[eval]')")
    t.add_argument("--ckpt", required=True, type=options.path,
                   help="a checkpoint folder (a step folder, a save folder, .../latest) or a HF / InternEvo folder")
    t.add_argument("--tasks", required=True, help="comma list of lm-eval task names (glob patterns allowed)")
    t.add_argument("--include-path", default=None, type=options.path,
                   help="a folder of task YAML files of your own (lm-eval's --include_path)")
    t.add_argument("--model-args", default="",
                   help="more model_args of the spindle model, k=v,...: rope, max_length, train_len, dtype, tokenizer, "
                        "max_gen_toks")
    t.add_argument("--num-fewshot", type=options.int_in(0, 1000), default=None)
    t.add_argument("--limit", type=options.float_in(0, 1e9, lo_open=True), default=None,
                   help="at most this many samples per task (a fraction below 1)")
    t.add_argument("--batch-size", type=options.int_in(1, 4096), default=1)
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA where there is one)")
    t.add_argument("--out", default=None, type=options.path, help="also write lm-eval's results JSON to this new file")
    t.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    import spindle.eval.harness  # noqa: F401  (registers the spindle model; one line when lm-eval is missing)
    simple_evaluate = require("lm_eval", "eval", EVAL_TASKS).simple_evaluate
    make_table = require("lm_eval.utils", "eval", EVAL_TASKS).make_table

    from spindle.fileio import write_atomic

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise SpindleError("--tasks: expected at least one task name")
    if "," in args.ckpt or "=" in args.ckpt:  # lm-eval's model_args are k=v,k=v
        raise SpindleError(f"--ckpt {args.ckpt}: a path with ',' or '=' cannot pass through lm-eval's model_args")
    if args.out is not None and os.path.lexists(args.out):
        raise SpindleError(f"--out {args.out}: already exists (nothing a user saved is overwritten)")
    # what can be checked before lm-eval indexes its ~15,000 tasks (about 40 s here) is checked first
    from spindle.checkpoint.discovery import is_remote, resolve, strip_prefix
    from spindle.eval.load import foreign_kind

    if not is_remote(args.ckpt) and not os.path.isdir(strip_prefix(args.ckpt)):
        raise SpindleError(f"--ckpt {args.ckpt}: no such folder (a Spindle checkpoint folder, a Hugging Face or "
                           "InternEvo folder)")
    if foreign_kind(args.ckpt) is None:
        resolve(args.ckpt)  # one line when the folder holds no Spindle checkpoint
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise SpindleError(f"--include-path {args.include_path}: no such folder (lm-eval task YAML files)")
    model_args = ",".join(a for a in (f"ckpt={args.ckpt}", args.model_args.strip(" ,")) if a)
    results = simple_evaluate(model="spindle", model_args=model_args, tasks=names, num_fewshot=args.num_fewshot,
                              limit=args.limit, batch_size=args.batch_size, device=args.device,
                              task_manager=task_manager(names, args.include_path))
    if results is None:  # a rank other than 0 under torchrun: rank 0 prints
        return 0
    print(make_table(results))
    if args.out is not None:
        write_atomic(args.out, json.dumps(results, indent=1, default=str).encode())
        print(f"wrote {args.out}")
    return 0
