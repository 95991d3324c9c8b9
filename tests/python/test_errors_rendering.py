"""The KV*Error classes render exactly as the original package's (str, repr, args, to_dict), keep
their constructor arguments as attributes, and keep the builtin bases we add."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sagellm_kv_cache import errors as E
from sagellm_protocol.kv import KVErrorCode

U = uuid.UUID(int=7)
US = str(U)

# (error, code, message, context) as the original renders them.
CASES: list[tuple[E.KVCacheError, str, str, dict[str, Any]]] = [
    (E.KVAllPinnedError(5), "KV_ALL_PINNED", "All 5 eviction candidates are pinned", {"candidate_count": 5}),
    (E.KVBudgetExceededError(10, 3), "KV_BUDGET_EXCEEDED",
     "Budget exceeded: requested 10 tokens, only 3 tokens available", {"requested": 10, "available": 3,
                                                                        "unit": "tokens"}),
    (E.KVCacheMissError("abc", prefix_len=5), "KV_CACHE_MISS", "Cache miss for prefix 'abc' (length=5)",
     {"prefix_hash": "abc", "prefix_len": 5}),
    (E.KVChecksumMismatchError("e", "a"), "KV_CHECKSUM_MISMATCH", "Checksum mismatch: expected 'e', got 'a'",
     {"expected": "e", "actual": "a"}),
    (E.KVChecksumMismatchError("e", "a", transfer_id=U), "KV_CHECKSUM_MISMATCH",
     f"Checksum mismatch: expected 'e', got 'a' (transfer_id={US})", {"expected": "e", "actual": "a",
                                                                       "transfer_id": US}),
    (E.KVConfigInvalidError("k", 3), "KV_CONFIG_INVALID", "Invalid configuration 'k': 3 - invalid value",
     {"config_key": "k", "value": 3, "reason": "invalid value"}),
    (E.KVConfigInvalidError("k", "v", reason="bad"), "KV_CONFIG_INVALID", "Invalid configuration 'k': 'v' - bad",
     {"config_key": "k", "value": "v", "reason": "bad"}),
    (E.KVConfigMissingError("k"), "KV_CONFIG_MISSING", "Required configuration missing: 'k'", {"config_key": "k"}),
    (E.KVDoubleFreeError(U), "KV_DOUBLE_FREE", f"Double free detected: handle '{US}' has already been freed",
     {"handle_id": US}),
    (E.KVEvictionFailedError("h", reason="r"), "KV_EVICTION_FAILED", "Eviction failed for handle 'h': r",
     {"handle_id": "h", "reason": "r"}),
    (E.KVHandleNotFoundError(U), "KV_HANDLE_NOT_FOUND", f"Handle not found: '{US}'", {"handle_id": US}),
    (E.KVHandlePinnedError("h", operation="free", pin_count=2), "KV_HANDLE_PINNED",
     "Cannot free handle 'h': handle is pinned (pin_count=2)", {"handle_id": "h", "operation": "free",
                                                                  "pin_count": 2}),
    (E.KVInvalidHandleError(U), "KV_INVALID_HANDLE",
     f"Invalid handle '{US}': handle does not exist or has been invalidated",
     {"handle_id": US, "reason": "handle does not exist or has been invalidated"}),
    (E.KVMemoryExhaustedError(100, device="cuda:0"), "KV_MEMORY_EXHAUSTED",
     "Memory exhausted on device 'cuda:0': cannot allocate 100 bytes", {"required_bytes": 100, "device": "cuda:0"}),
    (E.KVMetadataMismatchError("f", 1, "2"), "KV_METADATA_MISMATCH",
     "Metadata mismatch on field 'f': expected 1, got '2'", {"field": "f", "expected": 1, "actual": "2"}),
    (E.KVNotImplementedError("feat"), "KV_NOT_IMPLEMENTED", "Feature not implemented: 'feat' (Fail-Fast)",
     {"feature": "feat"}),
    (E.KVNoVictimError(10, pinned_count=2, total_count=3), "KV_NO_VICTIM",
     "No eviction victim available: need 10 bytes, but 2/3 objects are pinned",
     {"bytes_needed": 10, "pinned_count": 2, "total_count": 3}),
    (E.KVPoolFullError(7), "KV_POOL_FULL", "KV pool is full: all 7 blocks are allocated", {"total_blocks": 7}),
    (E.KVPrefixTooLongError(10, 5), "KV_PREFIX_TOO_LONG", "Prefix too long: 10 tokens exceeds maximum 5",
     {"prefix_len": 10, "max_len": 5}),
    (E.KVRefCountUnderflowError("h"), "KV_REF_COUNT_UNDERFLOW",
     "Reference count underflow on handle 'h': cannot decrement from 0", {"handle_id": "h", "current_count": 0}),
    (E.KVTransferFailedError("t", source="s", target="d", reason="r"), "KV_TRANSFER_FAILED",
     "KV transfer 't' failed: s -> d, reason: r", {"transfer_id": "t", "source": "s", "target": "d", "reason": "r"}),
    (E.KVTransferTimeoutError(U, timeout_seconds=1.5, elapsed_seconds=2.25), "KV_TRANSFER_TIMEOUT",
     f"KV transfer '{US}' timed out: elapsed 2.25s > timeout 1.50s",
     {"transfer_id": US, "timeout_seconds": 1.5, "elapsed_seconds": 2.25}),
    (E.KVCacheError(KVErrorCode.POOL_FULL, "msg", {"a": 1}), "KV_POOL_FULL", "msg", {"a": 1}),
]


@pytest.mark.parametrize(("err", "code", "message", "context"), CASES, ids=lambda v: type(v).__name__)
def test_rendering(err: E.KVCacheError, code: str, message: str, context: dict[str, Any]) -> None:
    name = type(err).__name__
    assert str(err) == f"[{code}] {message}"
    assert err.args == (f"[{code}] {message}",)
    assert repr(err) == f"{name}(code={code!r}, message={message!r})"
    assert err.to_dict() == {"error_type": name, "code": code, "message": message, "context": context,
                             "retryable": code == "KV_TRANSFER_TIMEOUT"}
    assert list(err.to_dict()) == ["error_type", "code", "message", "context", "retryable"]
    assert err.message == message and err.context == context and err.code.value == code


def test_attributes_and_context_merging() -> None:
    err = E.KVBudgetExceededError(10, 3, unit="bytes", context={"max_tokens": 99, "unit": "blocks"})
    assert (err.requested, err.available, err.unit, err.max_tokens) == (10, 3, "bytes", 99)
    assert err.context["unit"] == "blocks"  # the caller's context wins, as in the seed
    assert E.KVBudgetExceededError(1, 0).max_tokens is None
    assert E.KVDoubleFreeError(U).handle_id == US  # ids are kept as strings
    assert E.KVTransferFailedError(U).transfer_id == US
    assert E.KVChecksumMismatchError("e", "a", transfer_id="").transfer_id is None
    cause = ValueError("root")
    wrapped = E.KVCacheError(KVErrorCode.NOT_FOUND, "m", cause=cause)
    assert wrapped.cause is cause and "cause" not in wrapped.to_dict()


def test_builtin_bases_stay() -> None:
    assert isinstance(E.KVPoolFullError(1), MemoryError)
    assert isinstance(E.KVMemoryExhaustedError(1), MemoryError)
    assert isinstance(E.KVConfigInvalidError("k", 1), ValueError)
    assert isinstance(E.KVHandleNotFoundError("h"), KeyError)
    assert isinstance(E.KVHandlePinnedError("h", operation="free"), ValueError)  # the original's pool: ValueError
    assert str(E.KVHandleNotFoundError("h")) == "[KV_HANDLE_NOT_FOUND] Handle not found: 'h'"  # no KeyError quotes
    assert isinstance(E.KVTransferTimeoutError("t", timeout_seconds=1, elapsed_seconds=2), TimeoutError)
    assert isinstance(E.KVNotImplementedError("f"), NotImplementedError)


def test_errors_survive_pickling() -> None:
    import pickle

    # (The original's errors come back with the rendered message as their first argument.)
    for err, *_ in CASES:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and repr(back) == repr(err)
        assert back.to_dict() == err.to_dict() and vars(back) == vars(err)
