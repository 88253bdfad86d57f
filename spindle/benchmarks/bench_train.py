"""Training-step benchmark: Spindle against transformers' Llama and a hand-written PyTorch Llama.

    spindle bench train [--quick] [--sizes 10M,24M,10M-s2048] [--rounds N]
        [--variants spindle,spindle_c,hf,hf_c,hand,hand_c] [--out runs/bench_train.json]
    spindle bench train [same flags]

What is timed, for every variant, is one whole training step on the same batch: forward + loss +
backward + AdamW step (+ zero_grad), fp32, `torch.set_num_threads(2)` (--threads), the same initial
weights (Spindle's seeded init copied into the others).

- spindle    the real `Trainer.train_step` of a `Trainer` built from a config (dummy data, no
             checkpoints): forward, `reduction="sum"` cross-entropy / N, backward, the per-source
             loss/accuracy statistics, gradient-norm clipping (1.0), foreach AdamW. It does more work
             than the baselines (clipping, statistics), which is counted against it.
- spindle_c  the same with `trainer.compile=True` (`apply_compile`: each block compiled).
- hf         `LlamaForCausalLM` (sdpa), `model(input_ids=x, labels=x, use_cache=False).loss`,
             backward, `torch.optim.AdamW` (default implementation), zero_grad.
- hf_c       `torch.compile(hf)` (whole model, default inductor mode).
- hand       a minimal Llama: fused qkv Linear, SDPA is_causal, hand RMSNorm, SwiGLU, rotate_half
             RoPE with precomputed cos/sin, `F.cross_entropy` outside the model; AdamW as hf.
- hand_c     `torch.compile(hand)`.

Schedule: each variant does 2 warm-up steps (compilation happens there; its cost is reported),
then R rounds; each round runs every variant once, in an order rotated by one each round, plus
3 fp32 2048^3 `torch.matmul`s (the peak). Reported: median and min step time, tokens/s, MFU
against the best matmul of the run and against the same round's matmul (median over rounds), and
paired ratios (same round, so host drift cancels). FLOPs/token = 6 N_matmul + 12 L d S
(`spindle.model.flops.model_flops_per_token`, the convention of reference/cpu-baselines.md).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spindle.benchmarks.hand_llama import HandLlama, load_hand_from_spindle  # noqa: E402
from spindle.errors import SpindleError  # noqa: E402
from spindle.extras import require  # noqa: E402

logger = logging.getLogger(__name__)

SIZES = {
    # name: (d, layers, heads, vocab, seq, batch)
    "10M": (256, 8, 4, 8192, 256, 8),
    "24M": (384, 10, 6, 8192, 256, 8),
    "10M-s2048": (256, 8, 4, 8192, 2048, 1),
    "tiny": (64, 2, 4, 256, 32, 2),  # tests only
}
ALL_VARIANTS = ("spindle", "spindle_c", "hf", "hf_c", "hand", "hand_c")
HF_BASELINE = "the transformers variants of spindle bench train (hf, hf_c)"
LR = 1e-4


# ----------------------------------------------------------------------------- variants


def spindle_config(size: str, compile: bool, run_folder: str):
    from spindle.config import validate_config

    d, layers, heads, vocab, seq, batch = SIZES[size]
    raw = {
        "JOB_NAME": f"bench_{size}{'_c' if compile else ''}",
        "data": {"type": "dummy", "seq_len": seq, "micro_bsz": batch, "micro_num": 1, "total_steps": 1000},
        "model": {"hidden_size": d, "num_attention_heads": heads, "num_kv_attention_heads": heads,
                  "num_layers": layers, "vocab_size": vocab, "mlp_ratio": 8 / 3, "multiple_of": 16,
                  "max_position_embeddings": seq, "dtype": "torch.float32", "rope_base": 10000},
        "adam": {"lr": LR, "weight_decay": 0.0},
        "lr_scheduler": {"warmup_ratio": 0.0, "total_steps": 1000},
        "ckpt": {"enable_save_ckpt": False},
        "trainer": {"run_folder": run_folder, "tensorboard": False, "jsonl": False, "progress_bar": False,
                    "seed": 0, "compile": compile, "device": "cpu"},
    }
    return validate_config(raw)


def make_batch(size: str, seed: int = 0):
    from spindle.data.batch import Batch

    d, layers, heads, vocab, seq, batch = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    return Batch(x, y, torch.arange(seq).expand(batch, seq).contiguous(), torch.zeros(batch, seq, dtype=torch.long))


class Variant:
    """name, a `step()` that runs one full training step, `loss_of_last` for the sanity check."""

    def __init__(self, name, step, model, logits_fn):
        self.name, self.step, self.model, self.logits_fn = name, step, model, logits_fn
        self.times: list[float] = []
        self.warmup_s = 0.0
        self.losses: list[float] = []


def build_variants(size: str, names, run_folder: str) -> tuple[list[Variant], dict]:
    from spindle.logs import quiet
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    batch = make_batch(size)
    x, y = batch.input_ids, batch.labels
    with quiet():  # the trainers' start-up lines (checkpoint: ...) are not the benchmark's output
        ref = Trainer(spindle_config(size, False, run_folder), ParallelEnv())
    ref_state = ref.raw_model.state_dict()
    mcfg = ref.cfg.model
    out: list[Variant] = []
    info = {"params": ref.n_params, "ffn": mcfg.ffn_hidden_size}

    for name in names:
        if name in ("spindle", "spindle_c"):
            with quiet():
                tr = ref if name == "spindle" else Trainer(spindle_config(size, True, run_folder), ParallelEnv())
            with torch.no_grad():  # compiled blocks rename parameters (_orig_mod): copy in order
                for p, q in zip(tr.raw_model.parameters(), ref.raw_model.parameters()):
                    p.copy_(q)

            def step(tr=tr):
                return tr.train_step([batch])["loss"]

            def logits(tr=tr):
                return tr.model(x, batch.position_ids)

            out.append(Variant(name, step, tr.raw_model, logits))
        elif name in ("hf", "hf_c"):
            transformers = require("transformers", "hf", HF_BASELINE)
            transformers.logging.set_verbosity_error()
            from spindle.interop.families import family_named, hf_config, to_hf_name

            hcfg = transformers.LlamaConfig(attn_implementation="sdpa", **{
                k: v for k, v in hf_config(mcfg.to_args()).items() if k not in ("architectures",)})
            m = transformers.LlamaForCausalLM(hcfg).float()
            sd = {to_hf_name(k, family_named("llama")): v for k, v in ref_state.items() if not k.startswith("rotary")}
            missing, unexpected = m.load_state_dict(sd, strict=False)
            if [k for k in missing if "rotary" not in k] or unexpected:
                raise RuntimeError(f"HF weight copy: missing {missing}, unexpected {unexpected}")
            m.train()
            run = torch.compile(m) if name == "hf_c" else m
            opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0)

            def step(run=run, opt=opt):  # HF shifts the labels itself (S-1 predictions per row)
                loss = run(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()

            def logits(run=run):
                return run(input_ids=x, use_cache=False).logits

            out.append(Variant(name, step, m, logits))
        elif name in ("hand", "hand_c"):
            d, layers, heads, vocab, seq, _ = SIZES[size]
            m = HandLlama(d, layers, heads, mcfg.ffn_hidden_size, vocab, seq, eps=mcfg.layer_norm_epsilon)
            load_hand_from_spindle(m, ref.raw_model)
            m.train()
            run = torch.compile(m) if name == "hand_c" else m
            opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0)

            def step(run=run, opt=opt):
                logits = run(x)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()

            def logits(run=run):
                return run(x)

            out.append(Variant(name, step, m, logits))
        else:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(ALL_VARIANTS)}")
    return out, info


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time.perf_counter()
    torch.matmul(a, b)
    return 2 * n**3 / (time.perf_counter() - t) / 1e9


def summarize(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run_size(size: str, names, rounds: int, run_folder: str) -> dict:
    from spindle.model.flops import model_flops_per_token
    from spindle.train.host import cpu_training_mode

    variants, info = build_variants(size, names, run_folder)
    d, layers, heads, vocab, seq, batch = SIZES[size]
    cfg = spindle_config(size, False, run_folder).model
    fpt = model_flops_per_token(cfg, seq)
    tokens = batch * seq
    # sanity: same logits at the start (before any step), every variant against the first
    with torch.no_grad():
        ref_logits = variants[0].logits_fn()
        diffs = {v.name: float((v.logits_fn() - ref_logits).abs().max()) for v in variants[1:]}
    del ref_logits
    shape = f"[{size}] d{d} L{layers} H{heads} ffn{info['ffn']} V{vocab} S{seq} B{batch}"
    logger.info(f"{shape}: {info['params']:,} params, {fpt / 1e6:.2f} MFLOP/token; max |logit diff| vs "
                f"{variants[0].name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    # The process-wide CPU settings Spindle's trainer runs under (flush denormals, keep freed memory
    # in the heap: spindle/train/host.py), entered where `Trainer.fit` enters them (after the models
    # are built), for every variant alike: the ratios compare the steps, not the allocator.
    host_mode = contextlib.ExitStack()
    tuned = host_mode.enter_context(cpu_training_mode())
    for v in variants:  # warm-up: compilation happens here
        t = time.perf_counter()
        for _ in range(2):
            v.losses.append(v.step())
        v.warmup_s = time.perf_counter() - t
    peaks: list[float] = []
    round_peak: list[float] = []
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        mm = []
        for v in order:
            gc.collect()
            t = time.perf_counter()
            v.losses.append(v.step())
            v.times.append(time.perf_counter() - t)
        mm = [matmul_gflops() for _ in range(3)]
        peaks += mm
        round_peak.append(max(mm))
        logger.info(f"[{size}] round {r + 1}/{rounds}: "
                    + ", ".join(f"{v.name} {v.times[-1] * 1e3:.0f} ms" for v in variants)
                    + f"; matmul {max(mm):.0f} GFLOP/s; load {os.getloadavg()[0]:.2f}")
    host_mode.close()
    best_peak = max(peaks)
    res = {"size": size, "dims": {"d": d, "layers": layers, "heads": heads, "ffn": info["ffn"], "vocab": vocab,
                                  "seq": seq, "batch": batch}, "params": info["params"],
           "flops_per_token": fpt, "logit_max_abs_diff": diffs, "malloc_tuned": tuned,
           "matmul_gflops": summarize(peaks),
           "variants": {}, "ratios": {}}
    for v in variants:
        ts = v.times
        tps = [tokens / t for t in ts]
        mfu_round = [tokens / t * fpt / 1e9 / p for t, p in zip(ts, round_peak)]
        res["variants"][v.name] = {
            "step_s": summarize(ts), "tokens_per_s": summarize(tps),
            "gflops_median": statistics.median(tps) * fpt / 1e9,
            "mfu_vs_best_matmul": {"median": statistics.median(tps) * fpt / 1e9 / best_peak,
                                   "best": max(tps) * fpt / 1e9 / best_peak},
            "mfu_vs_round_matmul": {"median": statistics.median(mfu_round), "best": max(mfu_round)},
            "warmup_s": v.warmup_s, "compile_s_est": v.warmup_s - 2 * statistics.median(ts),
            "losses_first_last": [v.losses[0], v.losses[-1]],
        }
    by = {v.name: v for v in variants}
    pairs = [("spindle", "hf"), ("spindle", "hand"), ("spindle_c", "hf_c"), ("spindle_c", "hand_c"),
             ("spindle_c", "hf"), ("spindle_c", "hand"), ("spindle_c", "spindle"), ("hf_c", "hf"), ("hand", "hf")]
    for a, b in pairs:
        if a in by and b in by:
            rs = [tb / ta for ta, tb in zip(by[a].times, by[b].times)]  # >1: a is faster
            res["ratios"][f"{a}/{b}"] = summarize(rs)
    return res


def format_report(results: list[dict], meta: dict) -> str:
    lines = [f"# bench train — {meta['date']}, {meta['machine']}, torch {meta['torch']}, "
             f"transformers {meta.get('transformers')}, threads {meta['threads']}, rounds {meta['rounds']}",
             f"load average before/after: {meta['load_before']} / {meta['load_after']}", ""]
    for r in results:
        mm = r["matmul_gflops"]
        lines.append(f"## {r['size']}: {r['params']:,} params, seq {r['dims']['seq']} x batch {r['dims']['batch']}, "
                     f"{r['flops_per_token'] / 1e6:.2f} MFLOP/token; matmul 2048^3 median {mm['median']:.0f} "
                     f"(best {mm['max']:.0f}) GFLOP/s")
        lines.append("| variant | step ms median (min) | tokens/s median (best) | MFU vs best matmul median (best) "
                     "| MFU vs same-round matmul median | warm-up s (compile est.) |")
        lines.append("|---|---|---|---|---|---|")
        for name, v in r["variants"].items():
            lines.append(
                f"| {name} | {v['step_s']['median'] * 1e3:.0f} ({v['step_s']['min'] * 1e3:.0f}) "
                f"| {v['tokens_per_s']['median']:,.0f} ({v['tokens_per_s']['max']:,.0f}) "
                f"| {v['mfu_vs_best_matmul']['median']:.0%} ({v['mfu_vs_best_matmul']['best']:.0%}) "
                f"| {v['mfu_vs_round_matmul']['median']:.0%} | {v['warmup_s']:.1f} ({v['compile_s_est']:.1f}) |")
        if r["ratios"]:
            lines.append("")
            lines.append("paired speed ratios (same round; >1 = first is faster), median (min..max): "
                         + "; ".join(f"{k} {v['median']:.2f} ({v['min']:.2f}..{v['max']:.2f})"
                                     for k, v in r["ratios"].items()))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    from spindle.cli import options

    ap = options.OneLineParser(prog="spindle bench train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10M only, 3 rounds (about 2 minutes)")
    ap.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS))
    ap.add_argument("--rounds", type=options.int_in(1, 1000), default=None)
    ap.add_argument("--threads", type=options.int_in(1, 4096), default=2)
    ap.add_argument("--out", default="runs/bench_train.json")
    ap.add_argument("--md", default=None, help="also write the Markdown report here")
    args = ap.parse_args(argv)
    sizes = (args.sizes or ("10M" if args.quick else "10M,24M,10M-s2048")).split(",")
    rounds = args.rounds or (3 if args.quick else 6)
    names = [n for n in args.variants.split(",") if n]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {platform.machine()} "
            f"{os.cpu_count()} cpus", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rounds": rounds, "load_before": [round(x, 2) for x in os.getloadavg()], "argv": sys.argv[1:]}
    try:
        meta["transformers"] = require("transformers", "hf", HF_BASELINE).__version__
    except SpindleError as missing:  # the other variants still run; the line says what the hf ones need
        if any(n.startswith("hf") for n in names):
            logger.warning(f"{missing}; the hf variants are left out")
        names = [n for n in names if not n.startswith("hf")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            if size not in SIZES:
                raise SystemExit(f"unknown size {size!r}; known: {', '.join(SIZES)}")
            results.append(run_size(size, names, rounds, tmp))
            gc.collect()
            if args.out:  # after every size, so an interrupted run keeps what it measured
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "results": results, "partial": True}, f, indent=1)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report = format_report(results, meta)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
