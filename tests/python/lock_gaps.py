"""Running another thread's whole operation in each gap between one thread's critical sections.

An object whose state a lock guards promises readers a consistent view only if every read of one
answer happens in one critical section. :class:`GapLock` stands in for such a lock and makes the
interleavings that would break that promise happen on purpose: after the ``gap``-th time the armed
thread leaves the lock, ``between`` runs to its end on a thread of its own before the armed thread
goes on. Running the same call once for each gap (1, 2, ... past its last critical section) tries
every point at which another thread could act, deterministically.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType


class GapLock:
    """A ``threading.Lock`` (used with ``with``) that runs ``between`` in the ``gap``-th gap of the
    armed thread. ``ran`` says whether it did; an error ``between`` raised is raised in the armed
    thread, where the test sees it."""

    def __init__(self, gap: int, between: Callable[[], object]) -> None:
        self._lock = threading.Lock()
        self._gap = gap
        self._between = between
        self._armed: int | None = None
        self._released = 0
        self.ran = False

    def arm(self) -> None:
        """Counts the calling thread's releases from now on."""
        self._armed, self._released = threading.get_ident(), 0

    def __enter__(self) -> GapLock:
        self._lock.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()
        if threading.get_ident() != self._armed:
            return
        self._released += 1
        if self._released != self._gap:
            return
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._between()
            except BaseException as e:  # handed to the armed thread
                failure.append(e)

        other = threading.Thread(target=run, name="lock-gap")
        other.start()
        other.join()
        self.ran = True
        if failure:
            raise failure[0]
