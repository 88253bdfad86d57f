"""MoE training-step benchmark: a mixture-of-experts step against a dense model of the same active parameters.

    spindle bench moe [--quick] [--shape small|tiny] [--rounds N] [--threads 2] [--out runs/bench_moe.json]

Both models are Spindle's, trained by the real `Trainer.train_step` (forward, loss, backward, clipping,
AdamW; the MoE step adds its balance loss and routing statistics), fp32 on the CPU, on the same seeded
batch. The dense model's SwiGLU is top_k x the expert width, so a token passes through the same
parameters (the MoE model adds only its router, E x hidden) and the same matmul FLOPs. Paired rounds, the
order alternating, so host drift cancels in the ratio. Reported:

- step time of each (median, min), tokens/s, and the paired ratio MoE / dense (target on CPU: <= 1.5);
- the router's share of the MoE step: each MoE layer's router (gate matmul, scores, top-k, the sort by
  expert, the balance loss, forward and backward) timed on its own, on the hidden states the step's
  forward gave that layer, summed over the layers, over the step's median time;
- the all-to-all bytes one step would move under expert parallelism over 2 ranks, from the real routing of
  the batch (its first half of the rows on rank 0, the second on rank 1; rank r holds experts
  [r E / 2, (r + 1) E / 2)): every (token, slot) assignment whose expert lives on the other rank sends its
  hidden state there (dispatch) and back (combine), hidden x 4 bytes (fp32) each way; the backward sends
  the same again in reverse, so a training step moves 2 x the forward's bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

logger = logging.getLogger(__name__)

SHAPES = {
    # name: hidden, layers, heads, vocab, seq, micro_bsz, experts, top_k, expert width
    "small": (256, 4, 4, 4096, 256, 4, 8, 2, 256),
    "tiny": (32, 2, 4, 256, 16, 2, 4, 2, 16),  # tests only
}


def bench_config(shape: str, moe: bool, run_folder: str):
    """A Trainer config of `shape`: the MoE model, or the dense one of the same active parameters."""
    from spindle.config import validate_config

    h, layers, heads, vocab, seq, bsz, experts, top_k, width = SHAPES[shape]
    model = {"hidden_size": h, "num_layers": layers, "num_attention_heads": heads, "vocab_size": vocab,
             "max_position_embeddings": seq, "dtype": "torch.float32", "multiple_of": 16}
    if moe:
        model |= {"num_experts": experts, "top_k": top_k, "moe_intermediate_size": width}
    else:  # the dense SwiGLU a token's top_k experts add up to (multiple_of 16 keeps it exact)
        model |= {"mlp_ratio": top_k * width / h}
    raw = {
        "JOB_NAME": f"bench_moe_{shape}_{'moe' if moe else 'dense'}",
        "data": {"type": "dummy", "seq_len": seq, "micro_bsz": bsz, "micro_num": 1, "total_steps": 1000},
        "model": model,
        "adam": {"lr": 1e-4, "weight_decay": 0.0},
        "lr_scheduler": {"warmup_ratio": 0.0, "total_steps": 1000},
        "ckpt": {"enable_save_ckpt": False},
        "trainer": {"run_folder": run_folder, "tensorboard": False, "jsonl": False, "progress_bar": False,
                    "seed": 0, "device": "cpu"},
    }
    return validate_config(raw)


def seeded_batch(shape: str):
    from spindle.data.batch import Batch

    _, _, _, vocab, seq, bsz, *_ = SHAPES[shape]
    ids = torch.randint(0, vocab, (bsz, seq + 1), generator=torch.Generator().manual_seed(0))
    return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.arange(seq).expand(bsz, seq).contiguous(),
                 torch.zeros(bsz, seq, dtype=torch.long))


def layer_inputs(model, batch) -> list[tuple[object, torch.Tensor]]:
    """(MoE block, the hidden states it received) for each MoE layer, from one forward of `batch`."""
    from spindle.model.moe import MoEFeedForward

    seen, hooks = [], []
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            hooks.append(module.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].detach()))))
    try:
        with torch.no_grad():
            model(batch.input_ids, batch.position_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def router_seconds(block, x: torch.Tensor, repeats: int = 5) -> float:
    """Median time of one MoE layer's router, forward and backward, on its input `x` (B, L, H)."""
    from spindle.model.moe import plan_by_expert, route
    from spindle.model.moe_balance import expert_load

    times = []
    for _ in range(repeats):
        inp = x.detach().requires_grad_(True)
        t = time.perf_counter()
        flat = inp.reshape(-1, inp.shape[-1])
        routing = route(block.gate(flat), block.top_k, block.score, block.norm_topk_prob, block.score_bias)
        plan_by_expert(routing.experts, routing.weights, None, block.num_experts)
        expert_load(routing.experts, block.num_experts)
        aux = block.balance_loss(routing, inp.shape[0])
        (routing.weights.sum() + (aux if aux is not None else 0.0)).backward()
        times.append(time.perf_counter() - t)
        block.gate.weight.grad = None
    return statistics.median(times)


