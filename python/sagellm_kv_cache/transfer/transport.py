"""Point-to-point transports under the block transfer: non-blocking send/recv with a deadline.

``isagellm-comm``'s ``CommBackend`` offers blocking ``send``/``recv`` only, bounded by nothing but
the process group's timeout (30 minutes for gloo). Two adapters give the block transfer what it
needs, a per-operation deadline and several operations in flight:

* :class:`TorchDistTransport`, used for ``GlooBackend`` (a thin wrapper over torch.distributed's
  default group): ``torch.distributed.isend``/``irecv`` on tags of our own, one per channel (data
  frames one way, replies the other), so block traffic never matches another message of the same
  pair, even with transfers running both ways at once, and ``Work.wait(timeout)``. gloo's I/O thread moves
  the bytes while Python gathers, checks and scatters the neighbouring chunks. When a wait times
  out gloo closes the pair, so a late message can never land in a buffer we have given up on; the
  peer's pending operations fail at once instead of hanging.
* :class:`BackendThreadTransport`, for any other backend: the backend's blocking calls run in
  order on one daemon thread per peer, and the caller waits with a deadline. The backend has no
  tags, so between two ranks only one transfer may run at a time, in either direction. A call that times out
  stays stuck on its thread (no backend can cancel it), so the caller must not reuse the buffers
  it handed over, nor this peer.

Both raise :class:`TransportTimeout` or :class:`TransportError`; the block transfer turns them
into ``KVTransferTimeoutError`` / ``KVTransferFailedError``.

:class:`BackendThreadTransport` shares the backend's one stream per pair with whatever else calls
the backend, such as ``KVTransferEngine``'s tensor transfers; :func:`uses_backend_calls` says when
a block transfer runs on it, and :class:`BrokenLinks` is the verdict on each peer's stream that such
users share: once one of them leaves the stream out of step, all of them refuse it.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

__all__ = [
    "BackendThreadTransport",
    "BrokenLinks",
    "Pending",
    "TorchDistTransport",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "make_transport",
    "uses_backend_calls",
]

#: torch.distributed tag of block-transfer messages ("SKV" in ASCII).
BLOCK_TRANSFER_TAG = 0x534B56

_TIMED_OUT = re.compile(r"timed out", re.IGNORECASE)


class TransportError(RuntimeError):
    """The peer or the link failed (peer exited, connection closed, backend error)."""


class TransportTimeout(TransportError):
    """An operation did not complete before its deadline."""


class Pending(Protocol):
    def wait(self, timeout: float) -> None:
        """Blocks until the operation completes; ``math.inf`` waits without a deadline."""


class Transport(Protocol):
    name: str

    def rank(self) -> int: ...

    def world_size(self) -> int: ...

    def isend(self, tensor: Any, peer: int, channel: int) -> Pending: ...

    def irecv(self, tensor: Any, peer: int, channel: int) -> Pending: ...


class _TorchWork:
    """One gloo operation. gloo counts completions per buffer, so a second ``wait`` on the same
    work would block for a completion that never comes: only the first one waits."""

    __slots__ = ("_done", "_work")

    def __init__(self, work: Any) -> None:
        self._work = work
        self._done = False

    def wait(self, timeout: float) -> None:
        if self._done:
            return
        try:
            # gloo closes the pair when this deadline passes: nothing can land in the buffer later.
            deadline = None if math.isinf(timeout) else timedelta(seconds=max(timeout, 0.001))
            done = self._work.wait() if deadline is None else self._work.wait(deadline)
        except RuntimeError as e:
            if _TIMED_OUT.search(str(e)):
                raise TransportTimeout(str(e)) from e
            raise TransportError(str(e)) from e
        if done is False:
            raise TransportTimeout(f"operation did not complete within {timeout:.3f}s")
        self._done = True


class TorchDistTransport:
    """torch.distributed's default process group (what ``GlooBackend`` initialises)."""

    name = "torch.distributed"

    def __init__(self, tag: int = BLOCK_TRANSFER_TAG) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise TransportError("torch.distributed has no initialised default process group")
        self._dist = dist
        self._tag = tag

    def rank(self) -> int:
        return int(self._dist.get_rank())

    def world_size(self) -> int:
        return int(self._dist.get_world_size())

    def isend(self, tensor: Any, peer: int, channel: int) -> Pending:
        try:
            return _TorchWork(self._dist.isend(tensor, dst=peer, tag=self._tag + channel))
        except RuntimeError as e:
            raise TransportError(str(e)) from e

    def irecv(self, tensor: Any, peer: int, channel: int) -> Pending:
        try:
            return _TorchWork(self._dist.irecv(tensor, src=peer, tag=self._tag + channel))
        except RuntimeError as e:
            raise TransportError(str(e)) from e


