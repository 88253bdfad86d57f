"""`spindle eval ppl`, `spindle eval passkey`, `spindle eval plot`: the options, their checks, where results go.

Every option is checked before a model is loaded: a bad one is one line naming it (SpindleError, exit 2).
Results are printed as a table; `--out DIR` also writes JSON + PNG there, and refuses a folder that
already holds anything unless `--overwrite` (which replaces only the files this command writes).
Without `--data`, `eval ppl` reads the checkpoint's own data: its validation folder, else the files it
trained on (chosen by the training rules: `data.text_glob`, `data.text_exclude`, `data.max_text_bytes`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from spindle.cli import options
from spindle.cli.options import OneLineParser, number_list
from spindle.errors import SpindleError
from spindle.outputs import StagedFolder, check_output, refuse_checkpoint

MAX_EVAL_LENGTH = 1 << 24  # 16M tokens: beyond any model this evaluates; memory is checked per model too


def _number(kind, low: float, high: float = math.inf, what: str = ""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (low <= value <= high) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what or f'>= {low}'}")
        return value

    return parse


def _length(text: str) -> int:
    try:  # 4096, 4e3 and 4096.0 are lengths; 4096.5 is not
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not value.is_integer() or not 2 <= value <= MAX_EVAL_LENGTH:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers of tokens in 2 .. {MAX_EVAL_LENGTH:,}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="spindle eval", description="long-context evaluation of a checkpoint")
    sub = ap.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, type=options.path,
                        help="checkpoint folder (a step folder or a ckpt/ folder)")
    common.add_argument("--variants", default="plain,dynamic,yarn,logn",
                        help="comma list: plain, dynamic, yarn, yarn:F, ntk:F, linear:F, logn, a+b")
    common.add_argument("--lengths", type=number_list(_length), default=None,
                        help="comma list of lengths (default: T_train x 1, 2, ... 64; passkey x 1 ... 16)")
    common.add_argument("--train-len", type=_number(int, 1, MAX_EVAL_LENGTH, f"1 .. {MAX_EVAL_LENGTH:,}"), default=None,
                        help="default: data.seq_len of the checkpoint")
    common.add_argument("--chunk", type=_number(int, 1, MAX_EVAL_LENGTH, f"1 .. {MAX_EVAL_LENGTH:,}"), default=1024,
                        help="prefill chunk: tokens per forward")
    common.add_argument("--tokenizer", default=None, type=options.path)
    common.add_argument("--out", default=None, type=options.path,
                        help="also write JSON + PNG into this folder (new or empty)")
    common.add_argument("--overwrite", action="store_true", help="let --out be a folder that holds files already")
    common.add_argument("--device", default="cpu")
    common.add_argument("--threads", type=_number(int, 1, os.cpu_count() or 1,
                                                  f"1 .. {os.cpu_count() or 1} (the cores here)"), default=None)
    common.add_argument("--debug", action="store_true")
    p = sub.add_parser("ppl", parents=[common], help="per-position loss / perplexity per length")
    p.add_argument("--data", nargs="+", action="extend", default=None, type=options.path,
                   help="text files or folders (one document per file), or token shards "
                        "(default: the checkpoint's validation data or held-out files, else its training files)")
    p.add_argument("--glob", default="*", type=options.path, help="file pattern inside --data folders")
    p.add_argument("--windows", type=_number(int, 1, 100_000, "1 .. 100,000"), default=8,
                   help="number of evaluation windows (fewer when the data holds fewer: the first line says so)")
    p.add_argument("--windows-from", choices=["starts", "documents"], default="starts",
                   help="starts: the first L tokens of each document at least L long (the default); documents: "
                        "consecutive L-token pieces from inside every document, spread over all the data (at the "
                        "training length this is what validation evaluates)")
    p.add_argument("--batch", type=_number(int, 1, 1024, "1 .. 1,024"), default=1)
    k = sub.add_parser("passkey", parents=[common], help="passkey retrieval over a length x depth grid")
    k.add_argument("--depths", type=number_list(_number(float, 0.0, 1.0, "depths in [0, 1]")),
                   default=[0, 0.25, 0.5, 0.75, 1])
    k.add_argument("--samples", type=_number(int, 1, 10_000, "1 .. 10,000"), default=5,
                   help="samples per (length, depth) cell")
    k.add_argument("--seed", type=_number(int, 0, 2**32 - 1, "0 .. 4,294,967,295"), default=0)
    k.add_argument("--mode", choices=["generate", "teacher"], default="generate",
                   help="generate: greedy decoding, exact match; teacher: every key token is the argmax")
    pl = sub.add_parser("plot", help="the long-context metrics of a training run (long_eval keys) by step, as a PNG")
    pl.add_argument("run", metavar="RUN", type=options.path,
                    help="the run folder (holding metrics.jsonl), or the metrics.jsonl file")
    pl.add_argument("--out", default=None, type=options.path, help="the PNG to write (default: RUN/long_context.png)")
    pl.add_argument("--debug", action="store_true")
    from spindle.cli import eval_tasks

    eval_tasks.add_parser(sub)  # `spindle eval tasks`: lm-evaluation-harness tasks (spindle/cli/eval_tasks.py)
    return ap


def check_args(args: argparse.Namespace) -> list[str]:
    """What argparse cannot check: variants, device, glob, the output folder. Returns the variants."""
    from spindle.eval.perplexity import parse_variant

    variants = [v for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise SpindleError("--variants: expected at least one variant")
    for v in variants:
        parse_variant(v, 1)  # raises naming the variant
    check_device(args.device)
    if args.what == "ppl" and not args.glob:
        raise SpindleError("--glob: expected a file pattern such as '*.txt'")
    if args.out is not None:
        check_output(args.out, [], args.overwrite, "--out")
    return variants


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpindleError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpindleError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SpindleError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def write_outputs(out: Optional[str], name: str, result: dict, plot, overwrite: bool = False) -> list[Path]:
    """`name`.json and `name`.png into --out, published together (spindle/outputs.py): `--overwrite`
    replaces those two, every other file there is kept."""
    if out is None:
        return []
    mine = {f"{name}.json", f"{name}.png"}
    with StagedFolder(out, replaces=mine.__contains__, overwrite=overwrite, option="--out",
                      command=f"spindle eval {name}") as stage:
        Path(stage, f"{name}.json").write_text(json.dumps(result, indent=1))
        plot(result, Path(stage, f"{name}.png"))
    return [Path(out) / n for n in sorted(mine)]


def plot_run(run: str, out: Optional[str]) -> int:
    """`spindle eval plot RUN`: val/ppl@L and val/passkey@L of metrics.jsonl, one curve per step and variant."""
    from spindle.eval.curves import plot_curves, read_curves

    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = Path(out) if out else folder / "long_context.png"
    if path.suffix.lower() != ".png":
        raise SpindleError(f"--out {out}: expected a .png file name")
    if not path.parent.is_dir():
        raise SpindleError(f"--out {out}: the folder {path.parent} does not exist")
    refuse_checkpoint(str(path.parent), "--out")
    curves = read_curves(run)
    plot_curves(curves, path, title=f"{folder}: long-context metrics by training step")
    steps = sorted({s for kind in curves.values() for v in kind.values() for s in v})
    print(f"wrote {path} ({', '.join(k for k, v in curves.items() if v)} at steps {', '.join(map(str, steps))})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`spindle eval ppl ...` / `spindle eval passkey ...` / `spindle eval plot RUN`."""
    args = build_parser().parse_args(argv)
    if args.what == "plot":
        return plot_run(args.run, args.out)
    if args.what == "tasks":
        from spindle.cli.eval_tasks import run

        return run(args)
    variants = check_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what == "ppl":
        from spindle.eval.perplexity import format_table, plot_ppl, run_ppl

        res = run_ppl(args.ckpt, args.data, args.lengths, variants, args.windows, args.chunk, args.batch,
                      args.tokenizer, args.glob, args.train_len, args.device, windows_from=args.windows_from)
        print(format_table(res))
        written = write_outputs(args.out, "ppl", res, plot_ppl, args.overwrite)
    else:
        from spindle.eval.passkey import format_passkey_table, plot_passkey, run_passkey

        res = run_passkey(args.ckpt, args.lengths, args.depths, args.samples, variants, args.seed, args.mode,
                          args.chunk, args.tokenizer, args.train_len, args.device)
        print(format_passkey_table(res))
        written = write_outputs(args.out, "passkey", res, plot_passkey, args.overwrite)
    if written:
        print("wrote " + " and ".join(map(str, written)))
    return 0
