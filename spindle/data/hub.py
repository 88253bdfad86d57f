"""Dataset folders as the Hugging Face Hub ships them: which files are which split of which config.

A downloaded dataset repository holds a dataset card (README.md, whose YAML may declare `configs:`
with their `data_files` per split), `.gitattributes`, hub caches (`.cache/`, `.huggingface/`,
`*.lock`) and data files laid out by split and config: `data/{split}-00000-of-00001.parquet`,
`{split}/*.jsonl`, `{split}-*.parquet`, `{config}/{split}/...`. Both readers of such folders
(`spindle prepare` and `data.type="streaming"`) take the files of one split of one config from
here, so a validation or test split, another config or the card never ends up in training.

The split rules are the `datasets` library's own (its public pattern table, `datasets.data_files`),
matched against a loop-safe walk of the folder (spindle.data.files) instead of a glob that
would follow symlink loops. `datasets` and `huggingface_hub` come with the [hf] extra; telling
whether a folder is a Hub download needs neither, so a plain folder is read without them.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from spindle.data.files import glob_regex, walk_files
from spindle.errors import SpindleError
from spindle.extras import require

HUB_FOLDERS = "reading a Hugging Face dataset folder"
CARD = "README.md"
# not data, whatever their extension (datasets' FILES_TO_IGNORE)
NOT_DATA = {CARD, "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "dummy_data.zip"}
HUB_MARKERS = (".gitattributes", ".huggingface", os.path.join(".cache", "huggingface"))
# the Hub's shard names (datasets' SPLIT_PATTERN_SHARDED with any split): only to recognise a download
SHARDED_NAMES = "data/*-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"
SHARD_SPLIT = re.compile(r"(.+)-[0-9]{5}-of-[0-9]{5}")
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # what `datasets` accepts as a split name
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


def _suffix(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def _card_configs(root: str) -> dict:
    """The README's `configs:` ({name: {data_files, data_dir, default, ...}}), {} without any."""
    card = os.path.join(root, CARD)
    if not os.path.isfile(card):
        return {}
    with open(card, encoding="utf-8", errors="replace") as f:
        if f.readline().strip() != "---":  # no YAML header: a plain README
            return {}
    metadata = require("datasets.utils.metadata", "hf", HUB_FOLDERS)
    hub = require("huggingface_hub", "hf", HUB_FOLDERS)
    try:
        return dict(metadata.MetadataConfigs.from_dataset_card_data(hub.DatasetCard.load(card).data))
    except Exception as e:  # noqa: BLE001 - yaml / validation errors of many types
        raise SpindleError(f"{card}: unreadable dataset card YAML ({type(e).__name__}: {e})") from None


def is_hub_dataset(root: str) -> bool:
    """A folder downloaded from the Hub: a card with a YAML header, hub metadata, or sharded split files."""
    if not os.path.isdir(root):
        return False
    if any(os.path.exists(os.path.join(root, m)) for m in HUB_MARKERS):
        return True
    card = os.path.join(root, CARD)
    if os.path.isfile(card):
        with open(card, encoding="utf-8", errors="replace") as f:
            if f.readline().strip() == "---":
                return True
    rx = glob_regex(SHARDED_NAMES)
    return any(rx.match(p) for p in _data_paths(root))


def _data_paths(root: str) -> list[str]:
    """Paths (relative, "/"-separated) of the data files (by extension, as `datasets` picks them):
    hidden files and folders (hub caches), the card, dataset metadata and locks left out."""
    out = []
    for p in walk_files(root, skip_hidden=True):
        rel = os.path.relpath(p, root).replace(os.sep, "/")
        if os.path.basename(rel) not in NOT_DATA and _suffix(rel) in BUILDERS:
            out.append(rel)
    return out


def _match(paths: list[str], patterns: list[str]) -> list[str]:
    rxs = [glob_regex(p) for p in patterns]
    return sorted(p for p in paths if any(rx.match(p) for rx in rxs))


