"""The base of every config section, and the value checks sections share."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spindle.errors import SpindleError
from spindle.fileio import check_path_text, safe_relpath

MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take it; per-name init seeds stay below 2**64
_NUMBER_TYPES = (int, float, Optional[int], Optional[float])
_TEXT_TYPES = (str, Optional[str])


class Section(BaseModel):
    """Base of every section: unknown keys are errors; values are checked on assignment too. Numbers
    are finite (a key that means "never" with inf says so itself) and are numbers, not True or "3";
    a path object is taken as the path it names, as a file system would."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, v: Any, info) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if annotation in _NUMBER_TYPES and isinstance(v, (bool, str)):
            expected = "an integer" if annotation in (int, Optional[int]) else "a number"
            raise ValueError(f"expected {expected}, not a {type(v).__name__}")
        if annotation in _TEXT_TYPES and isinstance(v, os.PathLike):
            return os.fspath(v)
        return v


def _count(**bounds):
    """An integer key of the data section: a real int only (no True for 1, no 2048.0)."""
    return Field(strict=True, **bounds)


def every_steps(v: float) -> float:
    """An interval in steps: a whole number >= 1, or inf for never."""
    if not (v == math.inf or (v >= 1 and float(v).is_integer())):
        raise ValueError("must be a whole number of steps >= 1 (or float('inf') for never)")
    return v


def path_value(v: Optional[str], info) -> Optional[str]:
    """A path a config gives (a folder, a file, a save folder URL): not empty, on one line, no NUL byte.
    '..' and absolute paths are fine: the place is the user's own choice (names that must stay inside a
    folder, like JOB_NAME, are checked as names)."""
    if v is None:
        return v
    if not v.strip():
        raise ValueError("expected a path, not an empty string (leave the key out for the default)")
    try:
        check_path_text(v, info.field_name)
    except SpindleError as exc:  # the key and the value are named by the error line itself
        raise ValueError(str(exc).removeprefix(f"{info.field_name}: {v!r} ")) from None
    return v


def folder_name(v: str) -> str:
    """One folder name (JOB_NAME: the run goes to {trainer.run_folder}/{JOB_NAME}), never a path out of it."""
    try:
        plain = "/" not in safe_relpath(v, "JOB_NAME") and bool(v.strip())
    except SpindleError:
        plain = False
    if not plain:
        raise ValueError("expected one folder name inside trainer.run_folder: not empty, no '/' or '\\', "
                         "not '.' or '..', no NUL byte or line break")
    return v
