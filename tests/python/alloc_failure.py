"""Failing CPython's memory allocations one at a time (``_testcapi.set_nomemory``), for tests that a
call which runs out of memory part-way raises MemoryError and leaves its state as it found it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def failing_at(n: int, call: Callable[[], Any]) -> Any:
    """``call()`` with CPython's n-th memory allocation from now failing (``_testcapi`` hooks): its
    result, or None when it raised MemoryError."""
    testcapi = pytest.importorskip("_testcapi")
    testcapi.set_nomemory(n, n + 1)
    try:
        return call()
    except MemoryError:
        return None
    finally:
        testcapi.remove_mem_hooks()


def fail_each_allocation(attempt: Callable[[int], bool], min_failures: int) -> None:
    """``attempt(n)`` for n = 0, 1, ...: it builds its state, makes the call through ``failing_at(n, ...)``,
    checks what it finds and says whether the call succeeded. Ends after 20 successes in a row (the
    call then makes fewer than n allocations), having seen at least ``min_failures`` failed calls."""
    successes = failures = 0
    for n in range(2000):
        if attempt(n):
            successes += 1
            if successes == 20:
                break
        else:
            successes, failures = 0, failures + 1
    assert successes == 20 and failures >= min_failures
