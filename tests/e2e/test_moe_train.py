"""A mixture-of-experts model trains end to end (issue 27 points 2, 3, 6): `spindle train` in this process on a tiny
MoE config over text, its loss falling, its balance in the metrics line and metrics.jsonl (moe_loss beside loss,
imbalance and dropped share per layer, the load vector); no moe_loss without a balance loss; the aux-loss-free
bias moves and a resume is bit-exact with it; `--dry-run` plans total and active parameters;
`spindle bench moe` runs."""

import json
from pathlib import Path

import pytest
import torch

from spindle.config import validate_config
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer
from helpers import run_cli, tiny_config_text, tiny_raw

TEXT = "\n".join(f"expert {i % 5} routes token {i * 7 % 11} to layer {i % 3}." for i in range(300))
MOE = {"num_experts": 4, "top_k": 2, "moe_intermediate_size": 16, "vocab_size": 258, "num_layers": 2,
       "max_position_embeddings": 32}


def moe_sections(tmp: Path, **model) -> dict:
    (tmp / "text").mkdir(exist_ok=True)
    (tmp / "text" / "a.txt").write_text(TEXT)
    return {"data": {"type": "text", "tokenizer_path": "byte", "train_folder": str(tmp / "text"), "seq_len": 32,
                     "micro_num": 2, "total_steps": 12},
            "model": {**MOE, **model}, "lr_scheduler": {"warmup_ratio": 0.0}}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_moe_model_trains_and_reports_its_balance(tmp_path):
    cfg = tmp_path / "moe.py"
    cfg.write_text(tiny_config_text(tmp_path / "runs", JOB_NAME="moe", trainer={"tensorboard": True},
                                    **moe_sections(tmp_path, capacity_factor=1.0, z_loss_coeff=1e-3)))
    r = run_cli("train", "--config", cfg)
    assert r.returncode == 0, r.stderr
    steps = records(tmp_path / "runs" / "moe")
    assert len(steps) == 12 and steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    assignments = 2 * 2 * 32 * 2  # micro_num x micro_bsz x seq_len tokens, top_k each
    for s in steps:
        assert s["moe_loss"] > 0  # aux 0.01 x (>= 1) + z-loss
        for layer in ("layer0", "layer1"):
            load = s[f"moe_load/{layer}"]
            assert len(load) == 4 and sum(load) == assignments
            assert s[f"moe_imbalance/{layer}"] == pytest.approx(max(load) / (assignments / 4))
            assert 0 <= s[f"moe_dropped/{layer}"] < 1
        assert s["moe_imbalance"] == max(s["moe_imbalance/layer0"], s["moe_imbalance/layer1"])
        assert s["moe_dropped"] == max(s["moe_dropped/layer0"], s["moe_dropped/layer1"])
    line = next(x for x in r.stdout.splitlines() if x.startswith("tflops=") and ",step=11," in x)
    assert ",grad_norm=" in line and ",moe_loss=" in line and line.index("grad_norm=") < line.index("moe_loss=")
    assert ",moe_imbalance=" in line and ",moe_dropped=" in line and "moe_load" not in line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "moe" / "tensorboard"))
    events.Reload()
    for key in ("moe_loss", "moe_imbalance", "moe_dropped", "moe_imbalance/layer1", "moe_dropped/layer0"):
        assert [round(e.value, 4) for e in events.Scalars(key)] == [round(s[key], 4) for s in steps], key


def _trainer(tmp: Path, name: str, total: int, **model) -> Trainer:
    sections = moe_sections(tmp, **model)
    sections["data"]["total_steps"] = total
    sections["lr_scheduler"]["total_steps"] = 4  # the cut run's schedule is the whole run's
    raw = tiny_raw(tmp / "runs", JOB_NAME=name, ckpt={"enable_save_ckpt": True, "checkpoint_every": 2,
                                                      "save_ckpt_folder": str(tmp / name / "ckpt")}, **sections)
    return Trainer(validate_config(raw), ParallelEnv())


def test_without_balance_losses_no_moe_loss_is_reported(tmp_path):
    history = _trainer(tmp_path, "plain", 2, aux_loss_coeff=0.0).fit()["history"]
    assert all("moe_loss" not in h and h["moe_imbalance"] >= 1 and "moe_dropped" not in h for h in history)