def _inferred_splits(paths: list[str], root: str) -> tuple[dict[str, list[str]], bool]:
    """{split: files} by datasets' pattern table, in its order: the sharded names (`data/{split}-NNNNN-of-NNNNN.*`)
    first, then each table of split-keyword patterns, the first that matches any file deciding; and whether the
    split came from the layout (False when no name says a split, so every file is "train")."""
    table = require("datasets.data_files", "hf", HUB_FOLDERS)
    for sharded in table.ALL_SPLIT_PATTERNS:
        files = _match(paths, [sharded.replace("{split}", "*")])
        if not files:
            continue
        names = set()
        for f in files:
            shard = SHARD_SPLIT.match(os.path.basename(f))
            name = shard.group(1) if shard else ""  # 'data/-00000-of-00001.parquet' names no split
            if not SPLIT_NAME.fullmatch(name):
                raise SpindleError(f"{root}/{f}: {name!r} is not a split name (letters, digits, _ and dots)")
            names.add(name)
        known = [str(s) for s in table.DEFAULT_SPLITS]
        order = [s for s in known if s in names] + sorted(names - set(known))
        return {s: _match(paths, [sharded.replace("{split}", s)]) for s in order}, True
    for patterns in table.ALL_DEFAULT_PATTERNS:
        splits = {str(split): _match(paths, pats) for split, pats in patterns.items()}
        splits = {split: files for split, files in splits.items() if files}
        if splits:
            return splits, patterns != table.DEFAULT_PATTERNS_ALL
    return {}, False


def dataset_splits(root: str, subset: Optional[str] = None, subset_key: str = "--subset") -> dict[str, list[str]]:
    """{split: absolute file paths} of one config of the dataset folder `root`."""
    configs = _card_configs(root)
    paths = _data_paths(root)
    if configs:
        name = subset
        if name is None:
            try:
                name = require("datasets.utils.metadata", "hf", HUB_FOLDERS).MetadataConfigs(
                    configs).get_default_config_name()
            except ValueError as e:
                raise SpindleError(f"{root}/{CARD}: {e}") from None
            if name is None:
                raise SpindleError(f"{root}: the dataset card declares configs {', '.join(sorted(configs))} and none "
                                   f"is the default; choose one with {subset_key}")
        if name not in configs:
            raise SpindleError(f"{subset_key}: {root} has no config {name!r}; "
                               f"its configs: {', '.join(sorted(configs))}")
        cfg = configs[name]
        base = str(cfg.get("data_dir") or "").strip("/")
        if base:
            paths = [p[len(base) + 1:] for p in paths if p.startswith(base + "/")]
        if cfg.get("data_files") is not None:
            sanitize_patterns = require("datasets.data_files", "hf", HUB_FOLDERS).sanitize_patterns
            splits = {s: _match(paths, pats) for s, pats in sanitize_patterns(cfg["data_files"]).items()}
        else:
            splits, _ = _inferred_splits(paths, root)
        root = os.path.join(root, base) if base else root
    elif subset is not None:
        sub = os.path.join(root, subset)
        if not os.path.isdir(sub):
            raise SpindleError(f"{subset_key}: {root} has no config (README configs) or folder named {subset!r}")
        return dataset_splits(sub, None, subset_key)
    else:
        splits, by_layout = _inferred_splits(paths, root)
        if by_layout:
            _refuse_mixed_configs(root, splits, subset_key)
    return {s: [os.path.join(root, p) for p in files] for s, files in splits.items() if files}


def _refuse_mixed_configs(root: str, splits: dict[str, list[str]], subset_key: str) -> None:
    """`{config}/{split}/...`: one split's files under several top-level folders that are not
    themselves split folders are several configs; reading them together would mix them."""
    keywords = require("datasets.data_files", "hf", HUB_FOLDERS).SPLIT_KEYWORDS
    split_words = {w for words in keywords.values() for w in words} | {"data"}
    for files in splits.values():
        tops = {p.split("/", 1)[0] for p in files if "/" in p}
        if len(tops) > 1 and not tops & split_words:
            raise SpindleError(f"{root}: holds several configs ({', '.join(sorted(tops))}), each with its own "
                               f"splits; choose one with {subset_key}")


def split_files(root: str, split: str = "train", subset: Optional[str] = None, split_key: str = "--split",
                subset_key: str = "--subset") -> list[str]:
    """The files of `split` (of config `subset`) in the dataset folder `root`; a missing split is
    an error naming the splits there are."""
    splits = dataset_splits(root, subset, subset_key)
    if not splits:
        raise SpindleError(f"{root}: no data files found")
    if split not in splits:
        raise SpindleError(f"{split_key}: {root} has no split {split!r}; its splits: {', '.join(splits)}")
    return splits[split]


def builder_of(files: list[str], where: str) -> str:
    """The `datasets` builder that reads these files (one format per split)."""
    kinds = {BUILDERS.get(_suffix(f)) for f in files}
    if None in kinds:
        odd = next(f for f in files if BUILDERS.get(_suffix(f)) is None)
        raise SpindleError(f"{where}: {odd} is not a data file datasets reads (expected {', '.join(sorted(BUILDERS))})")
    if len(kinds) > 1:
        raise SpindleError(f"{where}: one split mixes file formats ({', '.join(sorted(kinds))})")
    return kinds.pop()
