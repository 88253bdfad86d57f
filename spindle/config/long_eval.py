"""The `long_eval` section: long-context metrics at every `data.valid_every` steps (spindle/train/long_eval.py).

    long_eval = dict(lengths=[4096, 16384], variants=["plain", "yarn"],       # val/ppl@4096, val/ppl@4096/yarn
                     passkey_lengths=[8192], passkey_depths=[0, 0.5, 1])    # val/passkey@8192

Empty `lengths` and `passkey_lengths` (the default) switch it off.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from spindle.config.base import Section, _count

MAX_LONG_EVAL_LENGTH = 1 << 24  # as `spindle eval`: beyond any model this evaluates
_Length = Annotated[int, Field(strict=True, ge=2, le=MAX_LONG_EVAL_LENGTH)]
_Depth = Annotated[float, Field(ge=0, le=1)]


class LongEvalConfig(Section):
    lengths: tuple[_Length, ...] = ()  # perplexity over the first L tokens of each window: val/ppl@L
    variants: tuple[str, ...] = ("plain",)  # RoPE variants as `spindle eval --variants`: plain, dynamic, yarn, ...
    windows: int = _count(default=2, ge=1, le=4096)  # evaluation windows (documents) of max(lengths) tokens
    chunk: int = _count(default=1024, ge=1, le=MAX_LONG_EVAL_LENGTH)  # prefill chunk: tokens per forward
    data: tuple[str, ...] = ()  # text files / folders or token shards; () = as `eval ppl` without --data
    passkey_lengths: tuple[_Length, ...] = ()  # val/passkey@L: accuracy over passkey_depths x passkey_samples
    passkey_depths: tuple[_Depth, ...] = (0.0, 0.5, 1.0)
    passkey_samples: int = _count(default=2, ge=1, le=4096)
    passkey_mode: Literal["teacher", "generate"] = "teacher"  # teacher works for models too small to prompt
    seed: int = _count(default=0, ge=0, lt=2**63)  # the passkey samples' own seed (never the training RNG)

    @property
    def enabled(self) -> bool:
        return bool(self.lengths or self.passkey_lengths)

    @field_validator("lengths", "passkey_lengths")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(v)))

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from spindle.errors import SpindleError
        from spindle.config.rope_types import parse_variant

        if not v:
            raise ValueError("expected at least one variant, e.g. ['plain']")
        if len(set(v)) != len(v):
            raise ValueError("a variant is named twice")
        for spec in v:
            try:
                parse_variant(spec, 1)
            except SpindleError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("passkey_depths")
    @classmethod
    def _depths(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("expected at least one depth in [0, 1]")
        return v

    @field_validator("data")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in v):
            raise ValueError("expected non-empty paths")
        return v
