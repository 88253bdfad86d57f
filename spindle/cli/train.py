"""`spindle train` (and the seed's `python train.py`): load the config, start the process group, train,
end with a sample."""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from spindle.cli import options, print_redacted
from spindle.cli.options import OneLineParser, int_in
from spindle.errors import SpindleError
from spindle.logs import logging_to

logger = logging.getLogger(__name__)

# the embedded default, shipped inside the package (configs/demo.py in a checkout links to it)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.py"
# the process that started this one (torchrun's agent, slurmstepd), read when the command is chosen, before
# the config loads: a launcher that dies after this is noticed (LauncherWatch), even before the watch is armed
PARENT_AT_START = os.getppid()

def add_train_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=None, type=options.path,
                    help="Python config file (default: the embedded demo, configs/demo.py)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",  # repeatable: all apply
                    help="override keys, e.g. data.micro_bsz=4")
    ap.add_argument("--dry-run", action="store_true", help="print size, FLOPs and memory estimates, then exit")
    ap.add_argument("--nproc", type=options.int_in(1, 1 << 20), default=None,
                    help="with --dry-run: the number of processes to plan for (default: this launch's)")
    ap.add_argument("--launcher", choices=["torch", "slurm"], default=None)
    ap.add_argument("--port", type=int_in(1, 65535), default=None, help="rendezvous port (MASTER_PORT)")
    ap.add_argument("--seed", type=int_in(0, 2**32 - 1), default=None, help="overrides trainer.seed")
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


def dry_run_report(cfg, world: int) -> str:
    """What a run of `cfg` on `world` processes would be; the layout errors of the real run (one `Layout.plan`)."""
    from spindle.model.flops import internevo_flops_per_step, model_flops_per_token, parameter_counts
    from spindle.parallel.dims import memory_estimate
    from spindle.parallel.layout import Layout

    dims = Layout.plan(cfg.parallel, cfg.model, world, cfg.data.seq_len)
    counts = parameter_counts(cfg.model)
    d, m = cfg.data, cfg.model
    tokens_per_rank = d.micro_num * d.micro_bsz * d.seq_len
    mem = memory_estimate(cfg, world)
    gib = 1024**3
    lines = [
        f"config: {cfg.JOB_NAME} (model_type {cfg.model_type}, dtype {m.dtype})",
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"(kv {m.kv_heads}), head_dim {m.head_dim}, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}",
        f"parameters: {counts['total']:,} ({counts['total'] / 1e9:.2f} B; non-embedding {counts['non_embedding']:,})",
        *moe_plan_lines(m, counts),
        f"FLOPs per token: {model_flops_per_token(m, d.seq_len) / 1e9:.2f} GFLOP (model FLOPs, 6N + 12 L h s"
        + (", N the active parameters" if m.num_experts else "") + "); "
        f"InternEvo formula: {internevo_flops_per_step(m, d.seq_len, 1) / d.seq_len / 1e9:.2f} GFLOP",
        f"layout for {world} process(es): data {dims.dp} x context {dims.cp} x pipeline {dims.pp} x tensor {dims.tp}; "
        + (f"FSDP ({'full' if dims.fsdp else 'ZeRO-1/2-like'}) over groups of {dims.shard * dims.cp}"
           if dims.shard * dims.cp > 1 else "no sharding")
        + (f"; experts split over {dims.ep} data-parallel ranks" if dims.ep > 1 else ""),
        f"tokens per step: {tokens_per_rank:,} per data-parallel rank x {dims.dp} = {tokens_per_rank * dims.dp:,} "
        f"(micro_num {d.micro_num} x micro_bsz {d.micro_bsz} x seq_len {d.seq_len})",
        f"memory estimate per device: weights {mem['weights'] / gib:.1f} GiB, "
        f"grads {mem['grads'] / gib:.1f} GiB, optimizer {mem['optimizer'] / gib:.1f} GiB, "
        f"activations {mem['activations'] / gib:.1f} GiB, logits {mem['logits'] / gib:.1f} GiB, "
        f"total {mem['total'] / gib:.1f} GiB",
    ]
    return "\n".join(lines)


def moe_plan_lines(m, counts: dict) -> list[str]:
    """A mixture-of-experts model's line: its experts and the parameters one token passes through; none when dense."""
    if not m.num_experts:
        return []
    shared = f" + {m.num_shared_experts} shared" if m.num_shared_experts else ""
    return [f"experts: {counts['moe_layers']} of {m.num_layers} layers MoE, {m.num_experts} experts{shared}, top "
            f"{m.top_k}, expert width {m.moe_intermediate_size or m.ffn_hidden_size}; active parameters per token "
            f"{counts['active']:,} ({counts['active'] / 1e9:.2f} B, {counts['active'] / counts['total']:.1%} of the "
            f"total; routed experts hold {counts['experts']:,})"]


