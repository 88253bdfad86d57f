"""A checkpoint someone else wrote is data, never code (issue 22, points 1 and 2).

The crafted checkpoints here are complete and self-consistent (an attacker writes the completion record
too): one entry that torch DCP would unpickle with `weights_only=False` holds an object whose unpickling
creates a marker file. Every loader must refuse it in one line, exit 2, and the marker must not exist.
A flipped byte in a tensor shard (same size) is refused by its hash, or skipped for the newest intact
checkpoint on auto_resume.
"""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch

from spindle.checkpoint import dcp_io
from spindle.cli import main as spindle_main
from spindle.config import validate_config
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer


class Payload:
    """Unpickling this creates `marker` (what arbitrary code would do, without doing harm)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def tiny_raw(tmp: Path, **ckpt) -> dict:
    text = tmp / "text"
    text.mkdir(exist_ok=True)
    for i in range(3):
        (text / f"doc{i}.txt").write_text("def f(x):\n    return x + 1\n" * (20 + 5 * i))
    return {
        "JOB_NAME": "tiny",
        "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": f"local:{tmp}/ckpt", "checkpoint_every": 2,
                 **ckpt},
        "data": {"type": "text", "train_folder": str(text), "text_glob": "*.txt", "tokenizer_path": "byte",
                 "seq_len": 16, "micro_bsz": 2, "total_steps": 2},
        "model": {"hidden_size": 16, "num_attention_heads": 2, "num_kv_attention_heads": 2, "num_layers": 1,
                  "vocab_size": 258, "multiple_of": 16, "max_position_embeddings": 16},
        "trainer": {"run_folder": str(tmp / "runs"), "tensorboard": False, "progress_bar": False,
                    "num_threads": 1},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in raw.items()))
    return path


def train(raw: dict) -> None:
    Trainer(validate_config(raw), ParallelEnv()).fit()


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """{kind: (folder, marker)}: a checkpoint whose model entry, and one whose optimizer entry, is a pickle."""
    out = {}
    for kind in ("model", "optimizer"):
        tmp = tmp_path_factory.mktemp(f"crafted-{kind}")
        marker = tmp / "PWNED"
        real_model, real_optim = dcp_io.get_model_state_dict, dcp_io.get_optimizer_state_dict

        def model_sd(model, *a, **k):
            sd = real_model(model, *a, **k)
            if kind == "model":
                sd["tok_embeddings.weight"] = Payload(str(marker))
            return sd

        def optim_sd(model, optim, *a, **k):
            sd = real_optim(model, optim, *a, **k)
            if kind == "optimizer":
                key = next(k for k in sd if k.startswith("param_groups.") and k.endswith(".lr"))
                sd[key] = Payload(str(marker))
            return sd

        mp = pytest.MonkeyPatch()
        mp.setattr(dcp_io, "get_model_state_dict", model_sd)
        mp.setattr(dcp_io, "get_optimizer_state_dict", optim_sd)
        try:
            train(tiny_raw(tmp))
        finally:
            mp.undo()
        assert (tmp / "ckpt" / "2.step").is_file() and not marker.exists()
        out[kind] = (tmp, marker)
    return out


def loader_commands(tmp: Path, kind: str) -> list[list[str]]:
    ckpt = str(tmp / "ckpt" / "2")
    resume = tiny_raw(tmp, auto_resume=True)
    resume["data"]["total_steps"] = 4
    start = tiny_raw(tmp, auto_resume=False, save_ckpt_folder=f"local:{tmp}/new",
                     load_ckpt_info={"path": ckpt, "content": ["all"] if kind == "optimizer" else ["model"]})
    commands = [
        ["train", "--config", str(write_config(tmp / "resume.py", resume))],
        ["train", "--config", str(write_config(tmp / "start.py", start))],
    ]
    if kind == "model":  # these read weights only
        commands += [["generate", "--ckpt", ckpt, "--prompt", "def", "--max-new-tokens", "2"],
                     ["convert", "to-hf", ckpt, str(tmp / "hf")],
                     ["eval", "ppl", "--ckpt", ckpt, "--lengths", "16", "--data", str(tmp / "text")]]
    return commands


@pytest.mark.parametrize("kind", ["model", "optimizer"])
def test_no_loader_runs_code_from_a_checkpoint(crafted, kind, capsys):
    tmp, marker = crafted[kind]
    for argv in loader_commands(tmp, kind):
        capsys.readouterr()
        code = spindle_main(argv)
        err = capsys.readouterr().err.strip()
        assert not marker.exists(), f"spindle {' '.join(argv)} ran the checkpoint's code"
        assert code == 2, (argv, code, err)
        assert err.count("\n") == 0 and "pickled" in err and "2" in err, (argv, err)


def test_a_model_key_declared_as_bytes_is_not_skipped_by_the_shape_check(crafted):
    tmp, marker = crafted["model"]
    from spindle.errors import SpindleError
    from spindle.model.llama import build_model

    cfg = validate_config(tiny_raw(tmp))
    model = build_model(cfg.model.to_args())
    with pytest.raises(SpindleError, match="tok_embeddings.weight.*pickled"):
        dcp_io.check_model_shapes(tmp / "ckpt" / "2", model.state_dict())
    assert not marker.exists()


def test_our_own_non_tensor_entries_still_load(tmp_path):
    """The optimizer's param_groups values (floats, tuples, bools) are DCP byte entries we wrote: they load
    without unpickling code, and a resume with all content is exact."""
    (tmp_path / "full").mkdir()
    full = tiny_raw(tmp_path / "full", auto_resume=False)
    full["data"]["total_steps"] = 4
    reference = Trainer(validate_config(full), ParallelEnv()).fit()
    (tmp_path / "stop").write_text("2")  # the first run stops (and saves) after step 2 of 4
    raw = tiny_raw(tmp_path, auto_resume=True, stop_file_path=str(tmp_path / "stop"))
    raw["data"]["total_steps"] = 4
    train(raw)
    (tmp_path / "stop").unlink()
    resumed = Trainer(validate_config(raw), ParallelEnv())
    assert resumed.state.step == 2
    rest = resumed.fit()
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in reference["history"]][2:]


# --------------------------------------------------------------------------- content hashes


def flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_completion_record_hashes_every_file(tmp_path):
    train(tiny_raw(tmp_path))
    record = json.loads((tmp_path / "ckpt" / "2.step").read_text())
    names = {p.name for p in (tmp_path / "ckpt" / "2").iterdir()}
    assert set(record["files"]) == names and any(n.endswith(".distcp") for n in names)
    assert all(len(meta.get("sha256", "")) == 64 for meta in record["files"].values())


def test_a_flipped_byte_in_a_shard_is_refused(tmp_path, capsys):
    train(tiny_raw(tmp_path))
    shard = next((tmp_path / "ckpt" / "2").glob("*.distcp"))
    size = shard.stat().st_size
    flip_a_byte(shard)
    assert shard.stat().st_size == size
    code = spindle_main(["generate", "--ckpt", str(tmp_path / "ckpt" / "2"), "--prompt", "d",
                         "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and shard.name in err and "content differs" in err, err


def test_auto_resume_skips_a_flipped_checkpoint_for_the_newest_intact_one(tmp_path, spindle_lines):
    raw = tiny_raw(tmp_path, auto_resume=True, checkpoint_every=1)
    train(raw)
    flip_a_byte(next((tmp_path / "ckpt" / "2").glob("*.distcp")))
    raw["data"]["total_steps"] = 3
    lines = spindle_lines
    lines.clear()  # from here on
    resumed = Trainer(validate_config(raw), ParallelEnv())
    assert resumed.state.step == 1
    assert any("checkpoint 2 is damaged" in line and "content differs" in line for line in lines), lines


def test_size_only_verification_is_a_switch_and_says_so(tmp_path, spindle_lines):
    raw = tiny_raw(tmp_path, auto_resume=True, verify="size")
    train(raw)
    raw["data"]["total_steps"] = 3
    lines = spindle_lines
    lines.clear()  # from here on
    resumed = Trainer(validate_config(raw), ParallelEnv())
    assert resumed.state.step == 2
    assert any("ckpt.verify='size'" in line for line in lines), lines


def test_a_flipped_byte_in_a_shard_on_s3_is_refused_once_downloaded(moto_server, tmp_path, monkeypatch, capsys):
    """A remote checkpoint's record holds its shards' hashes, taken from the staged files before the upload;
    a same-size change of the uploaded shard is found when the checkpoint is downloaded to be read."""
    import hashlib
    import uuid

    import boto3

    access, secret = "AKIDSPINDLETEST", "spindle-test-secret"
    for k, v in (("S3_ENDPOINT_URL", moto_server.endpoint), ("S3_ACCESS_KEY_ID", access),
                 ("S3_SECRET_ACCESS_KEY", secret)):
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, aws_access_key_id=access,
                      aws_secret_access_key=secret, region_name="us-east-1")
    bucket = f"spindle-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    raw = tiny_raw(tmp_path)
    raw["ckpt"].update(save_ckpt_folder=f"boto3:s3://{bucket}/run", async_upload_tmp_folder=str(tmp_path / "st"))
    train(raw)
    record = json.loads(s3.get_object(Bucket=bucket, Key="run/2.step")["Body"].read())
    shard = next(name for name in record["files"] if name.endswith(".distcp"))
    data = bytearray(s3.get_object(Bucket=bucket, Key=f"run/2/{shard}")["Body"].read())
    assert record["files"][shard]["sha256"] == hashlib.sha256(data).hexdigest()
    data[-100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=f"run/2/{shard}", Body=bytes(data))
    code = spindle_main(["generate", "--ckpt", f"boto3:s3://{bucket}/run", "--prompt", "d", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and shard in err and "content differs" in err, err


def test_each_rank_hashes_its_staged_shard_and_the_writer_gathers_them(tmp_path):
    """The gather of `_staged_digests` on a 1-rank gloo group (the code every rank runs under torchrun)."""
    import hashlib

    import torch.distributed as dist

    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig

    (tmp_path / "__0_0.distcp").write_bytes(b"shard of rank 0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        manager = CheckpointManager(str(tmp_path / "ck"), CkptConfig(), distributed=True)
        digests = manager._staged_digests(tmp_path)
    finally:
        dist.destroy_process_group()
    assert digests == {"__0_0.distcp": hashlib.sha256(b"shard of rank 0").hexdigest()}


FOREIGN_LOADERS = {  # loader -> (file it reads, the command), each given a pickle that would run code
    "hf .bin": ("pytorch_model.bin", ["convert", "from-hf"]),
    "internevo .pt": ("model_tp0_pp0.pt", ["convert", "from-internevo"]),
}


@pytest.mark.parametrize("loader", sorted(FOREIGN_LOADERS))
def test_foreign_weight_files_never_run_code(tmp_path, loader, capsys):
    name, command = FOREIGN_LOADERS[loader]
    marker = tmp_path / "PWNED"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
        "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32,
        "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}))
    torch.save({"model.embed_tokens.weight": Payload(str(marker))}, src / name)
    code = spindle_main([*command, str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), f"{loader}: the file's code ran"
    assert code == 2 and "\n" not in err and name in err, err
