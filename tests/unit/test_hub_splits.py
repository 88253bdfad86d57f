"""The splits of a dataset folder without a card (spindle/data/hub.py) are the `datasets` library's: the same
split names and files as its public `get_data_patterns` + `DataFilesDict.from_patterns` on the same folder
(spindle applies its pattern table to a loop-safe walk instead of fsspec's glob)."""

from __future__ import annotations

import os

import pytest

from spindle.data.hub import dataset_splits
from spindle.errors import SpindleError

LAYOUTS = {
    "one_split": ["a.jsonl", "b.jsonl"],
    "split_files": ["train.jsonl", "test.jsonl", "validation.jsonl"],
    "sharded": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                "data/test-00000-of-00001.parquet", "data/extra.v2-00000-of-00001.parquet"],
    "split_folders": ["train/a.jsonl", "train/b.jsonl", "valid/c.jsonl"],
    "keywords_in_names": ["my_train.csv", "dev.csv", "notes.csv"],
    "data_folder": ["data/train.parquet", "data/dev.parquet"],
}


def _make(root, files):
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_splits_are_the_ones_datasets_finds(tmp_path, layout):
    from datasets.data_files import DataFilesDict, get_data_patterns

    _make(tmp_path, LAYOUTS[layout])
    ours = {split: sorted(os.path.relpath(f, tmp_path) for f in files)
            for split, files in dataset_splits(str(tmp_path)).items()}
    found = DataFilesDict.from_patterns(get_data_patterns(str(tmp_path)), base_path=str(tmp_path))
    theirs = {str(split): sorted(os.path.relpath(f, tmp_path) for f in files) for split, files in found.items()}
    assert ours == theirs
    assert list(ours) == list(theirs)  # in the same order: train, validation, test, then the others by name


def test_a_shard_without_a_split_name_is_one_line(tmp_path):
    _make(tmp_path, ["data/-00000-of-00001.parquet"])
    with pytest.raises(SpindleError, match=r"data/-00000-of-00001\.parquet: '' is not a split name"):
        dataset_splits(str(tmp_path))
