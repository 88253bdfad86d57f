"""The `long_eval` section: long-context metrics at every `data.valid_every` steps (spindle/train/long_eval.py).

    long_eval = dict(lengths=[4096, 16384], variants=["plain", "yarn"],       # val/ppl@4096, val/ppl@4096/yarn
                     passkey_lengths=[8192], passkey_depths=[0, 0.5, 1])    # val/passkey@8192

Empty `lengths` and `passkey_lengths` (the default) switch it off. `tasks` runs lm-evaluation-harness tasks on the
model being trained, at its own cadence (spindle/train/lm_eval_hook.py, docs/evaluation.md):

    long_eval = dict(tasks=dict(names=["my_task"], include_path="my_tasks/", limit=50, every=500))
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator

from spindle.config.base import Section, _count, path_value

MAX_LONG_EVAL_LENGTH = 1 << 24  # as `spindle eval`: beyond any model this evaluates
_Length = Annotated[int, Field(strict=True, ge=2, le=MAX_LONG_EVAL_LENGTH)]
_Depth = Annotated[float, Field(ge=0, le=1)]


class LmEvalTasksConfig(Section):
    """lm-evaluation-harness tasks on the model being trained (spindle/train/lm_eval_hook.py):
    `lm_eval/{task}/{metric}` in the step's record."""

    names: tuple[str, ...] = ()  # lm-eval task names (glob patterns allowed); () = off
    include_path: Optional[str] = None  # a folder of task YAML files of your own, looked up first
    every: Optional[int] = _count(default=None, ge=1, le=10**12)  # steps; None: data.valid_every
    limit: Optional[float] = Field(default=None, gt=0, le=1e9)  # samples per task (a fraction below 1)
    num_fewshot: Optional[int] = _count(default=None, ge=0, le=1000)
    batch_size: int = _count(default=1, ge=1, le=4096)
    max_length: Optional[int] = _count(default=None, ge=2, le=MAX_LONG_EVAL_LENGTH)  # None: data.seq_len

    _paths = field_validator("include_path")(path_value)

    @field_validator("names", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        names = (v,) if isinstance(v, str) else v
        if isinstance(names, (list, tuple)) and any(not isinstance(n, str) or not n.strip() for n in names):
            raise ValueError("expected lm-eval task names (non-empty strings)")
        return names


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
    tasks: LmEvalTasksConfig = Field(default_factory=LmEvalTasksConfig)

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
