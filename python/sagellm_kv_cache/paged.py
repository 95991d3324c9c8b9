"""The native fast path over real KV memory: :class:`KVCacheSpec` and :class:`PagedKVPool`.

Block ids travel as ``np.int32`` arrays; every call that does work releases the GIL inside C++.
Each layer's K and V cache is one array of shape ``(num_blocks, block_size, num_kv_heads, head_dim)``
exposed without a copy: a numpy view on the CPU (buffer protocol) and ``__dlpack__`` everywhere, so
``torch.from_dlpack(pool.key_cache(0))`` works. A view keeps the pool's memory alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sagellm_kv_cache import _core
from sagellm_kv_cache._numbers import flag, integer
from sagellm_kv_cache.errors import KVConfigInvalidError

__all__ = ["KVCacheSpec", "LayerView", "PagedKVPool"]

BlockIds = npt.NDArray[np.int32] | Sequence[int]

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _int64_arg(name: str, value: Any) -> int:
    """An argument the native calls take as a 64-bit int: bools and non-ints are a TypeError, an int past
    64 bits a ValueError, both naming the argument (pybind would take True as 1 and name neither)."""
    n = integer(name, value)
    if not -_INT64_MAX <= n <= _INT64_MAX:
        raise ValueError(f"{name} must fit in 64 bits, got {n}")
    return n


def _count_arg(name: str, value: Any) -> int:
    """A block count in ``[0, 2**31)`` (the native range; its error message too)."""
    n = integer(name, value)
    if not 0 <= n <= _INT32_MAX:
        raise ValueError(f"{name} must be in [0, {_INT32_MAX}], got {n}")
    return n


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the KV cache of one model (or one tensor-parallel shard).

    ``dtype`` is one of ``fp32``, ``fp16``, ``bf16``, ``fp8`` (e4m3), ``int8``; the protocol's
    :class:`~sagellm_protocol.kv.DType` members are accepted too.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "fp16"
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            # Stored as Python ints: numpy scalars would wrap in block_nbytes and are not JSON.
            object.__setattr__(self, name, int(value))
        dtype = getattr(self.dtype, "value", self.dtype)
        if not isinstance(dtype, str):
            raise TypeError(f"dtype must be a string, got {type(dtype).__name__}")
        object.__setattr__(self, "dtype", _core.dtype_name(dtype))

    @property
    def dtype_size(self) -> int:
        return int(_core.dtype_size(self.dtype))

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_size": self.block_size,
        }


_DL_CPU, _DL_CUDA = 1, 2  # DLPack device types
_DL_SHARED, _DL_HOST_COPY, _DL_DEVICE_COPY = 0, 1, 2  # what the native export hands out


def _int_pair(name: str, value: Any, shape: str) -> tuple[int, int]:
    """``value`` as a pair of ints (an IntEnum is fine); TypeError naming ``name`` and the ``shape`` it
    must have otherwise."""
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be None or a {shape} tuple of ints, got {value!r}")
    return int(value[0]), int(value[1])


def _dlpack_max_version(max_version: Any) -> bool:
    """True when ``max_version`` (None or ``(major, minor)``) asks for a versioned capsule."""
    return max_version is not None and _int_pair("max_version", max_version, "(major, minor)")[0] >= 1


def _dlpack_stream_arg(stream: Any, device_type: int) -> None:
    """Checks a consumer's ``stream`` for an export to ``device_type`` (the array API's rules)."""
    if stream is None:
        return
    if isinstance(stream, bool) or not isinstance(stream, int | np.integer):
        raise TypeError(f"stream must be None or an int, got {type(stream).__name__}")
    if device_type == _DL_CPU:
        if stream != -1:
            raise ValueError(f"stream must be None (or -1) for an export to the host, got {stream}")
    elif stream == 0 or stream < -1:
        raise ValueError(f"stream must be None, -1, 1, 2 or a stream handle for a CUDA export, got {stream} "
                         "(0 is ambiguous)")


class LayerView:
    """Zero-copy view of one layer's K or V cache on any device, exported through DLPack."""

    def __init__(self, pool: PagedKVPool, layer: int, value: bool) -> None:
        self._native = pool._native
        self._layer = layer
        self._value = value
        self.shape = (pool.num_blocks, pool.spec.block_size, pool.spec.num_kv_heads, pool.spec.head_dim)
        self.dtype = pool.spec.dtype
        self.device = pool.device

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None,
                   copy: Any = None) -> Any:
        """A DLPack capsule of this layer (the Python array API's protocol, 2023.12).

        ``max_version`` ``(major, minor)`` with ``major >= 1`` gets a versioned capsule (DLPack 1.0),
        ``None`` the legacy one. ``dl_device`` ``None`` or this view's device exports the memory itself
        (``copy=True``: a copy on the same device); the host ``(1, 0)`` for a device view is a copy, a
        ``ValueError`` with ``copy=False``; any other device is a ``BufferError``. ``stream`` is the
        consumer's: ``None`` (or ``-1``) for the host; for CUDA ``None``, ``-1``, ``1``, ``2`` or a stream
        handle, never ``0``. The pool's copies are synchronous, so no stream has work to wait for.
        """
        versioned = _dlpack_max_version(max_version)
        if copy is not None and not isinstance(copy, bool | np.bool_):
            raise TypeError(f"copy must be True, False or None, got {copy!r}")
        own = self.__dlpack_device__()
        target = own if dl_device is None else _int_pair("dl_device", dl_device, "(device_type, device_id)")
        if target == own:
            where = _DL_DEVICE_COPY if copy else _DL_SHARED
        elif target == (_DL_CPU, 0) and own[0] == _DL_CUDA:
            if copy is not None and not copy:
                raise ValueError(f"dl_device {dl_device!r} (the host) needs a copy of this view on {self.device}, "
                                 "and copy=False forbids one")
            where = _DL_HOST_COPY
        else:
            raise BufferError(f"a view on {self.device} {own} cannot be exported to dl_device {dl_device!r}")
        _dlpack_stream_arg(stream, target[0])
        return self._native.dlpack_capsule(self._layer, self._value, versioned, where)

    def __dlpack_device__(self) -> tuple[int, int]:
        device_type, index = self._native.dlpack_device()
        return int(device_type), int(index)

    @property
    def data_ptr(self) -> int:
        """Raw address, for registering the memory with a communication library only."""
        return int(self._native.layer_address(self._layer, self._value))

    def __repr__(self) -> str:
        kind = "value" if self._value else "key"
        return f"LayerView({kind}, layer={self._layer}, shape={self.shape}, dtype={self.dtype}, device={self.device})"