class _ThreadOp:
    __slots__ = ("done", "error", "run")

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self, timeout: float) -> None:
        if not self.done.wait(None if math.isinf(timeout) else max(timeout, 0.0)):
            raise TransportTimeout(f"operation did not complete within {timeout:.3f}s")
        if self.error is not None:
            kind = TransportTimeout if _TIMED_OUT.search(str(self.error)) else TransportError
            raise kind(str(self.error)) from self.error


class BackendThreadTransport:
    """Any ``CommBackend``: its blocking calls, in order, on one daemon thread per peer."""

    name = "backend"

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._queues: dict[int, queue.SimpleQueue[_ThreadOp]] = {}

    def rank(self) -> int:
        return int(self._backend.get_rank())

    def world_size(self) -> int:
        return int(self._backend.get_world_size())

    def _submit(self, peer: int, run: Callable[[], None]) -> Pending:
        with self._lock:
            q = self._queues.get(peer)
            if q is None:
                q = self._queues[peer] = queue.SimpleQueue()
                # Daemon: a call stuck on a dead peer must not keep the interpreter from exiting.
                threading.Thread(target=self._serve, args=(q,), name=f"kv-transfer-peer{peer}", daemon=True).start()
        op = _ThreadOp(run)
        q.put(op)
        return op

    @staticmethod
    def _serve(q: queue.SimpleQueue[_ThreadOp]) -> None:
        while True:
            op = q.get()
            try:
                op.run()
            except BaseException as e:  # handed to the waiting caller
                op.error = e
            op.done.set()

    def isend(self, tensor: Any, peer: int, channel: int) -> Pending:
        return self._submit(peer, lambda: self._backend.send(tensor, peer))

    def irecv(self, tensor: Any, peer: int, channel: int) -> Pending:
        return self._submit(peer, lambda: self._backend.recv(tensor, peer))


class BrokenLinks:
    """Peers whose stream is unusable (out of step, or closed after a timeout), each with the first
    reason given. Thread-safe; every user of one stream holds the same instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._why: dict[int, str] = {}

    def mark(self, peer: int, why: str) -> None:
        """Makes the stream to ``peer`` unusable for good; an earlier reason stays."""
        with self._lock:
            self._why.setdefault(peer, why)

    def reason(self, peer: int) -> str | None:
        """Why the stream to ``peer`` is unusable, or None while it is usable."""
        with self._lock:
            return self._why.get(peer)


def uses_backend_calls(backend: Any, kind: str) -> bool:
    """Whether :func:`make_transport` gives ``kind`` the backend's own blocking calls (the stream every
    other caller of ``backend`` uses) rather than torch.distributed on tags of its own."""
    if kind not in ("auto", "torch", "backend"):
        raise ValueError(f"transport must be 'auto', 'torch' or 'backend', got {kind!r}")
    return kind == "backend" or (kind == "auto" and not _is_gloo(backend))


def make_transport(backend: Any, kind: str = "auto") -> Transport:
    """``auto``: torch.distributed for ``GlooBackend`` once initialised, the backend's calls otherwise."""
    if uses_backend_calls(backend, kind):
        return BackendThreadTransport(backend)
    return TorchDistTransport()


def _is_gloo(backend: Any) -> bool:
    try:
        from sagellm_comm import GlooBackend
    except ImportError:
        return False
    return isinstance(backend, GlooBackend)
