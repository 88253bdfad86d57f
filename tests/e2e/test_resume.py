"""Exact resume, in process: a run cut at step 3 and resumed from its checkpoint logs the uninterrupted run's
losses bit for bit, with every feature that draws random numbers or counts (CPU, fp32).

The same through a real SIGKILL and a new process: tests/faults/test_faults.py::
test_twenty_sigkills_every_resume_is_bit_exact (20 kills, some while a checkpoint is being written; every
life's auto_resume line and every logged loss checked).
"""

from pathlib import Path

import pytest
import torch

from spindle.config import validate_config
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

TEXT = "\n".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog." for i in range(400))
FEATURES = {
    "dropout": {"model": {"drop_rate": 0.2}},
    "attention_dropout": {"model": {"attn_drop_rate": 0.2}},
    "label_smoothing": {"loss": {"label_smoothing": 0.1}},
    "rampup": {"data": {"micro_num": 3, "rampup_batch_size": "1 1 2"}},
    "validation": {"data": {"valid_every": 1, "valid_micro_num": 1}, "model": {"drop_rate": 0.2}},
    "text_data": {"data": {"type": "text", "tokenizer_path": "byte"}, "model": {"drop_rate": 0.2}},
    # long-context metrics every step, between dropout steps: they must not move the training RNG
    "long_eval": {"data": {"type": "text", "tokenizer_path": "byte", "valid_every": 1}, "model": {"drop_rate": 0.2},
                  "long_eval": {"lengths": [16, 48], "variants": ["plain", "yarn"], "passkey_lengths": [256],
                                "passkey_depths": [0.5], "passkey_samples": 1}},
}


def _feature_cfg(tmp: Path, name: str, feature: str, total: int):
    data = {"seq_len": 16, "micro_num": 2, "micro_bsz": 2, "total_steps": total}
    raw = {
        "JOB_NAME": name,
        "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": str(tmp / name / "ckpt"), "checkpoint_every": 3},
        "data": data,
        "adam": {"lr": 1e-2},
        "lr_scheduler": {"warmup_ratio": 0.2, "total_steps": 6},
        "model": {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2, "vocab_size": 258,
                  "multiple_of": 16, "max_position_embeddings": 16},
        "trainer": {"run_folder": str(tmp), "tensorboard": False, "progress_bar": False, "seed": 13,
                    "num_threads": 1},
    }
    for section, values in FEATURES[feature].items():
        raw.setdefault(section, {}).update(values)
    if feature == "validation":
        from spindle.data.prepare import prepare

        (tmp / "valid.txt").write_text(TEXT)
        prepare([str(tmp / "valid.txt")], str(tmp / "valid" / "en"), "byte", overwrite=True, progress=False)
        data["valid_folder"] = str(tmp / "valid")
    if feature in ("text_data", "long_eval"):
        (tmp / "text").mkdir(exist_ok=True)
        for i in range(3):
            (tmp / "text" / f"f{i}.txt").write_text(TEXT[i * 3000:(i + 1) * 3000])
        data["train_folder"] = str(tmp / "text")
    return validate_config(raw)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_resume_is_bit_exact_with(feature, tmp_path, monkeypatch):
    full = Trainer(_feature_cfg(tmp_path, "full", feature, 6), ParallelEnv()).fit()["history"]
    first = Trainer(_feature_cfg(tmp_path, "cut", feature, 3), ParallelEnv()).fit()["history"]

    # nothing may draw from the global generator between the restore and the first step
    restored = {}
    real_restore, real_step = Trainer._restore, Trainer.train_step

    def spy_restore(self):
        real_restore(self)
        restored["rng"] = torch.get_rng_state()

    def spy_step(self, mbs):
        if "first_step" not in restored:
            restored["first_step"] = torch.get_rng_state()
        return real_step(self, mbs)

    monkeypatch.setattr(Trainer, "_restore", spy_restore)
    monkeypatch.setattr(Trainer, "train_step", spy_step)
    from spindle.hardware import measure_cpu_peak_tflops

    measure_cpu_peak_tflops.cache_clear()  # the probe runs again in this Trainer, as in a new process
    second = Trainer(_feature_cfg(tmp_path, "cut", feature, 6), ParallelEnv())
    assert second.state.step == 3
    rest = second.fit()["history"]
    assert torch.equal(restored["rng"], restored["first_step"])
    keys = ["loss", "grad_norm"] + {"validation": ["val/en_loss"], "long_eval": ["val/ppl@48/yarn", "val/passkey@256"]
                                    }.get(feature, [])
    assert [[h[k] for k in keys] for h in first + rest] == [[h[k] for k in keys] for h in full]
