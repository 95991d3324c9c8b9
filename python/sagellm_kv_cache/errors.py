"""The ``KV*Error`` hierarchy of the seed, plus the mapping from the C++ core's error codes.

Every error carries a :class:`~sagellm_protocol.kv.KVErrorCode`. Where Python convention asks for a
builtin, a class also inherits it (``KVPoolFullError`` is a ``MemoryError``, invalid configuration a
``ValueError``), so ``except MemoryError`` keeps working for callers that do not know this package.
"""

from __future__ import annotations

import inspect
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
    """Base of every error this package raises on purpose.

    Renders as the seed does: ``str(e)`` is ``"[<code>] <message>"`` (also ``e.args[0]``),
    ``repr(e)`` is ``ClassName(code='<code>', message='<message>')`` and :meth:`to_dict` has the keys
    ``error_type``, ``code``, ``message``, ``context`` and ``retryable``. Subclasses put their
    arguments into ``context`` first; a caller's ``context`` is merged over them.
    """

    def __init__(
        self,
        code: KVErrorCode,
        message: str,
        context: dict[str, Any] | None = None,
        cause: Exception | None = None,
    ) -> None:
        super().__init__(f"[{_code_text(code)}] {message}")
        self.code = code
        self.message = message
        self.context: dict[str, Any] = dict(context or {})
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause  # the seed leaves __cause__ unset; chaining only adds to tracebacks

    def is_retryable(self) -> bool:
        return bool(is_retryable(self.code))

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_type": type(self).__name__,
            "code": _code_text(self.code),
            "message": self.message,
            "context": dict(self.context),
            "retryable": self.is_retryable(),
        }

    def __str__(self) -> str:
        # Exception's rendering, also for the subclasses whose builtin base renders otherwise (KeyError quotes).
        return Exception.__str__(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={_code_text(self.code)!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickling would call cls(*args) with the rendered message; rebuild from the state
        # instead, so errors cross process boundaries (multiprocessing, transfer workers) intact.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))

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
        # The seed constructor's arguments are attributes (``total_blocks``, ``handle_id``, ...); the
        # core does not know them, so they read as None rather than raising AttributeError.
        if cls.__init__ is not KVCacheError.__init__:
            for name in inspect.signature(cls.__init__).parameters:
                if name not in ("self", "context") and not hasattr(err, name):
                    setattr(err, name, None)
        return err

    _core_code: KVErrorCode = KVErrorCode.ALLOCATION_FAILED


def _rebuild(cls: type[KVCacheError], args: tuple[Any, ...], state: dict[str, Any]) -> KVCacheError:
    try:
        err = cls.__new__(cls)
    except TypeError:
        err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


def _code_text(code: Any) -> str:
    return str(getattr(code, "value", code))


def _merged(own: dict[str, Any], context: dict[str, Any] | None) -> dict[str, Any]:
    return {**own, **(context or {})}


# --- memory and budget ---------------------------------------------------------------------------


class KVBudgetExceededError(KVCacheError):
    _core_code = KVErrorCode.BUDGET_EXCEEDED

    def __init__(
        self, requested: int, available: int, *, unit: str = "tokens", context: dict[str, Any] | None = None
    ) -> None:
        self.requested = requested
        self.available = available
        self.unit = unit
        self.max_tokens: Any = (context or {}).get("max_tokens")
        super().__init__(
            KVErrorCode.BUDGET_EXCEEDED,
            f"Budget exceeded: requested {requested} {unit}, only {available} {unit} available",
            _merged({"requested": requested, "available": available, "unit": unit}, context),
        )


class KVMemoryExhaustedError(KVCacheError, MemoryError):
    _core_code = KVErrorCode.MEMORY_EXHAUSTED

    def __init__(self, required_bytes: int, *, device: str = "unknown", context: dict[str, Any] | None = None) -> None:
        self.required_bytes = required_bytes
        self.device = device
        super().__init__(
            KVErrorCode.MEMORY_EXHAUSTED,
            f"Memory exhausted on device '{device}': cannot allocate {required_bytes} bytes",
            _merged({"required_bytes": required_bytes, "device": device}, context),
        )


class KVPoolFullError(KVCacheError, MemoryError):
    _core_code = KVErrorCode.POOL_FULL

    def __init__(self, total_blocks: int, *, context: dict[str, Any] | None = None) -> None:
        self.total_blocks = total_blocks
        super().__init__(
            KVErrorCode.POOL_FULL,
            f"KV pool is full: all {total_blocks} blocks are allocated",
            _merged({"total_blocks": total_blocks}, context),
        )


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
        self.handle_id = str(handle_id)
        self.reason = reason
        super().__init__(
            KVErrorCode.INVALID_HANDLE,
            f"Invalid handle '{handle_id}': {reason}",
            _merged({"handle_id": str(handle_id), "reason": reason}, context),
        )


class KVInvalidBlockError(KVInvalidHandleError):
    """A block id that is out of range, or not allocated where it must be (C++ ``kInvalidBlock``)."""


class KVDoubleFreeError(KVInvalidHandleError):
    """A handle (or block) freed again. A :class:`KVInvalidHandleError`: the original package's
    ``KVPool.free`` raised that for a freed handle, so an ``except`` written for it catches this."""

    _core_code = KVErrorCode.DOUBLE_FREE
    reason = "has already been freed"

    def __init__(self, handle_id: UUID | str, *, context: dict[str, Any] | None = None) -> None:
        self.handle_id = str(handle_id)
        KVCacheError.__init__(
            self,
            KVErrorCode.DOUBLE_FREE,
            f"Double free detected: handle '{handle_id}' has already been freed",
            _merged({"handle_id": str(handle_id)}, context),
        )


class KVHandlePinnedError(KVCacheError, ValueError):
    """An operation a pin forbids (free, evict). A ``ValueError`` as well: the original pool raised a
    plain ``ValueError`` when a pinned handle was freed, e.g. by the engine's ``SchedulerKVBridge``
    after its ``pin_request``."""

    _core_code = KVErrorCode.HANDLE_PINNED

    def __init__(
        self,
        handle_id: UUID | str,
        *,
        operation: str = "evict",
        pin_count: int = 0,
        context: dict[str, Any] | None = None,
    ) -> None:
        self.handle_id = str(handle_id)
        self.operation = operation
        self.pin_count = pin_count
        super().__init__(
            KVErrorCode.HANDLE_PINNED,
            f"Cannot {operation} handle '{handle_id}': handle is pinned (pin_count={pin_count})",
            _merged({"handle_id": str(handle_id), "operation": operation, "pin_count": pin_count}, context),
        )


class KVHandleNotFoundError(KVInvalidHandleError, KeyError):
    """A handle this pool or manager does not hold. Also a :class:`KVInvalidHandleError`, the
    original package's error for a foreign or freed handle in ``KVPool.free``/``pin``/``unpin``."""

    _core_code = KVErrorCode.HANDLE_NOT_FOUND
    reason = "not found"

    def __init__(self, handle_id: UUID | str, *, context: dict[str, Any] | None = None) -> None:
        self.handle_id = str(handle_id)
        KVCacheError.__init__(
            self,
            KVErrorCode.HANDLE_NOT_FOUND,
            f"Handle not found: '{handle_id}'",
            _merged({"handle_id": str(handle_id)}, context),
        )


class KVRefCountUnderflowError(KVCacheError, ValueError):
    """Also a ``ValueError``: the original package's ``KVHandle.unpin``/``decr_ref`` at 0 raised one."""

    _core_code = KVErrorCode.REF_COUNT_UNDERFLOW

    def __init__(self, handle_id: UUID | str, *, current_count: int = 0, context: dict[str, Any] | None = None) -> None:
        self.handle_id = str(handle_id)
        self.current_count = current_count
        super().__init__(
            KVErrorCode.REF_COUNT_UNDERFLOW,
            f"Reference count underflow on handle '{handle_id}': cannot decrement from {current_count}",
            _merged({"handle_id": str(handle_id), "current_count": current_count}, context),
        )


# --- prefix cache --------------------------------------------------------------------------------


class KVCacheMissError(KVCacheError):
    _core_code = KVErrorCode.CACHE_MISS

    def __init__(self, prefix_hash: str, *, prefix_len: int = 0, context: dict[str, Any] | None = None) -> None:
        self.prefix_hash = prefix_hash
        self.prefix_len = prefix_len
        super().__init__(
            KVErrorCode.CACHE_MISS,
            f"Cache miss for prefix '{prefix_hash}' (length={prefix_len})",
            _merged({"prefix_hash": prefix_hash, "prefix_len": prefix_len}, context),
        )


class KVPrefixTooLongError(KVCacheError, ValueError):
    _core_code = KVErrorCode.PREFIX_TOO_LONG

    def __init__(self, prefix_len: int, max_len: int, *, context: dict[str, Any] | None = None) -> None:
        self.prefix_len = prefix_len
        self.max_len = max_len
        super().__init__(
            KVErrorCode.PREFIX_TOO_LONG,
            f"Prefix too long: {prefix_len} tokens exceeds maximum {max_len}",
            _merged({"prefix_len": prefix_len, "max_len": max_len}, context),
        )


# --- eviction ------------------------------------------------------------------------------------


class KVNoVictimError(KVCacheError):
    _core_code = KVErrorCode.NO_VICTIM

    def __init__(
        self, bytes_needed: int, *, pinned_count: int = 0, total_count: int = 0, context: dict[str, Any] | None = None
    ) -> None:
        self.bytes_needed = bytes_needed
        self.pinned_count = pinned_count
        self.total_count = total_count
        super().__init__(
            KVErrorCode.NO_VICTIM,
            f"No eviction victim available: need {bytes_needed} bytes, but {pinned_count}/{total_count} objects "
            "are pinned",
            _merged({"bytes_needed": bytes_needed, "pinned_count": pinned_count, "total_count": total_count}, context),
        )


class KVEvictionFailedError(KVCacheError):
    _core_code = KVErrorCode.EVICTION_FAILED

    def __init__(
        self, handle_id: UUID | str, *, reason: str = "unknown", context: dict[str, Any] | None = None
    ) -> None:
        self.handle_id = str(handle_id)
        self.reason = reason
        super().__init__(
            KVErrorCode.EVICTION_FAILED,
            f"Eviction failed for handle '{handle_id}': {reason}",
            _merged({"handle_id": str(handle_id), "reason": reason}, context),
        )


class KVAllPinnedError(KVCacheError):
    _core_code = KVErrorCode.ALL_PINNED

    def __init__(self, candidate_count: int, *, context: dict[str, Any] | None = None) -> None:
        self.candidate_count = candidate_count
        super().__init__(
            KVErrorCode.ALL_PINNED,
            f"All {candidate_count} eviction candidates are pinned",
            _merged({"candidate_count": candidate_count}, context),
        )


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
        self.transfer_id = str(transfer_id)
        self.source = source
        self.target = target
        self.reason = reason
        super().__init__(
            KVErrorCode.TRANSFER_FAILED,
            f"KV transfer '{transfer_id}' failed: {source} -> {target}, reason: {reason}",
            _merged({"transfer_id": str(transfer_id), "source": source, "target": target, "reason": reason}, context),
        )


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
        self.transfer_id = str(transfer_id)
        self.timeout_seconds = timeout_seconds
        self.elapsed_seconds = elapsed_seconds
        super().__init__(
            KVErrorCode.TRANSFER_TIMEOUT,
            f"KV transfer '{transfer_id}' timed out: elapsed {elapsed_seconds:.2f}s > timeout {timeout_seconds:.2f}s",
            _merged(
                {
                    "transfer_id": str(transfer_id),
                    "timeout_seconds": timeout_seconds,
                    "elapsed_seconds": elapsed_seconds,
                },
                context,
            ),
        )


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
        self.expected = expected
        self.actual = actual
        self.transfer_id = str(transfer_id) if transfer_id else None
        own: dict[str, Any] = {"expected": expected, "actual": actual}
        message = f"Checksum mismatch: expected '{expected}', got '{actual}'"
        if transfer_id:
            own["transfer_id"] = str(transfer_id)
            message += f" (transfer_id={transfer_id})"
        super().__init__(KVErrorCode.CHECKSUM_MISMATCH, message, _merged(own, context))


class KVMetadataMismatchError(KVCacheError, ValueError):
    _core_code = KVErrorCode.METADATA_MISMATCH

    def __init__(self, field: str, expected: Any, actual: Any, *, context: dict[str, Any] | None = None) -> None:
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(
            KVErrorCode.METADATA_MISMATCH,
            f"Metadata mismatch on field '{field}': expected {expected!r}, got {actual!r}",
            _merged({"field": field, "expected": expected, "actual": actual}, context),
        )


# --- configuration and backends ------------------------------------------------------------------


class KVConfigMissingError(KVCacheError, ValueError):
    _core_code = KVErrorCode.CONFIG_MISSING

    def __init__(self, config_key: str, *, context: dict[str, Any] | None = None) -> None:
        self.config_key = config_key
        super().__init__(
            KVErrorCode.CONFIG_MISSING,
            f"Required configuration missing: '{config_key}'",
            _merged({"config_key": config_key}, context),
        )


class KVConfigInvalidError(KVCacheError, ValueError):
    _core_code = KVErrorCode.CONFIG_INVALID

    def __init__(
        self, config_key: str, value: Any, *, reason: str = "invalid value", context: dict[str, Any] | None = None
    ) -> None:
        self.config_key = config_key
        self.value = value
        self.reason = reason
        super().__init__(
            KVErrorCode.CONFIG_INVALID,
            f"Invalid configuration '{config_key}': {value!r} - {reason}",
            _merged({"config_key": config_key, "value": value, "reason": reason}, context),
        )


class KVNotImplementedError(KVCacheError, NotImplementedError):
    _core_code = KVErrorCode.NOT_IMPLEMENTED

    def __init__(self, feature: str, *, context: dict[str, Any] | None = None) -> None:
        self.feature = feature
        super().__init__(
            KVErrorCode.NOT_IMPLEMENTED,
            f"Feature not implemented: '{feature}' (Fail-Fast)",
            _merged({"feature": feature}, context),
        )


class KVBackendUnavailableError(KVCacheError, RuntimeError):
    """A device backend that exists but cannot run here (no driver, no such device). Not in the seed."""

    _core_code = KVErrorCode.BACKEND_UNAVAILABLE

    def __init__(self, device: str, *, reason: str = "unavailable", context: dict[str, Any] | None = None) -> None:
        self.device = device
        self.reason = reason
        super().__init__(
            KVErrorCode.BACKEND_UNAVAILABLE,
            f"Backend unavailable for device '{device}': {reason}",
            _merged({"device": device, "reason": reason}, context),
        )


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
