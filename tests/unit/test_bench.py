"""The benchmark code paths on tiny shapes: no timing assertions, only that they run and agree."""

import math
from pathlib import Path

import pytest
import torch

from spindle.cli.bench import load_script
from spindle.cli.bench import main as bench_main
from spindle.cli import main as cli_main
from spindle.errors import SpindleError


def test_train_bench_variants_start_from_the_same_model(tmp_path):
    bt = load_script("train")
    res = bt.run_size("tiny", ["spindle", "hf", "hand"], rounds=3, run_folder=str(tmp_path))
    assert set(res["variants"]) == {"spindle", "hf", "hand"}
    # the weights were copied: same logits before training (fp32 rounding only)
    assert all(d < 1e-4 for d in res["logit_max_abs_diff"].values()), res["logit_max_abs_diff"]
    first = {k: v["losses_first_last"][0] for k, v in res["variants"].items()}
    # spindle and hand predict all S positions, HF S-1 (it shifts labels itself): close, not equal
    assert first["spindle"] == pytest.approx(first["hand"], rel=1e-5)
    assert first["hf"] == pytest.approx(first["hand"], rel=0.05)
    # FLOPs per token: 6 x the matmul weights (every Linear, the head included) + 12 L d S for attention
    from spindle.model.llama import build_model

    d, layers, _, _, seq, batch = bt.SIZES["tiny"]
    model = build_model(bt.spindle_config("tiny", False, str(tmp_path)).model.to_args())
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert res["flops_per_token"] == 6 * n_matmul + 12 * layers * d * seq
    for v in res["variants"].values():  # the figures follow from the measured step times
        step = v["step_s"]["median"]
        assert v["tokens_per_s"]["median"] == pytest.approx(batch * seq / step, rel=1e-9)
        assert v["gflops_median"] == pytest.approx(batch * seq / step * res["flops_per_token"] / 1e9, rel=1e-9)
        assert v["mfu_vs_best_matmul"]["median"] == pytest.approx(
            v["gflops_median"] / res["matmul_gflops"]["max"], rel=1e-9)
        assert math.isfinite(v["losses_first_last"][1]) and v["losses_first_last"][1] != v["losses_first_last"][0]
    ratio = res["ratios"]["spindle/hand"]
    assert ratio["n"] == 3 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "spindle/hf" in res["ratios"]
    text = bt.format_report([res], {"date": "d", "machine": "m", "torch": "t", "transformers": "x", "threads": 2,
                                    "rounds": 2, "load_before": [0], "load_after": [0]})
    assert "| spindle |" in text


def test_hand_model_matches_spindle_model_numerically(tmp_path):
    bt = load_script("train")
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    tr = Trainer(bt.spindle_config("tiny", False, str(tmp_path)), ParallelEnv())
    d, layers, heads, vocab, seq, _ = bt.SIZES["tiny"]
    hand = bt.HandLlama(d, layers, heads, tr.cfg.model.ffn_hidden_size, vocab, seq)
    bt.load_hand_from_spindle(hand, tr.raw_model)
    x = bt.make_batch("tiny").input_ids
    with torch.no_grad():
        assert torch.allclose(hand(x), tr.raw_model(x), atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_driver_runs_the_trainer_on_cpu(tmp_path, dtype):
    gt = load_script("gpu")
    out = gt.run(preset="tiny", steps=3, warmup=1, dtype=dtype, compile=False, device="cpu",
                 run_folder=str(tmp_path))
    assert out["dtype"] == gt.DTYPES[dtype] and out["params"] > 0
    # MFU is tokens/s x FLOPs per token over the declared peak, step by step
    assert out["mfu"]["median"] == pytest.approx(
        # rel=1e-4: the log keeps 6 digits
        out["tokens_per_s"]["median"] * out["flops_per_token"] / (out["peak_tflops"] * 1e12), rel=1e-4)
    assert out["tokens_per_s"]["median"] > 0
    assert all(math.isfinite(x) for x in out["loss_first_last"])
    cfg = gt.build_config("1b", 10, "bf16", True, "cuda", str(tmp_path))
    from spindle.model.flops import parameter_counts

    assert 0.9e9 < parameter_counts(cfg.model)["total"] < 1.2e9  # the GPU preset is ~1B parameters
    assert cfg.trainer.compile and cfg.model.dtype == "torch.bfloat16" and cfg.adam.fused is None  # fused on CUDA


def test_resume_check_runs_deterministic_kernels_on_cuda_only():
    """The GPU resume round trip compares losses bit for bit, so on CUDA it asks PyTorch for deterministic
    kernels (warn-only: an op without one names itself) and gives the setting back after."""
    gt = load_script("gpu")
    assert not torch.are_deterministic_algorithms_enabled()
    with gt.deterministic_kernels(torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()  # nothing to change on a CPU
    with gt.deterministic_kernels(torch.device("cuda", 0)):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert (not torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled())
    gpu_sh = Path(__file__).resolve().parents[2] / "bench" / "gpu.sh"
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in gpu_sh.read_text()  # set before CUDA starts


def test_memory_bench_small_lengths(tmp_path):
    out = tmp_path / "mem.json"
    assert bench_main(["memory", "--lengths", "64,256", "--layers", "1", "--out", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["length"] for r in rows] == [64, 256]
    assert all(r["peak_rss"] >= r["base_rss"] > 0 for r in rows)


def test_cli_dispatch(capsys):
    """`spindle bench` lists every benchmark, `spindle bench NAME` runs NAME's own module (its options are
    that module's), and bench/gpu.sh drives the one behind `spindle bench gpu`."""
    from spindle.cli.bench import SCRIPTS

    assert cli_main(["bench"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name:<9} {what}" in listing for name, (_, what) in SCRIPTS.items())
    for name, (module, _) in SCRIPTS.items():
        assert load_script(name).__name__ == f"spindle.benchmarks.{module}"
    with pytest.raises(SystemExit) as done:
        bench_main(["gpu", "--help"])
    assert done.value.code == 0 and "usage: gpu_train" in capsys.readouterr().out
    assert cli_main(["bench", "nope"]) == 2
    with pytest.raises(SpindleError):
        bench_main(["nope"])
    gpu_sh = (Path(__file__).resolve().parents[2] / "bench" / "gpu.sh").read_text()
    assert f"-m spindle.benchmarks.{SCRIPTS['gpu'][0]} " in gpu_sh  # its training stages run that module
