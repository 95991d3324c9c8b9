"""``KVPool``: the seed's token-budget pool, backed by the C++ lock-free block allocator.

The seed accounts in tokens (``max_tokens``) and hands out :class:`KVHandle` objects; here every
handle also owns ``ceil(num_tokens / block_size)`` real block ids from the native allocator, which
is what an engine needs to build a block table. The pool is metadata-only (no KV bytes behind it,
like the seed); use :class:`sagellm_kv_cache.PagedKVPool` for real memory.

Block ids and admission, two modes (``overcommit_blocks``):

* Token budget alone (``overcommit_blocks=True``), the original package's admission: whatever fits
  in ``max_tokens`` is admitted, however the handles round up to blocks. Handles whose last block is
  partly filled can then need more block ids than ``num_blocks = ceil(max_tokens / block_size)`` (at
  most one per token), so the id space grows on demand in segments of ``num_blocks`` ids and shrinks
  back when they empty (with full blocks only the first segment is used).
* Bounded ids (``overcommit_blocks=False``): every id is below ``num_blocks``, and a handle is
  admitted when its tokens fit the budget and its ``ceil(num_tokens / block_size)`` blocks fit the
  free ids: ``get_available_tokens()`` is min(tokens left, free ids * block_size) and
  ``can_admit(n)`` is ``0 < n <= get_available_tokens()``. With full blocks this is the token budget.

The default (``None``) is bounded exactly when ``SAGELLM_ENABLE_CUDA_PAGED_ATTENTION=1``, the sageLLM
engine's switch for the one path where these ids index memory. The engine (isagellm-core 0.5.4.26)
builds its block tables from them (``KVCacheManager.allocate_slots``: ``[b.block_id for b in
handle._blocks]``) and, on that paged-attention path, indexes a KV tensor of exactly
``KVCacheConfig.num_blocks`` blocks with them (``SageAttention._ensure_paged_kv_cache``), the
``num_blocks`` whose ``block_size * num_blocks`` it passes here as ``max_tokens``: an id past it is
an out-of-bounds index (an ``IndexError`` in the backend's torch path, a stray write in a CUDA kernel).
Everywhere else (its CPU path) the ids index nothing, and token admission is kept because the engine
cannot wait on a refusal there: its scheduler admits a batch's requests each against the same
snapshot (``can_alloc``), and one whose allocation then fails and whose eviction cannot free its
whole size is never scheduled again (a hang; with the original too, on a smaller budget). Bounded
ids would reach that where the original served (two 20-token requests on 3 blocks of 16). On the
paged path that refusal is still the better outcome, and the original could not run it at all (its
UUID block ids make ``ModelRunner._build_block_tables_tensor`` raise ``TypeError``).

The accounting is the C++ ``TokenPool`` (``cpp/include/sagellm_kv/token_pool.hpp``) and the handle
table lives in its binding (``_core.SeedPool``), so ``alloc`` and ``free`` are one call into C++
each; this module keeps the policy: argument checking, the handle template and the seed's errors.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sagellm_protocol.kv import DType, KVBlockState, Layout, MemoryTier

from sagellm_kv_cache import _core
from sagellm_kv_cache._numbers import positive_int
from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVConfigInvalidError,
    KVDoubleFreeError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
)
from sagellm_kv_cache.models import kv_handle as _kv_handle
from sagellm_kv_cache.models.kv_handle import KVHandle
from sagellm_kv_cache.pool.block_manager import BlockManager

__all__ = ["KVPool", "parse_device"]

BudgetCallback = Callable[[int, int, int], None]

#: The sageLLM engine's switch for paged attention, which indexes a ``num_blocks`` tensor with our ids.
PAGED_ATTENTION_ENV = "SAGELLM_ENABLE_CUDA_PAGED_ATTENTION"


_MAX_DEVICE_INDEX = 2**31 - 1  # the native DeviceId's int
_DEVICE_TYPE = re.compile(r"[a-z][a-z_]*")
# Device types a label may name: torch's own (c10's DeviceType names), the names vendors' torch
# plug-ins register for the privateuse1 backend (Ascend npu, Cambricon mlu, Moore Threads musa),
# and the labels the ecosystem's MemoryTier rule reads (gpu, cxl, nvme). Plus this build's backends
# and, where torch is already imported, the privateuse1 name it has registered.
_KNOWN_DEVICE_TYPES = frozenset({
    "cpu", "cuda", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla", "lazy",
    "vulkan", "metal", "xpu", "mps", "meta", "hpu", "mtia", "ipu", "privateuseone",
    "npu", "mlu", "musa",
    "gpu", "cxl", "nvme",
})


def _known_device_type(kind: str) -> bool:
    if kind in _KNOWN_DEVICE_TYPES or kind in _core.registered_backends():
        return True
    torch = sys.modules.get("torch")  # never imported here: only a plug-in already loaded can name more
    try:
        return torch is not None and kind == torch._C._get_privateuse1_backend_name()
    except Exception:  # a torch without that call
        return False


def parse_device(device: Any) -> str:
    """Canonical device string ("cpu", "cuda:1", "npu:0") for a label; does not require the device to exist.

    The grammar is torch's: ``type`` or ``type:N``. ``type`` is a device type torch or a vendor's
    torch plug-in names (``cuda``, ``xpu``, ``mps``, ``npu``, ...; see ``_KNOWN_DEVICE_TYPES``), not
    only the backends this build can allocate on: the labels are metadata, and an Ascend caller
    passes ``str(param.device)``, which is ``npu:0``. An unknown type (``"cuad"``) is refused.
    ``N`` is a decimal index without sign, spaces or leading zeros. ``type`` alone
    means device 0 (``"npu"`` is ``"npu:0"``); the cpu backend has the one device ``"cpu"``.
    Malformed labels (``""``, ``" cpu"``, ``"CPU"``, ``"gpu0"``, ``"cuda:"``, ``"cuda:x"``,
    ``"cuda:01"``, ``"cuda:-1"``) raise :class:`KVConfigInvalidError` (a ``ValueError``) naming the string,
    a label that is not a str a ``TypeError``. (The original package stored any str as given,
    garbage included, and raised ``AttributeError`` for anything else.)
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    kind, colon, index = device.partition(":")
    if not _DEVICE_TYPE.fullmatch(kind):
        raise KVConfigInvalidError("device", device, reason="the device type must be a lower-case name such as "
                                                            "'cpu', 'cuda' or 'npu', optionally followed by ':index'")
    if not _known_device_type(kind):
        raise KVConfigInvalidError("device", device, reason=f"unknown device type {kind!r}; known: "
                                                            f"{', '.join(sorted(_KNOWN_DEVICE_TYPES))}")
    if colon and not index:  # "cuda:" is not "cuda:0"
        raise KVConfigInvalidError("device", device, reason="a ':' must be followed by a device index")
    if index and not (index.isascii() and index.isdigit()):  # str.isdigit also takes '\u00b2' and other scripts
        raise KVConfigInvalidError("device", device, reason="device index must be a non-negative integer")
    if len(index) > 1 and index[0] == "0":
        raise KVConfigInvalidError("device", device, reason="device index must not have leading zeros")
    if index and int(index) > _MAX_DEVICE_INDEX:
        raise KVConfigInvalidError("device", device, reason=f"device index must be at most {_MAX_DEVICE_INDEX}")
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
    entry = (canonical, _kv_handle._tier_of(canonical))
    if len(_DEVICES) < _MAX_CACHED_DEVICES:
        _DEVICES[device] = entry
    return entry


