"""`spindle` command line: one subcommand per job, each a thin call into the library.

    spindle train [--config FILE] [--set KEY=VALUE ...] [--dry-run] [--launcher torch|slurm]
    spindle prepare INPUTS... --out DIR [--tokenizer default|PATH]
    spindle tokenizer train FILES... --vocab-size N --out DIR
    spindle rope --head-dim 128 --train-len 4096 [--tune-len N] [--target-len N]
    spindle generate --ckpt DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]

Bad input prints one line naming what is wrong and exits with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from spindle.errors import SpindleError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.py"


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun: RANK, Slurm: SLURM_PROCID), 0 alone."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def guarded(fn: Callable[[], int], debug: bool) -> int:
    """Run `fn`; a SpindleError becomes one line on stderr and exit code 2 (traceback with --debug).
    Under a launcher every rank meets the same bad input, so rank 0 alone says it."""
    try:
        return fn()
    except SpindleError as exc:
        if debug:
            raise
        if launch_rank() == 0:
            print(f"spindle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spindle: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- train


def add_train_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=None, help="Python config file (default: the embedded demo, configs/demo.py)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override keys, e.g. data.micro_bsz=4")
    ap.add_argument("--dry-run", action="store_true", help="print size, FLOPs and memory estimates, then exit")
    ap.add_argument("--launcher", choices=["torch", "slurm"], default=None)
    ap.add_argument("--port", type=int, default=None, help="rendezvous port (MASTER_PORT)")
    ap.add_argument("--seed", type=int, default=None, help="overrides trainer.seed")
    ap.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on GPUs, gloo on CPU")
    ap.add_argument("--profiling", action="store_true", help="accepted for InternEvo compatibility (no effect yet)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")


def resolve_config(args: argparse.Namespace):
    from spindle.config import load_config

    path = args.config
    if path is None:
        if not DEMO_CONFIG.is_file():
            raise SpindleError(f"no --config given and the embedded demo config is missing: {DEMO_CONFIG}")
        path = DEMO_CONFIG
    overrides = list(args.set)
    if args.seed is not None:
        overrides.append(f"trainer.seed={args.seed}")
    return load_config(path, overrides)


def dry_run_report(cfg) -> str:
    from spindle.model.flops import internevo_flops_per_step, memory_estimate, model_flops_per_token, \
        parameter_counts

    world = int(os.environ.get("WORLD_SIZE", "1"))
    counts = parameter_counts(cfg.model)
    d = cfg.data
    tokens_per_rank = d.micro_num * d.micro_bsz * d.seq_len
    par = cfg.parallel
    dp = max(1, world // (par.tensor.size * par.pipeline.size))
    mem = memory_estimate(cfg, world)
    gib = 1024**3
    m = cfg.model
    lines = [
        f"config: {cfg.JOB_NAME} (model_type {cfg.model_type}, dtype {m.dtype})",
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"(kv {m.kv_heads}), head_dim {m.head_dim}, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}",
        f"parameters: {counts['total']:,} ({counts['total'] / 1e9:.2f} B; non-embedding {counts['non_embedding']:,})",
        f"FLOPs per token: {model_flops_per_token(m, d.seq_len) / 1e9:.2f} GFLOP (model FLOPs, 6N + 12 L h s); "
        f"InternEvo formula: {internevo_flops_per_step(m, d.seq_len, 1) / d.seq_len / 1e9:.2f} GFLOP",
        f"tokens per step: {tokens_per_rank:,} per data-parallel rank x {dp} = {tokens_per_rank * dp:,} "
        f"(micro_num {d.micro_num} x micro_bsz {d.micro_bsz} x seq_len {d.seq_len})",
        f"memory estimate per device (world {world}, tp {par.tensor.size}, pp {par.pipeline.size}, "
        f"zero1 {par.zero1.size}, fsdp {par.fsdp}): weights {mem['weights'] / gib:.1f} GiB, "
        f"grads {mem['grads'] / gib:.1f} GiB, optimizer {mem['optimizer'] / gib:.1f} GiB, "
        f"activations {mem['activations'] / gib:.1f} GiB, logits {mem['logits'] / gib:.1f} GiB, "
        f"total {mem['total'] / gib:.1f} GiB",
    ]
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.dry_run:
        print(dry_run_report(cfg))
        return 0
    import torch

    from spindle.parallel.mesh import init_distributed, leave_together, shutdown

    # Flush denormals before any parallel CPU work: OpenMP worker threads take the floating-point
    # mode of the thread that starts them, and `Trainer.fit()`'s own setting reaches only the main
    # thread. Without it the demo's step went from 0.24 s to 0.45 s after ~60 steps (docs/LOG.md).
    # No effect on GPU kernels. Switched back (for this thread) when the command returns.
    torch.set_flush_denormal(True)
    env = init_distributed(args.launcher, args.backend, args.port, cfg.trainer.device)
    try:
        return _train(cfg, env, time.perf_counter())
    except SpindleError:
        leave_together()
        raise
    finally:
        shutdown()
        torch.set_flush_denormal(False)


def _train(cfg, env, t0: float) -> int:
    from spindle.train.trainer import Trainer

    log = functools.partial(print, flush=True) if env.is_main else (lambda *_: None)
    log(f"spindle: job {cfg.JOB_NAME}, run folder {cfg.run_dir}, world size {env.world_size}, "
        f"device {env.device}")
    trainer = Trainer(cfg, env, log=log)
    log(f"model: {trainer.n_params:,} parameters; MFU peak {trainer.peak:.3g} TFLOP/s ({trainer.peak_source})")
    result = trainer.fit()
    hist = result["history"]
    if env.is_main and hist:
        tail = [h["loss"] for h in hist[-20:]]
        log(f"done: {len(hist)} steps in {time.perf_counter() - t0:.1f} s; loss {hist[0]['loss']:.4f} at the first "
            f"step, {hist[-1]['loss']:.4f} at the last, {sum(tail) / len(tail):.4f} averaged over the last "
            f"{len(tail)}" + (f"; checkpoint saved at step {result['saved_at']} in {trainer.save_dir}"
                              if result["saved_at"] else ""))
        if cfg.trainer.sample_prompt is not None and cfg.trainer.sample_tokens:
            print_sample(trainer, cfg)
    return 0


def print_sample(trainer, cfg) -> None:
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.generate import complete_text

    tok = load_tokenizer(cfg.data.tokenizer_path or "default")
    print(f"sample (greedy, {cfg.trainer.sample_tokens} tokens):")
    print(cfg.trainer.sample_prompt, end="", flush=True)
    complete_text(trainer.raw_model, tok, cfg.trainer.sample_prompt, cfg.trainer.sample_tokens,
                  stream=lambda piece: print(piece, end="", flush=True))
    print()


# ----------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace) -> int:
    from spindle.eval.load import load_model_for_eval
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.generate import complete_text

    model, cfg = load_model_for_eval(args.ckpt, rope_scaling=args.rope_scaling, device=args.device)
    tok = load_tokenizer(args.tokenizer or cfg.data.tokenizer_path or "default")
    print(args.prompt, end="", flush=True)
    complete_text(model, tok, args.prompt, args.max_new_tokens, stream=lambda p: print(p, end="", flush=True),
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print()
    return 0


# ----------------------------------------------------------------------------- main


# subcommand -> (module, function(argv) -> exit code); imported only when used, so `spindle --help` is fast
SUBCOMMANDS = {
    "prepare": ("spindle.data.prepare", "prepare_main"),
    "tokenizer": ("spindle.data.tokenizer", "tokenizer_main"),
    "rope": ("spindle.ropelaws", "rope_main"),
    "bench": ("spindle.bench", "bench_main"),
    "convert": ("spindle.checkpoint.hf", "convert_main"),
    "eval": ("spindle.eval.perplexity", "eval_main"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # subcommands implemented with their own argparse live next to their code
    if argv and argv[0] in SUBCOMMANDS:
        module, function = SUBCOMMANDS[argv[0]]
        entry = getattr(importlib.import_module(module), function)
        return guarded(lambda: entry(argv[1:]), debug)

    ap = argparse.ArgumentParser(prog="spindle", description="PyTorch-native LLM pre-training and fine-tuning.")
    sub = ap.add_subparsers(dest="command")
    add_train_args(sub.add_parser("train", help="train (default: the embedded demo)"))
    sub.add_parser("prepare", help="tokenize raw text into binary shards (spindle prepare -h)")
    sub.add_parser("tokenizer", help="train a tokenizer (spindle tokenizer train -h)")
    sub.add_parser("rope", help="RoPE scaling-law calculator (spindle rope -h)")
    sub.add_parser("bench", help="benchmarks: train, data, memory, gpu (spindle bench -h)")
    sub.add_parser("convert", help="checkpoint <-> Hugging Face Llama (spindle convert -h)")
    sub.add_parser("eval", help="long-context evaluation: ppl, passkey (spindle eval -h)")
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--ckpt", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rope-scaling", default=None, help="none | dynamic | ntk:FACTOR | linear:FACTOR | yarn:FACTOR")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--debug", action="store_true")
    if not argv:
        argv = ["train"]
    args = ap.parse_args(argv)
    if args.command == "train":
        return guarded(lambda: run_train(args), args.debug)
    if args.command == "generate":
        return guarded(lambda: run_generate(args), args.debug)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
