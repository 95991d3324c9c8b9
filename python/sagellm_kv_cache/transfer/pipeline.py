"""Asynchronous transfers: :class:`KVTransferPipeline` runs ``transfer_kv_handle`` calls on worker
threads and hands back futures; :class:`CommTransferBackendAdapter` names the interconnect of a
``sagellm_comm`` backend without changing how it moves data."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from sagellm_kv_cache.transfer.engine import KVTransferEngine

__all__ = ["CommTransferBackendAdapter", "KVTransferPipeline"]

DoneCallback = Callable[[uuid.UUID | None, Exception | None], None]


class KVTransferPipeline:
    """Runs transfers of one :class:`KVTransferEngine` concurrently on ``max_workers`` threads.

    The engine's backend must allow concurrent calls (gloo does for distinct peers). ``submit``
    returns at once; ``on_done(transfer_id, None)`` or ``on_done(None, error)`` runs on the worker
    thread when the transfer ends. Thread-safe.
    """

    def __init__(self, engine: KVTransferEngine, *, max_workers: int = 4) -> None:
        if not isinstance(engine, KVTransferEngine):
            raise TypeError(f"engine must be a KVTransferEngine, got {type(engine).__name__}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.engine = engine
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-transfer")
        self._lock = threading.Lock()
        self._in_flight: set[Future[uuid.UUID]] = set()
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._closed = False

    def submit(
        self,
        handle: Any,
        src_rank: int,
        dst_rank: int,
        tensor: Any | None = None,
        *,
        on_done: DoneCallback | None = None,
    ) -> Future[uuid.UUID]:
        """Queues one ``transfer_kv_handle``; the future holds its transfer id or its error."""
        if on_done is not None and not callable(on_done):
            raise TypeError("on_done must be callable(transfer_id, error)")
        with self._lock:
            if self._closed:
                raise RuntimeError("KVTransferPipeline is already shut down")
            future = self._executor.submit(self._run, handle, src_rank, dst_rank, tensor, on_done)
            self._submitted += 1
            self._in_flight.add(future)
        future.add_done_callback(self._finished)
        return future

    def _run(self, handle: Any, src: int, dst: int, tensor: Any, on_done: DoneCallback | None) -> uuid.UUID:
        try:
            transfer_id = self.engine.transfer_kv_handle(handle, src, dst, tensor)
        except Exception as e:
            if on_done is not None:
                on_done(None, e)
            raise
        if on_done is not None:
            on_done(transfer_id, None)
        return transfer_id

    def _finished(self, future: Future[uuid.UUID]) -> None:
        with self._lock:
            self._in_flight.discard(future)
            if future.cancelled() or future.exception() is not None:
                self._failed += 1
            else:
                self._completed += 1

    def wait_all(self, timeout: float | None = None) -> list[uuid.UUID]:
        """Waits for the transfers in flight now; returns the ids of those that succeeded.

        ``TimeoutError`` when some are still running after ``timeout`` seconds.
        """
        with self._lock:
            pending = list(self._in_flight)
        done, not_done = wait(pending, timeout=timeout, return_when=ALL_COMPLETED)
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {len(pending)} transfers still running after {timeout}s")
        return [f.result() for f in pending if f in done and not f.cancelled() and f.exception() is None]

    def pending_count(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def get_stats(self) -> dict[str, int]:
        with self._lock:
            return {"submitted": self._submitted, "completed": self._completed, "failed": self._failed,
                    "in_flight": len(self._in_flight)}

    def shutdown(self, *, wait: bool = True) -> None:
        """Refuses new transfers and stops the workers (after the running ones when ``wait``)."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait)


class CommTransferBackendAdapter:
    """A ``sagellm_comm`` backend as a transfer backend, labelled with its interconnect (``rdma``,
    ``nvlink``, ``tcp``, ...) for records and placement; data moves through the backend unchanged."""

    def __init__(self, comm_backend: Any, *, interconnect: str = "rdma") -> None:
        if comm_backend is None:
            raise ValueError("comm_backend cannot be None (Fail-Fast)")
        for name in ("send", "recv", "get_rank", "get_world_size"):
            if not callable(getattr(comm_backend, name, None)):
                raise TypeError(f"comm_backend has no {name}() method; pass a sagellm_comm backend")
        if not isinstance(interconnect, str) or not interconnect:
            raise ValueError(f"interconnect must be a non-empty string, got {interconnect!r}")
        self._backend = comm_backend
        self._interconnect = interconnect

    @property
    def interconnect(self) -> str:
        return self._interconnect

    def get_rank(self) -> int:
        return int(self._backend.get_rank())

    def get_world_size(self) -> int:
        return int(self._backend.get_world_size())

    def send(self, tensor: Any, dst_rank: int) -> None:
        self._backend.send(tensor, dst_rank)

    def recv(self, tensor: Any, src_rank: int) -> None:
        self._backend.recv(tensor, src_rank)

    def __repr__(self) -> str:
        backend = type(self._backend).__name__
        return f"CommTransferBackendAdapter(interconnect={self._interconnect!r}, backend={backend})"
