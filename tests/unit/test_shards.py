"""On-disk token formats: InternEvo .bin/.bin.meta byte layout, binary shards, validation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from spindle.data.shard_writers import JsonBinWriter, ShardWriter, json_line, write_manifest
from spindle.data.shards import find_token_files, open_documents, read_manifest
from spindle.errors import SpindleError

DOCS = [[1, 333, 352, 2], [1, 5, 2], [1, 7, 8, 9, 10, 11, 12, 13, 14, 2]]


def write_seed_bin(path, docs, meta_dtype):
    """The .bin/.bin.meta exactly as InternEvo's tools write them, built by hand."""
    buf, rows = b"", []
    for d in docs:
        line = (json.dumps({"tokens": d}) + "\n").encode()
        rows.append((len(buf), len(d)))
        buf += line
    path.write_bytes(buf)
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.array(rows, dtype=meta_dtype))
    return buf, rows


def test_json_line_matches_json_dumps():
    for d in ([], [0], [1, -2, 30000], list(range(-5, 300))):
        assert json_line(d) == (json.dumps({"tokens": d}) + "\n").encode()


def test_json_writer_byte_exact(tmp_path):
    p = tmp_path / "out.bin"
    w = JsonBinWriter(str(p))
    for d in DOCS:
        w.add(d)
    w.close()
    expected = b'{"tokens": [1, 333, 352, 2]}\n{"tokens": [1, 5, 2]}\n{"tokens": [1, 7, 8, 9, 10, 11, 12, 13, 14, 2]}\n'
    assert p.read_bytes() == expected
    meta = np.load(str(p) + ".meta")
    assert meta.dtype == np.int64 and meta.shape == (3, 2)
    assert meta.tolist() == [[0, 4], [29, 3], [51, 10]]
    # the .meta file is a plain .npy (magic, header, then row-major little-endian int64)
    raw = open(str(p) + ".meta", "rb").read()
    assert raw.startswith(b"\x93NUMPY") and b"'descr': '<i8'" in raw and b"'shape': (3, 2)" in raw
    assert raw.endswith(np.array([[0, 4], [29, 3], [51, 10]], "<i8").tobytes())


@pytest.mark.parametrize("meta_dtype", [np.int32, np.int64])
def test_read_seed_meta_int32_and_int64(tmp_path, meta_dtype):
    p = tmp_path / "seed.bin"
    write_seed_bin(p, DOCS, meta_dtype)
    src = open_documents(str(p), vocab_size=400)
    assert len(src) == 3 and src.lengths.dtype == np.int64 and src.lengths.tolist() == [4, 3, 10]
    for i, d in enumerate(DOCS):
        toks, mask = src[i]
        assert toks.dtype == np.int64 and toks.tolist() == d and mask is None
    assert src.path == str(p)


def test_negative_ids_become_mask(tmp_path):
    p = tmp_path / "sft.bin"
    write_seed_bin(p, [[1, -20, -21, 30, 31, 2], [1, 5, 2]], np.int64)
    src = open_documents(str(p))
    toks, mask = src[0]
    assert toks.tolist() == [1, 20, 21, 30, 31, 2]
    assert mask.dtype == bool and mask.tolist() == [True, False, False, True, True, True]
    assert src.has_loss_mask
    assert src[1][1].tolist() == [True, True, True]


@pytest.mark.parametrize("vocab,dtype", [(1000, "<u2"), (70000, "<u4")])
def test_binary_shard_roundtrip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, n) for n in (1, 7, 8, 9, 100, 3)]
    masks = [rng.random(len(d)) < 0.5 for d in docs]
    w = ShardWriter(str(tmp_path), "shard-00000", vocab, with_loss_mask=True)
    for d, m in zip(docs[:3], masks[:3]):
        w.add(d, m)
    lengths = np.array([len(d) for d in docs[3:]])
    w.add_many(lengths, np.concatenate(docs[3:]), np.concatenate(masks[3:]))
    entry = w.close()
    write_manifest(str(tmp_path), {"kind": "test"}, [entry])
    assert entry["dtype"] == dtype and entry["documents"] == 6
    assert os.path.getsize(tmp_path / "shard-00000.tokens") == sum(map(len, docs)) * np.dtype(dtype).itemsize
    man = read_manifest(str(tmp_path))
    assert man["version"] == 1 and man["tokens"] == sum(map(len, docs)) and man["tokenizer"] == {"kind": "test"}
    src = open_documents(str(tmp_path / "shard-00000.tokens"), vocab_size=vocab)
    assert len(src) == 6 and src.lengths.tolist() == [len(d) for d in docs]
    for i, (d, m) in enumerate(zip(docs, masks)):
        toks, mask = src[i]
        assert toks.dtype == np.int64 and toks.tolist() == d.tolist()
        assert mask.tolist() == m.tolist()
    # the base name works too, and a folder opens as one source
    assert len(open_documents(str(tmp_path / "shard-00000"))) == 6
    assert len(open_documents(str(tmp_path))) == 6


