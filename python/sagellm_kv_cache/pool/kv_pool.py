"""``KVPool``: the seed's token-budget pool, backed by the C++ lock-free block allocator.

The seed accounts in tokens (``max_tokens``) and hands out :class:`KVHandle` objects; here every
handle also owns ``ceil(num_tokens / block_size)`` real block ids from the native allocator, which
is what an engine needs to build a block table. The pool is metadata-only (no KV bytes behind it,
like the seed); use :class:`sagellm_kv_cache.PagedKVPool` for real memory.

Admission is by the token budget alone, as in the original package: whatever fits in
``max_tokens`` is admitted, however the handles round up to blocks. Handles whose last block is
partly filled can need more block ids than ``ceil(max_tokens / block_size)`` (at most one per
token), so the id space grows on demand in segments of that size, each a lock-free allocator of its
own (see :class:`_BlockIdSpace`); with full blocks only the first segment is ever used.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from sagellm_protocol.kv import DType, KVBlockState, Layout

from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVConfigInvalidError,
    KVDoubleFreeError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVInvalidBlockError,
    KVPoolFullError,
)
from sagellm_kv_cache.models.kv_handle import KVHandle

__all__ = ["KVPool", "parse_device"]

BudgetCallback = Callable[[int, int, int], None]


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


def parse_device(device: Any) -> str:
    """Canonical device string ("cpu", "cuda:1") for a label; does not require the device to exist.

    Unknown backend types raise :class:`KVConfigInvalidError` listing the known ones.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    kind, _, index = device.partition(":")
    known = list(_core.registered_backends())
    if kind not in known:
        raise KVConfigInvalidError("device", device, reason=f"unknown device type; known: {', '.join(known)}")
    if index and (not index.isdigit()):
        raise KVConfigInvalidError("device", device, reason="device index must be a non-negative integer")
    if kind == "cpu" and index not in ("", "0"):
        raise KVConfigInvalidError("device", device, reason="the cpu backend has one device, 'cpu'")
    return kind if kind == "cpu" else f"{kind}:{int(index or 0)}"


_INT32_IDS = 2**31 - 1


