"""spindle.config.redact: each form a secret takes is hidden, each harmless look-alike is kept (issue 22.5)."""

from __future__ import annotations

import json
import typing

import pytest
from pydantic import BaseModel

from spindle.config import AlertConfig, SpindleConfig, validate_config
from spindle.config.redact import REDACTED, is_credential_name, redact, redact_destination, redact_text, redact_url
from spindle.train.metrics import LineFile
from spindle.train.monitor import Monitor

CREDENTIAL_NAMES = ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "token", "access_token", "apiKey",
                    "api_key", "OPENAI_API_KEY", "db_password", "PASSWD", "ssh_private_key", "credentials",
                    "auth", "basic_auth_header", "Authorization", "OAuthToken", "X-Amz-Security-Token",
                    "X-Amz-Signature", "x-amz-credential", "session_cookie", "passphrase", "client_secret"]
HARMLESS_NAMES = ["max_tokens", "tokenizer_path", "token_dropping", "sample_tokens", "num_tokens", "pad_token",
                  "eos_token", "author", "passkey_lengths", "keep_last_n", "key_path", "monkey", "webhook_format"]


@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
def test_credential_names(name):
    assert is_credential_name(name)


@pytest.mark.parametrize("name", HARMLESS_NAMES)
def test_harmless_names(name):
    assert not is_credential_name(name)


def _schema_fields(model: type[BaseModel]):
    for name, field in model.model_fields.items():
        yield name
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (kind, *typing.get_args(kind)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from _schema_fields(inner)


def test_no_schema_key_is_a_credential_name():
    """A checkpoint's config.json is validated again when it is read (eval, generate, convert): no key of the
    schema may lose its value to the rule."""
    assert [n for n in _schema_fields(SpindleConfig) if is_credential_name(n)] == []


URLS = [  # (written, as shown)
    ("https://open.feishu.cn/open-apis/bot/v2/hook/3f2a-91c0", "https://open.feishu.cn/open-apis/bot/v2/hook/<redacted>"),
    ("https://open.larksuite.com/open-apis/bot/v2/hook/abcdef", "https://open.larksuite.com/open-apis/bot/v2/hook/<redacted>"),
    ("https://hooks.slack.com/services/T0001/B0002/XXXXYYYY", "https://hooks.slack.com/services/<redacted>"),
    ("https://discord.com/api/webhooks/123/tokentoken", "https://discord.com/api/webhooks/<redacted>"),
    ("https://bob:hunter2@example.com/data", "https://<redacted>@example.com/data"),
    ("https://ghp_abcdef123456@github.com/org/repo.git", "https://<redacted>@github.com/org/repo.git"),
    ("https://oapi.dingtalk.com/robot/send?access_token=abc123&timestamp=1",
     "https://oapi.dingtalk.com/robot/send?access_token=<redacted>&timestamp=1"),
    ("http://mon:8080/beat?token=t0k&job=x", "http://mon:8080/beat?token=<redacted>&job=x"),
    ("https://maps.example.com/api?key=K3Y&q=paris", "https://maps.example.com/api?key=<redacted>&q=paris"),
    ("https://b.s3.amazonaws.com/o?X-Amz-Credential=AKIAX%2F2024&X-Amz-Signature=9f8e&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/o?X-Amz-Credential=<redacted>&X-Amz-Signature=<redacted>&X-Amz-Expires=60"),
    ("https://acc.blob.core.windows.net/c/b?sv=2021&sig=abcd%3D", "https://acc.blob.core.windows.net/c/b?sv=2021&sig=<redacted>"),
    ("https://app.example.com/cb#access_token=xyz&state=1", "https://app.example.com/cb#access_token=<redacted>&state=1"),
]
KEPT_URLS = ["https://huggingface.co/datasets/org/name", "http://127.0.0.1:9000", "https://example.com/a?page=2#top",
             "s3://bucket/hooks/run", "boto3:s3://bucket/run/ckpt", "https://example.com/webhook"]


@pytest.mark.parametrize("url, shown", URLS)
def test_urls_lose_their_tokens(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"posting to {url}, then") == f"posting to {shown}, then"


@pytest.mark.parametrize("url", KEPT_URLS)
def test_urls_without_tokens_are_kept(url):
    assert redact_text(url) == url


@pytest.mark.parametrize("address, shown", [
    ("https://open.feishu.cn/open-apis/bot/v2/hook/abc", "https://open.feishu.cn/<redacted>"),
    ("http://10.0.0.5:8080/beat?id=7", "http://10.0.0.5:8080/<redacted>"),
    ("10.0.0.5:8080/beat", "10.0.0.5:8080/<redacted>"),  # the monitor adds http:// to these
    ("https://u:p@alerts.example.com", "https://<redacted>@alerts.example.com"),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
])
def test_alert_destinations_keep_scheme_host_and_port(address, shown):
    assert redact_destination(address) == shown


LINES = [  # (line, as written)
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "AWS_SECRET_ACCESS_KEY=<redacted>"),
    ('HF_TOKEN: "hf_abc def"', 'HF_TOKEN: "<redacted>"'),
    ("Authorization: Bearer eyJhbGciOi", "Authorization: <redacted>"),
    ("launch --password=hunter2 --port=1", "launch --password=<redacted> --port=1"),
    ("key id AKIAIOSFODNN7EXAMPLE in use", "key id <redacted> in use"),
    ('{"api_key": "abc", "step": 3, "token": 7}', '{"api_key": "<redacted>", "step": 3, "token": 7}'),
]
KEPT_LINES = ["tflops=0.1,step=3,loss=4.2,tgs (tokens/gpu/second)=1200.5,lr=0.001",
              "max_tokens=512 tokenizer_path=/data/tok.model token_dropping=True",
              '{"loss/secret_source": 0.25, "tokens/en": 512}', "password: None", "checkpoint saved: runs/x/ckpt/3"]