def test_bias_update_moves_the_bias_and_resume_is_bit_exact(tmp_path):
    keys = {"bias_update_rate": 0.01, "aux_loss_coeff": 0.0, "router_score": "sigmoid"}
    full = _trainer(tmp_path, "full", 4, **keys)
    full_history = full.fit()["history"]
    biases = [b.score_bias.clone() for b in full.raw_model.moe_blocks()]
    assert all(float(b.abs().sum()) > 0 for b in biases)  # moved by 0.01 steps every update
    first = _trainer(tmp_path, "cut", 2, **keys).fit()["history"]
    resumed = _trainer(tmp_path, "cut", 4, **keys)
    assert resumed.state.step == 2
    rest = resumed.fit()["history"]
    compare = ["loss", "grad_norm", "moe_imbalance", "moe_load/layer0", "moe_load/layer1"]
    assert [[h[k] for k in compare] for h in first + rest] == [[h[k] for k in compare] for h in full_history]
    assert all(torch.equal(a, b.score_bias) for a, b in zip(biases, resumed.raw_model.moe_blocks()))


def test_dry_run_plans_total_and_active_parameters(tmp_path):
    cfg = tmp_path / "moe.py"
    cfg.write_text(tiny_config_text(tmp_path, **moe_sections(tmp_path, num_shared_experts=1)))
    r = run_cli("train", "--config", cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    # per MoE layer: router 32 x 4, 4 routed experts of 3 x 32 x 16, one shared expert of the same width
    expert = 3 * 32 * 16
    routed_unused = 2 * 2 * expert  # 2 layers x the 2 experts a token does not go through
    from spindle.config import load_config
    from spindle.model.flops import parameter_counts

    counts = parameter_counts(load_config(cfg).model)
    assert counts["total"] - counts["active"] == routed_unused and counts["experts"] == 2 * 4 * expert
    assert (f"experts: 2 of 2 layers MoE, 4 experts + 1 shared, top 2, expert width 16; active parameters per "
            f"token {counts['active']:,}") in r.stdout
    assert f"parameters: {counts['total']:,}" in r.stdout and "N the active parameters" in r.stdout


def test_dry_run_splits_the_experts_over_expert_parallel_ranks(tmp_path):
    cfg = tmp_path / "moe.py"
    cfg.write_text(tiny_config_text(tmp_path, **moe_sections(tmp_path)))
    one = run_cli("train", "--config", cfg, "--dry-run", "--nproc", "2", "--set", "parallel.zero1=-1")
    two = run_cli("train", "--config", cfg, "--dry-run", "--nproc", "2", "--set", "parallel.zero1=-1",
                  "parallel.expert=2")
    assert one.returncode == two.returncode == 0, one.stderr + two.stderr
    # (the memory it prints: tests/unit/test_flops.py::test_moe_memory_splits_the_experts_over_expert_parallel_ranks)
    assert "experts split over" not in one.stdout and "; experts split over 2 data-parallel ranks" in two.stdout


@pytest.mark.slow  # about 7 s: two Trainers and the CPU peak probe
def test_bench_moe_reports_ratio_router_share_and_ep2_bytes(tmp_path, capsys):
    """`spindle bench moe` on its tiny shape: no timing assertions, only that it runs and what it counts."""
    from spindle.cli.bench import main as bench_main

    out = tmp_path / "moe.json"
    assert bench_main(["moe", "--shape", "tiny", "--rounds", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MoE / dense step time, paired: median" in printed and "of the MoE step" in printed
    result = json.loads(out.read_text())["result"]
    assert set(result["step_s"]) == {"moe", "dense"} and 0 < result["router_share"] < 1
    a2a = result["all_to_all_ep2"]
    assert len(a2a["per_layer"]) == 2 and a2a["step_bytes"] == 2 * a2a["forward_bytes"] > 0
    for layer in a2a["per_layer"]:
        assert layer["assignments"] == 2 * 16 * 2 and 0 < layer["remote"] < layer["assignments"]
        assert layer["forward_bytes"] == 2 * layer["remote"] * 32 * 4