_INT32_IDS = 2**31 - 1


def _normalize(num_tokens: Any, dtype: Any, layout: Any, device: Any, metadata: Any) -> tuple[Any, ...]:
    """The checked arguments of an allocation that the native fast path's tables do not hold
    (``_core.SeedPool.alloc`` calls it); raises the seed's errors for bad values."""
    if num_tokens.__class__ is not int or num_tokens <= 0:
        num_tokens = positive_int("num_tokens", num_tokens)
    try:
        dtype_member = _DTYPES[dtype]
        layout_member = _LAYOUTS[layout]
        canonical, tier = _DEVICES[device]
    except (KeyError, TypeError):
        dtype_member = DType(getattr(dtype, "value", dtype))
        layout_member = Layout(getattr(layout, "value", layout))
        canonical, tier = _device_of(device)
    return num_tokens, dtype_member, layout_member, canonical, tier, {} if metadata is None else _metadata(metadata)


def _refusal(kind: str, *details: Any) -> Exception:
    """The seed's error for a refused ``alloc`` or ``free`` (built for ``_core.SeedPool``)."""
    if kind == "budget":
        requested, available, max_tokens = details
        return KVBudgetExceededError(requested, available, context={"max_tokens": max_tokens})
    handle_id = details[0]
    if kind == "double_free":
        return KVDoubleFreeError(handle_id)
    if kind == "pinned":
        return KVHandlePinnedError(handle_id, operation="free", pin_count=details[1])
    return KVHandleNotFoundError(handle_id, context={"reason": "not allocated by this pool"})


