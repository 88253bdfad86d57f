"""Single-GPU training throughput with Spindle's own Trainer: tokens/s and MFU against the declared peak.

    spindle bench gpu [--preset 1b|tiny] [--steps 30] [--warmup 5] [--micro-bsz 4]
        [--seq-len 2048] [--dtype bf16|fp32] [--no-compile] [--device auto|cuda|cpu] [--out FILE]

Builds a `SpindleConfig` (dummy data: seeded random tokens, no checkpoints) and runs `Trainer.fit()`,
the path `spindle train` takes: bf16 autocast over fp32 master weights, fused AdamW on CUDA
(`adam.fused=None` picks it), per-block `torch.compile` (`trainer.compile=True`), SDPA with
`is_causal` (flash attention on CUDA). Tokens/s and MFU come from the trainer's own metrics
(`tgs`, `mfu` = 6 N_matmul + 12 L h s FLOPs per token over the peak: the GPU table — 989 TFLOP/s
bf16 dense for H100/H200 — or `--peak-tflops`); the first `--warmup` steps (compilation) are
dropped and the median and best of the rest are reported.

The `1b` preset: d2048, 16 layers, 32 heads (8 KV heads), SwiGLU 8192 (mlp_ratio 4 rounded), vocab
32000, seq 2048, micro-batch 4: about 1.0 B parameters. The `tiny` preset (d64, 2 layers, vocab 256,
seq 32) runs the same code path on a CPU in seconds; it is what the unit test runs.

`--moe` makes every layer a mixture of 8 experts, top 2 (the 1b preset: each 1024 wide, an eighth of the
dense SwiGLU, so the same 1,104,480,256 parameters and memory as the dense preset, 500,500,480 active, 3.41
GFLOP/token); MFU counts active FLOPs, and the result names the expert kernel
(`spindle.model.moe.choose_expert_kernel`: grouped GEMMs on CUDA in bf16).
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

from spindle.logs import quiet

logger = logging.getLogger(__name__)

PRESETS = {
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_attention_heads": 32, "num_kv_attention_heads": 8,
           "mlp_ratio": 4.0, "multiple_of": 256, "vocab_size": 32000, "seq_len": 2048, "micro_bsz": 4},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_kv_attention_heads": 2,
             "mlp_ratio": 8 / 3, "multiple_of": 16, "vocab_size": 256, "seq_len": 32, "micro_bsz": 2},
}
DTYPES = {"bf16": "torch.bfloat16", "fp32": "torch.float32", "fp16": "torch.float16"}
MOE = {"1b": {"num_experts": 8, "top_k": 2, "moe_intermediate_size": 1024},
       "tiny": {"num_experts": 4, "top_k": 2, "moe_intermediate_size": 48}}


def build_config(preset: str, steps: int, dtype: str, compile: bool, device: str, run_folder: str,
                 micro_bsz=None, seq_len=None, peak_tflops=None, fused=None, packed=False, moe=False):
    from spindle.config import validate_config

    p = dict(PRESETS[preset]) | (MOE[preset] if moe else {})
    seq = seq_len or p.pop("seq_len")
    p.pop("seq_len", None)
    bsz = micro_bsz or p.pop("micro_bsz")
    p.pop("micro_bsz", None)
    raw = {
        "JOB_NAME": f"gpu_bench_{preset}{'_moe' if moe else ''}",
        # packed: random-length documents packed into the rows (the varlen / segment kernels)
        "data": {"type": "dummy", "seq_len": seq, "micro_bsz": bsz, "micro_num": 1, "total_steps": steps,
                 "fixed_random_dataset_seqlen": not packed},
        "model": {**p, "max_position_embeddings": seq, "dtype": DTYPES[dtype], "checkpoint": False},
        "adam": {"lr": 3e-4, "weight_decay": 0.1, "fused": fused},
        "lr_scheduler": {"total_steps": steps, "warmup_ratio": 0.0},
        "ckpt": {"enable_save_ckpt": False},
        "trainer": {"run_folder": run_folder, "tensorboard": False, "jsonl": True, "progress_bar": False,
                    "compile": compile, "device": device, "log_every": max(1, steps // 5), "peak_tflops": peak_tflops},
    }
    return validate_config(raw)


def expert_kernel(device: torch.device, dtype: str) -> str:
    """How an MoE block runs its experts on this device and dtype (the one place that decides it)."""
    from spindle.dtypes import compute_dtype
    from spindle.model.moe import choose_expert_kernel

    return choose_expert_kernel(device.type, compute_dtype(dtype).torch_dtype)


def attention_kernel(device: torch.device, dtype: str, packed: bool, seq_len: int) -> str:
    """The kernel spindle.model.attention picks for this run's batches (packed: two documents a row)."""
    from spindle.model.attention import DocumentLayout, choose_kernel
    from spindle.dtypes import compute_dtype

    layout = DocumentLayout(1, seq_len, (0, seq_len // 2) if packed else None, device=device)
    name = choose_kernel(device.type, compute_dtype(dtype).torch_dtype, layout).name
    if device.type == "cuda" and name == "sdpa_causal":  # which SDPA backends PyTorch may pick from
        b = torch.backends.cuda
        name += f" (flash {b.flash_sdp_enabled()}, mem_efficient {b.mem_efficient_sdp_enabled()}, " \
                f"cudnn {b.cudnn_sdp_enabled()})"
    return name


def run(preset="tiny", steps=8, warmup=2, dtype="bf16", compile=True, device="auto", micro_bsz=None, seq_len=None,
        peak_tflops=None, fused=None, run_folder=None, packed=False, moe=False) -> dict:
    from spindle.model.flops import parameter_counts
    from spindle.parallel.mesh import init_distributed
    from spindle.train.trainer import Trainer

    if steps <= warmup:
        raise SystemExit(f"--steps ({steps}) must exceed --warmup ({warmup})")
    env = init_distributed(None, None, None, device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(preset, steps, dtype, compile, device, run_folder or tmp, micro_bsz, seq_len,
                           peak_tflops, fused, packed, moe)
        t0 = time.perf_counter()
        with quiet(env.rank):  # the trainer's start-up lines are not the benchmark's output
            tr = Trainer(cfg, env)
        opt_defaults = tr.optimizer.defaults
        result = tr.fit()
        wall = time.perf_counter() - t0
    hist = result["history"][warmup:]
    tgs = [h["tgs (tokens/gpu/second)"] for h in hist]
    mfu = [h["mfu"] for h in hist]
    dev = tr.device
    out = {
        "preset": preset, "device": str(dev), "packed": packed, "moe": moe,
        "attention_kernel": attention_kernel(dev, cfg.model.dtype, packed, cfg.data.seq_len),
        "expert_kernel": expert_kernel(dev, cfg.model.dtype) if moe else None,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": cfg.model.dtype, "compile": compile, "fused_adamw": bool(opt_defaults.get("fused")),
        "params": tr.n_params, "active_params": parameter_counts(cfg.model)["active"],
        "seq_len": cfg.data.seq_len, "micro_bsz": cfg.data.micro_bsz,
        "flops_per_token": tr.flops_per_token, "peak_tflops": tr.peak, "peak_source": tr.peak_source,
        "steps": steps, "warmup": warmup, "wall_s": wall,
        "tokens_per_s": {"median": statistics.median(tgs), "best": max(tgs)},
        "mfu": {"median": statistics.median(mfu), "best": max(mfu)},
        "data_wait_median": statistics.median(h["data_wait"] for h in hist),
        "loss_first_last": [result["history"][0]["loss"], result["history"][-1]["loss"]],
        "max_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    what = preset + (" packed" if packed else "") + (f" MoE (experts: {out['expert_kernel']})" if moe else "")
    logger.info(f"{what} on {out['device_name']} ({out['dtype']}, "
                f"{out['attention_kernel']}, compile {compile}, fused AdamW {out['fused_adamw']}): "
                f"{out['params']:,} params, {tgs and out['tokens_per_s']['median']:,.0f} tokens/s median "
                f"({out['tokens_per_s']['best']:,.0f} best), MFU {out['mfu']['median']:.1%} median "
                f"({out['mfu']['best']:.1%} best) of {out['peak_tflops']:.3g} TFLOP/s ({out['peak_source']}); "
                f"loss {out['loss_first_last'][0]:.3f} -> {out['loss_first_last'][1]:.3f}")
    return out


@contextlib.contextmanager
def deterministic_kernels(device: torch.device):
    """On CUDA, the kernels that give the same bits on every run where PyTorch has them (backward kernels
    that would add with atomics in a varying order, cuBLAS with a fixed workspace: CUBLAS_WORKSPACE_CONFIG,
    which bench/gpu.sh sets before CUDA starts); an op without one runs anyway and warns, naming itself.
    Restored after.
    Off CUDA nothing changes: the CPU kernels Spindle uses are deterministic already."""
    if device.type != "cuda":
        yield
        return
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def resume_round_trip(preset="tiny", dtype="bf16", device="auto", seq_len=None) -> dict:
    """4 steps straight, against 2 steps, a checkpoint (the stop file), and 2 resumed: the same losses
    bit for bit (no compile, deterministic kernels: the check is of the state saved, not of kernels)."""
    from spindle.parallel.mesh import init_distributed
    from spindle.train.trainer import Trainer

    env = init_distributed(None, None, None, device)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp, deterministic_kernels(env.device):
        for name in ("straight", "stopped", "resumed"):
            cfg = build_config(preset, 4, dtype, False, device, f"{tmp}/{'straight' if name == 'straight' else 'b'}",
                               seq_len=seq_len)
            cfg.ckpt.enable_save_ckpt, cfg.ckpt.checkpoint_every = True, 2
            if name == "stopped":
                cfg.ckpt.stop_file_path = f"{tmp}/stop"
                with open(cfg.ckpt.stop_file_path, "w") as f:
                    f.write("2")
            with quiet(env.rank):
                runs[name] = [h["loss"] for h in Trainer(cfg, env).fit()["history"]]
    same = runs["stopped"] + runs["resumed"] == runs["straight"]
    # the stage's result line on stdout (bench/gpu.sh reads it), whatever logging the nested fits left in force
    print(f"resume round trip ({preset}, {dtype}, {env.device}): {'bit-exact' if same else 'DIFFERENT'} "
          f"losses {runs['straight']} vs {runs['stopped']} + {runs['resumed']}", flush=True)
    return {"resume_bit_exact": same, **runs}


def main(argv=None) -> int:
    from spindle.cli import options

    ap = options.OneLineParser(prog="gpu_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--steps", type=options.int_in(1, 10**6), default=30)
    ap.add_argument("--warmup", type=options.int_in(0, 10**6), default=5)
    ap.add_argument("--micro-bsz", type=options.int_in(1, 1 << 16), default=None)
    ap.add_argument("--seq-len", type=options.int_in(2, 1 << 24), default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--packed", action="store_true", help="random-length documents packed into the rows")
    ap.add_argument("--moe", action="store_true", help="every layer a mixture of experts (MFU on active FLOPs)")
    ap.add_argument("--resume-check", action="store_true", help="only the save/resume round trip (4 steps)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--peak-tflops", type=options.float_in(0, 1e6, lo_open=True), default=None,
                    help="MFU denominator (default: the GPU table)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    if args.resume_check:
        out = resume_round_trip(args.preset, args.dtype, args.device, args.seq_len)
        print(json.dumps(out))
        return 0 if out["resume_bit_exact"] else 1
    out = run(args.preset, args.steps, args.warmup, args.dtype, not args.no_compile, args.device, args.micro_bsz,
              args.seq_len, args.peak_tflops, packed=args.packed, moe=args.moe)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from spindle.logs import logging_to

    with logging_to():  # the progress lines on stdout, as `spindle bench` prints them
        sys.exit(main())
