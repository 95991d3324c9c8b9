"""Where the seed API met a divergence from the original ``isagellm-kv-cache==0.5.4.15`` that
``test_seed_diff.py`` found: the original's behaviour, pinned here without needing the original."""

from __future__ import annotations

import uuid

import pytest
from sagellm_kv_cache import KVBlockState, KVHandle, KVInvalidHandleError, KVPool, PrefixCache


def test_pool_refusals_are_caught_as_the_originals_errors() -> None:
    # The original raised KVInvalidHandleError for a freed or foreign handle and ValueError for a
    # pinned one (or a pin count at 0); ours raises more precise classes that are also those.
    pool = KVPool(100, 16)
    h = pool.alloc(10, "fp16", "contiguous", "cpu")
    pool.pin(h)
    with pytest.raises(ValueError):
        pool.free(h)
    pool.unpin(h)
    pool.free(h)
    with pytest.raises(KVInvalidHandleError):
        pool.free(h)
    with pytest.raises(KVInvalidHandleError):
        pool.pin(h)
    with pytest.raises(KVInvalidHandleError):
        pool.free(KVHandle.create(num_tokens=4))
    loose = KVHandle.create(num_tokens=4)
    with pytest.raises(ValueError):
        loose.unpin()
    loose.decr_ref()
    with pytest.raises(ValueError):
        loose.decr_ref()
    assert pool.get_stats()["num_handles"] == 0


def test_can_admit_zero_is_false_as_alloc_zero_is_refused() -> None:
    pool = KVPool(100, 16)
    assert not pool.can_admit(0)
    with pytest.raises(ValueError):
        pool.alloc(0, "fp16", "contiguous", "cpu")
    assert pool.can_admit(1) and pool.can_admit(100) and not pool.can_admit(101)


def test_unpin_of_a_handle_that_is_not_pinned_does_nothing() -> None:
    # The engine's SchedulerKVBridge.unpin_request calls KVPool.unpin whether or not it pinned.
    pool = KVPool(100, 16)
    h = pool.alloc(10, "fp16", "contiguous", "cpu")
    pool.unpin(h)
    pool.pin(h)
    pool.unpin(h)
    pool.unpin(h)
    assert h.pin_count == 0 and pool.get_stats()["pinned_tokens"] == 0 and not pool.pinned_handles
    pool.free(h)
    with pytest.raises(KVInvalidHandleError):
        pool.unpin(h)


def test_pin_leaves_the_state_and_freed_handles_are_not_evictable() -> None:
    # The original's KVHandle.pin/unpin change only pin_count; is_evictable is False for a pinned,
    # a PINNED-state or a freed handle.
    pool = KVPool(100, 16)
    h = pool.alloc(10, "fp16", "contiguous", "cpu")
    pool.pin(h)
    assert h.state == KVBlockState.ALLOCATED and h.is_pinned and not h.is_evictable()
    pool.unpin(h)
    assert h.state == KVBlockState.ALLOCATED and h.is_evictable()
    loose = KVHandle.create(num_tokens=4)
    loose.state = KVBlockState.FREE
    loose.pin()
    assert loose.state == KVBlockState.FREE
    loose.unpin()
    assert not loose.is_evictable()
    pool.free(h)
    assert not h.is_evictable()


def test_prefix_lookup_of_none_is_a_type_error_that_counts_nothing() -> None:
    cache = PrefixCache(2)
    with pytest.raises(TypeError, match="None"):
        cache.lookup(None)  # type: ignore[arg-type]
    assert cache.get_stats()["miss_count"] == 0
    assert cache.lookup([]) == ([], 0) and cache.get_stats()["miss_count"] == 1


def test_prefix_invalidate_counts_its_blocks_as_evicted() -> None:
    cache = PrefixCache(2)
    owner = uuid.UUID(int=1)
    keys = cache.compute_block_hashes([1, 2, 3, 4])
    cache.insert(keys, [{"block_id": 0, "handle_id": owner}, {"block_id": 1, "handle_id": owner}])
    assert cache.invalidate(owner) == 2
    assert cache.get_stats()["evict_count"] == 2 and len(cache) == 0
