"""Paths stay inside (issue 22, point 3): names read from a bucket listing, a config or the command line
never escape the folder they belong to, and files Spindle writes are never written through a planted
symbolic link; staging folders on the shared staging disk are private and only our own are uploaded.

Each test was first run against the unfixed code and failed there (the report of the commit says how).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from spindle.checkpoint.staging import Staging
from spindle.checkpoint.storage import open_storage
from spindle.cli import main
from spindle.config import CkptConfig, validate_config
from spindle.config.load import save_resolved_config
from spindle.errors import SpindleError


# --------------------------------------------------------------------------- the run's config.json


def test_run_config_json_not_written_through_a_symlink(tmp_path):
    """A config.json planted as a link to a user's file: the file is untouched, the link replaced."""
    victim = tmp_path / "users_file.json"
    victim.write_text("precious")
    run = tmp_path / "runs" / "job"
    run.mkdir(parents=True)
    (run / "config.json").symlink_to(victim)
    out = save_resolved_config(validate_config({"JOB_NAME": "job"}), run)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and '"JOB_NAME": "job"' in out.read_text()


# --------------------------------------------------------------------------- S3 keys that climb out


ACCESS, SECRET = "AKIASPINDLEPATHS001", "paths-secret-never-printed"
CKPT_V1 = Path(__file__).resolve().parents[1] / "fixtures" / "ckpt_v1"