def _native_pool(max_tokens: int, block_size: int, node_rank: int | None, overcommit_blocks: bool) -> Any:
    shareable = _kv_handle._TEMPLATE_IS_SHAREABLE
    return _core.SeedPool(
        max_tokens, block_size, node_rank,
        cls=KVHandle,
        # A protocol version with mutable defaults cannot share them: build through the validating path.
        defaults=_kv_handle._FIELD_DEFAULTS if shareable else None,
        names=_kv_handle._PER_HANDLE_ORDER,
        fields_set=_kv_handle._CREATE_FIELDS,
        fallback=KVHandle._trusted,
        uuid_cls=uuid.UUID,
        uuid_safe=uuid.SafeUUID.unknown,
        free_state=_FREE,
        dtypes=_DTYPES,
        layouts=_LAYOUTS,
        devices=_DEVICES,
        normalize=_normalize,
        refusal=_refusal,
        overcommit_blocks=overcommit_blocks,
    )


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

    def _count_new_block(self) -> None:
        # Not `total_allocated_bytes += ...`: its getter and setter would read the pool's peak twice,
        # and a pool allocation in between lost the new block's bytes.
        self._own_bytes += self.block_size

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
        self._pool._reset_blocks_peak()
        self._own_bytes = 0


class KVPool:
    """Token-budgeted pool of KV handles (seed API).

    The original's public attributes: ``handles`` (handle id -> live handle; a snapshot taken on
    each read), ``pinned_handles`` (the set of pinned handle ids; read it, change it only through
    :meth:`pin` / :meth:`unpin`) and ``block_manager`` (the pool's blocks, see
    :class:`_PoolBlockManager`).

    Thread-safe: one lock (the native pool's, ``with self._lock``) guards the handle table, the pin
    bookkeeping and the native accounting; ``alloc`` and ``free`` take it inside their one call into
    C++. ``on_budget_exceeded`` is called without the lock held, so it may use the pool.
    """

    def __init__(
        self,
        max_tokens: int,
        block_size: int = 128,
        bytes_per_token: int = 32,
        on_budget_exceeded: BudgetCallback | None = None,
        node_rank: int | None = None,
        *,
        overcommit_blocks: bool | None = None,
    ) -> None:
        self.max_tokens = positive_int("max_tokens", max_tokens)
        self.block_size = positive_int("block_size", block_size)
        if self.block_size > _INT32_IDS:  # the native pool's range, checked here for ints past 64 bits too
            raise ValueError(f"block_size must be in [1, {_INT32_IDS}], got {self.block_size}")
        self.bytes_per_token = positive_int("bytes_per_token", bytes_per_token)
        if on_budget_exceeded is not None and not callable(on_budget_exceeded):
            raise TypeError("on_budget_exceeded must be callable(requested, available, max_tokens)")
        if node_rank is not None:
            node_rank = positive_int("node_rank", node_rank, allow_zero=True)
        if overcommit_blocks is None:  # read once, here: a pool keeps its mode
            overcommit_blocks = os.environ.get(PAGED_ATTENTION_ENV) != "1"
        elif not isinstance(overcommit_blocks, bool):
            raise TypeError(f"overcommit_blocks must be a bool or None, got {type(overcommit_blocks).__name__}")
        self.on_budget_exceeded = on_budget_exceeded
        self.num_blocks = -(-self.max_tokens // self.block_size)
        self.overcommit_blocks = overcommit_blocks
        segments = -(-self.max_tokens // self.num_blocks) if overcommit_blocks else 1
        if self.num_blocks * segments > _INT32_IDS:
            raise KVConfigInvalidError("max_tokens", max_tokens, reason="needs more block ids than int32 holds")
        self._native = _native_pool(self.max_tokens, self.block_size, node_rank, overcommit_blocks)
        self._lock = self._native  # `with self._lock:` takes the native pool's table lock
        self._alloc = self._native.alloc
        self._free = self._native.free
        # Live handles keyed by handle_id.int (an int hashes in C, a UUID through a Python __hash__);
        # the native pool inserts and removes them.
        self._live_handles: dict[int, KVHandle] = self._native.live
        self.pinned_handles: set[uuid.UUID] = set()
        self._pinned_tokens = 0
        self._generation = 0  # bumped by reset()
        self.block_manager: BlockManager = _PoolBlockManager(self)

    @property
    def node_rank(self) -> int | None:
        """The rank that new handles carry (``None``: single node)."""
        rank: int | None = self._native.node_rank
        return rank

    @node_rank.setter
    def node_rank(self, value: int | None) -> None:
        self._native.node_rank = None if value is None else positive_int("node_rank", value, allow_zero=True)

    # --- the native accounting, as the pool's private attributes --------------------------------

    @property
    def _allocated_tokens(self) -> int:
        return int(self._native.allocated_tokens)

    @property
    def _blocks_in_use(self) -> int:
        return int(self._native.blocks_in_use)

    @property
    def _blocks_peak(self) -> int:
        return int(self._native.blocks_peak)

    def _reset_blocks_peak(self) -> None:
        self._native.reset_peak()

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
        max_tokens)``, ``available`` being :meth:`get_available_tokens`) when ``num_tokens`` exceeds
        :meth:`get_available_tokens`: the token budget, or the free block ids (see the module).
        Whatever :meth:`can_admit` just admitted is granted. Nothing is taken on failure. ``device``
        is a label in the spelling :func:`parse_device` gives it (``"npu"`` is stored as ``"npu:0"``);
        the handle's ``memory_tier`` follows from it as in the original (cuda/npu/gpu labels are GPU
        memory).
        """
        try:
            handle: KVHandle = self._alloc(num_tokens, dtype, layout, device, metadata)
        except KVBudgetExceededError as refused:
            if self.on_budget_exceeded is not None:
                self.on_budget_exceeded(refused.requested, refused.available, self.max_tokens)
            raise
        return handle

    def free(self, handle: KVHandle) -> None:
        """Returns the handle's tokens and blocks. Double free and foreign handles raise; pinned too."""
        self._free(handle)
        if self.pinned_handles:  # pinned through the pool, then unpinned on the handle itself
            with self._lock:
                if handle.handle_id in self.pinned_handles:
                    self.pinned_handles.discard(handle.handle_id)
                    self._pinned_tokens -= handle.num_tokens

    def pin(self, handle: KVHandle) -> None:
        """Protects the handle from eviction and from ``free`` until unpinned.

        ``pinned_handles`` and the pinned tokens count the handles pinned through the pool (as in the
        original package), so a ``KVHandle.pin``/``unpin`` on the handle itself cannot unbalance them.
        """
        with self._lock:
            live = self._live(handle)
            if live.handle_id not in self.pinned_handles:
                self._pinned_tokens += live.num_tokens
                self.pinned_handles.add(live.handle_id)
            live.pin()
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    def unpin(self, handle: KVHandle) -> None:
        """Undoes one pin. A live handle that is not pinned is left as it is, as in the original
        (the sageLLM engine's ``SchedulerKVBridge.unpin_request`` calls this whether or not the
        request was pinned); a handle the pool does not hold is a ``KVHandleNotFoundError``."""
        with self._lock:
            live = self._live(handle)
            if live.pin_count == 0:
                return
            live.unpin()
            if live.pin_count == 0 and live.handle_id in self.pinned_handles:
                self._pinned_tokens -= live.num_tokens
                self.pinned_handles.discard(live.handle_id)
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    # --- budget -----------------------------------------------------------------------------

    def can_admit(self, num_tokens: int) -> bool:
        """Whether :meth:`alloc` of ``num_tokens`` tokens would be granted now:
        ``0 < num_tokens <= get_available_tokens()``. 0 is False (``alloc(0)`` is refused; the
        original said False too); a negative or non-int count is an error."""
        if num_tokens.__class__ is not int or num_tokens < 0:  # the engine asks once per request: ints skip the checks
            num_tokens = positive_int("num_tokens", num_tokens, allow_zero=True)
        return 0 < num_tokens <= self.max_tokens and self._native.can_admit(num_tokens)

    def get_allocated_tokens(self) -> int:
        return self._allocated_tokens

    def get_available_tokens(self) -> int:
        """The largest allocation that fits now: the tokens left, at most the free block ids times
        ``block_size`` (unless ``overcommit_blocks``); see the module."""
        return int(self._native.available_tokens)

    @property
    def handles(self) -> dict[uuid.UUID, KVHandle]:
        """Handle id -> live handle, oldest allocation first (a new dict on each read)."""
        with self._lock:
            live = list(self._live_handles.values())
        return {handle.handle_id: handle for handle in live}

    def get_handle(self, handle_id: uuid.UUID) -> KVHandle:
        with self._lock:
            handle = self._live_handles.get(handle_id.int) if isinstance(handle_id, uuid.UUID) else None
        if handle is None:
            raise KVHandleNotFoundError(handle_id)
        return handle

    def get_stats(self) -> dict:
        with self._lock:  # alloc and free change the native counters under this lock too
            allocated = self._allocated_tokens
            available = int(self._native.available_tokens)
            num_handles = len(self._live_handles)
            pinned = self._pinned_tokens
        return {
            "allocated_tokens": allocated,
            "available_tokens": available,
            "max_tokens": self.max_tokens,
            "num_handles": num_handles,
            "pinned_tokens": pinned,
            "unpinned_tokens": allocated - pinned,
            "used_tokens": allocated,
        }

    def get_block_stats(self) -> dict[str, int]:
        """Block-level view (not in the seed): blocks the budget holds when they are full
        (``total_blocks``, also the bound on block ids unless ``overcommit_blocks``), blocks in use
        (partly filled last blocks count whole; only with ``overcommit_blocks`` can this exceed
        ``total_blocks``), the budget's blocks still free, the id space now in use, and bytes."""
        stats = self._native.stats()
        used = int(stats["blocks_in_use"])
        capacity = int(stats["block_id_capacity"])
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
        return int(self._native.max_block_ids)

    def reset(self) -> None:
        """Drops every handle (pinned ones included) and returns all blocks; bumps :attr:`generation`."""
        with self._lock:
            for handle in self._live_handles.values():
                handle.state = KVBlockState.FREE
                handle.ref_count = 0
                handle.pin_count = 0
            self._live_handles.clear()
            self.pinned_handles.clear()
            self._native.reset_ids()
            self._pinned_tokens = 0
            # Last: whoever sees the new number sees the emptied table (see KVCacheManager).
            self._generation += 1
        self.block_manager.reset()

    @property
    def generation(self) -> int:
        """How many times :meth:`reset` ran. Whoever keeps handles of this pool (a
        :class:`~sagellm_kv_cache.kv_cache_manager.KVCacheManager`) compares it with the value it
        saw last to notice that a reset it did not make dropped them."""
        return self._generation

    # --- helpers ----------------------------------------------------------------------------

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
