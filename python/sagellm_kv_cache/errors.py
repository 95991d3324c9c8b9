"""The ``KV*Error`` hierarchy of the seed, plus the mapping from the C++ core's error codes.

Every error carries a :class:`~sagellm_protocol.kv.KVErrorCode`. Where Python convention asks for a
builtin, a class also inherits it (``KVPoolFullError`` is a ``MemoryError``, invalid configuration a
``ValueError``), so ``except MemoryError`` keeps working for callers that do not know this package.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sagellm_protocol.kv import KVErrorCode, is_retryable

__all__ = [
    "KVAllPinnedError",
    "KVBackendUnavailableError",
    "KVBudgetExceededError",
    "KVCacheError",
    "KVCacheMissError",
    "KVChecksumMismatchError",
    "KVConfigInvalidError",
    "KVConfigMissingError",
    "KVDoubleFreeError",
    "KVEvictionFailedError",
    "KVHandleNotFoundError",
    "KVHandlePinnedError",
    "KVInvalidBlockError",
    "KVInvalidHandleError",
    "KVMemoryExhaustedError",
    "KVMetadataMismatchError",
    "KVNoVictimError",
    "KVNotImplementedError",
    "KVPoolFullError",
    "KVPrefixTooLongError",
    "KVRefCountUnderflowError",
    "KVTransferFailedError",
    "KVTransferOutcomeUnknownError",
    "KVTransferTimeoutError",
]


class KVCacheError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(
        self,
        code: KVErrorCode,
        message: str,
        context: dict[str, Any] | None = None,
        cause: Exception | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context: dict[str, Any] = dict(context or {})
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    def is_retryable(self) -> bool:
        return bool(is_retryable(self.code))

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code.value,
            "message": self.message,
            "context": dict(self.context),
            "cause": repr(self.cause) if self.cause is not None else None,
            "retryable": self.is_retryable(),
        }

    def __str__(self) -> str:
        return self.message

    @classmethod
    def _from_core(cls, message: str, context: dict[str, Any] | None = None) -> KVCacheError:
        """Builds the error from a C++ core message without going through the seed constructor."""
        # Builtin bases disagree on which __new__ may build a subclass (MemoryError keeps a freelist,
        # OSError maps errno): use whichever accepts the class.
        try:
            err = cls.__new__(cls)
        except TypeError:
            err = Exception.__new__(cls)
        KVCacheError.__init__(err, cls._core_code, message, context)
        return err

    _core_code: KVErrorCode = KVErrorCode.ALLOCATION_FAILED


# --- memory and budget ---------------------------------------------------------------------------


class KVBudgetExceededError(KVCacheError):
    _core_code = KVErrorCode.BUDGET_EXCEEDED

    def __init__(
        self, requested: int, available: int, *, unit: str = "tokens", context: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            KVErrorCode.BUDGET_EXCEEDED,
            f"KV budget exceeded: requested {requested} {unit}, only {available} {unit} available",
            {"requested": requested, "available": available, "unit": unit, **(context or {})},
        )
        self.requested = requested
        self.available = available
        self.unit = unit


class KVMemoryExhaustedError(KVCacheError, MemoryError):
    _core_code = KVErrorCode.MEMORY_EXHAUSTED

    def __init__(self, required_bytes: int, *, device: str = "unknown", context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.MEMORY_EXHAUSTED,
            f"cannot allocate {required_bytes} bytes on device {device}",
            {"required_bytes": required_bytes, "device": device, **(context or {})},
        )
        self.required_bytes = required_bytes
        self.device = device


class KVPoolFullError(KVCacheError, MemoryError):
    _core_code = KVErrorCode.POOL_FULL

    def __init__(self, total_blocks: int, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.POOL_FULL,
            f"KV pool is full ({total_blocks} blocks in total)",
            {"total_blocks": total_blocks, **(context or {})},
        )
        self.total_blocks = total_blocks


# --- handles and blocks --------------------------------------------------------------------------


class KVInvalidHandleError(KVCacheError, ValueError):
    _core_code = KVErrorCode.INVALID_HANDLE

    def __init__(
        self,
        handle_id: UUID | str,
        *,
        reason: str = "handle does not exist or has been invalidated",
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            KVErrorCode.INVALID_HANDLE,
            f"invalid handle {handle_id}: {reason}",
            {"handle_id": str(handle_id), "reason": reason, **(context or {})},
        )
        self.handle_id = handle_id
        self.reason = reason


class KVInvalidBlockError(KVInvalidHandleError):
    """A block id that is out of range, or not allocated where it must be (C++ ``kInvalidBlock``)."""


class KVDoubleFreeError(KVCacheError):
    _core_code = KVErrorCode.DOUBLE_FREE

    def __init__(self, handle_id: UUID | str, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.DOUBLE_FREE,
            f"double free of {handle_id}",
            {"handle_id": str(handle_id), **(context or {})},
        )
        self.handle_id = handle_id


class KVHandlePinnedError(KVCacheError):
    _core_code = KVErrorCode.HANDLE_PINNED

    def __init__(
        self,
        handle_id: UUID | str,
        *,
        operation: str = "evict",
        pin_count: int = 0,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            KVErrorCode.HANDLE_PINNED,
            f"cannot {operation} handle {handle_id}: it is pinned (pin_count={pin_count})",
            {"handle_id": str(handle_id), "operation": operation, "pin_count": pin_count, **(context or {})},
        )
        self.handle_id = handle_id
        self.operation = operation
        self.pin_count = pin_count


class KVHandleNotFoundError(KVCacheError, KeyError):
    _core_code = KVErrorCode.HANDLE_NOT_FOUND

    def __init__(self, handle_id: UUID | str, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.HANDLE_NOT_FOUND,
            f"handle {handle_id} not found",
            {"handle_id": str(handle_id), **(context or {})},
        )
        self.handle_id = handle_id

    __str__ = KVCacheError.__str__  # KeyError would quote the message


class KVRefCountUnderflowError(KVCacheError):
    _core_code = KVErrorCode.REF_COUNT_UNDERFLOW

    def __init__(self, handle_id: UUID | str, *, current_count: int = 0, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.REF_COUNT_UNDERFLOW,
            f"reference count of {handle_id} would drop below zero (current {current_count})",
            {"handle_id": str(handle_id), "current_count": current_count, **(context or {})},
        )
        self.handle_id = handle_id
        self.current_count = current_count


# --- prefix cache --------------------------------------------------------------------------------


class KVCacheMissError(KVCacheError):
    _core_code = KVErrorCode.CACHE_MISS

    def __init__(self, prefix_hash: str, *, prefix_len: int = 0, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.CACHE_MISS,
            f"prefix {prefix_hash} (length {prefix_len}) is not cached",
            {"prefix_hash": prefix_hash, "prefix_len": prefix_len, **(context or {})},
        )
        self.prefix_hash = prefix_hash
        self.prefix_len = prefix_len


class KVPrefixTooLongError(KVCacheError, ValueError):
    _core_code = KVErrorCode.PREFIX_TOO_LONG

    def __init__(self, prefix_len: int, max_len: int, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.PREFIX_TOO_LONG,
            f"prefix of {prefix_len} tokens exceeds the maximum of {max_len}",
            {"prefix_len": prefix_len, "max_len": max_len, **(context or {})},
        )
        self.prefix_len = prefix_len
        self.max_len = max_len


# --- eviction ------------------------------------------------------------------------------------


class KVNoVictimError(KVCacheError):
    _core_code = KVErrorCode.NO_VICTIM

    def __init__(
        self, bytes_needed: int, *, pinned_count: int = 0, total_count: int = 0, context: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            KVErrorCode.NO_VICTIM,
            f"no eviction victim frees {bytes_needed}: {pinned_count} of {total_count} candidates are pinned",
            {"bytes_needed": bytes_needed, "pinned_count": pinned_count, "total_count": total_count, **(context or {})},
        )
        self.bytes_needed = bytes_needed
        self.pinned_count = pinned_count
        self.total_count = total_count


class KVEvictionFailedError(KVCacheError):
    _core_code = KVErrorCode.EVICTION_FAILED

    def __init__(
        self, handle_id: UUID | str, *, reason: str = "unknown", context: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            KVErrorCode.EVICTION_FAILED,
            f"eviction of {handle_id} failed: {reason}",
            {"handle_id": str(handle_id), "reason": reason, **(context or {})},
        )
        self.handle_id = handle_id
        self.reason = reason


class KVAllPinnedError(KVCacheError):
    _core_code = KVErrorCode.ALL_PINNED

    def __init__(self, candidate_count: int, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.ALL_PINNED,
            f"all {candidate_count} eviction candidates are pinned",
            {"candidate_count": candidate_count, **(context or {})},
        )
        self.candidate_count = candidate_count


# --- transfer ------------------------------------------------------------------------------------


class KVTransferFailedError(KVCacheError):
    _core_code = KVErrorCode.TRANSFER_FAILED

    def __init__(
        self,
        transfer_id: UUID | str,
        *,
        source: str = "unknown",
        target: str = "unknown",
        reason: str = "unknown",
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            KVErrorCode.TRANSFER_FAILED,
            f"transfer {transfer_id} from {source} to {target} failed: {reason}",
            {"transfer_id": str(transfer_id), "source": source, "target": target, "reason": reason, **(context or {})},
        )
        self.transfer_id = transfer_id
        self.source = source
        self.target = target
        self.reason = reason


class KVTransferTimeoutError(KVCacheError, TimeoutError):
    _core_code = KVErrorCode.TRANSFER_TIMEOUT

    def __init__(
        self,
        transfer_id: UUID | str,
        *,
        timeout_seconds: float,
        elapsed_seconds: float,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            KVErrorCode.TRANSFER_TIMEOUT,
            f"transfer {transfer_id} timed out after {elapsed_seconds:.3f}s (timeout {timeout_seconds:.3f}s)",
            {
                "transfer_id": str(transfer_id),
                "timeout_seconds": timeout_seconds,
                "elapsed_seconds": elapsed_seconds,
                **(context or {}),
            },
        )
        self.transfer_id = transfer_id
        self.timeout_seconds = timeout_seconds
        self.elapsed_seconds = elapsed_seconds


class KVChecksumMismatchError(KVCacheError):
    _core_code = KVErrorCode.CHECKSUM_MISMATCH

    def __init__(
        self,
        expected: str,
        actual: str,
        *,
        transfer_id: UUID | str | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            KVErrorCode.CHECKSUM_MISMATCH,
            f"checksum mismatch{f' in transfer {transfer_id}' if transfer_id else ''}: "
            f"expected {expected}, got {actual}",
            {"expected": expected, "actual": actual, "transfer_id": str(transfer_id) if transfer_id else None,
             **(context or {})},
        )
        self.expected = expected
        self.actual = actual
        self.transfer_id = transfer_id


class KVMetadataMismatchError(KVCacheError, ValueError):
    _core_code = KVErrorCode.METADATA_MISMATCH

    def __init__(self, field: str, expected: Any, actual: Any, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.METADATA_MISMATCH,
            f"metadata mismatch on {field}: expected {expected!r}, got {actual!r}",
            {"field": field, "expected": expected, "actual": actual, **(context or {})},
        )
        self.field = field
        self.expected = expected
        self.actual = actual


# --- configuration and backends ------------------------------------------------------------------


class KVConfigMissingError(KVCacheError, ValueError):
    _core_code = KVErrorCode.CONFIG_MISSING

    def __init__(self, config_key: str, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.CONFIG_MISSING,
            f"missing configuration: {config_key}",
            {"config_key": config_key, **(context or {})},
        )
        self.config_key = config_key


class KVConfigInvalidError(KVCacheError, ValueError):
    _core_code = KVErrorCode.CONFIG_INVALID

    def __init__(
        self, config_key: str, value: Any, *, reason: str = "invalid value", context: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            KVErrorCode.CONFIG_INVALID,
            f"invalid {config_key}={value!r}: {reason}",
            {"config_key": config_key, "value": value, "reason": reason, **(context or {})},
        )
        self.config_key = config_key
        self.value = value
        self.reason = reason


class KVNotImplementedError(KVCacheError, NotImplementedError):
    _core_code = KVErrorCode.NOT_IMPLEMENTED

    def __init__(self, feature: str, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.NOT_IMPLEMENTED,
            f"not implemented: {feature}",
            {"feature": feature, **(context or {})},
        )
        self.feature = feature


class KVBackendUnavailableError(KVCacheError, RuntimeError):
    """A device backend that exists but cannot run here (no driver, no such device)."""

    _core_code = KVErrorCode.BACKEND_UNAVAILABLE

    def __init__(self, device: str, *, reason: str = "unavailable", context: dict[str, Any] | None = None) -> None:
        super().__init__(
            KVErrorCode.BACKEND_UNAVAILABLE,
            f"device {device} is unavailable: {reason}",
            {"device": device, "reason": reason, **(context or {})},
        )
        self.device = device
        self.reason = reason


class KVTransferOutcomeUnknownError(KVCacheError):
    """The source sent every byte of a transfer but never learnt what the destination did with it.

    The destination publishes a transfer as soon as it has verified every chunk and only then
    sends its final reply, so a reply lost to a deadline or a broken link leaves the source unable
    to tell whether the blocks were published. This is not a failure: the destination may hold
    them. :meth:`~sagellm_kv_cache.transfer.BlockTransfer.outcome` tells the outcome once a later
    exchange with the same rank has settled it. Not retryable as such: a blind retry may publish
    the same blocks twice.
    """

    _core_code = KVErrorCode.TRANSFER_TIMEOUT

    def __init__(
        self,
        transfer_id: UUID | str,
        *,
        source: str = "unknown",
        target: str = "unknown",
        reason: str = "unknown",
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            KVErrorCode.TRANSFER_TIMEOUT,
            f"transfer {transfer_id} from {source} to {target}: outcome unknown, the destination may hold the "
            f"blocks ({reason})",
            {"transfer_id": str(transfer_id), "source": source, "target": target, "reason": reason,
             "outcome": "unknown", **(context or {})},
        )
        self.transfer_id = transfer_id
        self.source = source
        self.target = target
        self.reason = reason

    def is_retryable(self) -> bool:
        return False


# --- the C++ core's codes ------------------------------------------------------------------------

# Index = sagellm::kv::ErrorCode value (cpp/include/sagellm_kv/error.hpp). The bindings call
# `_from_core_error` for every sagellm::kv::Error they catch.
_CORE_ERRORS: tuple[type[KVCacheError], ...] = (
    KVCacheError,  # kOk: never raised
    KVConfigInvalidError,  # kInvalidArgument
    KVPoolFullError,  # kPoolFull
    KVBudgetExceededError,  # kBudgetExceeded
    KVMemoryExhaustedError,  # kMemoryExhausted
    KVDoubleFreeError,  # kDoubleFree
    KVInvalidBlockError,  # kInvalidBlock
    KVConfigInvalidError,  # kUnknownDevice
    KVBackendUnavailableError,  # kBackendUnavailable
    KVRefCountUnderflowError,  # kRefCountUnderflow
    KVMetadataMismatchError,  # kMetadataMismatch
    KVChecksumMismatchError,  # kChecksumMismatch
    KVCacheMissError,  # kCacheMiss
    KVNoVictimError,  # kNoVictim
    KVNotImplementedError,  # kNotImplemented
    KVCacheError,  # kInternal
)


def _from_core_error(code: int, message: str) -> KVCacheError:
    cls = _CORE_ERRORS[code] if 0 <= code < len(_CORE_ERRORS) else KVCacheError
    return cls._from_core(message, {"core_code": code})
