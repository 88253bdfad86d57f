"""Safety: hostile pickles in checkpoint or tokenizer files are refused without running their code;
secrets from the environment never reach alerts or error messages."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from spindle.checkpoint.loading import load_checkpoint
from spindle.checkpoint.manager import CheckpointManager
from spindle.config import CkptConfig, validate_config
from spindle.config.ckpt_content import CONTENT_PARTS as CONTENTS
from spindle.errors import SpindleError


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny(tmp_path):
    from spindle.model.llama import build_model
    from spindle.train.optim import build_optimizer

    cfg = validate_config({"model": {"hidden_size": 16, "num_attention_heads": 2, "num_kv_attention_heads": 1,
                                     "num_layers": 1, "vocab_size": 32, "multiple_of": 16,
                                     "max_position_embeddings": 16}})
    model = build_model(cfg.model.to_args(), torch.device("cpu"), seed=1)
    opt = build_optimizer(model, cfg.adam, "cpu")
    CheckpointManager(str(tmp_path / "ck"), CkptConfig()).save(1, model, opt, {"step": 1}, {})
    return model, opt, tmp_path / "ck" / "1"


@pytest.mark.parametrize("victim", [".metadata", "__0_0.distcp"])
def test_checkpoint_with_pickled_code_is_refused_not_run(tmp_path, victim):
    model, opt, path = tiny(tmp_path)
    marker = tmp_path / "PWNED"
    if victim == ".metadata":
        (path / victim).write_bytes(pickle.dumps(Evil(marker)))
    else:  # a torch.save'd pickle where DCP expects tensor bytes
        torch.save({"x": Evil(marker)}, path / victim)
    with pytest.raises(SpindleError):
        load_checkpoint(path, model, opt, CONTENTS)
    assert not marker.exists(), "pickled code was executed"


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "spm.model"])
def test_tokenizer_file_with_pickled_code_is_refused_not_run(tmp_path, name):
    from spindle.data.tokenizer import load_tokenizer

    marker = tmp_path / "PWNED"
    f = tmp_path / "tok" / name
    f.parent.mkdir()
    f.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(SpindleError):
        load_tokenizer(f if name == "spm.model" else f.parent)
    assert not marker.exists()


def test_no_pickle_loads_anywhere_in_the_package():
    """Every torch.load passes weights_only=True; np.load never allows pickles; no pickle.load."""
    root = Path(__file__).resolve().parents[2] / "spindle"
    for py in root.rglob("*.py"):
        for n, line in enumerate(py.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code:
                assert "weights_only=True" in code, f"{py}:{n}"
            if "np.load(" in code:
                assert "allow_pickle=False" in code, f"{py}:{n}"
            assert "pickle.load(" not in code and "pickle.loads(" not in code, f"{py}:{n}"


def test_env_secrets_masked_in_alerts(tmp_path, monkeypatch, spindle_lines):
    from spindle.config import AlertConfig
    from spindle.train.monitor import Monitor

    secret = "s3cr3t-value-from-env-0123"
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MY_API_TOKEN", "tok-abcdef-987654")
    lines = spindle_lines
    mon = Monitor(AlertConfig(alert_file_path=str(tmp_path / "alerts.jsonl")), tmp_path)
    mon.exception(RuntimeError(f"connect failed with key {secret} and tok-abcdef-987654"))
    stored = (tmp_path / "alerts.jsonl").read_text()
    for text in ["\n".join(lines), stored]:
        assert secret not in text and "tok-abcdef-987654" not in text and "<redacted>" in text
