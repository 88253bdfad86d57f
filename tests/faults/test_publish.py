"""Issue 22, point 4 (publishing is atomic and scoped) and the full-disk part of point 7, through the commands
that write a folder (`prepare --out`, `tokenizer train --out`, `convert ... OUT`, `eval --out`).

- kills at every instant of `prepare --overwrite`: a forked child counts its file-system calls (os.rename,
  replace, link, unlink, rmdir, mkdir, symlink, fsync and the renameat2 exchange) and SIGKILLs itself before
  the k-th, for every k; OUT is then the whole old or the whole new output, and the next command cleans up;
- two writers on one output: exactly one succeeds, the other is one line, exit 2;
- `--overwrite` keeps the unrelated files and folders of OUT;
- no command writes into or inside a checkpoint folder;
- a full disk is one line, exit 2, the previous output intact.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spindle import outputs
from spindle.cli import main as cli_main


ROOT = Path(__file__).resolve().parents[2]
FS_CALLS = ("rename", "replace", "link", "unlink", "rmdir", "mkdir", "symlink", "fsync")


def tree(root: Path) -> dict:
    """Every entry under `root`: files by content, folders as None."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        found.update({prefix + d: None for d in dirs})
        found.update({prefix + f: Path(dirpath, f).read_bytes() for f in files})
    return found


def write_tree(root: Path, content: dict) -> None:
    root.mkdir(parents=True)
    for rel, data in sorted(content.items()):
        (root / rel).mkdir(parents=True, exist_ok=True) if data is None else (root / rel).write_bytes(data)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("the old output\nline two\n" * 20)
    (tmp_path / "texts" / "b.txt").write_text("the new output\n" * 30)
    return tmp_path / "texts"


def prepare_argv(src: Path, out: Path, *flags) -> list[str]:
    return ["prepare", str(src), "--out", str(out), "--tokenizer", "byte", "--workers", "1", *flags]


def killed_child(argv: list[str], kill_at: int, exchange: bool, count_file: Path) -> int:
    """Run `spindle ARGV` in a forked child that SIGKILLs itself just before its `kill_at`-th file-system call
    (0: never; it then writes how many it made to `count_file`). Returns the wait status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    code = 70
    try:
        calls = [0]

        def counted(fn):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)
            return call

        for name in FS_CALLS:
            setattr(os, name, counted(getattr(os, name)))
        outputs._exchange = counted(outputs._exchange) if exchange else (lambda a, b: False)
        code = cli_main(argv)
        count_file.write_text(str(calls[0]))
    finally:
        os._exit(code)


def exchange_works(tmp_path: Path) -> bool:
    (tmp_path / "x1").mkdir()
    (tmp_path / "x2").mkdir()
    (tmp_path / "x1" / "in1").touch()
    works = outputs._exchange(str(tmp_path / "x1"), str(tmp_path / "x2"))
    if works:
        assert (tmp_path / "x2" / "in1").exists()
    return works


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_kill_at_any_instant_of_prepare_overwrite_leaves_the_old_or_the_new_output_whole(texts, tmp_path, exchange):
    """Before the fix, StagedFolder deleted the old token files and moved the new ones in one by one: a kill
    in between left a folder with no manifest or a manifest naming missing shards."""
    if exchange and not exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    out = tmp_path / "out"
    assert cli_main(prepare_argv(texts / "a.txt", out)) == 0
    (out / "notes.txt").write_text("mine")  # a user's files: in the old and in the new output
    (out / "keep").mkdir()
    (out / "keep" / "x.txt").write_text("also mine")
    old = tree(out)
    argv, count_file = prepare_argv(texts / "b.txt", out, "--overwrite"), tmp_path / "count"
    assert killed_child(argv, 0, exchange, count_file) == 0
    new, calls = tree(out), int(count_file.read_text())
    assert new != old and new["notes.txt"] == b"mine" and new["keep/x.txt"] == b"also mine"
    assert leftovers(out) == [] and calls > 10
    missing = 0
    for k in range(1, calls + 1):
        for path in [out, *out.parent.glob(".out.*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        write_tree(out, old)
        status = killed_child(argv, k, exchange, count_file)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        if not out.exists():  # only between the fallback's two renames
            assert not exchange, k
            missing += 1
            outputs.recover(str(out))  # what the next command on this output does first
        assert tree(out) in (old, new), f"killed before file-system call {k} of {calls}"
        outputs.recover(str(out))
        assert leftovers(out) == [], k  # dead processes' staging / old folders and the lock are gone
    assert missing == (0 if exchange else 1)
    assert cli_main(argv) == 0 and tree(out) == new and leftovers(out) == []


def test_a_second_writer_is_refused_while_the_first_holds_the_output(texts, tmp_path, capsys):
    """Before the fix there was no lock: the second prepare wrote the same output and exited 0."""
    out = tmp_path / "out"
    holder = outputs.WriterLock(str(out), str(out), "--out", "spindle prepare (the first writer)")
    holder.acquire()
    try:
        assert cli_main(prepare_argv(texts / "a.txt", out)) == 2
        one_line(capsys, f"--out {out}: another command is writing it now", f"pid {os.getpid()}: spindle prepare")
    finally:
        holder.release()
    assert not out.exists() and leftovers(out) == []
    assert cli_main(prepare_argv(texts / "a.txt", out)) == 0


def test_a_rival_that_published_after_the_first_check_is_not_replaced(texts, tmp_path, capsys, monkeypatch):
    """Before the fix the later of two prepare runs into one new --out replaced the other's output."""
    import spindle.data.prepare as prep

    out = tmp_path / "out"
    real_load = prep.load_tokenizer

    def rival_publishes_then_load(spec):  # runs after check_output passed on a missing --out
        monkeypatch.setattr(prep, "load_tokenizer", real_load)
        assert cli_main(prepare_argv(texts / "b.txt", out)) == 0
        return real_load(spec)

    monkeypatch.setattr(prep, "load_tokenizer", rival_publishes_then_load)
    capsys.readouterr()
    assert cli_main(prepare_argv(texts / "a.txt", out)) == 2
    one_line(capsys, f"--out {out}: already exists and is not empty; pass --overwrite")
    assert json.loads((out / "manifest.json").read_text())["sources"] == [str(texts / "b.txt")]  # the rival's
    assert leftovers(out) == []


