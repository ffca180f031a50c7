"""Argument checks shared by the public constructors: clear ValueErrors."""

from __future__ import annotations

from typing import Any


def whole_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (or None when allowed).

    >>> whole_number("every_n_steps", 0)
    Traceback (most recent call last):
    ...
    ValueError: every_n_steps must be a whole number >= 1, got 0
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a whole number >= 1{extra}, got {value!r}")


def deferred_option(value: Any) -> None:
    if value not in (True, False, "auto"):
        raise ValueError(f"deferred must be True, False or 'auto', got {value!r}")