@pytest.mark.parametrize("line, shown", LINES)
def test_lines_lose_their_secrets(line, shown):
    assert redact_text(line) == shown


@pytest.mark.parametrize("line", KEPT_LINES)
def test_harmless_lines_are_kept(line):
    assert redact_text(line) == line


@pytest.mark.parametrize("record", [
    {"credentials": {"user": "bob", "password": "pw"}, "token": [1, 2], "secret": None, "auth": True},
    {"api_key": "a\\\"b", "X-Amz-Signature": 1.5e-3, "cookie": "c=d; e=f", "nested": [{"HF_TOKEN": "x y"}]},
    {"message": 'failed: HF_TOKEN=abc"def (token: {x})', "step": 2},
])
def test_json_lines_stay_json(record):
    line = json.dumps(record)
    shown = redact_text(line)
    assert json.loads(shown).keys() == record.keys() and shown != line


def test_known_values_are_hidden_anywhere():
    assert redact_text("connect with s3cr3t-value now", ["s3cr3t-value", "abc"]) == f"connect with {REDACTED} now"


def test_config_redacted_and_still_valid():
    raw = {
        "JOB_NAME": "r",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG",
        "CREDENTIALS": {"aws": "inner-secret-1", "port": 9000, "enabled": True, "none": None},
        "BUCKET_OWNER": "AKIAIOSFODNN7EXAMPLE",
        "MIRROR": "https://bob:pw-12345@mirror.example.com/x?sig=zz",
        "ECHO": "uses wJalrXUtnFEMI-K7MDENG inline",
        "MAX_TOKENS": 2048,
        "monitor": {"alert": {"enable_feishu_alert": True, "light_monitor_address": "10.0.0.5:8080/beat",
                              "feishu_alert_address": "https://open.feishu.cn/open-apis/bot/v2/hook/abc"}},
        "data": {"tokenizer_path": "byte"},
    }
    cfg = validate_config(raw)
    shown = redact(cfg.to_dict())
    assert shown["constants"] == {
        "AWS_SECRET_ACCESS_KEY": REDACTED,
        "CREDENTIALS": {"aws": REDACTED, "port": REDACTED, "enabled": True, "none": None},
        "BUCKET_OWNER": REDACTED, "MIRROR": "https://<redacted>@mirror.example.com/x?sig=<redacted>",
        "ECHO": f"uses {REDACTED} inline", "MAX_TOKENS": 2048}
    assert shown["monitor"]["alert"]["feishu_alert_address"] == "https://open.feishu.cn/<redacted>"
    assert shown["monitor"]["alert"]["light_monitor_address"] == "10.0.0.5:8080/<redacted>"
    assert shown["data"]["tokenizer_path"] == "byte"
    assert cfg.monitor.alert.feishu_alert_address.endswith("/hook/abc")  # the run keeps the real value
    shown.pop("constants")
    validate_config(json.loads(json.dumps(shown)))  # a checkpoint's config.json is read back like this


def test_default_config_is_unchanged():
    d = SpindleConfig().to_dict()
    assert redact(d) == d


def test_monitor_alert_text_and_file_hide_its_url_and_env_secrets(tmp_path, monkeypatch, spindle_lines):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "env-secret-value-42")
    alert = AlertConfig(enable_feishu_alert=True, feishu_alert_address="127.0.0.1:9/hook/url-secret-9",
                        alert_file_path=str(tmp_path / "alerts.jsonl"))
    lines = spindle_lines
    mon = Monitor(alert, tmp_path)
    mon._post = lambda url, body: True  # nothing listens: only what is logged and written matters here
    mon.alert("exception", "POST http://127.0.0.1:9/hook/url-secret-9 failed, env-secret-value-42 refused")
    written = (tmp_path / "alerts.jsonl").read_text() + "\n".join(lines)
    assert "url-secret-9" not in written and "env-secret-value-42" not in written
    assert "http://127.0.0.1:9/<redacted>" in written


def test_line_file_writes_lines_without_secrets_and_json_stays_json(tmp_path):
    f = LineFile(tmp_path / "log")
    f.write_line('{"step": 1, "note": "see https://h.example/p?token=abc", "loss": 2.5}')
    f.close()
    assert json.loads((tmp_path / "log").read_text()) == {"step": 1, "note": "see https://h.example/p?token=<redacted>",
                                                          "loss": 2.5}