def test_two_prepare_processes_into_one_new_out_exactly_one_succeeds(texts, tmp_path):
    """Two real processes started together: exactly one exits 0, the other says why in one line, exit 2."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "spindle.cli", *prepare_argv(texts / name, out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a.txt", "b.txt")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert len(err.strip().splitlines()) == 1 and ("another command is writing it now" in err
                                                    or "already exists and is not empty" in err), err
    assert sorted(tree(out)) == ["manifest.json", "shard-00000.idx.npy", "shard-00000.tokens"]
    assert leftovers(out) == []


# --------------------------------------------------------------------------- --overwrite is scoped


def small_checkpoint(folder: Path) -> Path:
    """A one-layer Spindle checkpoint (step 1) with the byte tokenizer, as a run saves it."""
    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig, validate_config
    from spindle.model.llama import build_model

    cfg = validate_config({"model": {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 1, "vocab_size": 96,
                                     "multiple_of": 16, "max_position_embeddings": 64},
                           "data": {"tokenizer_path": "byte"}})
    CheckpointManager(str(folder), CkptConfig()).save(1, build_model(cfg.model.to_args()), None, {"step": 1},
                                                      cfg.to_dict())
    return folder


def unrelated(out: Path) -> dict:
    (out / "README.md").write_text("my notes")
    (out / "other-model").mkdir()
    (out / "other-model" / "model.safetensors").write_bytes(b"someone else's weights")
    (out / "other-model" / "deep").mkdir()
    (out / "other-model" / "deep" / "config.json").write_text("{}")
    return {k: v for k, v in tree(out).items() if k.startswith(("README", "other-model"))}


def test_overwrite_keeps_unrelated_files_and_folders(texts, tmp_path, capsys):
    """Before the fix `convert to-hf OUT --overwrite` deleted everything in OUT (README, another model)."""
    ck = small_checkpoint(tmp_path / "ck")
    runs = {
        "to-hf": (["convert", "to-hf", str(ck)], {"model.safetensors", "config.json", "tokenizer.json"}),
        "from-hf": (["convert", "from-hf", str(tmp_path / "to-hf")], {"0", "0.step"}),
        "tokenizer": (["tokenizer", "train", str(texts / "a.txt"), "--vocab-size", "300", "--kind", "bpe", "--out"],
                      {"tokenizer.json", "tokenizer_config.json"}),
        "prepare": (["prepare", str(texts / "a.txt"), "--tokenizer", "byte", "--workers", "1", "--out"],
                    {"manifest.json", "shard-00000.tokens"}),
    }
    for name, (argv, written) in runs.items():
        out = tmp_path / name
        out.mkdir()
        kept = unrelated(out)
        (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of an earlier export")
        assert cli_main([*argv, str(out)]) == 2  # non-empty: needs --overwrite
        one_line(capsys, "--overwrite")
        assert cli_main([*argv, str(out), "--overwrite"]) == 0, capsys.readouterr().err
        now = tree(out)
        assert {k: v for k, v in now.items() if k in kept} == kept, name
        assert written <= set(now), (name, sorted(now))
        assert ("model-00002-of-00002.safetensors" in now) == (name != "to-hf"), name  # to-hf's own kind of file
        assert leftovers(out) == [], name


# --------------------------------------------------------------------------- never inside a checkpoint


def test_no_command_writes_into_or_inside_a_checkpoint(texts, tmp_path, capsys):
    """Before the fix `eval --out` could name its own checkpoint's step folder, prepare and convert any."""
    save = tmp_path / "save"
    (save / "8").mkdir(parents=True)
    (save / "8" / ".metadata").write_bytes(b"")
    (save / "8.step").write_text("{}")
    (save / "snapshot" / "1" / "4").mkdir(parents=True)
    (save / "snapshot" / "1" / "4.step").write_text("{}")
    before = tree(save)
    targets = [save, save / "8", save / "8" / "out", save / "new", save / "snapshot" / "1" / "4" / "x"]
    for target in targets:
        for argv in (prepare_argv(texts / "a.txt", target, "--overwrite"),
                     ["tokenizer", "train", str(texts / "a.txt"), "--vocab-size", "300", "--out", str(target)],
                     ["convert", "from-hf", str(texts), str(target), "--overwrite"],
                     ["eval", "ppl", "--ckpt", str(save), "--out", str(target), "--overwrite"]):
            assert cli_main(argv) == 2, argv
            one_line(capsys, str(target), "the checkpoint folder", "no command writes into checkpoints")
    (tmp_path / "run").mkdir()
    assert cli_main(["eval", "plot", str(tmp_path / "run"), "--out", str(save / "8" / "curves.png")]) == 2
    one_line(capsys, "the checkpoint folder")
    assert tree(save) == before


