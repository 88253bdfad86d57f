"""Source folders: type ids by sorted folder name, per-source metrics in a real run, validation sets per leaf."""

import json
import math

import numpy as np
import pytest

from helpers import tiny_cfg
from spindle.config import DataConfig, validate_config
from spindle.data.loader import build_train_loader, build_valid_sets, discover_sources, leaf_sources
from spindle.data.shard_writers import JsonBinWriter
from spindle.errors import SpindleError
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

VOCAB = 64


def write_bin(path, docs):
    w = JsonBinWriter(str(path))
    for d in docs:
        w.add([int(t) for t in d])
    w.close()


def make_tree(root, seed=0, n=30):
    """train/{cn,code,en}/... with each source's tokens in its own id range (to tell them apart)."""
    rng = np.random.default_rng(seed)
    ranges = {"cn": (0, 20), "code": (20, 40), "en": (40, 64)}
    layout = {"en": ["part1/a.bin", "part2/deeper/b.bin"], "cn": ["x.bin"], "code": ["repo/y.bin"]}
    for name, files in layout.items():
        lo, hi = ranges[name]
        for f in files:
            p = root / name / f
            p.parent.mkdir(parents=True, exist_ok=True)
            write_bin(p, [rng.integers(lo, hi, size=int(k)) for k in rng.integers(5, 40, size=n)])
    return ranges


def test_type_ids_by_sorted_folder_name(tmp_path):
    ranges = make_tree(tmp_path / "train")
    sources = discover_sources(str(tmp_path / "train"), VOCAB)
    assert [(s.name, s.type_id) for s in sources] == [("cn", 0), ("code", 1), ("en", 2)]
    assert len(sources[2].docs) == 60  # both nested files of en
    data = DataConfig(train_folder=str(tmp_path / "train"), seq_len=16, micro_bsz=2, micro_num=4)
    loader = build_train_loader(data, VOCAB, tmp_path / "cache", prefetch=False)
    assert loader.source_names == ["cn", "code", "en"]
    seen = set()
    for step in range(10):
        for mb in loader.next_step(step):
            t = int(mb.type_ids[0, 0])
            assert (mb.type_ids == t).all()  # a pack comes from one source
            lo, hi = ranges[loader.source_names[t]]
            assert int(mb.input_ids.min()) >= lo and int(mb.input_ids.max()) < hi
            seen.add(t)
    assert seen == {0, 1, 2}


def test_source_weights_and_min_length_dict(tmp_path):
    make_tree(tmp_path / "train", n=60)
    data = DataConfig(train_folder=str(tmp_path / "train"), seq_len=8, micro_bsz=1, micro_num=10,
                      source_weights={"cn": 3.0, "en": 1.0}, min_length_dict={"code": 1000})
    loader = build_train_loader(data, VOCAB, tmp_path / "cache", prefetch=False)
    assert [len(p) for p in loader.packed][1] == 0  # every code document is shorter than 1000
    types = np.array([int(mb.type_ids[0, 0]) for s in range(100) for mb in loader.next_step(s)])
    frac = np.bincount(types, minlength=3) / len(types)
    assert frac[1] == 0 and frac[0] == pytest.approx(0.75, abs=0.05) and frac[2] == pytest.approx(0.25, abs=0.05)
    with pytest.raises(SpindleError, match="no source named"):
        build_train_loader(data.model_copy(update={"source_weights": {"de": 1.0}}), VOCAB, tmp_path / "c",
                           prefetch=False)


