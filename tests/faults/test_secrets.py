"""No secrets at rest (issue 22, point 5): a real training run whose config holds an alert webhook and a
heartbeat URL with tokens, credential constants and URLs with passwords writes none of them into any file
(run folder, checkpoints, logs, TensorBoard events, alert file, stack dumps, uploaded S3 objects), nor to
the console — while the alerts still go to the real URLs, and the redacted checkpoint still resumes and
evaluates."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spindle.cli import main
from spindle.train import trainer as trainer_module
from tests.unit.test_monitor import Hook

HOOK_TOKEN = "hooktok-5f3a9c1e7b2d4a60"
BEAT_TOKEN = "beattok-0c4e8a2f6b1d3957"
AWS_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSPINDLE"
AWS_KEY_ID = "AKIASPINDLETEST12345"
URL_PASSWORD = "urlpass-hunter2-77aa"
URL_SIG = "urlsig-0a1b2c3d4e5f"
SLACK_SECRET = "slacksecretXYZ0123456789"
SECRETS = (HOOK_TOKEN, BEAT_TOKEN, AWS_SECRET, AWS_KEY_ID, URL_PASSWORD, URL_SIG, SLACK_SECRET)

CONFIG = """
JOB_NAME = "secrets"
AWS_SECRET_ACCESS_KEY = {aws_secret!r}
BUCKET_OWNER = {aws_key_id!r}
MIRROR = "https://bob:{url_password}@mirror.example.com/data?sig={url_sig}"
SLACK_HOOK = "https://hooks.slack.com/services/T0001/B0002/{slack}"
ckpt = dict(enable_save_ckpt=True, checkpoint_every=2, auto_resume=True, save_ckpt_folder={save!r})
data = dict(seq_len=16, micro_num=1, micro_bsz=2, total_steps={total})
model = dict(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=1, vocab_size=64,
             multiple_of=16, max_position_embeddings=16)
monitor = dict(alert=dict(enable_feishu_alert=True, webhook_format="json", stuck_timeout_s=0.1, heartbeat_every=1,
                          feishu_alert_address="{hook}/open-apis/bot/v2/hook/{hook_token}",
                          light_monitor_address="{hook}/beat?access_token={beat_token}",
                          alert_file_path={alert_file!r}))
trainer = dict(run_folder={runs!r}, tensorboard=True, progress_bar=False, seed=3, num_threads=1, sample_tokens=0)
"""


def write_config(tmp_path: Path, hook: Hook, save: str | None, total: int = 3) -> Path:
    runs = tmp_path / "runs"
    cfg = tmp_path / "config.py"  # the user's own file: the one place the secrets are meant to be
    cfg.write_text(CONFIG.format(aws_secret=AWS_SECRET, aws_key_id=AWS_KEY_ID, url_password=URL_PASSWORD,
                                 url_sig=URL_SIG, slack=SLACK_SECRET, save=save, total=total, hook=hook.url,
                                 hook_token=HOOK_TOKEN, beat_token=BEAT_TOKEN, runs=str(runs),
                                 alert_file=str(runs / "secrets" / "alerts.jsonl")))
    return cfg


@pytest.fixture
def slow_first_step(monkeypatch):
    """The first step outlasts stuck_timeout_s, so the watchdog raises a real alert (and dumps stacks)."""
    real = trainer_module.Trainer.train_step

    def train_step(self, micro_batches):
        if self.state.step == 0:
            time.sleep(0.5)
        return real(self, micro_batches)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)


@pytest.fixture
def hook():
    server = Hook()
    yield server
    server.server.shutdown()


def leaks(blobs: dict[str, bytes]) -> list[str]:
    """'where: secret' for every secret found in any of the named blobs."""
    return [f"{name}: {s}" for name, data in blobs.items() for s in SECRETS if s.encode() in data]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_alerts_used_the_real_urls(hook: Hook) -> None:
    assert hook.wait_for(f"/open-apis/bot/v2/hook/{HOOK_TOKEN}"), hook.received  # the stuck alert
    assert hook.wait_for(f"/beat?access_token={BEAT_TOKEN}"), hook.received  # heartbeats


@pytest.mark.slow
def test_a_run_writes_no_secret_anywhere_and_still_resumes(tmp_path, hook, slow_first_step, capsys):
    cfg = write_config(tmp_path, hook, save=None)
    assert main(["train", "--config", str(cfg)]) == 0
    assert_alerts_used_the_real_urls(hook)
    run = tmp_path / "runs" / "secrets"
    written = files_under(tmp_path / "runs")
    assert {"config.json", "metrics.jsonl", "alerts.jsonl"} <= {Path(p).name for p in written}
    assert any("tfevents" in p for p in written) and any("/stacks/" in p for p in written)
    assert any(p.endswith("/ckpt/2/config.json") for p in written)
    out = capsys.readouterr()
    assert leaks(written | {"stdout": out.out.encode(), "stderr": out.err.encode()}) == []
    # where alerts go is still visible
    assert f"{hook.url}/<redacted>" in (run / "config.json").read_text()

    # the redacted checkpoint config neither stops a resume nor an evaluation
    assert main(["train", "--config", str(cfg), "--set", "data.total_steps=4"]) == 0
    assert "auto_resume: continuing from" in capsys.readouterr().out
    from spindle.eval.load import load_model_for_eval

    _, ckpt_cfg = load_model_for_eval(str(run / "ckpt"))
    assert ckpt_cfg.model.hidden_size == 32
    assert leaks(files_under(tmp_path / "runs")) == []


@pytest.mark.slow
def test_uploaded_checkpoint_objects_hold_no_secret(tmp_path, hook, slow_first_step, moto_server, monkeypatch):
    import boto3

    from tests.e2e.test_s3_checkpoint import ACCESS, SECRET, make_bucket, s3_env

    s3_env(monkeypatch, moto_server.endpoint)
    bucket = make_bucket(moto_server.endpoint)
    cfg = write_config(tmp_path, hook, save=f"boto3:s3://{bucket}/run")
    assert main(["train", "--config", str(cfg)]) == 0
    assert_alerts_used_the_real_urls(hook)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, aws_access_key_id=ACCESS,
                      aws_secret_access_key=SECRET, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "run/2/config.json" in keys
    objects = {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    assert leaks(objects | files_under(tmp_path / "runs")) == []