# --------------------------------------------------------------------------- full disk


class FileSizeLimit:
    """RLIMIT_FSIZE in this process with SIGXFSZ ignored: a write past `limit` bytes fails with EFBIG, as a
    full disk fails with ENOSPC, in every writer (numpy, safetensors' and tokenizers' Rust) with no root or
    tmpfs needed. Restored on exit."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
        signal.signal(signal.SIGXFSZ, self.handler)


def test_a_full_disk_is_one_line_and_leaves_the_previous_output_whole(texts, tmp_path, capsys):
    """Before the fix each of these was a traceback with exit 1 (OSError, numpy's errno-less 'N requested
    and M written', SafetensorError, tokenizers' Exception). The limit is RLIMIT_FSIZE (EFBIG)."""
    big = tmp_path / "big.txt"
    big.write_text("a line of text to tokenize\n" * 4000)
    ck = small_checkpoint(tmp_path / "ck")
    commands = {
        "prepare": ["prepare", str(big), "--tokenizer", "byte", "--workers", "1", "--overwrite", "--out"],
        "bpe": ["tokenizer", "train", str(big), "--vocab-size", "2000", "--kind", "bpe", "--overwrite", "--out"],
        "to-hf": ["convert", "to-hf", str(ck), "--overwrite"],
    }
    for name, argv in commands.items():
        out = tmp_path / name
        out.mkdir()
        (out / "previous.txt").write_text("the previous output")
        before = tree(out)
        with FileSizeLimit(4096):
            rc = cli_main([*argv, str(out)])
        assert rc == 2, name
        one_line(capsys, "file too large", "what was there before is intact", str(out))
        assert tree(out) == before and leftovers(out) == [], name


def test_no_space_left_is_named_so(texts, tmp_path, capsys, monkeypatch):
    """ENOSPC itself (the manifest writer monkeypatched to raise it, in-process): the line says there is no
    space. Before the fix: an OSError traceback, exit 1."""
    import spindle.data.prepare as prep

    out = tmp_path / "out"
    assert cli_main(prepare_argv(texts / "a.txt", out)) == 0
    before = tree(out)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prep, "write_manifest", full)
    assert cli_main(prepare_argv(texts / "b.txt", out, "--overwrite")) == 2
    one_line(capsys, "no space left on device while writing", str(out), "what was there before is intact")
    assert tree(out) == before and leftovers(out) == []