def test_leaf_validation_sets_are_named_by_folder(tmp_path):
    rng = np.random.default_rng(1)
    for leaf in ("zhihu", "wiki/sub"):
        (tmp_path / "valid" / leaf).mkdir(parents=True)
        write_bin(tmp_path / "valid" / leaf / "v.bin", [rng.integers(0, VOCAB, size=20) for _ in range(6)])
    assert [s.name for s in leaf_sources(str(tmp_path / "valid"))] == ["sub", "zhihu"]
    data = DataConfig(valid_folder=str(tmp_path / "valid"), valid_every=1, seq_len=16, micro_bsz=2, micro_num=3,
                      valid_micro_num=2)
    sets = build_valid_sets(data, VOCAB)  # 120 tokens a set: 3 packs of 32 and a padded tail, all evaluated
    assert sorted(sets) == ["sub", "zhihu"] and all(v.count == 4 and v.used_tokens == 120 for v in sets.values())
    calls = list(sets["zhihu"].micro_batches(2))  # valid_micro_num packs per evaluation call
    assert [len(c) for c in calls] == [2, 2] and calls[0][0].input_ids.shape == (2, 16)
    assert int((calls[1][1].labels != -100).sum()) < 24  # the tail: its padding carries no label


def test_per_source_metrics_and_validation_in_metrics_jsonl(tmp_path):
    make_tree(tmp_path / "train")
    rng = np.random.default_rng(2)
    for leaf in ("held_en", "held_code"):
        (tmp_path / "valid" / leaf).mkdir(parents=True)
        write_bin(tmp_path / "valid" / leaf / "v.bin", [rng.integers(0, VOCAB, size=30) for _ in range(4)])
    cfg = tiny_cfg(tmp_path / "run", JOB_NAME="src",
                   data={"micro_num": 4, "total_steps": 3, "train_folder": str(tmp_path / "train"),
                         "valid_folder": str(tmp_path / "valid"), "valid_every": 1, "valid_micro_num": 1},
                   model={"vocab_size": VOCAB}, lr_scheduler={"warmup_ratio": 0.0}, ckpt={"enable_save_ckpt": False},
                   trainer={"seed": 3, "num_threads": None})
    out = Trainer(cfg, ParallelEnv()).fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "src" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and [r["step"] for r in lines] == [0, 1, 2]
    names = {k.split("/", 1)[1] for r in lines for k in r if k.startswith("tokens/")}
    assert names <= {"cn", "code", "en"} and len(names) >= 2
    for r in lines:
        per = [n for n in ("cn", "code", "en") if f"tokens/{n}" in r]
        # the per-source token counts add up to the step's valid labels: 4 packs of 32 tokens minus doc ends
        total = sum(r[f"tokens/{n}"] for n in per)
        assert 0 < total <= 4 * 32
        # the step loss is the token-weighted mean of the per-source losses
        assert r["loss"] == pytest.approx(sum(r[f"loss/{n}"] * r[f"tokens/{n}"] for n in per) / total, rel=1e-6)
        assert r["acc"] == pytest.approx(sum(r[f"acc/{n}"] * r[f"tokens/{n}"] for n in per) / total, rel=1e-6)
        assert all(0.0 <= r[f"acc/{n}"] <= 1.0 for n in per)
        for leaf in ("held_en", "held_code"):
            assert r[f"val/{leaf}_plex"] == pytest.approx(math.exp(r[f"val/{leaf}_loss"]), rel=1e-9)
    assert out["history"][-1]["loss"] == lines[-1]["loss"]


def test_leaf_sets_with_the_same_folder_name_keep_apart(tmp_path):
    rng = np.random.default_rng(4)
    for leaf in ("a/en", "b/en", "cn"):
        (tmp_path / "valid" / leaf).mkdir(parents=True)
        write_bin(tmp_path / "valid" / leaf / "v.bin", [rng.integers(0, VOCAB, size=20) for _ in range(3)])
    assert [s.name for s in leaf_sources(str(tmp_path / "valid"))] == ["a_en", "b_en", "cn"]


# ------------------------------------------------------------------------------ data under a resume


