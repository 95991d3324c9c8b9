"""``KVPool``: the seed's token-budget pool, backed by the C++ lock-free block allocator.

The seed accounts in tokens (``max_tokens``) and hands out :class:`KVHandle` objects; here every
handle also owns ``ceil(num_tokens / block_size)`` real block ids from the native allocator, which
is what an engine needs to build a block table. The pool is metadata-only (no KV bytes behind it,
like the seed); use :class:`sagellm_kv_cache.PagedKVPool` for real memory.
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
        self._allocator = _core.BlockAllocator(self.num_blocks)
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
        max_tokens)``) when the token budget is short, ``KVPoolFullError`` when block rounding leaves
        too few blocks. Nothing is taken on failure.
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
            blocks = self._allocator.allocate(-(-num_tokens // self.block_size))
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
            self._allocator.free(live._block_ids)
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
        num_tokens = _positive_int("num_tokens", num_tokens, allow_zero=True)
        with self._lock:
            blocks = -(-num_tokens // self.block_size)
            return (num_tokens <= self.max_tokens - self._allocated_tokens
                    and blocks <= self._allocator.num_available)

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
        """Block-level view (not in the seed): total, free and used blocks and bytes."""
        used = int(self._allocator.num_allocated)
        return {
            "block_size": self.block_size,
            "total_blocks": self.num_blocks,
            "free_blocks": int(self._allocator.num_available),
            "used_blocks": used,
            "used_bytes": used * self.block_size * self.bytes_per_token,
            "total_bytes": self.num_blocks * self.block_size * self.bytes_per_token,
        }

    def reset(self) -> None:
        """Drops every handle (pinned ones included) and returns all blocks."""
        with self._lock:
            for handle in self._handles.values():
                handle.state = KVBlockState.FREE
                handle.ref_count = 0
                handle.pin_count = 0
            self._handles.clear()
            self._allocator = _core.BlockAllocator(self.num_blocks)
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

    def __repr__(self) -> str:
        return (f"KVPool(max_tokens={self.max_tokens}, block_size={self.block_size}, "
                f"allocated={self._allocated_tokens}, handles={len(self._handles)})")