@pytest.fixture
def bucket(moto_server, monkeypatch):
    """A fresh bucket on the session's S3 server, its credentials in the environment, and a client."""
    import boto3

    for k, v in (("S3_ENDPOINT_URL", moto_server.endpoint), ("S3_ACCESS_KEY_ID", ACCESS),
                 ("S3_SECRET_ACCESS_KEY", SECRET)):
        monkeypatch.setenv(k, v)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    client = boto3.client("s3", endpoint_url=moto_server.endpoint, aws_access_key_id=ACCESS,
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    name = f"paths-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return name, client


def _put_checkpoint(client, bucket_name: str, prefix: str, extra: dict[str, bytes]) -> None:
    """The first-wave fixture checkpoint (step 2) under `prefix`, plus `extra` keys (relative to it)."""
    for path in sorted(CKPT_V1.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket_name, Key=f"{prefix}/{path.relative_to(CKPT_V1).as_posix()}",
                              Body=path.read_bytes())
    for rel, data in extra.items():
        client.put_object(Bucket=bucket_name, Key=f"{prefix}/{rel}", Body=data)


# every way a listed key can leave the step folder: climbing up, absolute, empty and dot parts
ESCAPING_RELS = ["x/../../../victim.txt", "../victim.txt", "x/../../victim.txt", "./x", "x//y", "x/./y"]


def test_download_refuses_a_key_that_leaves_the_destination(bucket, tmp_path):
    """S3Storage.download_dir: a listed key whose parts climb out of the destination (or are not plain
    names) is one line naming the key, and nothing is downloaded (before: the file landed in a parent of
    the destination, read from the bucket's normalised key)."""
    name, client = bucket
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    client.put_object(Bucket=name, Key="victim.txt", Body=b"planted by the bucket")  # what a normalised key reads
    storage = open_storage(f"boto3:s3://{name}/run")
    for step, rel in enumerate(ESCAPING_RELS):
        client.put_object(Bucket=name, Key=f"run/{step}/.metadata", Body=b"m")
        client.put_object(Bucket=name, Key=f"run/{step}/{rel}", Body=b"planted by the bucket")
        dest = tmp_path / "a" / "b" / str(step)
        dest.mkdir(parents=True)
        with pytest.raises(SpindleError) as err:
            storage.download_dir(str(step), str(dest))
        message = str(err.value)
        assert "\n" not in message and rel in message and SECRET not in message, rel
    assert victim.read_text() == "precious"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [victim]


def test_reading_a_checkpoint_with_a_climbing_key_leaves_user_files_alone(bucket, tmp_path, monkeypatch, capsys):
    """The measured attack: a key `<prefix>/2/x/../../../TARGET` in a checkpoint read by `convert to-hf`
    (the same download serves generate, eval and load_ckpt_info) overwrote TARGET; now exit 2, one line."""
    name, client = bucket
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    temp = tmp_path / "temp"  # where the download goes: temp/spindle-ckpt-2-*/
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    _put_checkpoint(client, name, "run", {"2/x/../../../victim.txt": b"planted by the bucket"})
    client.put_object(Bucket=name, Key="victim.txt", Body=b"planted by the bucket")
    code = main(["convert", "to-hf", f"boto3:s3://{name}/run", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert victim.read_text() == "precious" and code == 2
    assert err.count("\n") == 1 and "x/../../../victim.txt" in err and SECRET not in err
    assert not list(temp.glob("spindle-ckpt-*"))  # the download folder is cleaned up


# --------------------------------------------------------------------------- the shared staging disk


GONE_PID = 999999  # above any pid this test machine hands out: a run that is gone


def _staging(tmp_path) -> Staging:
    """The staging of a run saving to a (local stand-in for a) remote folder, on its own staging disk."""
    return Staging(open_storage(str(tmp_path / "remote")), CkptConfig(async_upload_tmp_folder=str(tmp_path / "shm")))


def _staged_checkpoint(folder: Path) -> None:
    """A complete staged checkpoint of step 2 (the fixture's files and the owner file a save writes first)."""
    shutil.copytree(CKPT_V1 / "2", folder)
    (folder / ".owner.json").write_text('{"lineage": "planted"}')


def _plant(kind: str, stage: Staging, tmp_path) -> Path:
    """A staging folder named like a dead run's that this user must not trust, planted as `kind`."""
    root = stage.base / f"spindle-{stage.key}-{GONE_PID}"
    if kind == "symlink":  # a link to a folder that would pass every other check
        elsewhere = tmp_path / "elsewhere"
        _staged_checkpoint(elsewhere / "2")
        elsewhere.chmod(0o700)
        stage.base.mkdir(parents=True)
        root.symlink_to(elsewhere, target_is_directory=True)
        return root
    _staged_checkpoint(root / "2")
    if kind == "world-writable":
        root.chmod(0o777)
    elif kind == "other-owner":  # tests run as root here; elsewhere this case needs root to chown
        if os.getuid() != 0:
            pytest.skip("simulating another user's folder needs root (os.chown)")
        root.chmod(0o700)
        os.chown(root, 12345, 12345)
    return root


@pytest.mark.parametrize("kind", ["world-writable", "symlink", "other-owner"])
def test_a_planted_staging_folder_is_never_uploaded(tmp_path, kind, spindle_lines):
    """A complete checkpoint planted on the staging disk under a dead run's name was uploaded, marked
    complete (and so auto-resumed); now it is named in one log line and left where it is."""
    lines = spindle_lines
    stage = _staging(tmp_path)
    root = _plant(kind, stage, tmp_path)
    committed = []
    stage.recover(committed.append)
    assert committed == [] and not stage.storage.exists("2") and not stage.storage.exists("2.step")
    assert len(lines) == 1 and str(root) in lines[0] and "left alone" in lines[0]
    assert (root / "2" / ".metadata").is_file()  # someone else's files are not deleted either


def test_our_own_staging_folder_is_private_and_still_recovered(tmp_path, spindle_lines):
    """Our staging folder is made 0700 (it was 0755: readable by every user); a dead run's own private
    folder is still uploaded and marked at the next start."""
    lines = spindle_lines
    stage = _staging(tmp_path)
    stage.folder("4")
    assert stat.S_IMODE(os.lstat(stage.root).st_mode) == 0o700
    mine = stage.base / f"spindle-{stage.key}-{GONE_PID}"
    _staged_checkpoint(mine / "2")
    mine.chmod(0o700)
    committed = []
    stage.recover(committed.append)
    assert [ref.rel for ref in committed] == ["2"] and stage.storage.exists("2/.metadata")
    assert not mine.exists() and any("uploaded step 2" in line for line in lines)


def test_a_folder_planted_under_our_own_name_is_not_written_into(tmp_path):
    """A folder planted under the name this process will stage in (its pid) is refused with one line."""
    stage = _staging(tmp_path)
    stage.root.mkdir(parents=True, mode=0o777)
    stage.root.chmod(0o777)
    with pytest.raises(SpindleError) as err:
        stage.folder("4")
    message = str(err.value)
    assert "\n" not in message and str(stage.root) in message and "async_upload_tmp_folder" in message
    assert not (stage.root / "4").exists()


def test_a_listed_name_with_dots_never_reaches_another_entry(tmp_path):
    """A name from a listing such as 'snapshot/0/x/../../2.step' (what the manager deletes when it clears a
    snapshot slot) was normalised to '2.step' and deleted that checkpoint's record; now it is refused."""
    storage = open_storage(str(tmp_path / "ckpt"))
    storage.write_bytes("2.step", b"2")
    with pytest.raises(SpindleError, match=r"snapshot/0/x/\.\./\.\./2\.step"):
        storage.delete_prefix("snapshot/0/x/../../2.step")
    assert storage.exists("2.step")


def test_a_bucket_prefix_holds_plain_names():
    """`boto3:s3://bucket/a/../b` was read as the prefix 'b' but listed as 'a/../b'; now one line."""
    for url in ("boto3:s3://bucket/a/../b", "boto3:s3://bucket/a/./b", "boto3:s3://bucket/a//b"):
        with pytest.raises(SpindleError, match="the key prefix"):
            open_storage(url)


# --------------------------------------------------------------------------- names and paths in a config


# every path-like key of a config (a tuple of its sections); JOB_NAME is a name (below)
PATH_KEYS = [("trainer", "run_folder"), ("ckpt", "save_ckpt_folder"), ("ckpt", "load_ckpt_folder"),
             ("ckpt", "load_ckpt_info", "path"), ("ckpt", "async_upload_tmp_folder"), ("ckpt", "snapshot_ckpt_folder"),
             ("ckpt", "stop_file_path"), ("monitor", "alert", "alert_file_path"), ("tensorboard_folder",),
             ("resume_tb_folder",), ("data", "train_folder"), ("data", "valid_folder"), ("data", "tokenizer_path")]
BAD_PATHS = {"NUL": "runs\x00x", "newline": "runs\nx", "carriage return": "runs\rx", "empty": ""}
# JOB_NAME names one folder inside trainer.run_folder: besides every bad path, anything that is not one name
BAD_NAMES = {**BAD_PATHS, "parent": "..", "climbing": "../hfmodel", "absolute": "/tmp/x", "two folders": "a/b",
             "dot": ".", "backslash": "a\\b", "blank": "  "}


def _nested(keys: tuple, value) -> dict:
    raw: dict = {}
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return raw


@pytest.mark.parametrize("keys,value", [(keys, value) for keys in PATH_KEYS for value in BAD_PATHS.values()] +
                         [(("JOB_NAME",), value) for value in BAD_NAMES.values()],
                         ids=[f"{'.'.join(keys)}-{form}" for keys in PATH_KEYS for form in BAD_PATHS] +
                         [f"JOB_NAME-{form}" for form in BAD_NAMES])
def test_config_names_and_paths_are_checked(keys, value):
    """Every path-like key x every bad form: one line naming the key (all were accepted before)."""
    with pytest.raises(SpindleError) as err:
        validate_config(_nested(keys, value), "my.py")
    message = str(err.value)
    assert message.startswith(f"my.py: {'.'.join(keys)}: ") and "\n" not in message and "\r" not in message
    assert "\x00" not in message


def test_paths_a_user_chooses_stay_free():
    """Absolute paths, '..' and bucket URLs are the user's own choice of place: accepted."""
    cfg = validate_config({"JOB_NAME": "7b_sft-v2.1", "trainer": {"run_folder": "../shared/runs"},
                           "ckpt": {"save_ckpt_folder": "boto3:s3://bucket/team/run",
                                    "load_ckpt_folder": "/abs/ckpt/10"}})
    assert cfg.run_dir == Path("../shared/runs/7b_sft-v2.1")


def test_a_climbing_job_name_writes_nothing_beside_the_run_folder(tmp_path, capsys):
    """The measured case: JOB_NAME='../hfmodel' wrote the run's config.json, metrics and logs into a sibling
    of the run folder (overwriting a model's config.json there); now exit 2 before anything is written."""
    (tmp_path / "hfmodel").mkdir()
    (tmp_path / "hfmodel" / "config.json").write_text('{"model_type": "llama"}')
    config = tmp_path / "tiny.py"
    config.write_text(f"JOB_NAME = '../hfmodel'\nmodel = dict(hidden_size=32, num_attention_heads=4, num_layers=1, "
                      f"vocab_size=64, multiple_of=16)\n"
                      f"data = dict(type='dummy', seq_len=16, micro_bsz=2, total_steps=1)\n"
                      f"trainer = dict(run_folder={str(tmp_path / 'runs')!r}, tensorboard=False, progress_bar=False, "
                      f"num_threads=1)\n")
    code = main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert (tmp_path / "hfmodel" / "config.json").read_text() == '{"model_type": "llama"}'
    assert code == 2 and err.count("\n") == 1 and "JOB_NAME" in err
    assert sorted(p.name for p in (tmp_path / "hfmodel").iterdir()) == ["config.json"]


# --------------------------------------------------------------------------- NUL bytes in command-line paths


# every path option of every command (the rest of the line valid enough to get past argparse)
PATH_OPTIONS = [
    ("generate", ["--ckpt", "{}", "--prompt", "x"]),
    ("generate", ["--ckpt", "ckpt", "--prompt", "x", "--tokenizer", "{}"]),
    ("eval ppl", ["--ckpt", "{}"]),
    ("eval ppl", ["--ckpt", "ckpt", "--tokenizer", "{}"]),
    ("eval ppl", ["--ckpt", "ckpt", "--out", "{}"]),
    ("eval ppl", ["--ckpt", "ckpt", "--data", "{}"]),
    ("eval ppl", ["--ckpt", "ckpt", "--glob", "{}"]),
    ("eval passkey", ["--ckpt", "{}"]),
    ("eval passkey", ["--ckpt", "ckpt", "--out", "{}"]),
    ("eval plot", ["{}"]),
    ("eval plot", ["run", "--out", "{}"]),
    ("convert to-hf", ["{}", "out"]),
    ("convert to-hf", ["ckpt", "{}"]),
    ("convert from-hf", ["{}", "out"]),
    ("convert from-internevo", ["{}", "out"]),
    ("convert from-internevo", ["src", "{}"]),
    ("train", ["--config", "{}"]),
    ("prepare", ["{}", "--out", "out"]),
    ("prepare", ["raw", "--out", "{}"]),
    ("prepare", ["raw", "--out", "out", "--tokenizer", "{}"]),
    ("tokenizer train", ["{}", "--vocab-size", "300", "--out", "out"]),
    ("tokenizer train", ["raw", "--vocab-size", "300", "--out", "{}"]),
    ("tokenizer info", ["{}"]),
]


def _option(args: list) -> str:
    """The option the NUL goes to ('--out'), or the position of a positional argument ('#0')."""
    at = args.index("{}")
    return args[at - 1] if at and args[at - 1].startswith("-") else f"#{at}"


@pytest.mark.parametrize("command,args", PATH_OPTIONS, ids=[f"{c}-{_option(a)}" for c, a in PATH_OPTIONS])
def test_a_nul_byte_in_a_path_option_is_one_line(command, args, tmp_path, monkeypatch, capsys):
    """A NUL byte in any path option: exit 2 and one line naming the option (a ValueError traceback from
    the OS before, in convert and eval --out). Run in an empty folder: nothing is written."""
    monkeypatch.chdir(tmp_path)
    argv = command.split() + [a.format("a\x00b") for a in args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "NUL" in err and "\x00" not in err, err
    assert not list(tmp_path.iterdir())
