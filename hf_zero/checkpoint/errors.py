"""CheckpointError and the small helpers every checkpoint check uses to say what is wrong."""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["CheckpointError", "expect", "is_int", "is_str_list", "show"]

_repr = reprlib.Repr()  # bad values in messages: short, and safe on any nesting
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxdict = 8
_repr.maxlevel = 3
show = _repr.repr


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, foreign or unsupported."""


def expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what}")


def is_int(v: Any) -> bool:
    return type(v) is int


def is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)
