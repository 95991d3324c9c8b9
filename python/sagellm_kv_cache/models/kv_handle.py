"""``KVHandle``: the seed's reference to an allocation of KV cache.

It is the ecosystem's :class:`sagellm_protocol.kv.KVHandle` (same fields, same wire form) plus the
seed's behaviour (pinning, reference counts, access tracking) and the ids of the pool blocks that
back it, which stay out of ``to_dict`` so the wire form is unchanged.
"""

from __future__ import annotations

import enum
import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, PrivateAttr
from sagellm_protocol.kv import (
    DType,
    EvictionCandidate,
    EvictionPolicy,
    KVBlock,
    KVBlockState,
    KVPoolStats,
    KVTransferMetadata,
    Layout,
    LifetimePrediction,
    MemoryTier,
    PrefixCacheEntry,
    RequestType,
    SchedulerPlan,
    SchedulerRequest,
)
from sagellm_protocol.kv import KVHandle as _ProtocolKVHandle

from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import KVRefCountUnderflowError

# The original module re-exported the protocol's KV types next to KVHandle; code imports them from here.
__all__ = [
    "DType",
    "EvictionCandidate",
    "EvictionPolicy",
    "KVBlock",
    "KVBlockRef",
    "KVBlockState",
    "KVHandle",
    "KVPoolStats",
    "KVTransferMetadata",
    "Layout",
    "LifetimePrediction",
    "MemoryTier",
    "PrefixCacheEntry",
    "RequestType",
    "SchedulerPlan",
    "SchedulerRequest",
]

_DTYPE_BYTES = {
    DType.FP32: 4.0,
    DType.FP16: 2.0,
    DType.BF16: 2.0,
    DType.FP8: 1.0,
    DType.INT8: 1.0,
    DType.INT4: 0.5,
}


def _tier_of(device: str) -> MemoryTier:
    """The memory tier a device label implies, by the original package's rule: a label starting with
    cuda, npu or gpu (any case) is GPU memory, cxl CXL, nvme NVME, anything else (cpu, xpu, mps, ...)
    CPU."""
    label = device.lower()
    if label.startswith(("cuda", "npu", "gpu")):
        return MemoryTier.GPU
    if label.startswith("cxl"):
        return MemoryTier.CXL
    if label.startswith("nvme"):
        return MemoryTier.NVME
    return MemoryTier.CPU


_UUID = uuid.UUID
_UUID_SAFETY = uuid.SafeUUID.unknown
_trusted_model = _core.trusted_model
_block_refs = _core.block_refs


# A random version-4 UUID, equal in form to ``uuid.uuid4()`` (same version and variant bits), without
# its urandom call: from the core's generator (seeded from the OS, re-seeded in a forked child so
# parent and child never draw the same ids). A partial, so the hot path pays no Python frame.
_uuid4: Callable[[], uuid.UUID] = functools.partial(_core.uuid4, _UUID, _UUID_SAFETY)


@dataclass(frozen=True, slots=True)
class KVBlockRef:
    """One pool block backing a handle, as the engine reads it: ``block_id`` is the integer id the
    native allocator handed out (the original package used a UUID per block here)."""

    block_id: int


