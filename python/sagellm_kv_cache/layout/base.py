"""The KV-block layout interface: per-token K/V storage of one block, ``[2, hidden_dim]`` per token."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from sagellm_kv_cache.errors import KVMemoryExhaustedError

__all__ = ["BaseKVBlock"]

_T = TypeVar("_T")

# Host memory one tensor costs besides its data (the Python object, TensorImpl, storage, allocator
# rounding): about 550 bytes measured with torch 2.x; rounded up, so the estimate errs towards refusing.
_BYTES_PER_ALLOCATION = 1024


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _physical_memory_bytes() -> int | None:
    """The machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _is_allocation_failure(err: BaseException) -> bool:
    # torch reports failure as a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory" for the
    # data, "std::bad_alloc" for its own bookkeeping; torch.OutOfMemoryError is a RuntimeError too. Other
    # RuntimeErrors are not ours to rename.
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(
        marker in text for marker in ("can't allocate memory", "bad_alloc", "out of memory", "OutOfMemory")))


class BaseKVBlock(ABC):
    """K and V of ``num_tokens`` tokens, each ``hidden_dim`` wide, of one torch ``dtype``.

    ``get_kv(i)`` returns token ``i``'s ``[2, hidden_dim]`` tensor (row 0 = K, row 1 = V) as a view
    into the block; ``set_kv(i, t)`` copies ``t`` (same shape) into it. Layouts differ in how the
    memory is split into allocations (``get_num_allocations``).
    """

    def __init__(self, num_tokens: int, hidden_dim: int, dtype: Any) -> None:
        self.num_tokens = _positive("num_tokens", num_tokens)
        self.hidden_dim = _positive("hidden_dim", hidden_dim)
        self.dtype = dtype

    def _allocate(self, torch: Any, allocate: Callable[[], _T], allocations: int = 1) -> _T:
        """Runs ``allocate`` (which builds the block's ``allocations`` tensors, ``2 * num_tokens * hidden_dim``
        elements of ``dtype`` on the CPU in all) unless the block cannot fit: :class:`KVMemoryExhaustedError`
        naming its bytes when they, with the tensors' own bookkeeping, exceed the machine's physical memory
        (refused before anything is allocated: zero-filling them would end in the OOM killer), or when
        torch cannot allocate them (what was built is dropped)."""
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {self.dtype!r}")
        required = 2 * self.num_tokens * self.hidden_dim * self.dtype.itemsize
        physical = _physical_memory_bytes()
        if physical is not None and required + allocations * _BYTES_PER_ALLOCATION > physical:
            raise KVMemoryExhaustedError(required, device="cpu", context={
                "reason": f"{required} bytes in {allocations} tensors (about {_BYTES_PER_ALLOCATION} bytes of "
                          f"bookkeeping each) exceed the machine's physical memory ({physical} bytes)",
                "physical_bytes": physical, "allocations": allocations})
        try:
            return allocate()
        except (MemoryError, RuntimeError) as err:
            if not _is_allocation_failure(err):
                raise
            raise KVMemoryExhaustedError(required, device="cpu", context={"reason": " ".join(str(err).split())}) \
                from None

    @abstractmethod
    def get_kv(self, token_idx: int) -> Any:
        """Token ``token_idx``'s K/V; ``IndexError`` outside ``[0, num_tokens)``."""

    @abstractmethod
    def set_kv(self, token_idx: int, kv_data: Any) -> None:
        """Writes token ``token_idx``'s K/V; ``ValueError`` for a tensor that is not ``[2, hidden_dim]``."""

    @abstractmethod
    def get_memory_usage(self) -> int:
        """Bytes held by the block."""

    @abstractmethod
    def get_num_allocations(self) -> int:
        """Separate memory allocations behind the block."""

    def _check_index(self, token_idx: Any) -> int:
        if isinstance(token_idx, bool) or not isinstance(token_idx, int):
            raise TypeError(f"token_idx must be an int, got {type(token_idx).__name__}")
        if not 0 <= token_idx < self.num_tokens:
            raise IndexError(f"token_idx {token_idx} out of range [0, {self.num_tokens})")
        return token_idx

    def _check_data(self, kv_data: Any) -> Any:
        shape = getattr(kv_data, "shape", None)
        if shape is None or not hasattr(kv_data, "to"):
            raise TypeError(f"kv_data must be a torch tensor of shape (2, {self.hidden_dim}), "
                            f"got {type(kv_data).__name__}")
        if tuple(shape) != (2, self.hidden_dim):
            raise ValueError(f"Expected kv_data shape (2, {self.hidden_dim}), got {shape}")
        return kv_data

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.num_tokens}, hidden_dim={self.hidden_dim}, dtype={self.dtype})"
