"""The `data` section: what is read, how it is packed, which batches are skipped."""

from __future__ import annotations

import bisect
import collections.abc
import math
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from spindle.config.base import Section, _count, path_value

class DataConfig(Section):
    type: Literal["tokenized", "streaming", "text", "dummy"] = "tokenized"
    seq_len: int = _count(default=2048, ge=2)
    micro_num: int = _count(default=1, ge=1)
    micro_bsz: int = _count(default=1, ge=1)
    valid_micro_num: Optional[int] = _count(default=None, ge=1)  # micro-batches per evaluation call; default micro_num
    valid_max_tokens: Optional[int] = _count(default=None, ge=1)  # None: every token of each validation set
    valid_every: int = _count(default=0, ge=0)  # 0 = no validation
    pack_sample_into_one: bool = False
    total_steps: int = _count(default=50000, ge=1)
    skip_batches: str = ""  # "1-5,9": batch_count values to skip
    rampup_batch_size: str = ""  # "start incr every": micro_num ramps from start by incr every N steps
    min_length: int = _count(default=0, ge=0)
    min_length_dict: dict[str, Annotated[int, Field(strict=True, ge=0)]] = Field(default_factory=dict)
    train_folder: Optional[str] = None  # None: a seeded random dataset, as InternEvo does
    valid_folder: Optional[str] = None
    empty_cache_and_diag_interval: int = _count(default=50, ge=0)
    diag_outlier_ratio: float = Field(default=1.1, gt=0, allow_inf_nan=False)
    use_packed_dataset: bool = True
    fixed_random_dataset_seqlen: bool = True
    num_worker: int = _count(default=0, ge=0)
    seed: int = _count(default=1024, ge=0, lt=2**63)  # numpy seeds are non-negative
    # streaming (Hugging Face datasets) and raw text
    tokenizer_path: Optional[str] = None
    content_name: str = "text"
    subset_name: Optional[str] = None
    split: str = "train"  # streaming: the split trained on (e.g. "train_sft")
    valid_split: Optional[str] = None  # streaming: a split of the dataset to validate on (e.g. "validation")
    # raw text folders (type="text"): which files, and how a file becomes documents
    text_glob: str = "**/*.txt"
    text_exclude: tuple[str, ...] = ()
    max_text_bytes: Optional[int] = _count(default=None, ge=1)
    # the last matching files, up to this many bytes, are held out of training and validated on
    # (with valid_every), named "held_out"
    text_valid_bytes: int = _count(default=0, ge=0)
    # per-source sampling weights by folder name, e.g. {"en": 1.0, "code": 0.5}
    source_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("skip_batches", mode="before")
    @classmethod
    def _one_batch(cls, v: Any) -> Any:
        # `--set data.skip_batches=3` (a literal 3, not "3") as the seed writes the key
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("skip_batches")
    @classmethod
    def _skip_batches(cls, v: str) -> str:
        parse_skip_batches(v)  # raises ValueError with the reason
        return v

    @field_validator("rampup_batch_size")
    @classmethod
    def _rampup(cls, v: str) -> str:
        parse_rampup(v)
        return v

    @field_validator("source_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"the weight of {name!r} must be a finite number > 0 (leave a source out to "
                                 f"give it weight 0)")
        return v

    @field_validator("text_glob")
    @classmethod
    def _glob(cls, v: str) -> str:
        if not v.strip() or v.startswith(("/", "\\")) or ".." in v.replace("\\", "/").split("/"):
            raise ValueError("expected a non-empty pattern relative to train_folder, like '**/*.txt'")
        return v

    _paths = field_validator("tokenizer_path", "train_folder", "valid_folder")(path_value)

    @field_validator("content_name", "split", "valid_split", "subset_name", "tokenizer_path", "train_folder",
                     "valid_folder")
    @classmethod
    def _non_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("expected a non-empty string (or leave the key out)")
        return v

    @field_validator("text_exclude")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not part.strip() for part in v):
            raise ValueError("expected non-empty folder or file names")
        return v

    @model_validator(mode="after")
    def _streaming_keys(self) -> "DataConfig":
        if self.type != "streaming":
            if self.split != "train":
                raise ValueError("'split' selects a split of a streamed dataset and needs type='streaming'")
            if self.valid_split is not None:
                raise ValueError("'valid_split' selects a split of a streamed dataset and needs type='streaming'")
        # (text_valid_bytes with another type does nothing and is reported at start: config/load.py)
        if self.text_valid_bytes and self.type == "text" and self.valid_folder:
            raise ValueError("give one validation set: 'valid_folder' or 'text_valid_bytes', not both")
        return self

    @property
    def packed_length(self) -> int:
        return self.seq_len * self.micro_bsz


class BatchRanges(collections.abc.Set):
    """A set of batch_count values held as merged inclusive ranges: `"0-99999999999"` is one pair,
    not a set of 10^11 ints. Membership is a bisect; iterating and `==` behave like a set."""

    def __init__(self, ranges: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._starts = [a for a, _ in merged]
        self._ranges = [(a, b) for a, b in merged]

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, int):
            return False
        k = bisect.bisect_right(self._starts, x) - 1
        return k >= 0 and x <= self._ranges[k][1]

    def __iter__(self):
        for a, b in self._ranges:
            yield from range(a, b + 1)

    def __len__(self) -> int:
        return sum(b - a + 1 for a, b in self._ranges)

    def __repr__(self) -> str:
        return f"BatchRanges({self._ranges})"


def parse_skip_batches(spec: str) -> BatchRanges:
    """'1-5,9' -> {1,2,3,4,5,9} (InternEvo's BatchSkipper syntax), as ranges."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"expected ranges like '1-5,9', got {spec!r}") from None
        if b < a:
            raise ValueError(f"range {part!r} ends before it starts")
        ranges.append((a, b))
    return BatchRanges(ranges)


def parse_rampup(spec: str) -> Optional[tuple[int, int, int]]:
    """'start incr every' -> (start, incr, every): micro_num grows from start by incr every N steps."""
    if not spec.strip():
        return None
    parts = spec.split()
    try:
        start, incr, every = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected three integers 'start increment every_steps', got {spec!r}") from None
    if start < 1 or incr < 0 or every < 1:
        raise ValueError(f"need start >= 1, increment >= 0, every_steps >= 1, got {spec!r}")
    return start, incr, every