def test_find_token_files_and_folder(tmp_path):
    (tmp_path / "en" / "b").mkdir(parents=True)
    (tmp_path / "cn").mkdir()
    write_seed_bin(tmp_path / "en" / "b" / "x.bin", DOCS, np.int32)
    write_seed_bin(tmp_path / "cn" / "y.bin", DOCS[:1], np.int64)
    w = ShardWriter(str(tmp_path / "en"), "shard-00000", 400)
    w.add([1, 2, 3])
    w.close()
    files = find_token_files(str(tmp_path))
    rel = [os.path.relpath(f, tmp_path) for f in files]
    assert rel == ["cn/y.bin", "en/b/x.bin", "en/shard-00000.tokens"]
    src = open_documents(str(tmp_path))
    assert len(src) == 1 + 3 + 1
    assert src[0][0].tolist() == DOCS[0] and src[4][0].tolist() == [1, 2, 3] and src[-1][0].tolist() == [1, 2, 3]
    with pytest.raises(SpindleError, match="nowhere"):
        find_token_files(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ bad inputs


def test_json_bad_meta_offsets(tmp_path):
    p = tmp_path / "a.bin"
    buf, rows = write_seed_bin(p, DOCS, np.int64)
    np.save(open(str(p) + ".meta", "wb"), np.array(rows + [(len(buf) + 10, 3)], np.int64))
    with pytest.raises(SpindleError, match=r"a\.bin.*outside"):
        open_documents(str(p))
    src = open_documents(str(p), on_error="skip")
    assert len(src) == 3 and src.skipped == 1
    np.save(open(str(p) + ".meta", "wb"), np.array([(0, 4), (5, 3)], np.int64))
    with pytest.raises(SpindleError, match="not the start of a line"):
        open_documents(str(p))


def test_json_count_mismatch(tmp_path):
    p = tmp_path / "a.bin"
    buf, rows = write_seed_bin(p, DOCS, np.int32)
    rows[1] = (rows[1][0], 99)
    np.save(open(str(p) + ".meta", "wb"), np.array(rows, np.int32))
    with pytest.raises(SpindleError, match=r"a\.bin line 2 holds 3"):
        open_documents(str(p))
    src = open_documents(str(p), on_error="skip")
    assert src.skipped == 1 and [src[i][0].tolist() for i in range(len(src))] == [DOCS[0], DOCS[2]]


def test_json_malformed_line(tmp_path):
    p = tmp_path / "a.bin"
    write_seed_bin(p, DOCS, np.int64)
    data = p.read_bytes().split(b"\n")
    data[1] = b'{"tokens": [1, 5, 2'  # same offsets for line 3 would shift, so rebuild meta
    p.write_bytes(b"\n".join(data))
    offs = [0, len(data[0]) + 1, len(data[0]) + len(data[1]) + 2]
    np.save(open(str(p) + ".meta", "wb"), np.array([(offs[0], 4), (offs[1], 3), (offs[2], 10)], np.int64))
    with pytest.raises(SpindleError, match=r"a\.bin: line 2: malformed JSON"):
        open_documents(str(p))
    src = open_documents(str(p), on_error="skip")
    assert src.skipped == 1 and len(src) == 2
    p.write_bytes(b'{"tokens": [1, "x"]}\n')
    np.save(open(str(p) + ".meta", "wb"), np.array([(0, 2)], np.int64))
    with pytest.raises(SpindleError, match="line 1"):
        open_documents(str(p))


def test_vocab_violations(tmp_path):
    p = tmp_path / "a.bin"
    write_seed_bin(p, DOCS, np.int64)
    with pytest.raises(SpindleError, match=r"a\.bin: line 1: token id 352 >= vocab size 300"):
        open_documents(str(p), vocab_size=300)
    assert len(open_documents(str(p), vocab_size=300, on_error="skip")) == 2
    w = ShardWriter(str(tmp_path), "s", 70000)
    w.add([1, 2, 3])
    w.add([1, 60000, 3])
    w.close()
    with pytest.raises(SpindleError, match=r"s\.tokens.*vocab size 1000.*document 1"):
        open_documents(str(tmp_path / "s.tokens"), vocab_size=1000)
    src = open_documents(str(tmp_path / "s.tokens"), vocab_size=1000, on_error="skip")
    assert src.skipped == 1 and len(src) == 1 and src[0][0].tolist() == [1, 2, 3]


def test_empty_and_missing_files(tmp_path):
    p = tmp_path / "e.bin"
    p.write_bytes(b"")
    np.save(open(str(p) + ".meta", "wb"), np.zeros((0, 2), np.int64))
    with pytest.raises(SpindleError, match=r"e\.bin: empty"):
        open_documents(str(p))
    q = tmp_path / "nometa.bin"
    q.write_bytes(b'{"tokens": [1]}\n')
    with pytest.raises(SpindleError, match=r"nometa\.bin\.meta"):
        open_documents(str(q))
    (tmp_path / "z.tokens").write_bytes(b"")
    np.save(str(tmp_path / "z.idx.npy"), np.zeros(1, np.int64))
    with pytest.raises(SpindleError, match=r"z\.tokens: empty"):
        open_documents(str(tmp_path / "z.tokens"))
    with pytest.raises(SpindleError, match="absent"):
        open_documents(str(tmp_path / "absent.bin"))
    garbage = tmp_path / "g.bin"
    garbage.write_bytes(b'{"tokens": [1]}\n')
    (tmp_path / "g.bin.meta").write_bytes(b"not npy")
    with pytest.raises(SpindleError, match=r"g\.bin\.meta"):
        open_documents(str(garbage))


def test_binary_index_disagrees(tmp_path):
    w = ShardWriter(str(tmp_path), "s", 1000)
    w.add([1, 2, 3, 4])
    w.close()
    np.save(str(tmp_path / "s.idx.npy"), np.array([0, 2, 9], np.int64))
    with pytest.raises(SpindleError, match=r"s\.tokens: size 8 bytes does not fit 9"):
        open_documents(str(tmp_path / "s.tokens"))
    np.save(str(tmp_path / "s.idx.npy"), np.array([0, 3, 2, 4], np.int64))
    with pytest.raises(SpindleError, match=r"s\.idx\.npy: offsets"):
        open_documents(str(tmp_path / "s.tokens"))
    np.save(str(tmp_path / "s.idx.npy"), np.array([0, 4], np.int64))
    write_manifest(str(tmp_path), None, [{"name": "s", "dtype": "<u4", "documents": 1, "tokens": 4}])
    with pytest.raises(SpindleError, match="manifest says <u4"):
        open_documents(str(tmp_path / "s.tokens"))


# ------------------------------------------------------------------------------ files changing under a reader


def _changes(path):
    """Ways a file changes under a running job: truncated, rewritten in place (same size), replaced."""
    data = path.read_bytes()

    def truncate():
        os.truncate(path, len(data) // 2)

    def rewrite():
        st = os.stat(path)
        path.write_bytes(data[::-1])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewrite within the clock tick still counts

    def replace():
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    return {"truncated": truncate, "rewritten": rewrite, "replaced": replace}


@pytest.mark.parametrize("how", ["truncated", "rewritten", "replaced"])
@pytest.mark.parametrize("kind", ["tokens", "mask", "bin"])
def test_a_file_changed_under_a_reader_is_an_error_naming_it(tmp_path, kind, how):
    if kind == "bin":
        write_seed_bin(tmp_path / "a.bin", DOCS, np.int64)
        src, victim = open_documents(str(tmp_path / "a.bin")), tmp_path / "a.bin"
    else:
        w = ShardWriter(str(tmp_path), "s", 1000, with_loss_mask=True)
        for d in DOCS:
            w.add(d, np.arange(len(d)) % 2 == 0)
        w.close()
        src = open_documents(str(tmp_path / "s.tokens"))
        victim = tmp_path / ("s.tokens" if kind == "tokens" else "s.mask")
    assert src[2][0].tolist() == DOCS[2]
    _changes(victim)[how]()
    with pytest.raises(SpindleError, match=f"{victim.name}: token file (truncated|rewritten or replaced)") as e:
        src[2]
    assert str(victim) in str(e.value)
    victim.unlink()
    with pytest.raises(SpindleError, match=f"{victim.name}: token file disappeared"):
        src[0]


def test_symlink_loops_list_every_real_file_once(tmp_path):
    (tmp_path / "en" / "b").mkdir(parents=True)
    write_seed_bin(tmp_path / "en" / "b" / "x.bin", DOCS, np.int64)
    write_seed_bin(tmp_path / "y.bin", DOCS[:1], np.int64)
    os.symlink(".", tmp_path / "self")  # two loops: the folder into itself, a sub-folder back to the top
    os.symlink("../..", tmp_path / "en" / "b" / "top")
    os.symlink("b", tmp_path / "en" / "c")  # a second name for one folder
    os.symlink("missing", tmp_path / "dangling.bin")
    rel = [os.path.relpath(f, tmp_path) for f in find_token_files(str(tmp_path))]
    assert rel == ["en/b/x.bin", "y.bin"]  # each real file once, under the first name a sorted walk meets
    assert len(open_documents(str(tmp_path))) == len(DOCS) + 1
