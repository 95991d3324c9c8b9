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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sagellm_protocol.kv import DType, KVBlockState, Layout, MemoryTier

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
from sagellm_kv_cache.pool.block_manager import BlockManager

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


# Argument lookups of the allocation hot path: enum members and their values map to the member
# (a str enum hashes by name, so both spellings need an entry); device labels that parsed once map
# to (canonical label, memory tier). Anything not found takes the validating path.
_DTYPES: dict[Any, DType] = {**{m: m for m in DType}, **{m.value: m for m in DType}}
_LAYOUTS: dict[Any, Layout] = {**{m: m for m in Layout}, **{m.value: m for m in Layout}}
_DEVICES: dict[str, tuple[str, MemoryTier]] = {}
_MAX_CACHED_DEVICES = 256
_FREED_FIELDS = ("state", "ref_count")
_FREE = KVBlockState.FREE


def _metadata(metadata: Any) -> dict[str, Any]:
    """A handle's own copy of ``metadata`` (a mapping with str keys, as the model requires)."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    copy = dict(metadata)
    for key in copy:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r} ({type(key).__name__})")
    return copy


def _device_of(device: Any) -> tuple[str, MemoryTier]:
    """``parse_device`` plus the memory tier, remembered for the next allocation on that device."""
    canonical = parse_device(device)
    entry = (canonical, MemoryTier.CPU if canonical == "cpu" else MemoryTier.GPU)
    if len(_DEVICES) < _MAX_CACHED_DEVICES:
        _DEVICES[device] = entry
    return entry


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
        if len(self._segments) == 1:
            first = self._segments[0]
            if count <= first.num_available:
                return first.allocate(count)
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
        if len(self._segments) == 1:
            self._segments[0].free(ids)
            return
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


class _PoolBlockManager(BlockManager):
    """The pool's blocks through the seed's :class:`BlockManager` API (``KVPool.block_manager``).

    As in the original package, a pool block is ``block_size`` tokens of ``bytes_per_token`` bytes,
    a handle holds ``ceil(num_tokens / block_size)`` of them, and the figures are those of a manager
    that reuses freed blocks: ``total_blocks`` is the most blocks ever in use at once (since the
    last reset), ``used_blocks`` those the live handles hold now. The pool's blocks are ids in the
    native allocator, not :class:`Block` objects, so they are counted here rather than listed in
    ``blocks``; blocks a caller takes directly with :meth:`alloc_block` are ordinary ``Block``
    objects and count on top. Thread-safe.
    """

    def __init__(self, pool: KVPool) -> None:
        self._pool = pool
        self._own_bytes = 0
        super().__init__(pool.block_size * pool.bytes_per_token)

    @property
    def total_allocated_bytes(self) -> int:
        return self._own_bytes + self._pool._blocks_peak * self.block_size

    @total_allocated_bytes.setter
    def total_allocated_bytes(self, value: int) -> None:
        self._own_bytes = value - self._pool._blocks_peak * self.block_size

    def get_used_bytes(self) -> int:
        return super().get_used_bytes() + self._pool._blocks_in_use * self.block_size

    def get_stats(self) -> dict[str, int]:
        own = super().get_stats()
        in_use, peak = self._pool._blocks_in_use, self._pool._blocks_peak
        total, used = own["total_blocks"] + peak, own["used_blocks"] + in_use
        return {
            "total_blocks": total,
            "free_blocks": total - used,
            "used_blocks": used,
            "total_allocated_bytes": total * self.block_size,
            "used_bytes": used * self.block_size,
            "free_bytes": (total - used) * self.block_size,
        }

    def reset(self) -> None:
        """Forgets the caller's own blocks; the pool's count restarts from the blocks in use now."""
        super().reset()
        self._pool._blocks_peak = self._pool._blocks_in_use
        self._own_bytes = 0


class KVPool:
    """Token-budgeted pool of KV handles (seed API).

    The original's public attributes: ``handles`` (handle id -> live handle; a snapshot taken on
    each read), ``pinned_handles`` (the set of pinned handle ids; read it, change it only through
    :meth:`pin` / :meth:`unpin`) and ``block_manager`` (the pool's blocks, see
    :class:`_PoolBlockManager`).

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
        # Live handles keyed by handle_id.int: an int hashes in C, a UUID through a Python __hash__
        # (three hashes per alloc + free are a tenth of the seed pool's cost).
        self._live_handles: dict[int, KVHandle] = {}
        self.pinned_handles: set[uuid.UUID] = set()
        self._allocated_tokens = 0
        self._pinned_tokens = 0
        self._blocks_in_use = 0
        self._blocks_peak = 0
        self.block_manager: BlockManager = _PoolBlockManager(self)

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
        # The hot path: every argument is looked up in a table of known-good values and the handle
        # is built without re-validation; anything unusual goes through the checking helpers.
        if num_tokens.__class__ is not int or num_tokens <= 0:
            num_tokens = _positive_int("num_tokens", num_tokens)
        try:
            dtype_member = _DTYPES[dtype]
            layout_member = _LAYOUTS[layout]
            canonical, tier = _DEVICES[device]
        except (KeyError, TypeError):
            dtype_member = DType(getattr(dtype, "value", dtype))
            layout_member = Layout(getattr(layout, "value", layout))
            canonical, tier = _device_of(device)
        metadata = {} if metadata is None else _metadata(metadata)
        num_blocks = -(-num_tokens // self.block_size)
        with self._lock:
            available = self.max_tokens - self._allocated_tokens
            if num_tokens > available:
                if self.on_budget_exceeded is not None:
                    self.on_budget_exceeded(num_tokens, available, self.max_tokens)
                raise KVBudgetExceededError(num_tokens, available, context={"max_tokens": self.max_tokens})
            segments = self._ids._segments
            if len(segments) == 1:
                try:  # the common case in one call; a short segment refuses without taking anything
                    blocks = segments[0].allocate(num_blocks)
                except KVPoolFullError:
                    blocks = self._ids.allocate(num_blocks)  # grows a segment, or refuses
            else:
                blocks = self._ids.allocate(num_blocks)
            handle = KVHandle._trusted(num_tokens, dtype_member, layout_member, canonical, tier, self.node_rank,
                                       metadata, blocks)
            self._live_handles[handle.handle_id.int] = handle
            self._allocated_tokens += num_tokens
            self._blocks_in_use += num_blocks
            if self._blocks_in_use > self._blocks_peak:
                self._blocks_peak = self._blocks_in_use
        return handle

    def free(self, handle: KVHandle) -> None:
        """Returns the handle's tokens and blocks. Double free and foreign handles raise; pinned too."""
        if handle.__class__ is not KVHandle:
            self._check_handle(handle)
        handle_id = handle.handle_id
        with self._lock:
            live = self._live_handles.get(handle_id.int)
            if live is None:
                if handle.state == KVBlockState.FREE:
                    raise KVDoubleFreeError(handle_id)
                raise KVHandleNotFoundError(handle_id, context={"reason": "not allocated by this pool"})
            if live.pin_count > 0:
                raise KVHandlePinnedError(handle_id, operation="free", pin_count=live.pin_count)
            blocks = live.__pydantic_private__["_block_ids"]  # not live._block_ids: slow
            segments = self._ids._segments
            if len(segments) == 1:
                segments[0].free(blocks)
            else:
                self._ids.free(blocks)
            del self._live_handles[handle_id.int]
            self._allocated_tokens -= live.num_tokens
            self._blocks_in_use -= len(blocks)
            # What `live.state = FREE; live.ref_count = 0` does, without re-validating the model.
            fields = live.__dict__
            fields["state"] = _FREE
            fields["ref_count"] = 0
            live.__pydantic_fields_set__.update(_FREED_FIELDS)
            if handle is not live:
                self._mark_freed(handle)

    def pin(self, handle: KVHandle) -> None:
        """Protects the handle from eviction and from ``free`` until unpinned."""
        with self._lock:
            live = self._live(handle)
            if live.pin_count == 0:
                self._pinned_tokens += live.num_tokens
                self.pinned_handles.add(live.handle_id)
            live.pin()
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    def unpin(self, handle: KVHandle) -> None:
        with self._lock:
            live = self._live(handle)
            live.unpin()  # raises KVRefCountUnderflowError when not pinned
            if live.pin_count == 0:
                self._pinned_tokens -= live.num_tokens
                self.pinned_handles.discard(live.handle_id)
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

    @property
    def handles(self) -> dict[uuid.UUID, KVHandle]:
        """Handle id -> live handle, oldest allocation first (a new dict on each read)."""
        with self._lock:
            return {handle.handle_id: handle for handle in self._live_handles.values()}

    def get_handle(self, handle_id: uuid.UUID) -> KVHandle:
        with self._lock:
            handle = self._live_handles.get(handle_id.int) if isinstance(handle_id, uuid.UUID) else None
        if handle is None:
            raise KVHandleNotFoundError(handle_id)
        return handle

    def get_stats(self) -> dict:
        with self._lock:
            return {
                "allocated_tokens": self._allocated_tokens,
                "available_tokens": self.max_tokens - self._allocated_tokens,
                "max_tokens": self.max_tokens,
                "num_handles": len(self._live_handles),
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
            for handle in self._live_handles.values():
                handle.state = KVBlockState.FREE
                handle.ref_count = 0
                handle.pin_count = 0
            self._live_handles.clear()
            self.pinned_handles.clear()
            self._ids = _BlockIdSpace(self.max_tokens, self.block_size)
            self._allocated_tokens = 0
            self._pinned_tokens = 0
            self._blocks_in_use = 0
        self.block_manager.reset()

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _mark_freed(handle: KVHandle) -> None:
        # What `handle.state = FREE; handle.ref_count = 0` does, without re-validating the model:
        # both values are valid by construction.
        fields = handle.__dict__
        fields["state"] = _FREE
        fields["ref_count"] = 0
        handle.__pydantic_fields_set__.update(_FREED_FIELDS)

    @staticmethod
    def _check_handle(handle: Any) -> None:
        if not isinstance(handle, KVHandle):
            raise TypeError(f"expected a KVHandle, got {type(handle).__name__}")

    def _live(self, handle: KVHandle) -> KVHandle:
        self._check_handle(handle)
        live = self._live_handles.get(handle.handle_id.int)
        if live is None:
            raise KVHandleNotFoundError(handle.handle_id)
        return live

    def __len__(self) -> int:
        return len(self._live_handles)

    def __bool__(self) -> bool:
        # A pool is a resource, not a container: it must stay truthy while empty. The sageLLM
        # engine's scheduler tests `elif kv_pool:` to take the pool's max_tokens (the original
        # KVPool had no __len__, so it was always true).
        return True

    def __repr__(self) -> str:
        return (f"KVPool(max_tokens={self.max_tokens}, allocated={self._allocated_tokens}, "
                f"num_handles={len(self._live_handles)}, num_pinned={len(self.pinned_handles)})")
