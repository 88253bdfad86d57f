"""data.type="streaming": local Hugging Face datasets (parquet, jsonl, save_to_disk), packed like cut mode,
split across data-parallel ranks, resumable; a short real training run."""

import json

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

from spindle.config import DataConfig, validate_config  # noqa: E402
from spindle.data.loader import build_train_loader  # noqa: E402
from spindle.data.packing import PackedDocuments  # noqa: E402
from spindle.data.streaming import StreamingLoader  # noqa: E402
from spindle.errors import SpindleError  # noqa: E402

BOS, EOS = 256, 257  # the byte tokenizer's
TEXTS = [f"doc {i}: " + "ab" * (i % 9) + "x" * (i % 4) for i in range(60)]


class ListDocs:
    def __init__(self, docs):
        self.docs = docs
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i], None


def encoded(texts=TEXTS):
    return [np.array([BOS, *t.encode(), EOS], dtype=np.int64) for t in texts]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    # a Hub-style dataset repository: data/train-0000{0,1}-of-00002.parquet
    (root / "repo" / "data").mkdir(parents=True)
    half = len(TEXTS) // 2
    ds.select(range(half)).to_parquet(str(root / "repo" / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(half, len(TEXTS))).to_parquet(str(root / "repo" / "data" / "train-00001-of-00002.parquet"))
    (root / "jsonl").mkdir()
    (root / "jsonl" / "part.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS))
    ds.save_to_disk(str(root / "disk"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "diskdict"))
    return root


def cfg(folder, **over):
    base = dict(type="streaming", train_folder=str(folder), tokenizer_path="byte", seq_len=16, micro_bsz=2,
                micro_num=2)
    return DataConfig(**(base | over))


def ids(batch):
    return [tuple(mb.input_ids.flatten().tolist()) for mb in batch]


def packs(loader, steps, start=0):
    return [ids(loader.next_step(s)) for s in range(start, start + steps)]


def test_packs_equal_cut_mode_packing_of_the_same_documents(folders):
    loader = build_train_loader(cfg(folders / "repo"), 258, folders / "cache", prefetch=False)
    assert isinstance(loader, StreamingLoader) and loader.source_names == ["repo"]
    ref = PackedDocuments(ListDocs(encoded()), 16, 2, shuffle=False)
    n = len(ref)  # packs per epoch
    got = [mb for s in range(n // 2 + 2) for mb in loader.next_step(s)]
    for i, mb in enumerate(got):
        want = ref[i % n]  # after the epoch the stream starts over (the tail is dropped)
        for key in ("input_ids", "labels", "position_ids", "type_ids"):
            assert getattr(mb, key).tolist() == getattr(want, key).tolist(), (i, key)
        assert mb.position_ids.tolist() == want.position_ids.tolist()
    loader.close()
    # the first pack by hand: "doc 0: " is 7 bytes -> [BOS] 7 bytes [EOS] = 9 tokens, then doc 1 starts
    first = got[0]
    assert first.input_ids[0, :9].tolist() == [BOS, *b"doc 0: ", EOS]
    assert first.labels[0, :9].tolist() == [*b"doc 0: ", EOS, -100]
    assert first.position_ids[0].tolist() == list(range(9)) + list(range(7))
    assert torch.nonzero(first.position_ids.flatten() == 0).flatten().tolist()[:3] == [0, 9, 16]


@pytest.mark.parametrize("variant,column", [("jsonl", "content"), ("disk", "text"), ("diskdict", "text")])
def test_jsonl_and_save_to_disk_give_the_same_packs(folders, variant, column):
    want = packs(StreamingLoader(cfg(folders / "repo"), 258, prefetch=False), 3)
    got = packs(StreamingLoader(cfg(folders / variant, content_name=column), 258, prefetch=False), 3)
    assert got == want


def test_concat_mode_and_min_length(folders):
    loader = StreamingLoader(cfg(folders / "disk", pack_sample_into_one=True, min_length=14), 258, prefetch=False)
    kept = [d for d in encoded() if len(d) >= 14]
    ref = PackedDocuments(ListDocs(kept), 16, 2, shuffle=False, pack_into_one=True)
    (mb0, mb1) = loader.next_step(0)
    assert mb0.labels.tolist() == ref[0].labels.tolist() and mb1.input_ids.tolist() == ref[1].input_ids.tolist()
    assert mb0.position_ids.tolist() == [list(range(16))] * 2


def test_ranks_split_the_global_stream(folders):
    single = StreamingLoader(cfg(folders / "repo", micro_num=4), 258, prefetch=False)
    ranks = [StreamingLoader(cfg(folders / "repo"), 258, r, 2, prefetch=False) for r in range(2)]
    for step in range(4):
        one = ids(single.next_step(step))
        r0, r1 = (ids(r.next_step(step)) for r in ranks)
        assert one == r0 + r1 and not set(r0) & set(r1)
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


@pytest.mark.parametrize("prefetch", [False, True])
def test_resume_continues_exactly_across_epochs(folders, prefetch):
    n_steps = 14  # past the end of the first epoch (about 25 packs of 32 tokens, 4 packs a step)
    full = StreamingLoader(cfg(folders / "repo", micro_num=4), 258, prefetch=prefetch)
    want = packs(full, n_steps)
    assert full.state_dict()["epoch"] >= 1
    full.close()
    for cut in (3, 7):
        first = StreamingLoader(cfg(folders / "repo", micro_num=4), 258, prefetch=prefetch)
        got = packs(first, cut)
        state = first.state_dict()
        assert state["position"] == 4 * cut and state["offset"] >= 0
        first.close()
        resumed = StreamingLoader(cfg(folders / "repo", micro_num=4), 258, prefetch=prefetch)
        resumed.load_state_dict(state)
        got += packs(resumed, n_steps - cut, start=cut)
        resumed.close()
        assert got == want
    # resumed with another dp size: rank 1 of 2 continues with its half of the same global steps
    rank1 = StreamingLoader(cfg(folders / "repo", micro_num=2), 258, 1, 2, prefetch=False)
    first = StreamingLoader(cfg(folders / "repo", micro_num=4), 258, prefetch=False)
    packs(first, 5)
    rank1.load_state_dict(first.state_dict())
    assert packs(rank1, 2, start=5) == [w[2:] for w in want[5:7]]
    # a bare position (no cursor) replays the stream to it
    bare = StreamingLoader(cfg(folders / "repo", micro_num=4), 258, prefetch=False)
    bare.load_state_dict({"position": 20})
    assert packs(bare, 3, start=5) == want[5:8]


def test_errors(folders, tmp_path):
    with pytest.raises(SpindleError, match="no column 'body'"):
        StreamingLoader(cfg(folders / "disk", content_name="body"), 258, prefetch=False).next_step(0)
    with pytest.raises(SpindleError, match="tokenizer_path"):
        StreamingLoader(cfg(folders / "disk", tokenizer_path=None), 258)
    with pytest.raises(SpindleError, match="vocab_size"):
        StreamingLoader(cfg(folders / "disk"), 100)
    with pytest.raises(SpindleError, match="not found"):
        StreamingLoader(cfg(tmp_path / "nope"), 258, prefetch=False).next_step(0)
    with pytest.raises(SpindleError, match="fewer tokens than one pack"):
        StreamingLoader(cfg(folders / "disk", seq_len=4096), 258, prefetch=False).next_step(0)


def test_subset_name_selects_a_subfolder(tmp_path):
    for sub, texts in (("en", ["hello world"] * 8), ("de", ["hallo welt!"] * 8)):
        (tmp_path / "ds" / sub).mkdir(parents=True)
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "ds" / sub / "train.parquet"))
    loader = StreamingLoader(cfg(tmp_path / "ds", subset_name="de", micro_num=1), 258, prefetch=False)
    assert loader.source_names == ["de"]
    assert bytes(loader.next_step(0)[0].input_ids[0, 1:12].tolist()) == b"hallo welt!"


def test_training_steps_with_streaming_data_and_checkpoint_resume(folders, tmp_path):
    """4 steps straight vs 2 steps, checkpoint, a new Trainer auto-resumes: the same per-step losses."""
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    def trainer(run, auto_resume, stop=None):
        c = validate_config({
            "JOB_NAME": "stream",
            "data": {"type": "streaming", "train_folder": str(folders / "repo"), "tokenizer_path": "byte",
                     "seq_len": 16, "micro_bsz": 2, "micro_num": 2, "total_steps": 4},
            "model": {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 1,
                      "vocab_size": 258, "multiple_of": 16, "max_position_embeddings": 16},
            "adam": {"lr": 1e-2}, "lr_scheduler": {"warmup_ratio": 0.0},
            "ckpt": {"enable_save_ckpt": True, "save_ckpt_folder": f"local:{tmp_path / run}/ckpt",
                     "checkpoint_every": 2, "auto_resume": auto_resume, "stop_file_path": stop},
            "trainer": {"run_folder": str(tmp_path / run), "tensorboard": False, "progress_bar": False, "seed": 3},
        })
        return Trainer(c, ParallelEnv())

    full = trainer("a", False).fit()["history"]
    assert len(full) == 4 and all(np.isfinite(h["loss"]) for h in full) and "tokens/repo" in full[0]
    assert full[-1]["loss"] < full[0]["loss"]
    (tmp_path / "stop").write_text("2")  # the stop file ends the first run after step 2, with a checkpoint
    first = trainer("b", True, str(tmp_path / "stop")).fit()["history"]
    assert len(first) == 2
    resumed = trainer("b", True)
    assert resumed.state.step == 2 and resumed.loader.state_dict()["position"] == 4
    rest = resumed.fit()["history"]
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]  # bit for bit


def test_loops_in_the_dataset_folder_and_a_changed_dataset(folders, tmp_path):
    import os
    import shutil

    shutil.copytree(folders / "repo", tmp_path / "repo")
    os.symlink(".", tmp_path / "repo" / "data" / "again")  # a loop: data/again/again/...
    os.symlink("..", tmp_path / "repo" / "data" / "up")
    want = packs(StreamingLoader(cfg(folders / "repo"), 258, prefetch=False), 3)
    loader = StreamingLoader(cfg(tmp_path / "repo"), 258, prefetch=False)
    assert packs(loader, 3) == want  # every record once, in order
    state = loader.state_dict()
    assert sorted(state["fingerprint"][0]["files"]) == ["data/train-00000-of-00002.parquet",
                                                        "data/train-00001-of-00002.parquet"]
    datasets.Dataset.from_dict({"text": ["new"] * 5}).to_parquet(
        str(tmp_path / "repo" / "data" / "train-00002-of-00002.parquet"))
    with pytest.raises(SpindleError, match=r"data changed since the checkpoint: source 'repo': file "
                                           r"data/train-00002-of-00002.parquet was added"):
        StreamingLoader(cfg(tmp_path / "repo"), 258, prefetch=False).load_state_dict(state)


def hub_repo(root, splits: dict, prefix="data"):
    """A Hub-style dataset repository: {prefix}/{split}-00000-of-00001.parquet, a card, .gitattributes."""
    (root / prefix).mkdir(parents=True)
    for split, texts in splits.items():
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(root / prefix / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nlicense: mit\n---\n# A card, not data\n")
    (root / ".gitattributes").write_text("*.parquet filter=lfs\n")
    return root


def test_split_selects_splits_not_named_train(tmp_path):
    sft = [f"sft record {i} " * 3 for i in range(20)]
    repo = hub_repo(tmp_path / "chat", {"train_sft": sft, "test_sft": ["held out"] * 20})
    loader = StreamingLoader(cfg(repo, split="train_sft", micro_num=1), 258, prefetch=False)
    first = bytes(t for t in loader.next_step(0)[0].input_ids.flatten().tolist() if t < 256)
    assert first[:24] == sft[0].encode()[:24]
    assert sorted(loader.state_dict()["fingerprint"][0]["files"]) == ["data/train_sft-00000-of-00001.parquet"]
    with pytest.raises(SpindleError, match=r"data.split: .*chat has no split 'train'; its splits: (train_sft, test_sft|"
                                           r"test_sft, train_sft)"):
        StreamingLoader(cfg(repo), 258, prefetch=False)


def test_validation_split_of_the_same_dataset(tmp_path):
    from spindle.data.loader import build_valid_sets

    train = [f"train text {i} " * 2 for i in range(30)]
    valid = [f"VALID {i} " * 3 for i in range(30)]
    repo = hub_repo(tmp_path / "ds", {"train": train, "validation": valid, "test": ["TEST"] * 30})
    for keys in ({"valid_folder": str(repo)}, {"valid_split": "validation"}):
        sets = build_valid_sets(cfg(repo, valid_every=1, valid_micro_num=2, **keys), 258)
        found = sets["validation"]
        assert list(sets) == ["validation"] and found.used_tokens == found.total_tokens  # the whole split
        got = bytes(t for t in next(found.micro_batches(2))[0].input_ids.flatten().tolist() if t < 256)
        assert got[:20] == valid[0].encode()[:20]  # the validation split, in dataset order
    sets = build_valid_sets(cfg(repo, valid_every=1, valid_micro_num=1, valid_split="test", valid_max_tokens=1), 258)
    assert bytes(next(sets["test"].micro_batches(1))[0].input_ids[0, 1:5].tolist()) == b"TEST"
    assert sets["test"].coverage().endswith(f" of {sets['test'].total_tokens:,} tokens")
    with pytest.raises(SpindleError, match="data.split: .* has no split 'dev'"):
        build_valid_sets(cfg(repo, valid_every=1, valid_split="dev"), 258)
    # training on the same folder reads the train split only: neither the card nor the other splits
    loader = StreamingLoader(cfg(repo, micro_num=1), 258, prefetch=False)
    assert sorted(loader.state_dict()["fingerprint"][0]["files"]) == ["data/train-00000-of-00001.parquet"]


def test_a_filter_that_drops_everything_is_named_once(folders):
    loader = StreamingLoader(cfg(folders / "repo", min_length=500), 258, prefetch=True)
    with pytest.raises(SpindleError) as e:
        loader.next_step(0)
    msg = str(e.value)
    assert msg.startswith("data.min_length=500 drops every document of") and "60 documents" in msg
    assert msg.count("min_length") == 1
    loader.close()


def test_streaming_training_validates_on_its_validation_split(tmp_path):
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    repo = hub_repo(tmp_path / "ds", {"train": [f"train {i} " * 4 for i in range(40)],
                                      "validation": [f"valid {i} " * 4 for i in range(40)]})
    c = validate_config({
        "JOB_NAME": "sv",
        "data": {"type": "streaming", "train_folder": str(repo), "tokenizer_path": "byte", "seq_len": 16,
                 "micro_bsz": 2, "micro_num": 1, "total_steps": 2, "valid_every": 1, "valid_split": "validation",
                 "valid_micro_num": 1},
        "model": {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 1,
                  "vocab_size": 258, "multiple_of": 16, "max_position_embeddings": 16},
        "ckpt": {"enable_save_ckpt": False},
        "trainer": {"run_folder": str(tmp_path / "run"), "tensorboard": False, "progress_bar": False},
    })
    hist = Trainer(c, ParallelEnv()).fit()["history"]
    assert all(np.isfinite(h["val/validation_loss"]) for h in hist) and "tokens/ds" in hist[0]