class KVHandle(_ProtocolKVHandle):
    """A reference to KV cache owned by a pool; mutable bookkeeping, validated on assignment."""

    model_config = ConfigDict(validate_assignment=True)

    metadata: dict[str, Any] = Field(default_factory=dict)
    _block_ids: np.ndarray = PrivateAttr(default_factory=lambda: np.empty(0, dtype=np.int32))

    @classmethod
    def create(
        cls,
        num_tokens: int,
        *,
        dtype: DType = DType.FP16,
        layout: Layout = Layout.CONTIGUOUS,
        device: str = "cpu",
        request_id: str | None = None,
        session_id: str | None = None,
        node_rank: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KVHandle:
        """A fresh handle for ``num_tokens`` tokens, created and last accessed now."""
        if not isinstance(device, str):  # the memory tier is read off it before pydantic sees it
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda:0', got {type(device).__name__}")
        now = time.time()
        return cls(
            handle_id=_uuid4(),
            request_id=request_id,
            session_id=session_id,
            num_tokens=num_tokens,
            token_start=0,
            token_end=num_tokens,
            dtype=dtype,
            layout=layout,
            device=device,
            memory_tier=_tier_of(device),
            rank=node_rank,
            created_at=now,
            last_access=now,
            metadata=dict(metadata or {}),
        )

    @classmethod
    def _trusted(
        cls,
        num_tokens: int,
        dtype: DType,
        layout: Layout,
        device: str,
        memory_tier: MemoryTier,
        rank: int | None,
        metadata: dict[str, Any],
        block_ids: np.ndarray,
    ) -> KVHandle:
        """A fresh handle built without validation, for a pool that has checked every argument.

        Same fields and state as :meth:`create` (a fresh random id, created and last accessed now)
        with ``block_ids`` attached; about 20x cheaper than validating the model.
        """
        if not _TEMPLATE_IS_SHAREABLE:  # a protocol version with mutable defaults: validate instead
            handle = cls.create(num_tokens, dtype=dtype, layout=layout, device=device, node_rank=rank,
                                metadata=metadata)
            handle.__pydantic_private__["_block_ids"] = block_ids
            return handle
        now = time.time()
        return _trusted_model(
            cls, _FIELD_DEFAULTS, _PER_HANDLE_ORDER,
            (_uuid4(), num_tokens, num_tokens, dtype, layout, device, memory_tier, rank,
             now, now, metadata),
            _CREATE_FIELDS, {"_block_ids": block_ids},
        )

    # --- placement ---------------------------------------------------------------------------

    @property
    def node_rank(self) -> int | None:
        return self.rank

    def is_local(self, current_rank: int = 0) -> bool:
        """True when the handle has no rank (single node) or lives on ``current_rank``."""
        return self.rank is None or self.rank == current_rank

    @property
    def block_ids(self) -> np.ndarray:
        """Ids of the pool blocks backing this handle (read-only int32 array)."""
        view = self.__pydantic_private__["_block_ids"].view()
        view.flags.writeable = False
        return view

    @property
    def _blocks(self) -> list[KVBlockRef]:
        """The backing blocks, one :class:`KVBlockRef` per id in :attr:`block_ids`, in order.

        Part of the contract although private: the sageLLM engine (``isagellm-core`` 0.5.4.x,
        ``engine_core.kv_cache_manager``, ``scheduler_kv_bridge`` and ``scheduler``) builds every block
        table as ``[b.block_id for b in getattr(handle, "_blocks", [])]``. Keep it working.
        """
        # Not self._block_ids (30x slower); the refs made in one native call (~5x faster than here).
        return _block_refs(KVBlockRef, self.__pydantic_private__["_block_ids"])

    def __eq__(self, other: object) -> bool:
        # Field equality, as for the protocol model; the block ids are bookkeeping of the pool.
        if not isinstance(other, _ProtocolKVHandle):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like every non-frozen pydantic model

    # --- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVHandle:
        return cls.model_validate(data)

    # --- access and lifetime -----------------------------------------------------------------

    def touch(self) -> None:
        self.last_access = time.time()
        self.access_count += 1

    def is_evictable(self) -> bool:
        """Evictable when nothing pins it, it is not freed (state ``FREE``) or marked ``PINNED``, as in
        the original, and (ours alone) no transfer is moving it (``is_transferring``)."""
        return (self.pin_count == 0 and not self.is_transferring
                and self.state != KVBlockState.PINNED and self.state != KVBlockState.FREE)

    def incr_ref(self) -> int:
        self.ref_count += 1
        return self.ref_count

    def decr_ref(self) -> int:
        if self.ref_count == 0:
            raise KVRefCountUnderflowError(self.handle_id, current_count=0)
        self.ref_count -= 1
        return self.ref_count

    def pin(self) -> int:
        """One more pin (``is_pinned``); the ``state`` is left as it is, as in the original."""
        self.pin_count += 1
        return self.pin_count

    def unpin(self) -> int:
        if self.pin_count == 0:
            raise KVRefCountUnderflowError(self.handle_id, current_count=0, context={"counter": "pin_count"})
        self.pin_count -= 1
        return self.pin_count

    @property
    def is_pinned(self) -> bool:
        return self.pin_count > 0

    def __repr__(self) -> str:
        state = getattr(self.state, "value", self.state)
        return (f"{type(self).__name__}(id={str(self.handle_id)[:8]}..., tokens={self.num_tokens}, "
                f"device={self.device}, state={state}, pin={self.pin_count}, ref={self.ref_count})")

    def estimate_size_bytes(self, head_dim: int = 128, num_heads: int = 32) -> int:
        """Bytes of K and V for this handle's tokens in one layer of a model with that shape."""
        return int(self.num_tokens * num_heads * head_dim * 2 * _DTYPE_BYTES[DType(self.dtype)])


# The fields of a fresh handle in pydantic's order (_trusted replaces every per-handle value,
# metadata included; the others are immutable defaults) and the fields create() sets explicitly
# (what pydantic reports as model_fields_set), both read off one validated handle.
_TEMPLATE = KVHandle.create(1)
_CREATE_FIELDS = set(_TEMPLATE.model_fields_set)
_FIELD_DEFAULTS = dict(_TEMPLATE.__dict__)
# The per-handle fields in the order _trusted passes their values.
_PER_HANDLE_ORDER = ("handle_id", "num_tokens", "token_end", "dtype", "layout", "device", "memory_tier", "rank",
                     "created_at", "last_access", "metadata")
_PER_HANDLE = set(_PER_HANDLE_ORDER)
_TEMPLATE_IS_SHAREABLE = all(
    value is None or isinstance(value, bool | int | float | str | enum.Enum | uuid.UUID)
    for name, value in _FIELD_DEFAULTS.items()
    if name not in _PER_HANDLE
)
del _TEMPLATE