def shard_folder(folder, docs, tokenizer=None):
    """A prepared folder (binary shard + manifest) of `docs`, as `spindle prepare` writes it."""
    from spindle.data.shard_writers import ShardWriter, write_manifest

    w = ShardWriter(str(folder), "shard-00000", VOCAB)
    for d in docs:
        w.add([int(t) for t in d])
    write_manifest(str(folder), tokenizer, [w.close()])


TOK_A = {"kind": "sentencepiece", "path": "/x/a.model", "sha256": "aa", "vocab_size": VOCAB}
TOK_B = {"kind": "hf", "path": "/y/tokenizer.json", "sha256": "bb", "vocab_size": VOCAB}


def test_loader_state_carries_a_data_fingerprint(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("cn", "en"):
        shard_folder(tmp_path / "train" / name, [rng.integers(0, VOCAB, 30) for _ in range(20)], TOK_A)
    data = DataConfig(train_folder=str(tmp_path / "train"), seq_len=16, micro_bsz=1, micro_num=2)

    def loader():
        return build_train_loader(data, VOCAB, tmp_path / "cache", prefetch=False)

    first = loader()
    first.next_step(0)
    state = json.loads(json.dumps(first.state_dict()))  # what trainer_state.json keeps
    fp = {s["name"]: s for s in state["fingerprint"]}
    assert sorted(fp) == ["cn", "en"] and fp["en"]["files"] == {"shard-00000.tokens": 30 * 20 * 2}
    assert fp["en"]["tokenizer"] == {"kind": "sentencepiece", "sha256": "aa", "vocab_size": VOCAB}
    assert set(fp["en"]["manifests"]) == {"manifest.json"}
    second = loader()
    second.load_state_dict(state)  # the same data: loads
    assert second.position == 2
    legacy = loader()
    legacy.load_state_dict({"position": 2})  # a checkpoint from before fingerprints: no check
    # the copied folder (another root, same content) resumes too
    import shutil

    shutil.copytree(tmp_path / "train", tmp_path / "copy")
    build_train_loader(data.model_copy(update={"train_folder": str(tmp_path / "copy")}), VOCAB, tmp_path / "c",
                       prefetch=False).load_state_dict(state)

    def changed(match):
        with pytest.raises(SpindleError, match=match):
            loader().load_state_dict(state)

    shard_folder(tmp_path / "train" / "en", [rng.integers(0, VOCAB, 31) for _ in range(20)], TOK_A)
    changed(r"source 'en': file shard-00000.tokens changed size \(1200 -> 1240 bytes\)")
    shutil.rmtree(tmp_path / "train" / "en")
    shutil.copytree(tmp_path / "copy" / "en", tmp_path / "train" / "en")
    shard_folder(tmp_path / "train" / "en" / "more", [rng.integers(0, VOCAB, 30)], TOK_A)
    changed(r"source 'en': file more/shard-00000.tokens was added")
    shutil.rmtree(tmp_path / "train" / "en" / "more")
    man = tmp_path / "train" / "cn" / "manifest.json"
    man.write_text(json.dumps(json.loads(man.read_text()) | {"min_length": 7}))  # prepared again, another way
    changed(r"source 'cn': manifest manifest.json differs")
    shutil.rmtree(tmp_path / "train" / "cn")
    changed(r"sources \['cn', 'en'\] -> \['en'\]")


def test_sources_prepared_with_different_tokenizers_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    shard_folder(tmp_path / "train" / "cn", [rng.integers(0, VOCAB, 30) for _ in range(5)], TOK_A)
    shard_folder(tmp_path / "train" / "en", [rng.integers(0, VOCAB, 30) for _ in range(5)], TOK_B)
    with pytest.raises(SpindleError, match=r"data.train_folder: .*/train/cn and .*/train/en were prepared with "
                                           r"different tokenizers"):
        discover_sources(str(tmp_path / "train"), VOCAB)
    # the same tokenizer found at another path is the same tokenizer
    shard_folder(tmp_path / "train" / "en", [rng.integers(0, VOCAB, 30) for _ in range(5)], TOK_A | {"path": "/z"})
    assert len(discover_sources(str(tmp_path / "train"), VOCAB)) == 2
    shard_folder(tmp_path / "valid" / "a", [rng.integers(0, VOCAB, 30) for _ in range(5)], TOK_A)
    shard_folder(tmp_path / "valid" / "b", [rng.integers(0, VOCAB, 30) for _ in range(5)], TOK_B)
    with pytest.raises(SpindleError, match=r"data.valid_folder: .*/valid/a and .*/valid/b"):
        leaf_sources(str(tmp_path / "valid"), VOCAB)


def test_text_cache_is_keyed_by_content(tmp_path, caplog):
    import logging
    import os

    from spindle.data.loader import text_cache

    (tmp_path / "raw").mkdir()
    doc = tmp_path / "raw" / "a.txt"
    doc.write_text("first version of the text")
    data = DataConfig(type="text", train_folder=str(tmp_path / "raw"), tokenizer_path="byte", text_glob="*.txt")
    caplog.set_level(logging.DEBUG, logger="spindle.data.loader")

    def built():
        return [r for r in caplog.records if "tokenizing" in r.getMessage()]

    first = text_cache(data, tmp_path / "cache")
    assert text_cache(data, tmp_path / "cache") == first and len(built()) == 1  # reused
    st = doc.stat()
    doc.write_text("second version, same name")  # edited in place: same file name
    os.utime(doc, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = text_cache(data, tmp_path / "cache")
    assert second != first and len(built()) == 2
    from spindle.data.shards import open_documents

    assert bytes(open_documents(second)[0][0].tolist()[1:-1]) == b"second version, same name"


def test_text_valid_bytes_holds_the_last_files_out_of_training(tmp_path):
    from spindle.data.loader import text_files
    from spindle.data.shards import open_documents

    raw = tmp_path / "raw"
    raw.mkdir()
    for name, size in (("a", 300), ("b", 300), ("c", 120), ("d", 100)):
        (raw / f"{name}.txt").write_bytes(name.encode() * size)
    data = DataConfig(type="text", train_folder=str(raw), tokenizer_path="byte", text_glob="*.txt",
                      text_valid_bytes=250, valid_every=1, seq_len=16, micro_bsz=2)
    assert [p.rsplit("/", 1)[1] for p in text_files(data)] == ["a.txt", "b.txt"]  # c + d (220 B) held out
    sets = build_valid_sets(data, 258, tmp_path / "cache")
    assert list(sets) == ["held_out"]
    docs = open_documents(str(next((tmp_path / "cache").glob("text-*/held_out"))))
    held = b"".join(bytes(t for t in docs[i][0].tolist() if t < 256) for i in range(len(docs)))
    assert held == b"c" * 120 + b"d" * 100
    seen = set()
    for call in sets["held_out"].micro_batches(1):
        seen |= set(call[0].input_ids.flatten().tolist())
    assert ord("c") in seen and ord("a") not in seen
    trained = set()
    loader = build_train_loader(data, 258, tmp_path / "cache", prefetch=False)
    for step in range(8):
        for b in loader.next_step(step):
            trained |= set(b.input_ids.flatten().tolist())
    assert ord("a") in trained and not trained & {ord("c"), ord("d")}
    with pytest.raises(SpindleError, match="the last file .* is larger"):
        text_files(data.model_copy(update={"text_valid_bytes": 50}))
    # `eval ppl` without --data and long_eval without long_eval.data read the held-out files, not the trained
    from spindle.eval.perplexity import checkpoint_data

    paths, what = checkpoint_data(validate_config({"data": data.model_dump()}))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["c.txt", "d.txt"] and "never trained on" in what
    paths, what = checkpoint_data(validate_config({"data": {**data.model_dump(), "text_valid_bytes": 0}}))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.txt", "b.txt", "c.txt", "d.txt"] and "the training data" in what
    with pytest.raises(SpindleError, match="not both"):
        validate_config({"data": {**data.model_dump(), "valid_folder": str(raw)}})
    # another data type: no held-out files, and the start-up report says the key does nothing
    from spindle.config.load import load_config

    cfg_file = tmp_path / "c.py"
    cfg_file.write_text(f"data = dict(type='tokenized', train_folder={str(raw)!r}, text_valid_bytes=250, "
                        "valid_every=1)\n")
    cfg = load_config(str(cfg_file), [])
    assert build_valid_sets(cfg.data, 258, tmp_path / "cache2") == {}
    assert any(n.startswith("data.text_valid_bytes (holds out raw-text files; data.type is 'tokenized'")
               for n in cfg._compat_notes)


@pytest.mark.parametrize("data,expected", [
    ({"seq_len": 2.5}, "data.seq_len: Input should be a valid integer (got 2.5)"),
    ({"micro_num": True}, "data.micro_num: expected an integer, not a bool (got True)"),
    ({"micro_bsz": "4"}, "data.micro_bsz: expected an integer, not a str"),
    ({"min_length_dict": {"en": 1.5}}, "data.min_length_dict.en: Input should be a valid integer"),
    ({"min_length_dict": {"en": -1}}, "data.min_length_dict.en: Input should be greater than or equal to 0"),
    ({"source_weights": {"en": 0}}, "data.source_weights: the weight of 'en' must be a finite number > 0"),
    ({"source_weights": {"en": -2.0}}, "data.source_weights: the weight of 'en' must be a finite number > 0"),
    ({"source_weights": {"en": float("nan")}}, "data.source_weights.en: Input should be a finite number"),
    ({"diag_outlier_ratio": float("inf")}, "data.diag_outlier_ratio: Input should be a finite number"),
    ({"seed": -1}, "data.seed: Input should be greater than or equal to 0"),
    ({"max_text_bytes": 0}, "data.max_text_bytes: Input should be greater than or equal to 1"),
    ({"text_glob": "/data/*.txt"}, "data.text_glob: expected a non-empty pattern relative to train_folder"),
    ({"text_glob": ""}, "data.text_glob: expected a non-empty pattern relative to train_folder"),
    ({"text_glob": "../*.txt"}, "data.text_glob: expected a non-empty pattern relative to train_folder"),
    ({"text_exclude": ("",)}, "data.text_exclude: expected non-empty folder or file names"),
    ({"content_name": " "}, "data.content_name: expected a non-empty string"),
    ({"split": "train_sft"}, "'split' selects a split of a streamed dataset and needs type='streaming'"),
    ({"skip_batches": "9-3"}, "data.skip_batches: range '9-3' ends before it starts"),
])
def test_data_keys_are_validated(data, expected):
    with pytest.raises(SpindleError) as e:
        validate_config({"data": data})
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_skip_batches_ranges_do_not_allocate():
    from spindle.config import parse_skip_batches

    skip = validate_config({"data": {"skip_batches": "0-99999999999,5"}}).data.skip_batches
    ranges = parse_skip_batches(skip)  # one merged range, not 10^11 ints
    assert 0 in ranges and 99_999_999_999 in ranges and 100_000_000_000 not in ranges and -1 not in ranges
    assert len(ranges) == 100_000_000_000
    assert parse_skip_batches("1-3,9, 2-4") == {1, 2, 3, 4, 9} and 5 not in parse_skip_batches("1-3,9")


def test_min_length_that_drops_every_document_is_named(tmp_path):
    make_tree(tmp_path / "train")
    data = DataConfig(train_folder=str(tmp_path / "train"), seq_len=8, micro_bsz=1, min_length=100)
    with pytest.raises(SpindleError,
                       match=r"data.min_length=100 .* drops every document \(the longest has 39 tokens\)"):
        build_train_loader(data, VOCAB, tmp_path / "cache", prefetch=False)
