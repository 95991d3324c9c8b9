"""Distributed KV pooling: nodes contribute memory to one global pool.

The seed declares the interfaces (:class:`GlobalKVPoolManager`, :class:`RemoteKVAccessor`, abstract)
and the node description (:class:`NodeContribution`); they are the same here. On top of them this
module provides working implementations:

* :class:`LocalGlobalKVPoolManager` composes one :class:`~sagellm_kv_cache.pool.KVPool` per node
  (capacity = the node's contributed memory / bytes per token): allocation goes to the preferred
  node when it has room, else to the node with the most free tokens; every handle carries its
  node's rank; ``get`` returns local handles directly and fetches remote ones through a
  :class:`RemoteKVAccessor`.
* :class:`TransferRemoteKVAccessor` fetches a remote handle's KV tensor over a
  :class:`~sagellm_kv_cache.transfer.KVTransferEngine` (the owner sends with ``serve``), with
  ``prefetch`` running the same receive in the background.

Migrating live KV between nodes (``rebalance``) needs a data mover and is refused with
:class:`~sagellm_kv_cache.errors.KVNotImplementedError`, as the seed's fail-fast convention asks.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagellm_protocol.kv import DType, Layout

from sagellm_kv_cache._numbers import integer, is_finite_number, shown
from sagellm_kv_cache.errors import KVBudgetExceededError, KVHandleNotFoundError, KVNotImplementedError
from sagellm_kv_cache.models.kv_handle import KVHandle

if TYPE_CHECKING:
    from sagellm_kv_cache.pool.kv_pool import KVPool
    from sagellm_kv_cache.transfer.engine import KVTransferEngine

__all__ = [
    "GlobalKVPoolManager",
    "LocalGlobalKVPoolManager",
    "NodeContribution",
    "RemoteKVAccessor",
    "TransferRemoteKVAccessor",
]

_GIB = 1 << 30


@dataclass
class NodeContribution:
    """What one node gives to the global pool (sizes in GiB)."""

    node_rank: int
    total_memory_gb: float
    contributed_memory_gb: float
    reserved_memory_gb: float
    storage_tiers: list[str]

    def __post_init__(self) -> None:
        for name in ("total_memory_gb", "contributed_memory_gb", "reserved_memory_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of GiB, got {type(value).__name__}")
            if not is_finite_number(value):  # NaN passes every comparison below
                raise ValueError(f"{name} must be finite, got {shown(value)}")
        # Read only later (get_global_stats copies the tiers): None was a TypeError from there and a
        # str was split into letters; a str rank failed only when the node joined a global pool.
        _check_rank("node_rank", self.node_rank)
        tiers = self.storage_tiers
        if isinstance(tiers, str | bytes) or not isinstance(tiers, list | tuple) or \
                not all(isinstance(tier, str) for tier in tiers):
            raise TypeError(f"storage_tiers must be a list of tier names (str), got {tiers!r}")
        if self.contributed_memory_gb < 0 or self.reserved_memory_gb < 0:
            raise ValueError("Memory sizes must be non-negative")
        if self.contributed_memory_gb + self.reserved_memory_gb > self.total_memory_gb:
            raise ValueError(
                f"Contributed ({self.contributed_memory_gb}GB) + Reserved ({self.reserved_memory_gb}GB) > "
                f"Total ({self.total_memory_gb}GB)"
            )


class GlobalKVPoolManager(ABC):
    """The global pool: allocate anywhere, free, read local or remote KV, report, rebalance."""

    @abstractmethod
    def __init__(self, nodes: list[NodeContribution]) -> None:
        """Takes every node's contribution; ``ValueError`` for an invalid set of nodes."""

    @abstractmethod
    def alloc(
        self,
        num_tokens: int,
        dtype: DType | str,
        layout: Layout | str,
        device: str,
        preferred_node: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KVHandle:
        """Allocates on some node (``handle.node_rank`` tells which); ``KVBudgetExceededError`` when none fits."""

    @abstractmethod
    def free(self, handle: KVHandle) -> None:
        """Frees ``handle`` on the node that holds it."""

    @abstractmethod
    def get(self, handle: KVHandle, current_rank: int) -> Any:
        """The KV of ``handle`` as seen from ``current_rank`` (local read or remote fetch)."""

    @abstractmethod
    def get_global_stats(self) -> dict[str, Any]:
        """At least ``total_capacity_tokens``, ``allocated_tokens`` and ``per_node_stats``."""

    @abstractmethod
    def rebalance(self) -> None:
        """Moves KV between nodes to even out load and shorten access paths."""


class RemoteKVAccessor(ABC):
    """Reads KV that may live on another node."""

    @abstractmethod
    def fetch(self, handle: KVHandle, current_rank: int) -> Any:
        """The KV data of ``handle`` on ``current_rank`` (blocking)."""

    @abstractmethod
    def prefetch(self, handle: KVHandle, current_rank: int) -> None:
        """Starts fetching in the background; a later ``fetch`` returns the result."""

    @abstractmethod
    def is_remote(self, handle: KVHandle, current_rank: int) -> bool:
        """True when ``handle`` lives on a node other than ``current_rank``."""


def _check_rank(name: str, value: Any) -> int:
    return integer(name, value)  # a numpy integer is a rank too (it compares equal to the int)


def _check_handle(handle: Any) -> None:
    if not isinstance(handle, KVHandle):
        raise TypeError(f"expected a KVHandle, got {type(handle).__name__}")


class LocalGlobalKVPoolManager(GlobalKVPoolManager):
    """A global pool over per-node :class:`KVPool` objects held in this process (see the module docstring).

    ``bytes_per_token`` converts a node's contributed GiB into its token capacity; ``block_size``
    is each node pool's block size. Thread-safe (each node pool is; node choice takes a lock).
    """

    def __init__(
        self,
        nodes: list[NodeContribution],
        *,
        bytes_per_token: int = 32,
        block_size: int = 128,
        accessor: RemoteKVAccessor | None = None,
    ) -> None:
        from sagellm_kv_cache.pool.kv_pool import KVPool

        if not isinstance(nodes, list | tuple) or not nodes:
            raise ValueError("nodes must be a non-empty list of NodeContribution")
        ranks = [_check_rank("node_rank", getattr(n, "node_rank", None)) for n in nodes]
        if not all(isinstance(n, NodeContribution) for n in nodes):
            raise TypeError("every node must be a NodeContribution")
        if len(set(ranks)) != len(ranks) or min(ranks) < 0:
            raise ValueError(f"node ranks must be distinct and >= 0, got {ranks}")
        if isinstance(bytes_per_token, bool) or not isinstance(bytes_per_token, int) or bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token must be a positive int, got {bytes_per_token!r}")
        self.nodes = list(nodes)
        self.bytes_per_token = bytes_per_token
        self.accessor = accessor
        self._pools: dict[int, KVPool] = {}
        for node in self.nodes:
            capacity = math.floor(node.contributed_memory_gb * _GIB / bytes_per_token)
            if capacity <= 0:
                raise ValueError(f"node {node.node_rank} contributes no usable memory "
                                 f"({node.contributed_memory_gb}GB at {bytes_per_token} bytes per token)")
            # Token admission, as in the original (the nodes' pools back no paged tensor).
            self._pools[node.node_rank] = KVPool(capacity, block_size, bytes_per_token, node_rank=node.node_rank,
                                                 overcommit_blocks=True)
        self._lock = threading.Lock()

    def pool(self, node_rank: int) -> KVPool:
        """The pool of one node; ``ValueError`` for a rank that is not in the global pool."""
        try:
            return self._pools[node_rank]
        except KeyError:
            raise ValueError(f"unknown node rank {node_rank}; nodes are {sorted(self._pools)}") from None

    def alloc(
        self,
        num_tokens: int,
        dtype: DType | str,
        layout: Layout | str,
        device: str,
        preferred_node: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KVHandle:
        if preferred_node is not None:
            self.pool(_check_rank("preferred_node", preferred_node))
        with self._lock:
            order = sorted(self._pools, key=lambda r: (r != preferred_node, -self._pools[r].get_available_tokens(), r))
            for rank in order:
                if self._pools[rank].can_admit(num_tokens):
                    return self._pools[rank].alloc(num_tokens, dtype, layout, device, metadata)
            best = max(p.get_available_tokens() for p in self._pools.values())
        raise KVBudgetExceededError(num_tokens, best, context={"num_nodes": len(self._pools),
                                                               "preferred_node": preferred_node})

    def _owner(self, handle: Any) -> KVPool:
        _check_handle(handle)
        pool = self._pools.get(handle.node_rank) if handle.node_rank is not None else None
        if pool is None:
            raise KVHandleNotFoundError(handle.handle_id, context={"node_rank": handle.node_rank,
                                                                   "reason": "not allocated by this global pool"})
        return pool

    def free(self, handle: KVHandle) -> None:
        self._owner(handle).free(handle)

    def get(self, handle: KVHandle, current_rank: int) -> Any:
        """A local handle's live record, or the remote KV fetched through ``accessor``."""
        _check_rank("current_rank", current_rank)  # any other type never equals a rank: read as remote
        pool = self._owner(handle)
        if handle.node_rank == current_rank:
            live = pool.get_handle(handle.handle_id)
            live.touch()
            return live
        if self.accessor is None:
            raise KVNotImplementedError("remote KV access without a RemoteKVAccessor",
                                        context={"node_rank": handle.node_rank, "current_rank": current_rank})
        return self.accessor.fetch(handle, current_rank)

    def get_global_stats(self) -> dict[str, Any]:
        per_node = {}
        for node in self.nodes:
            pool = self._pools[node.node_rank]
            per_node[node.node_rank] = {
                **pool.get_stats(),
                "contributed_memory_gb": node.contributed_memory_gb,
                "storage_tiers": list(node.storage_tiers),
            }
        return {
            "num_nodes": len(self.nodes),
            "total_capacity_tokens": sum(p.max_tokens for p in self._pools.values()),
            "allocated_tokens": sum(p.get_allocated_tokens() for p in self._pools.values()),
            "available_tokens": sum(p.get_available_tokens() for p in self._pools.values()),
            "total_contributed_gb": sum(n.contributed_memory_gb for n in self.nodes),
            "per_node_stats": per_node,
        }

    def rebalance(self) -> None:
        """Refused: moving live KV between nodes needs a data mover this pool does not have."""
        raise KVNotImplementedError("rebalance: migrating live KV between nodes")


class TransferRemoteKVAccessor(RemoteKVAccessor):
    """Fetches remote KV over a :class:`KVTransferEngine`.

    ``make_buffer(handle)`` returns the tensor to receive into (its shape and dtype must match what
    the owner sends). The owner calls :meth:`serve` with the handle's tensor at the same time.

    A prefetched buffer waits for its :meth:`fetch`; at most ``max_pending`` (default 64) wait at a
    time. Beyond that the oldest finished prefetch is dropped (its ``fetch`` receives anew) and,
    when none has finished, a new prefetch is not started: prefetches whose fetch never comes (an
    aborted request) would otherwise hold their buffers for the life of the process.
    """

    def __init__(self, engine: KVTransferEngine, make_buffer: Callable[[KVHandle], Any], *,
                 max_prefetch: int = 2, max_pending: int = 64) -> None:
        if engine is None:
            raise ValueError("engine is required (a KVTransferEngine on an initialised backend)")
        if not callable(make_buffer):
            raise TypeError("make_buffer must be callable(handle) -> tensor")
        for name, count in (("max_prefetch", max_prefetch), ("max_pending", max_pending)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be a positive int, got {count!r}")
        self.max_pending = max_pending
        self.engine = engine
        self.make_buffer = make_buffer
        self._executor = ThreadPoolExecutor(max_workers=max_prefetch, thread_name_prefix="kv-prefetch")
        self._pending: dict[Any, Future[Any]] = {}
        self._lock = threading.Lock()

    def is_remote(self, handle: KVHandle, current_rank: int) -> bool:
        _check_handle(handle)
        _check_rank("current_rank", current_rank)  # a str rank never equals one: every handle read as remote
        return handle.node_rank is not None and handle.node_rank != current_rank

    def _receive(self, handle: KVHandle, current_rank: int) -> Any:
        if handle.node_rank is None:
            raise ValueError(f"handle {handle.handle_id} has no node rank")
        buffer = self.make_buffer(handle)
        # A copy: the engine records the transfer on the handle it gets (rank := receiver), and the
        # caller's handle must keep naming the node that owns the KV.
        self.engine.transfer_kv_handle(handle.model_copy(), handle.node_rank, current_rank, buffer)
        return buffer

    def fetch(self, handle: KVHandle, current_rank: int) -> Any:
        """Receives the KV of a remote handle (or waits for its prefetch); ``ValueError`` for a local one."""
        remote = self.is_remote(handle, current_rank)  # checks both arguments first
        with self._lock:
            pending = self._pending.pop(handle.handle_id, None)
        if pending is not None:
            return pending.result()
        if not remote:
            raise ValueError(f"handle {handle.handle_id} is local to rank {current_rank}; read it from the local pool")
        return self._receive(handle, current_rank)

    def prefetch(self, handle: KVHandle, current_rank: int) -> None:
        if not self.is_remote(handle, current_rank):
            return
        with self._lock:
            if handle.handle_id in self._pending:
                return
            if len(self._pending) >= self.max_pending:
                finished = next((key for key, fut in self._pending.items() if fut.done()), None)
                if finished is None:
                    return  # all in flight: a prefetch is a hint, the fetch will receive itself
                del self._pending[finished]  # oldest first: the dict keeps submission order
            self._pending[handle.handle_id] = self._executor.submit(self._receive, handle, current_rank)

    def serve(self, handle: KVHandle, dst_rank: int, tensor: Any) -> None:
        """The owner's side: sends ``tensor`` (the KV of ``handle``) to ``dst_rank``."""
        _check_handle(handle)
        _check_rank("dst_rank", dst_rank)
        if handle.node_rank is None:
            raise ValueError(f"handle {handle.handle_id} has no node rank")
        self.engine.transfer_kv_handle(handle.model_copy(), handle.node_rank, dst_rank, tensor)

    def close(self) -> None:
        """Waits for running prefetches and stops the worker threads."""
        self._executor.shutdown(wait=True)
