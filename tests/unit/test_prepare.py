"""spindle prepare / write_json_bin: input formats, document units, parallel == serial, errors."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from spindle.cli import main as cli_main

from spindle.data.prepare import prepare, write_json_bin
from spindle.data.shards import open_documents, read_manifest
from spindle.errors import SpindleError

LINES = ["first line", "  second ", "", "third <s> line", "é ü"]
DOCS = ["first line", "second", "third <s> line", "é ü"]


def byte_doc(text: str) -> list[int]:
    return [256, *text.encode("utf-8"), 257]


def all_docs(src) -> list[list[int]]:
    return [src[i][0].tolist() for i in range(len(src))]


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n\n")
    (d / "c.json").write_text(json.dumps([{"text": t} for t in DOCS]))
    with gzip.open(d / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz one\r\ngz two\rgz three\n")
    (d / "e.py").write_text("def f():\n    return 1\n")
    return d


def test_prepare_all_formats(inputs, tmp_path):
    out = tmp_path / "out"
    s = prepare([str(inputs)], str(out), "byte", workers=1, progress=False)
    expected = DOCS + DOCS + DOCS + ["gz one", "gz two", "gz three"] + ["def f():\n    return 1\n"]
    src = open_documents(str(out), vocab_size=258)
    assert all_docs(src) == [byte_doc(t) for t in expected]
    assert s["documents"] == len(expected) and s["files"] == 5
    man = read_manifest(str(out))
    assert man["tokenizer"]["kind"] == "byte" and man["dtype"] == "<u2" and man["documents"] == len(expected)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "n": list(range(4))}), tmp_path / "x.parquet")
    src = open_documents(prepare([str(tmp_path / "x.parquet")], str(tmp_path / "o"), "byte", workers=1,
                                 progress=False)["out_dir"])
    assert all_docs(src) == [byte_doc(t) for t in DOCS]
    with pytest.raises(SpindleError, match=r"x\.parquet: no column 'body'"):
        prepare([str(tmp_path / "x.parquet")], str(tmp_path / "o2"), "byte", text_key="body", workers=1, progress=False)


def test_parallel_equals_serial_and_shard_rolling(tmp_path, monkeypatch):
    import spindle.data.documents as documents

    monkeypatch.setattr(documents, "BATCH_BYTES", 2000)  # many small tasks through the pool
    rng = np.random.default_rng(0)
    lines = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(1, 60))) for _ in range(3000)]
    (tmp_path / "big.txt").write_text("\n".join(lines) + "\n")
    s1 = prepare([str(tmp_path / "big.txt")], str(tmp_path / "o1"), "byte", workers=1, progress=False)
    s2 = prepare([str(tmp_path / "big.txt")], str(tmp_path / "o2"), "byte", workers=2, shard_size_mb=0.02,
                 progress=False)
    assert s2["shards"] > 1 and s1["shards"] == 1
    a, b = open_documents(str(tmp_path / "o1")), open_documents(str(tmp_path / "o2"))
    assert all_docs(a) == all_docs(b) == [byte_doc(t) for t in lines]


def test_min_length_and_overwrite(inputs, tmp_path):
    out = str(tmp_path / "o")
    s = prepare([str(inputs / "a.txt")], out, "byte", workers=1, min_length=9, progress=False)
    assert s["documents"] == 2 and s["dropped_short"] == 2
    with pytest.raises(SpindleError, match="--overwrite"):
        prepare([str(inputs / "a.txt")], out, "byte", workers=1, progress=False)
    assert prepare([str(inputs / "a.txt")], out, "byte", workers=1, overwrite=True, progress=False)["documents"] == 4


def test_doc_per_file_flag(inputs, tmp_path):
    s = prepare([str(inputs / "a.txt")], str(tmp_path / "o"), "byte", workers=1, doc_per_file=True, progress=False)
    assert s["documents"] == 1
    assert open_documents(str(tmp_path / "o"))[0][0].tolist() == byte_doc("\n".join(LINES) + "\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_inputs_name_file_and_line(tmp_path, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(SpindleError, match=r"bad\.jsonl: line 2: malformed JSON"):
        prepare([str(bad)], str(tmp_path / "o"), "byte", workers=workers, progress=False)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(SpindleError, match=r"nokey\.jsonl: line 3: no 'text' field"):
        prepare([str(nokey)], str(tmp_path / "o"), "byte", workers=workers, progress=False)
    utf = tmp_path / "utf.txt"
    utf.write_bytes(b"fine\nalso fine\nbad \xff here\n")
    with pytest.raises(SpindleError, match=r"utf\.txt: line 3: invalid UTF-8"):
        prepare([str(utf)], str(tmp_path / "o"), "byte", workers=workers, progress=False)


def test_bad_json_records(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"text": "a"}, {"other": 1}]))
    with pytest.raises(SpindleError, match=r"r\.json: record 1: no 'text' field"):
        prepare([str(p)], str(tmp_path / "o"), "byte", workers=1, progress=False)
    p.write_text('{"text": "not a list"}')
    with pytest.raises(SpindleError, match=r"r\.json: expected a top-level JSON list"):
        prepare([str(p)], str(tmp_path / "o"), "byte", workers=1, progress=False)
    with pytest.raises(SpindleError, match="missing"):
        prepare([str(tmp_path / "missing")], str(tmp_path / "o"), "byte", workers=1, progress=False)


def test_write_json_bin_matches_shards_and_raw_mode(inputs, tmp_path):
    binp = str(tmp_path / "j" / "x.bin")
    write_json_bin([str(inputs / "b.jsonl")], binp, "byte", workers=2)
    prepare([str(inputs / "b.jsonl")], str(tmp_path / "s"), "byte", workers=1, progress=False)
    assert all_docs(open_documents(binp)) == all_docs(open_documents(str(tmp_path / "s")))
    # --raw_json_line: the whole JSON line, newline included, is the document (InternEvo)
    rawp = str(tmp_path / "j" / "raw.bin")
    write_json_bin([str(inputs / "b.jsonl")], rawp, "byte", raw_json_line=True, workers=1)
    first = (inputs / "b.jsonl").read_text().split("\n")[0] + "\n"
    assert open_documents(rawp)[0][0].tolist() == byte_doc(first)
    rawj = str(tmp_path / "j" / "rawj.bin")
    write_json_bin([str(inputs / "c.json")], rawj, "byte", raw_json_line=True, workers=1)
    assert open_documents(rawj)[0][0].tolist() == byte_doc(json.dumps({"text": DOCS[0]}))


def test_prepare_main(inputs, tmp_path, capsys):
    assert cli_main(["prepare", str(inputs / "a.txt"), "--out", str(tmp_path / "o"), "--tokenizer", "byte",
                     "--workers", "1"]) == 0
    assert "4 documents" in capsys.readouterr().out
    assert cli_main(["prepare", str(inputs / "a.txt"), "--out", str(tmp_path / "o"), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and os.path.basename(str(tmp_path / "o")) in err


@pytest.mark.parametrize("vocab", [258, 1024, 70_000])
def test_render_json_lines_equals_json_dumps(vocab):
    from spindle.data.prepare import render_json_lines

    rng = np.random.default_rng(vocab)
    docs = [rng.integers(0, vocab, rng.integers(1, 30)).tolist() for _ in range(300)] + [[vocab - 1], [0, 0], [0]]
    flat = np.array([t for d in docs for t in d], dtype=np.uint32)
    blob, line_bytes = render_json_lines(flat, np.array([len(d) for d in docs]), vocab)
    lines = [(json.dumps({"tokens": d}) + "\n").encode() for d in docs]
    assert blob == b"".join(lines)
    assert line_bytes.tolist() == [len(x) for x in lines]


def test_inputs_with_symlink_loops_are_read_once(tmp_path):
    from spindle.data.documents import expand_inputs

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a\n")
    (d / "sub" / "b.txt").write_text("b\n")
    os.symlink(".", d / "loop")
    os.symlink("..", d / "sub" / "back")
    files = expand_inputs([str(d), str(d / "a.txt")])  # a folder and a file inside it
    assert [os.path.relpath(f, d) for f in files] == ["a.txt", "sub/b.txt"]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_prepare_never_overwrites_nor_writes_into_its_inputs(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a non-empty folder that prepare did not write
    argv = [str(inputs / "a.txt"), "--out", str(out), "--tokenizer", "byte", "--workers", "1"]
    assert cli_main(["prepare"] + argv) == 2
    one_line(capsys, f"--out {out}: already exists and is not empty", "--overwrite")
    assert snapshot(out) == {"notes.txt": b"mine"}
    # --overwrite: the token files are replaced (stale shards of a larger earlier output too), the rest kept
    (out / "shard-00007.tokens").write_bytes(b"old")
    assert cli_main(["prepare"] + argv + ["--overwrite", "--shard-size-mb", "1"]) == 0
    assert sorted(snapshot(out)) == ["manifest.json", "notes.txt", "shard-00000.idx.npy", "shard-00000.tokens"]
    assert (out / "notes.txt").read_text() == "mine"
    before = snapshot(out)
    # a failing run leaves the previous output byte-identical
    assert cli_main(["prepare", str(tmp_path / "missing.txt"), "--out", str(out), "--tokenizer", "byte",
                     "--overwrite"]) == 2
    one_line(capsys, "missing.txt")
    (inputs / "zz.jsonl").write_text('{"text": "x"}\n{"text": 5}\n')
    assert cli_main(["prepare", str(inputs), "--out", str(out), "--tokenizer", "byte", "--overwrite",
                     "--workers", "1"]) == 2
    one_line(capsys, "zz.jsonl", "line 2")
    assert snapshot(out) == before and not list(tmp_path.glob(".out.partial-*"))
    (inputs / "zz.jsonl").unlink()
    # never into (or above) an input folder, even with --overwrite
    inside = inputs / "shards"
    src = snapshot(inputs)
    assert cli_main(["prepare", str(inputs), "--out", str(inside), "--tokenizer", "byte", "--overwrite"]) == 2
    one_line(capsys, f"--out {inside}: is inside the input folder {inputs}")
    assert cli_main(["prepare", str(inputs), "--out", str(inputs), "--tokenizer", "byte", "--overwrite"]) == 2
    one_line(capsys, "is the input", "itself")
    assert cli_main(["prepare", str(inputs / "a.txt"), "--out", str(tmp_path), "--tokenizer", "byte",
                     "--overwrite"]) == 2
    one_line(capsys, f"--out {tmp_path}: holds the input")
    assert snapshot(inputs) == src and not inside.exists()


@pytest.mark.parametrize("option,value,expected", [
    ("--workers", "0", "argument --workers: expected an integer in [1, 1024], got 0"),
    ("--workers", "two", "argument --workers: expected an integer in [1, 1024], got 'two'"),
    ("--shard-size-mb", "0", "argument --shard-size-mb: expected a number in (0, 1048576]"),
    ("--shard-size-mb", "nan", "argument --shard-size-mb: expected a number in (0, 1048576], got nan"),
    ("--shard-size-mb", "inf", "got inf"),
    ("--min-length", "-1", "argument --min-length: expected an integer in [0, 2147483647], got -1"),
    ("--min-length", "1.5", "argument --min-length: expected an integer"),
    ("--text-key", "", "argument --text-key: expected a non-empty name"),
    ("--out", "", "argument --out: expected a path"),
    ("--tokenizer", "/nowhere/tok.model", "/nowhere/tok.model"),
    ("--bogus", "1", "unrecognized arguments: --bogus"),
])
def test_prepare_options_are_validated(inputs, tmp_path, capsys, option, value, expected):
    argv = [str(inputs / "a.txt"), "--out", str(tmp_path / "o"), "--tokenizer", "byte", option, value]
    assert cli_main(["prepare"] + argv) == 2
    one_line(capsys, expected)
    assert not (tmp_path / "o").exists()


def test_prepare_requires_inputs_and_out(capsys, tmp_path):
    assert cli_main(["prepare", "--out", str(tmp_path / "o")]) == 2
    one_line(capsys, "the following arguments are required: inputs")
    assert cli_main(["prepare", str(tmp_path)]) == 2
    one_line(capsys, "--out")


# ------------------------------------------------------------------------------ Hub dataset folders


def jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def texts_of(out):
    return [bytes(d.tolist()[1:-1]).decode() for d, _ in open_documents(str(out))]


def hub_markers(root, card="---\nlicense: mit\n---\n# Card\nnot data\n"):
    (root / "README.md").write_text(card)
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    (root / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download" / "x.jsonl.lock").write_text("")
    (root / ".cache" / "huggingface" / "download" / "x.jsonl").write_text('{"text": "cached"}\n')


def test_hub_dataset_folder_takes_one_split(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["train a", "train b"]}), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["test a"]}), repo / "data" / "test-00000-of-00001.parquet")
    hub_markers(repo)
    assert cli_main(["prepare", str(repo), "--out", str(tmp_path / "o"), "--tokenizer", "byte", "--workers", "1"]) == 0
    assert texts_of(tmp_path / "o") == ["train a", "train b"]  # no card, no cache, no test split
    out = capsys.readouterr().out
    assert f"{repo}: split 'train', 1 file(s): data/train-00000-of-00001.parquet" in out
    s = prepare([str(repo)], str(tmp_path / "t"), "byte", workers=1, progress=False, split="test")
    assert texts_of(tmp_path / "t") == ["test a"] and s["taken"] == {str(repo): ("test", [
        str(repo / "data" / "test-00000-of-00001.parquet")])}
    assert cli_main(["prepare", str(repo), "--out", str(tmp_path / "v"), "--tokenizer", "byte",
                     "--split", "validation"]) == 2
    one_line(capsys, "--split: ", "has no split 'validation'; its splits: train, test")


def test_config_folders_and_split_files(tmp_path, capsys):
    repo = tmp_path / "multi"
    for cfg in ("en", "de"):
        jsonl(repo / cfg / "train" / "part.jsonl", [f"{cfg} train"])
        jsonl(repo / cfg / "test" / "part.jsonl", [f"{cfg} test"])
    hub_markers(repo)
    assert cli_main(["prepare", str(repo), "--out", str(tmp_path / "o"), "--tokenizer", "byte"]) == 2
    one_line(capsys, f"{repo}: holds several configs (de, en)", "--subset")
    prepare([str(repo)], str(tmp_path / "o"), "byte", workers=1, progress=False, subset="de")
    assert texts_of(tmp_path / "o") == ["de train"]
    flat = tmp_path / "flat"  # {split}-*.jsonl at the top, no card: a split layout given --split
    jsonl(flat / "train-0.jsonl", ["t0"])
    jsonl(flat / "validation-0.jsonl", ["v0"])
    prepare([str(flat)], str(tmp_path / "f"), "byte", workers=1, progress=False, split="validation")
    assert texts_of(tmp_path / "f") == ["v0"]
    # without hub markers and without --split a folder is just files: every file is read
    prepare([str(flat)], str(tmp_path / "g"), "byte", workers=1, progress=False)
    assert texts_of(tmp_path / "g") == ["t0", "v0"]


CARD_CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "texts/a-*.jsonl"
  - split: test
    path: "texts/b-*.jsonl"
- config_name: other
  data_files: "other/*.jsonl"
---
# a card
"""


def test_readme_configs(tmp_path, capsys):
    repo = tmp_path / "cards"
    jsonl(repo / "texts" / "a-0.jsonl", ["default train"])
    jsonl(repo / "texts" / "b-0.jsonl", ["default test"])
    jsonl(repo / "other" / "x.jsonl", ["other train"])
    hub_markers(repo, card=CARD_CONFIGS)
    prepare([str(repo)], str(tmp_path / "d"), "byte", workers=1, progress=False)
    assert texts_of(tmp_path / "d") == ["default train"]
    prepare([str(repo)], str(tmp_path / "o"), "byte", workers=1, progress=False, subset="other")
    assert texts_of(tmp_path / "o") == ["other train"]
    assert cli_main(["prepare", str(repo), "--out", str(tmp_path / "x"), "--tokenizer", "byte",
                     "--subset", "nope"]) == 2
    one_line(capsys, "--subset: ", "has no config 'nope'; its configs: default, other")
    assert cli_main(["prepare", str(repo), "--out", str(tmp_path / "x"), "--tokenizer", "byte",
                     "--subset", "../up"]) == 2
    one_line(capsys, "argument --subset: expected a name inside the dataset folder")
