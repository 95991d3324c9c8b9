"""One rule for "a finite number", "an integer", "a flag", "a string" and "any iterable of items" from a
caller, shared by the modules that check one (before a native call, pybind's own refusal names neither
the argument nor the value: "incompatible function arguments").

A Python int past the float range (``10**400``) is an int, but ``math.isfinite`` and ``float()`` raise
``OverflowError`` on it, so a check built on them alone leaks a bare ``OverflowError``; here such an
int is simply not finite. Its ``repr`` is unhelpful (and raises past 4300 digits), so messages name it
by its size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["INT32_MAX", "INT64_MAX", "array_of", "finite_number", "flag", "integer", "is_finite_number", "iterable",
           "plain", "positive_int", "shown", "text"]

INT32_MAX = 2**31 - 1  # the native block and slot counts
INT64_MAX = 2**63 - 1


def is_finite_number(value: object) -> bool:
    """True for an int or float (a bool is neither) whose float value is finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


def shown(value: object) -> str:
    """``repr(value)`` for a message; an int past the float range is named by its size instead."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1024:
        return f"an int of {value.bit_length()} bits (past the float range)"
    return repr(value)


def finite_number(name: str, value: object, *, minimum: float | None = None) -> float:
    """``value`` as a float. ``TypeError`` unless it is an int or a float (a bool is not); ``ValueError``
    naming ``name`` when it is NaN, infinite, an int past the float range, or below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def integer(name: str, value: Any) -> int:
    """``value`` as a Python int: a bool, a float or anything else but an int or a numpy integer is a
    TypeError naming ``name`` (native calls would take ``True`` as 1, and refuse a float without the name)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def positive_int(name: str, value: Any, *, allow_zero: bool = False, maximum: int | None = None) -> int:
    """An :func:`integer` that is > 0 (>= 0 with ``allow_zero``) and at most ``maximum`` when given;
    ValueError naming ``name`` otherwise."""
    n = integer(name, value)
    if n < 0 or (n == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {shown(n)}")
    if maximum is not None and n > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {shown(n)}")
    return n


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool: only a bool (or a numpy bool) is one; TypeError naming ``name`` otherwise
    (an int 0 / 1 or a string is a mistake, not a truth value)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def text(name: str, value: Any) -> str:
    """``value`` as a str; TypeError naming ``name`` and the type otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def plain(value: Any) -> Any:
    """A numpy integer or float as the Python number it holds (the original package took them);
    anything else unchanged, for the checks that follow (a numpy bool stays refused)."""
    return value.item() if isinstance(value, np.integer | np.floating) else value


def iterable(name: str, value: Any, expected: str, *, refuse: tuple[type, ...] = ()) -> Iterable[Any]:
    """``value`` when it is any iterable (a list, a generator, ``dict.values()``: the original package
    took them) but not a str or bytes (characters are no items) nor an instance of ``refuse`` (a
    mapping, whose items are keys; one model, which iterates as its fields); else ``TypeError``
    "``name`` must be ``expected``, got <type>"."""
    if isinstance(value, (str, bytes, *refuse)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return value


def array_of(name: str, value: Any, expected: str = "a flat sequence of ints") -> np.ndarray[Any, Any]:
    """``np.asarray(value)``; a value that refuses the conversion (a torch tensor that requires grad
    raises RuntimeError from its ``__array__``, one on a GPU TypeError, a ragged list ValueError) is a
    TypeError "``name`` must be ``expected``, got <type> (<the refusal>)"."""
    try:
        return np.asarray(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} ({exc})") from None