class PagedKVPool:
    """Blocks of real KV memory plus a lock-free allocator of their ids.

    >>> spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=64, dtype="fp16", block_size=16)
    >>> pool = PagedKVPool(spec, num_blocks=1024, device="cpu")
    >>> ids = pool.allocate(8)
    >>> pool.num_free_blocks
    1016
    >>> pool.free(ids)
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        device: str = "cpu",
        *,
        zero_fill: bool = True,
        huge_pages: bool = False,
        lock_memory: bool = False,
    ) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        num_blocks = _int64_arg("num_blocks", num_blocks)
        if not isinstance(device, str):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
        flags = (flag("zero_fill", zero_fill), flag("huge_pages", huge_pages), flag("lock_memory", lock_memory))
        self.spec = spec
        self._native = _core.PagedKVPool(
            spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype, spec.block_size, num_blocks, device, *flags,
        )

    # --- allocation -------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> npt.NDArray[np.int32]:
        """Takes ``num_blocks`` blocks (ref count 1). ``KVPoolFullError`` when short; nothing taken."""
        return self._native.allocate(_count_arg("num_blocks", num_blocks))

    def free(self, block_ids: BlockIds) -> None:
        """Drops one reference per id; a block is free again at 0. All or nothing."""
        self._native.free(block_ids)

    def incref(self, block_ids: BlockIds) -> None:
        """Adds one reference per id (sharing a block between requests). All or nothing."""
        self._native.incref(block_ids)

    def ref_count(self, block_id: int) -> int:
        block_id = integer("block_id", block_id)
        if not -_INT64_MAX <= block_id <= _INT64_MAX:
            raise ValueError(f"block id {block_id} out of range")
        return int(self._native.ref_count(block_id))

    def is_allocated(self, block_id: int) -> bool:
        block_id = integer("block_id", block_id)
        return -_INT64_MAX <= block_id <= _INT64_MAX and bool(self._native.is_allocated(block_id))

    # --- memory -----------------------------------------------------------------------------

    def key_cache(self, layer: int) -> Any:
        """Layer ``layer``'s K cache: a numpy view on the CPU, a :class:`LayerView` elsewhere.

        numpy has no bf16/fp8, so those CPU pools show their raw bits (uint16 / uint8); use
        :meth:`dlpack_view` to get the real element type into torch.
        """
        return self._view(layer, value=False)

    def value_cache(self, layer: int) -> Any:
        """Layer ``layer``'s V cache; see :meth:`key_cache`."""
        return self._view(layer, value=True)

    def dlpack_view(self, layer: int, value: bool = False) -> LayerView:
        """A DLPack-exportable view of layer ``layer``'s K (or V) cache with its true dtype."""
        layer = self._layer_arg(layer)
        value = flag("value", value)
        self._native.layer_address(layer, value)  # validates the layer
        return LayerView(self, layer, value)

    def _layer_arg(self, layer: Any) -> int:
        layer = integer("layer", layer)
        if not 0 <= layer <= _INT32_MAX:  # past 64 bits the native call could not name it
            raise IndexError(f"layer {layer} out of range [0, {self.spec.num_layers})")
        return layer

    def _view(self, layer: int, value: bool) -> Any:
        layer = self._layer_arg(layer)
        if self.device == "cpu":
            return self._native.host_view(layer, value)
        return self.dlpack_view(layer, value)

    def copy_blocks(self, src: BlockIds, dst: BlockIds) -> None:
        """Copies the contents of blocks ``src[i]`` into ``dst[i]`` (copy-on-write)."""
        self._native.copy_blocks(src, dst)

    def gather(self, block_ids: BlockIds) -> npt.NDArray[np.uint8]:
        """The blocks' bytes in staging layout ``[block][layer][K|V][token][head][dim]``."""
        return self._native.gather(block_ids)

    def gather_into(self, block_ids: BlockIds, out: Any) -> None:
        """Like :meth:`gather`, into a caller-provided writable contiguous buffer of the exact size."""
        self._native.gather_into(block_ids, out)

    def scatter(self, data: Any, block_ids: BlockIds) -> None:
        """Writes staging-layout bytes back into the blocks (inverse of :meth:`gather`)."""
        self._native.scatter(data, block_ids)

    def gather_summed(self, block_ids: BlockIds, out: Any, sums: npt.NDArray[np.uint64]) -> None:
        """:meth:`gather_into` that also writes, in the same pass over the bytes, the sum of each full
        4 KiB segment of ``out`` (little-endian 64-bit words, mod 2**64) into ``sums`` (uint64, one
        entry per full segment): the bulk of the transfer checksum ``segsum64``."""
        self._native.gather_summed(block_ids, out, sums)

    def scatter_summed(self, data: Any, block_ids: BlockIds, sums: npt.NDArray[np.uint64]) -> None:
        """:meth:`scatter` that also writes the segment sums of ``data`` as it was read (see
        :meth:`gather_summed`): they describe exactly the bytes that went into the blocks."""
        self._native.scatter_summed(data, block_ids, sums)

    # --- budget -----------------------------------------------------------------------------

    def set_budget_blocks(self, blocks: int) -> None:
        """Caps how many blocks may be in use at once (at most ``num_blocks``)."""
        self._native.set_budget_blocks(_count_arg("budget_blocks", blocks))

    def set_budget_bytes(self, nbytes: int) -> None:
        """Caps the bytes in use, rounded down to whole blocks."""
        nbytes = integer("budget_bytes", nbytes)
        if nbytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {nbytes}")
        if nbytes > _INT64_MAX:
            raise KVConfigInvalidError("budget_bytes", nbytes, reason=f"exceeds the pool's {self.num_blocks} blocks")
        self._native.set_budget_bytes(nbytes)

    def can_admit(self, num_tokens: int) -> bool:
        """True when ``num_tokens`` more tokens (rounded up to blocks) fit within the budget now."""
        num_tokens = integer("num_tokens", num_tokens)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens <= _INT64_MAX and bool(self._native.can_admit_tokens(num_tokens))

    # --- properties -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return int(self._native.num_blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free and within the budget)."""
        return int(self._native.num_free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return int(self._native.num_used_blocks)

    @property
    def budget_blocks(self) -> int:
        return int(self._native.budget_blocks)

    @property
    def block_nbytes(self) -> int:
        return int(self._native.block_nbytes)

    @property
    def total_nbytes(self) -> int:
        return int(self._native.total_nbytes)

    @property
    def device(self) -> str:
        return str(self._native.device)

    def stats(self) -> dict[str, int]:
        return {
            "total_blocks": self.num_blocks,
            "free_blocks": self.num_free_blocks,
            "used_blocks": self.num_used_blocks,
            "budget_blocks": self.budget_blocks,
            "block_bytes": self.block_nbytes,
            "total_bytes": self.total_nbytes,
            "used_bytes": self.num_used_blocks * self.block_nbytes,
        }

    def __repr__(self) -> str:
        return (f"PagedKVPool({self.spec}, num_blocks={self.num_blocks}, device={self.device!r}, "
                f"free={self.num_free_blocks})")