class _BlockIdSpace:
    """Block ids for a token budget of ``max_tokens`` in blocks of ``block_size`` tokens.

    Segment ``k`` hands out ids ``[k * S, (k + 1) * S)`` (``S = ceil(max_tokens / block_size)``)
    from its own :class:`_core.BlockAllocator`. Segment 0 always exists; more are added when an
    allocation does not fit in the free ids, up to ``ceil(max_tokens / S)`` segments, which covers
    the worst case (every handle one token, one block each). Trailing segments that become empty
    are dropped again.

    Not thread-safe on its own: the owning pool calls it under its lock, which is also what makes
    an allocation spread over several segments all-or-nothing.
    """

    def __init__(self, max_tokens: int, block_size: int) -> None:
        self.segment_blocks = -(-max_tokens // block_size)
        self.max_segments = -(-max_tokens // self.segment_blocks)
        if self.segment_blocks * self.max_segments > _INT32_IDS:
            raise KVConfigInvalidError("max_tokens", max_tokens, reason="needs more block ids than int32 holds")
        self._segments = [_core.BlockAllocator(self.segment_blocks)]

    def allocate(self, count: int) -> np.ndarray:
        """``count`` ids (int32), from the lowest segments first; ``KVPoolFullError`` takes nothing."""
        taken: list[np.ndarray] = []
        remaining = count
        index = 0
        try:
            while remaining > 0:
                if index == len(self._segments):
                    if index == self.max_segments:
                        raise KVPoolFullError(self.segment_blocks * self.max_segments,
                                              context={"requested_blocks": count})
                    self._segments.append(_core.BlockAllocator(self.segment_blocks))
                segment = self._segments[index]
                n = min(remaining, int(segment.num_available))
                if n:
                    taken.append(segment.allocate(n) + np.int32(index * self.segment_blocks))
                    remaining -= n
                index += 1
        except BaseException:
            for ids in taken:
                self.free(ids)
            raise
        if len(taken) == 1:
            return taken[0]
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int32)

    def free(self, ids: np.ndarray) -> None:
        """Returns ids handed out by :meth:`allocate` (the allocators reject anything else)."""
        segment_of = ids // self.segment_blocks
        if len(self._segments) == 1 or not segment_of.any():
            self._segments[0].free(ids)
        else:
            for index in np.unique(segment_of).tolist():
                if not 0 <= index < len(self._segments):
                    bad = int(ids[segment_of == index][0])
                    raise KVInvalidBlockError(str(bad), reason=f"block id out of range [0, {self.capacity})")
                part = ids[segment_of == index] - np.int32(index * self.segment_blocks)
                self._segments[index].free(part)
        while len(self._segments) > 1 and int(self._segments[-1].num_allocated) == 0:
            self._segments.pop()

    @property
    def capacity(self) -> int:
        return self.segment_blocks * len(self._segments)

    @property
    def num_allocated(self) -> int:
        return sum(int(segment.num_allocated) for segment in self._segments)


class KVPool:
    """Token-budgeted pool of KV handles (seed API).

    Thread-safe: one lock guards the handle table; block ids come from the lock-free allocator.
    """

    def __init__(
        self,
        max_tokens: int,
        block_size: int = 128,
        bytes_per_token: int = 32,
        on_budget_exceeded: BudgetCallback | None = None,
        node_rank: int | None = None,
    ) -> None:
        self.max_tokens = _positive_int("max_tokens", max_tokens)
        self.block_size = _positive_int("block_size", block_size)
        self.bytes_per_token = _positive_int("bytes_per_token", bytes_per_token)
        if on_budget_exceeded is not None and not callable(on_budget_exceeded):
            raise TypeError("on_budget_exceeded must be callable(requested, available, max_tokens)")
        if node_rank is not None:
            _positive_int("node_rank", node_rank, allow_zero=True)
        self.on_budget_exceeded = on_budget_exceeded
        self.node_rank = node_rank
        self.num_blocks = -(-self.max_tokens // self.block_size)
        self._lock = threading.Lock()
        self._ids = _BlockIdSpace(self.max_tokens, self.block_size)
        self._handles: dict[uuid.UUID, KVHandle] = {}
        self._allocated_tokens = 0
        self._pinned_tokens = 0

    # --- allocation -------------------------------------------------------------------------

    def alloc(
        self,
        num_tokens: int,
        dtype: DType | str = DType.FP16,
        layout: Layout | str = Layout.CONTIGUOUS,
        device: str = "cpu",
        metadata: dict | None = None,
    ) -> KVHandle:
        """Reserves ``num_tokens`` tokens and their blocks; returns the handle that owns them.

        Raises ``KVBudgetExceededError`` (after calling ``on_budget_exceeded(requested, available,
        max_tokens)``) when the token budget is short; block rounding never refuses what the budget
        admits. Nothing is taken on failure.
        """
        num_tokens = _positive_int("num_tokens", num_tokens)
        dtype = DType(getattr(dtype, "value", dtype))
        layout = Layout(getattr(layout, "value", layout))
        device = parse_device(device)
        with self._lock:
            available = self.max_tokens - self._allocated_tokens
            if num_tokens > available:
                if self.on_budget_exceeded is not None:
                    self.on_budget_exceeded(num_tokens, available, self.max_tokens)
                raise KVBudgetExceededError(num_tokens, available, context={"max_tokens": self.max_tokens})
            blocks = self._ids.allocate(-(-num_tokens // self.block_size))
            handle = KVHandle.create(
                num_tokens, dtype=dtype, layout=layout, device=device, node_rank=self.node_rank, metadata=metadata
            )
            handle._block_ids = blocks
            self._handles[handle.handle_id] = handle
            self._allocated_tokens += num_tokens
        return handle

    def free(self, handle: KVHandle) -> None:
        """Returns the handle's tokens and blocks. Double free and foreign handles raise; pinned too."""
        self._check_handle(handle)
        with self._lock:
            live = self._handles.get(handle.handle_id)
            if live is None:
                if handle.state == KVBlockState.FREE:
                    raise KVDoubleFreeError(handle.handle_id)
                raise KVHandleNotFoundError(handle.handle_id, context={"reason": "not allocated by this pool"})
            if live.pin_count > 0:
                raise KVHandlePinnedError(handle.handle_id, operation="free", pin_count=live.pin_count)
            self._ids.free(live._block_ids)
            del self._handles[handle.handle_id]
            self._allocated_tokens -= live.num_tokens
            for h in {id(live): live, id(handle): handle}.values():
                h.state = KVBlockState.FREE
                h.ref_count = 0

    def pin(self, handle: KVHandle) -> None:
        """Protects the handle from eviction and from ``free`` until unpinned."""
        with self._lock:
            live = self._live(handle)
            if live.pin_count == 0:
                self._pinned_tokens += live.num_tokens
            live.pin()
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    def unpin(self, handle: KVHandle) -> None:
        with self._lock:
            live = self._live(handle)
            live.unpin()  # raises KVRefCountUnderflowError when not pinned
            if live.pin_count == 0:
                self._pinned_tokens -= live.num_tokens
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    # --- budget -----------------------------------------------------------------------------

    def can_admit(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` more tokens fit in the budget (the only limit, as in the seed)."""
        num_tokens = _positive_int("num_tokens", num_tokens, allow_zero=True)
        with self._lock:
            return num_tokens <= self.max_tokens - self._allocated_tokens

    def get_allocated_tokens(self) -> int:
        return self._allocated_tokens

    def get_available_tokens(self) -> int:
        return self.max_tokens - self._allocated_tokens

    def get_handle(self, handle_id: uuid.UUID) -> KVHandle:
        with self._lock:
            handle = self._handles.get(handle_id)
        if handle is None:
            raise KVHandleNotFoundError(handle_id)
        return handle

    def get_stats(self) -> dict:
        with self._lock:
            return {
                "allocated_tokens": self._allocated_tokens,
                "available_tokens": self.max_tokens - self._allocated_tokens,
                "max_tokens": self.max_tokens,
                "num_handles": len(self._handles),
                "pinned_tokens": self._pinned_tokens,
                "unpinned_tokens": self._allocated_tokens - self._pinned_tokens,
                "used_tokens": self._allocated_tokens,
            }

    def get_block_stats(self) -> dict[str, int]:
        """Block-level view (not in the seed): blocks the budget holds when they are full
        (``total_blocks``), blocks in use (partly filled last blocks count whole, so this can exceed
        ``total_blocks``), the budget's blocks still free, the id space now in use, and bytes."""
        with self._lock:
            used = self._ids.num_allocated
            capacity = self._ids.capacity
        return {
            "block_size": self.block_size,
            "total_blocks": self.num_blocks,
            "free_blocks": max(0, self.num_blocks - used),
            "used_blocks": used,
            "block_id_capacity": capacity,
            "used_bytes": used * self.block_size * self.bytes_per_token,
            "total_bytes": self.num_blocks * self.block_size * self.bytes_per_token,
        }

    @property
    def max_block_ids(self) -> int:
        """Upper bound (exclusive) of any block id this pool can hand out."""
        return self._ids.segment_blocks * self._ids.max_segments

    def reset(self) -> None:
        """Drops every handle (pinned ones included) and returns all blocks."""
        with self._lock:
            for handle in self._handles.values():
                handle.state = KVBlockState.FREE
                handle.ref_count = 0
                handle.pin_count = 0
            self._handles.clear()
            self._ids = _BlockIdSpace(self.max_tokens, self.block_size)
            self._allocated_tokens = 0
            self._pinned_tokens = 0

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _check_handle(handle: Any) -> None:
        if not isinstance(handle, KVHandle):
            raise TypeError(f"expected a KVHandle, got {type(handle).__name__}")

    def _live(self, handle: KVHandle) -> KVHandle:
        self._check_handle(handle)
        live = self._handles.get(handle.handle_id)
        if live is None:
            raise KVHandleNotFoundError(handle.handle_id)
        return live

    def __len__(self) -> int:
        return len(self._handles)

    def __bool__(self) -> bool:
        # A pool is a resource, not a container: it must stay truthy while empty. The sageLLM
        # engine's scheduler tests `elif kv_pool:` to take the pool's max_tokens (the original
        # KVPool had no __len__, so it was always true).
        return True

    def __repr__(self) -> str:
        return (f"KVPool(max_tokens={self.max_tokens}, block_size={self.block_size}, "
                f"allocated={self._allocated_tokens}, handles={len(self._handles)})")
