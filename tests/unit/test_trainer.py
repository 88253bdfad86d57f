"""The training step: token-weighted loss over micro-batches, skipping non-finite steps, determinism."""

import math

import pytest
import torch

from helpers import micro_batch
from helpers import step_cfg as tiny_cfg
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer


def test_step_loss_is_token_weighted_over_micro_batches(tmp_path):
    """The trainer's scaling of the executor's loss: its gradient (seen through the reported pre-clip norm)
    and its loss are those of the mean over the step's 19 labelled tokens, however the rows are split
    into micro-batches (tests/unit/test_executor.py compares the gradients themselves)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[0, 3:] = -100  # row 0 has only 3 valid labels, row 1 has 16
    fresh = Trainer(tiny_cfg(tmp_path), ParallelEnv())
    logits = fresh.raw_model(ids).float()
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 64), labels.view(-1), ignore_index=-100)
    ref.backward()
    ref_norm = torch.cat([p.grad.flatten() for p in fresh.raw_model.parameters()]).norm().item()
    one = Trainer(tiny_cfg(tmp_path), ParallelEnv())
    two = Trainer(tiny_cfg(tmp_path), ParallelEnv())
    a = one.train_step([micro_batch(ids, labels)])
    b = two.train_step([micro_batch(ids[:1], labels[:1]), micro_batch(ids[1:], labels[1:])])
    for out in (a, b):
        assert out["loss"] == pytest.approx(ref.item(), rel=1e-5)
        assert out["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    # the mean of the two micro-batch means would be another loss
    per_row = [torch.nn.functional.cross_entropy(logits[r], labels[r], ignore_index=-100).item() for r in (0, 1)]
    assert abs(sum(per_row) / 2 - a["loss"]) > 1e-3


def test_non_finite_loss_skips_the_update(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), ParallelEnv())
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        tr.raw_model.layers["0"].attention.wq.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in tr.raw_model.parameters()]
    out = tr.train_step([micro_batch(ids, torch.roll(ids, -1, 1))])
    assert not out["finite"] and tr.state.inf_nan_skip_batches == 1 and tr.state.updates == 0
    for p, b in zip(tr.raw_model.parameters(), before):
        assert torch.equal(p.detach().nan_to_num(), b.nan_to_num())


def test_same_seed_same_losses_and_random_data(tmp_path):
    runs = []
    for _ in range(2):
        tr = Trainer(tiny_cfg(tmp_path), ParallelEnv())
        runs.append([h["loss"] for h in tr.fit()["history"]])
    assert runs[0] == runs[1] and len(runs[0]) == 6
    other = Trainer(tiny_cfg(tmp_path, trainer={"seed": 8}), ParallelEnv())
    assert [h["loss"] for h in other.fit()["history"]] != runs[0]


def test_skip_batches_and_metrics_fields(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, data={"skip_batches": "1-2"}), ParallelEnv())
    hist = tr.fit()["history"]
    assert [h["step"] for h in hist] == [0, 3, 4, 5]
    h = hist[0]
    for key in ("tflops", "tgs (tokens/gpu/second)", "lr", "loss_scale", "grad_norm", "micro_num",
                "num_consumed_tokens", "inf_nan_skip_batches", "num_samples_in_batch", "largest_length",
                "largest_batch", "smallest_batch", "adam_beta2", "fwd_bwd_time", "mfu"):
        assert key in h, key
    assert h["micro_num"] == 2 and h["num_consumed_tokens"] == 2 * 2 * 16
    assert (tmp_path / "t" / "config.json").is_file()
    assert len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 4


def test_fp16_path_uses_the_loss_scaler(tmp_path):
    cfg = tiny_cfg(tmp_path, model={"dtype": "torch.float16"}, data={"total_steps": 2},
                   grad_scaler={"fp16": {"initial_scale": 1024.0}})
    tr = Trainer(cfg, ParallelEnv())
    hist = tr.fit()["history"]
    assert hist[0]["loss_scale"] == 1024.0 and all(math.isfinite(h["loss"]) for h in hist)
    bf = Trainer(tiny_cfg(tmp_path, model={"dtype": "torch.bfloat16"}, data={"total_steps": 1}), ParallelEnv())
    assert bf.fit()["history"][0]["loss_scale"] == 1.0  # no scaling for bf16


def test_fp16_overflow_backs_off_the_scale(tmp_path):
    cfg = tiny_cfg(tmp_path, model={"dtype": "torch.float16"},
                   grad_scaler={"fp16": {"initial_scale": 2.0**40}, "hysteresis": 1, "max_scale": 2.0**40})
    tr = Trainer(cfg, ParallelEnv())
    ids = torch.randint(0, 64, (2, 16))
    out = tr.train_step([micro_batch(ids, torch.roll(ids, -1, 1))])
    assert not out["finite"] and tr.scaler.scale == 2.0**39


def test_label_smoothing_trains_on_the_smoothed_loss_and_reports_the_plain_one(tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[1, 10:] = -100
    labels[0, :4] = 1  # source-free data: every token is type 0
    tr = Trainer(tiny_cfg(tmp_path, loss={"label_smoothing": 0.1}, hybrid_zero_optimizer={"clip_grad_norm": 0.0}),
                 ParallelEnv())
    assert tr.executor.fused  # label smoothing runs through the fused head + loss
    model = tr.raw_model
    with torch.enable_grad():
        logits = model(ids).float().view(-1, 64)
        smooth = torch.nn.functional.cross_entropy(logits, labels.view(-1), ignore_index=-100, label_smoothing=0.1)
        plain = torch.nn.functional.cross_entropy(logits, labels.view(-1), ignore_index=-100)
        hits = ((logits.argmax(-1) == labels.view(-1)) & (labels.view(-1) != -100)).sum() / (labels != -100).sum()
        expected = torch.autograd.grad(smooth, list(model.parameters()))
    tr.optimizer.step = lambda: None  # keep the gradients to compare them
    tr.optimizer.zero_grad = lambda set_to_none=True: None
    out = tr.train_step([micro_batch(ids, labels)])
    assert out["loss"] == pytest.approx(plain.item(), rel=1e-6)  # the logged loss is the plain cross-entropy
    assert out["acc"] == pytest.approx(hits.item())
    assert abs(smooth.item() - plain.item()) > 1e-4  # the two losses are distinguishable here
    for p, g in zip(model.parameters(), expected):  # the update follows the smoothed loss
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_step_times_wait_for_the_device_and_memory_is_logged(tmp_path, monkeypatch):
    """Twice per step (after forward/backward, after the optimizer) the trainer synchronises its device before
    reading the clock, and every record carries the device's memory metrics (CUDA's calls monkeypatched)."""
    import spindle.train.metrics as metrics_module
    import spindle.train.trainer as trainer_module

    waited = []
    monkeypatch.setattr(trainer_module, "synchronize", lambda device: waited.append(device))
    monkeypatch.setattr(metrics_module, "memory_metrics", lambda device: {"mem_peak_allocated_gib": 1.5})
    hist = Trainer(tiny_cfg(tmp_path, data={"total_steps": 2}), ParallelEnv()).fit()["history"]
    assert waited == [torch.device("cpu")] * 4
    assert [h["mem_peak_allocated_gib"] for h in hist] == [1.5, 1.5]


def test_backend_flags_are_not_left_behind(tmp_path, monkeypatch):
    """cudnn_benchmark / cudnn_deterministic / torch.tf32 hold during fit() only (they were process-wide). They
    are CUDA settings, never touched on a CPU: here the trainer's cuda_backend_mode is handed a CUDA device
    (it reads nothing but device.type), so the CPU run sets them, and the flags each step sees are recorded."""
    import spindle.train.trainer as trainer_module

    real_mode = trainer_module.cuda_backend_mode
    monkeypatch.setattr(trainer_module, "cuda_backend_mode", lambda device, *a: real_mode(torch.device("cuda", 0), *a))
    flags = lambda: (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,  # noqa: E731
                     torch.get_float32_matmul_precision())
    seen, real_step = [], Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, mbs: (seen.append(flags()), real_step(self, mbs))[1])
    before = flags()
    cfg = tiny_cfg(tmp_path, data={"total_steps": 2}, cudnn_benchmark=True, cudnn_deterministic=True,
                   model={"dtype": "torch.tf32"})
    Trainer(cfg, ParallelEnv()).fit()
    assert seen == [(True, True, "high")] * 2 != [before] * 2  # in force while training ...
    assert flags() == before  # ... and given back after