def all_to_all_bytes(inputs, ranks: int = 2, element_bytes: int = 4) -> dict:
    """The hidden states expert parallelism over `ranks` ranks would send for this routing (see the module
    docstring): per MoE layer and in all, forward (dispatch + combine) and per training step (x 2)."""
    from spindle.model.moe import route

    per_layer = []
    for block, x in inputs:
        b, _, h = x.shape
        with torch.no_grad():
            experts = route(block.gate(x.reshape(-1, h)), block.top_k, block.score, block.norm_topk_prob,
                            block.score_bias).experts.reshape(b, -1)  # (rows, tokens x slots)
        owner = experts // (block.num_experts // ranks)  # the rank holding each assignment's expert
        token_rank = (torch.arange(b) * ranks // b)[:, None]  # rows split evenly over the ranks
        remote = int((owner != token_rank).sum())
        per_layer.append({"assignments": experts.numel(), "remote": remote,
                          "forward_bytes": 2 * remote * h * element_bytes})
    forward = sum(layer["forward_bytes"] for layer in per_layer)
    return {"ranks": ranks, "element_bytes": element_bytes, "per_layer": per_layer, "forward_bytes": forward,
            "step_bytes": 2 * forward}


def run(shape: str, rounds: int, run_folder: str) -> dict:
    from spindle.logs import quiet
    from spindle.model.flops import parameter_counts
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.host import cpu_training_mode
    from spindle.train.trainer import Trainer

    batch = seeded_batch(shape)
    with quiet():  # the trainers' start-up lines are not the benchmark's output
        trainers = {name: Trainer(bench_config(shape, name == "moe", run_folder), ParallelEnv())
                    for name in ("moe", "dense")}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    with contextlib.ExitStack() as host_mode:
        host_mode.enter_context(cpu_training_mode())  # as Trainer.fit runs, for both alike
        for name, tr in trainers.items():  # warm-up
            losses[name].append(tr.train_step([batch])["loss"])
        for r in range(rounds):
            for name in (("moe", "dense") if r % 2 == 0 else ("dense", "moe")):
                t = time.perf_counter()
                losses[name].append(trainers[name].train_step([batch])["loss"])
                times[name].append(time.perf_counter() - t)
            logger.info(f"[{shape}] round {r + 1}/{rounds}: moe {times['moe'][-1] * 1e3:.0f} ms, dense "
                        f"{times['dense'][-1] * 1e3:.0f} ms; load {os.getloadavg()[0]:.2f}")
        moe_model = trainers["moe"].raw_model
        inputs = layer_inputs(moe_model, batch)
        router = sum(router_seconds(block, x) for block, x in inputs)
    tokens = batch.input_ids.numel()
    ratios = [m / d for m, d in zip(times["moe"], times["dense"])]
    counts = {}
    for name, tr in trainers.items():
        c = parameter_counts(tr.cfg.model)
        counts[name] = {"total": c["total"], "active": c["active"], "flops_per_token": tr.flops_per_token}
    moe_median = statistics.median(times["moe"])
    return {
        "shape": shape, "dims": dict(zip(("hidden", "layers", "heads", "vocab", "seq", "micro_bsz", "experts",
                                          "top_k", "expert_width"), SHAPES[shape])),
        "parameters": counts, "tokens_per_step": tokens, "rounds": rounds,
        "step_s": {name: {"median": statistics.median(ts), "min": min(ts)} for name, ts in times.items()},
        "tokens_per_s": {name: tokens / statistics.median(ts) for name, ts in times.items()},
        "ratio_moe_over_dense": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "router_s": router, "router_share": router / moe_median,
        "all_to_all_ep2": all_to_all_bytes(inputs),
        "loss_first_last": {name: [ls[0], ls[-1]] for name, ls in losses.items()},
    }


def format_report(out: dict, meta: dict) -> str:
    d, p, a2a = out["dims"], out["parameters"], out["all_to_all_ep2"]
    ratio = out["ratio_moe_over_dense"]
    return "\n".join([
        f"# bench moe — {meta['date']}, {meta['machine']}, torch {meta['torch']}, threads {meta['threads']}, "
        f"{out['rounds']} rounds",
        f"shape {out['shape']}: hidden {d['hidden']}, {d['layers']} layers, vocab {d['vocab']}, "
        f"{d['micro_bsz']} x {d['seq']} tokens; MoE {d['experts']} experts top {d['top_k']} of width "
        f"{d['expert_width']} vs dense SwiGLU {d['top_k'] * d['expert_width']}",
        f"parameters: MoE {p['moe']['total']:,} total, {p['moe']['active']:,} active; dense {p['dense']['total']:,}; "
        f"FLOPs/token {p['moe']['flops_per_token'] / 1e6:.2f} M vs {p['dense']['flops_per_token'] / 1e6:.2f} M",
        "| model | step ms median (min) | tokens/s |", "|---|---|---|",
        *[f"| {name} | {s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}) | {out['tokens_per_s'][name]:,.0f} |"
          for name, s in out["step_s"].items()],
        f"MoE / dense step time, paired: median {ratio['median']:.2f} (min {ratio['min']:.2f}, max {ratio['max']:.2f});"
        f" target <= 1.5: {'met' if ratio['median'] <= 1.5 else 'NOT met'}",
        f"router (gate, scores, top-k, sort, balance loss; forward + backward): {out['router_s'] * 1e3:.1f} ms, "
        f"{out['router_share']:.1%} of the MoE step",
        f"all-to-all under EP2 (real routing of the batch): {sum(x['remote'] for x in a2a['per_layer']):,} of "
        f"{sum(x['assignments'] for x in a2a['per_layer']):,} assignments cross ranks; "
        f"{a2a['forward_bytes'] / 2**20:.2f} MiB forward (dispatch + combine), {a2a['step_bytes'] / 2**20:.2f} MiB "
        f"per training step",
    ])


def main(argv=None) -> int:
    from spindle.cli import options

    ap = options.OneLineParser(prog="spindle bench moe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--rounds", type=options.int_in(1, 1000), default=None)
    ap.add_argument("--threads", type=options.int_in(1, 4096), default=2)
    ap.add_argument("--out", default="runs/bench_moe.json")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 8)
    torch.set_num_threads(args.threads)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {platform.machine()} "
            f"{os.cpu_count()} cpus", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_before": [round(x, 2) for x in os.getloadavg()], "argv": list(argv or sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        out = run(args.shape, rounds, tmp)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(format_report(out, meta))
    if args.out:
        from spindle.fileio import write_atomic

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_atomic(args.out, json.dumps({"meta": meta, "result": out}, indent=1).encode())
    return 0


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