def compat_line(cfg) -> Optional[str]:
    notes = cfg._compat_notes
    return ("config: accepted for compatibility, no effect here or mapped: " + "; ".join(notes)) if notes else None


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.dry_run:
        from spindle.parallel.launch import chosen_launcher_env

        world = args.nproc or int(chosen_launcher_env(args.launcher, args.port).get("WORLD_SIZE", 1))
        from spindle.interop.hf_start import model_from_hf_folder

        cfg = model_from_hf_folder(cfg)  # the model a start from a Hugging Face folder trains (as Trainer does)
        if compat_line(cfg):
            print(compat_line(cfg))
        from spindle.parallel.layout import LayoutError

        try:
            report = dry_run_report(cfg, world)
        except LayoutError as exc:  # the run's line; where the process count decides, how to plan another
            if exc.with_world:
                raise SpindleError(f"{exc} (--dry-run --nproc N plans for N processes)") from None
            raise
        print(report)
        return 0
    import torch

    from spindle.parallel.launch import LauncherWatch, chosen_launcher_env, started_by_launcher
    from spindle.parallel.mesh import init_distributed, leave_together, peer_failure, shutdown

    timeout_s = cfg.parallel.timeout_s
    rank = int(chosen_launcher_env(args.launcher, args.port).get("RANK", 0))  # checks every launch value
    watch = LauncherWatch(PARENT_AT_START, rank)
    if started_by_launcher(args.launcher):
        watch.arm()
    # Flush denormals before any parallel CPU work: OpenMP worker threads take the floating-point
    # mode of the thread that starts them, and `Trainer.fit()`'s own setting reaches only the main
    # thread. Without it the demo's step went from 0.24 s to 0.45 s after ~60 steps (docs/LOG.md).
    # No effect on GPU kernels. Switched back (for this thread) when the command returns.
    torch.set_flush_denormal(True)
    try:
        env = init_distributed(args.launcher, args.backend, args.port, cfg.trainer.device, timeout_s)
        try:
            return _train(cfg, env, time.perf_counter())
        except SpindleError:
            leave_together()
            raise
        except RuntimeError as exc:  # a collective that another rank left waiting or hung up on
            lost = peer_failure(exc, env.rank, timeout_s) if env.distributed else None
            if lost is None:
                raise
            raise lost from None
        finally:
            shutdown()
    finally:
        torch.set_flush_denormal(False)
        watch.disarm()


def _train(cfg, env, t0: float) -> int:
    with logging_to(env.rank, console=print_redacted):  # the rank as the process group has it
        return _train_on_rank(cfg, env, t0)


def _train_on_rank(cfg, env, t0: float) -> int:
    from spindle.train.trainer import Trainer

    from spindle.hardware import resolve_model_dtype

    log = logger.info  # rank 0's console (spindle.logs)
    log(f"spindle: job {cfg.JOB_NAME}, run folder {cfg.run_dir}, world size {env.world_size}, "
        f"device {env.device}")
    cfg.model.dtype, note = resolve_model_dtype(cfg.model.dtype, "dtype" in cfg.model.model_fields_set, env.device)
    if note:
        log(f"config: {note}")
    if compat_line(cfg):
        log(compat_line(cfg))
    trainer = Trainer(cfg, env)
    cfg = trainer.cfg  # with the model a Hugging Face folder completed
    active = ""
    if cfg.model.num_experts:  # a mixture of experts: what one token passes through, what MFU counts
        from spindle.model.flops import parameter_counts

        active = f" ({parameter_counts(cfg.model)['active']:,} active per token)"
    log(f"model: {trainer.n_params:,} parameters{active}; MFU peak {trainer.peak:.3g} TFLOP/s ({trainer.peak_source})")
    result = trainer.fit()
    hist = result["history"]
    if env.is_main and hist:
        log(f"done: {result['steps']} steps in {time.perf_counter() - t0:.1f} s; "
            + loss_summary(hist, byte_level=cfg.data.tokenizer_path == "byte")
            + (f"; checkpoint saved at step {result['saved_at']} in {trainer.save_dir}" if result["saved_at"] else ""))
    if cfg.trainer.sample_prompt is not None and cfg.trainer.sample_tokens:
        from spindle.parallel.gather import whole_model

        model = whole_model(trainer.raw_model, cfg.model.to_args(), trainer.layout)  # collective under a layout
        if model is not None:
            print_sample(model.eval(), cfg, trainer.tokenizer)
    return 0


def loss_summary(history: list[dict], byte_level: bool) -> str:
    """The run's losses in nats per token (first step, last, mean of the last 20) and the last held-out
    validation losses; with the byte-level tokenizer a token is a byte, so bits per byte too."""
    def both(nats: float) -> str:
        return f"{nats:.4f} nats ({nats / math.log(2):.3f} bits/byte)" if byte_level else f"{nats:.4f}"

    tail = [h["loss"] for h in history[-20:]]
    text = (f"training loss {history[0]['loss']:.4f} at the first step, {history[-1]['loss']:.4f} at the last, "
            f"{both(sum(tail) / len(tail))} averaged over the last {len(tail)}")
    last_valid = next((h for h in reversed(history) if any(k.startswith("val/") for k in h)), None)
    if last_valid is not None:
        text += "; held-out loss after step {} ".format(last_valid["step"]) + ", ".join(
            f"{k[4:-5]} {both(v)}" for k, v in last_valid.items() if k.startswith("val/") and k.endswith("_loss"))
    return text


def print_sample(model, cfg, tokenizer=None) -> None:
    """`tokenizer`: the run's (spindle.data.tokenizer_identity.Recorded), else data.tokenizer_path's."""
    from spindle.data.tokenizer import load_tokenizer
    from spindle.data.tokenizer_identity import recorded_spec
    from spindle.eval.generate import complete_text

    t = cfg.trainer
    tok = load_tokenizer(recorded_spec(tokenizer) if tokenizer else cfg.data.tokenizer_path or "default")
    how = f"temperature {t.sample_temperature}, top-p {t.sample_top_p}" if t.sample_temperature > 0 else "greedy"
    print(f"sample ({how}, {t.sample_tokens} tokens; trainer.sample_temperature / sample_top_p set it):")
    print(t.sample_prompt, end="", flush=True)
    complete_text(model, tok, t.sample_prompt, t.sample_tokens, stream=lambda piece: print(piece, end="", flush=True),
                  temperature=t.sample_temperature, top_p=t.sample_top_p, seed=t.seed)
    print()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = OneLineParser(prog="spindle train", description="Train (default: the embedded demo config).")
    add_train_args(ap)
    return run_train(ap.parse_args(argv))
