"""A tiny InternEvo MoE config (model_type INTERNLM_MoE, the `moe` section, loss.moe_loss_coeff) trains under the
seed's launch line on 2 processes, and after a SIGKILL of the whole job (launcher and ranks, as a node loss) the
same line resumes from the last marked checkpoint and logs the uninterrupted run's losses bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.journeys.shell import env, program, user_folder

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.dist]
TOTAL = 8
CONFIG = """
JOB_NAME = "moe_kill"
model_type = "INTERNLM_MoE"
ckpt = dict(enable_save_ckpt=True, checkpoint_every=2, auto_resume=True)
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps={total}, fixed_random_dataset_seqlen=False)
adam = dict(lr=1e-2)
lr_scheduler = dict(warmup_ratio=0.2, total_steps={total})
loss = dict(label_smoothing=0, moe_loss_coeff=0.05)
model = dict(hidden_size=32, num_attention_heads=4, num_layers=2, vocab_size=96, mlp_ratio=2, multiple_of=16,
             max_position_embeddings=32, dtype="torch.float32", num_experts=4, moe_use_residual=False,
             moe_type="GShard")
moe = dict(top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=2, noisy_gate_policy=None,
           drop_tokens=True, use_rts=True)
parallel = dict(zero1=dict(size=-1), tensor=1, pipeline=1)
trainer = dict(run_folder="runs", tensorboard=False, progress_bar=False, seed=11, num_threads=1, log_every=1)
"""
LINE = 'torchrun --nnodes=1 --nproc_per_node=2 train.py --config ./configs/moe.py --launcher "torch"'


def launch(folder: Path, log: Path) -> subprocess.Popen:
    words = LINE.replace('"torch"', "torch").split()
    with open(log, "w") as out:  # its own session: the SIGKILL takes the launcher and both ranks at once
        return subprocess.Popen([*program(words[0]), *words[1:]], cwd=folder, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def records(folder: Path) -> list[dict]:
    path = folder / "runs" / "moe_kill" / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line the SIGKILL tore
            pass
    return out


def job(tmp: Path, name: str) -> Path:
    folder = user_folder(tmp / name)
    (folder / "configs" / "moe.py").write_text(CONFIG.format(total=TOTAL))
    return folder


def test_internevo_moe_config_on_two_processes_resumes_bit_exactly_after_sigkill(tmp_path):
    ref = job(tmp_path, "ref")
    proc = launch(ref, tmp_path / "ref.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    want = {r["step"]: (r["loss"], r["moe_loss"]) for r in records(ref)}
    assert sorted(want) == list(range(TOTAL))
    # the InternEvo keys did what they say: the balance loss weight, GShard's capacity (so tokens can drop)
    model = json.loads((ref / "runs" / "moe_kill" / "config.json").read_text())["model"]
    assert (model["aux_loss_coeff"], model["capacity_factor"], model["min_capacity"]) == (0.05, 1.0, 2)
    assert all("moe_dropped" in r for r in records(ref))

    victim = job(tmp_path, "victim")
    ckpt = victim / "runs" / "moe_kill" / "ckpt"
    proc = launch(victim, tmp_path / "life1.log")
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline and not (len(records(victim)) >= 5 and
                                                                       any(ckpt.glob("*.step"))):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "life1.log").read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    marked = sorted(int(p.stem) for p in ckpt.glob("*.step") if p.stem.isdigit())
    assert marked and len(records(victim)) < TOTAL

    proc = launch(victim, tmp_path / "life2.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "life2.log").read_text()[-3000:]
    said = (tmp_path / "life2.log").read_text()
    assert "Traceback" not in said
    assert "auto_resume: continuing from" in said and f"(step {marked[-1]}" in said, said[-3000:]
    got = records(victim)
    assert {r["step"] for r in got} == set(range(TOTAL))
    bad = [(r["step"], r["loss"], r["moe_loss"], want[r["step"]]) for r in got
           if (r["loss"], r["moe_loss"]) != want[r["step"]]]
    assert not bad, bad
