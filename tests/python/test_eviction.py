"""Eviction strategies and the EvictionManager: ordering, pinning, errors, and a model-based property test."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sagellm_kv_cache.errors import KVAllPinnedError, KVCacheError, KVNoVictimError
from sagellm_kv_cache.eviction import (
    EvictionManager,
    EvictionStrategy,
    FIFOEviction,
    LFUEviction,
    LRUEviction,
    PriorityEviction,
    TTLEviction,
)
from sagellm_kv_cache.models.kv_handle import KVHandle
from sagellm_kv_cache.pool.kv_pool import KVPool
from sagellm_protocol.kv import EvictionPolicy


def make_handle(
    num_tokens: int,
    *,
    created: float = 1000.0,
    last: float | None = None,
    pinned: bool = False,
    priority: Any = None,
    access_count: int = 0,
) -> KVHandle:
    metadata = {} if priority is None else {"priority": priority}
    handle = KVHandle.create(num_tokens, metadata=metadata)
    handle.created_at = created
    handle.last_access = created if last is None else last
    handle.access_count = access_count
    if pinned:
        handle.pin()
    return handle


def snapshot(handles: list[KVHandle]) -> list[dict[str, Any]]:
    return [h.model_dump() for h in handles]


# --- ordering ----------------------------------------------------------------------------------


def test_lru_takes_least_recently_used_until_need_is_covered() -> None:
    hot = make_handle(10, created=1.0, last=50.0)
    cold = make_handle(10, created=2.0, last=10.0)
    warm = make_handle(10, created=3.0, last=30.0)
    victims = LRUEviction().select_victim([hot, cold, warm], 15)
    assert victims == [cold, warm]


def test_lru_stops_as_soon_as_enough_tokens_are_covered() -> None:
    big = make_handle(100, last=1.0)
    small = make_handle(1, last=2.0)
    assert LRUEviction().select_victim([small, big], 50) == [big]


def test_fifo_ignores_recent_use() -> None:
    old_but_hot = make_handle(8, created=1.0, last=99.0)
    young_and_cold = make_handle(8, created=5.0, last=5.0)
    assert FIFOEviction().select_victim([young_and_cold, old_but_hot], 8) == [old_but_hot]


def test_lfu_takes_least_accessed_then_least_recent() -> None:
    often = make_handle(4, last=1.0, access_count=9)
    rare_recent = make_handle(4, last=8.0, access_count=1)
    rare_old = make_handle(4, last=2.0, access_count=1)
    assert LFUEviction().select_victim([often, rare_recent, rare_old], 8) == [rare_old, rare_recent]


def test_ttl_evicts_expired_oldest_first_then_lru() -> None:
    now = time.time()
    expired_old = make_handle(4, created=now - 1000, last=now - 1)
    expired_young = make_handle(4, created=now - 500, last=now - 400)
    live_cold = make_handle(4, created=now - 10, last=now - 9)
    live_hot = make_handle(4, created=now - 10, last=now - 1)
    policy = TTLEviction(ttl_seconds=300.0)
    assert policy.is_expired(expired_old) and not policy.is_expired(live_cold)
    victims = policy.select_victim([live_hot, expired_young, live_cold, expired_old], 12)
    assert victims == [expired_old, expired_young, live_cold]


def test_priority_lowest_first_with_lru_tie_break_and_default() -> None:
    important = make_handle(4, last=1.0, priority=10)
    low_recent = make_handle(4, last=9.0, priority=-1)
    low_old = make_handle(4, last=3.0, priority=-1)
    default = make_handle(4, last=0.5)  # default_priority 5 below
    policy = PriorityEviction(default_priority=5)
    assert policy.select_victim([important, low_recent, default, low_old], 12) == [low_old, low_recent, default]


def test_equal_keys_keep_caller_order() -> None:
    handles = [make_handle(1, created=7.0, last=7.0) for _ in range(5)]
    assert LRUEviction().select_victim(handles, 5) == handles


def test_policy_names() -> None:
    assert LRUEviction().get_policy_name() == EvictionPolicy.LRU
    assert FIFOEviction().get_policy_name() == EvictionPolicy.FIFO
    assert TTLEviction().get_policy_name() == EvictionPolicy.TTL
    assert PriorityEviction().get_policy_name() == EvictionPolicy.PRIORITY
    assert LFUEviction().get_policy_name() == EvictionPolicy.LFU


# --- pinning, limits, errors -------------------------------------------------------------------


def test_pinned_handles_are_never_victims() -> None:
    pinned_cold = make_handle(10, last=0.0, pinned=True)
    free_hot = make_handle(10, last=100.0)
    assert LRUEviction().select_victim([pinned_cold, free_hot], 10) == [free_hot]


def test_transferring_handle_is_not_evictable() -> None:
    moving = make_handle(10, last=0.0)
    moving.is_transferring = True
    other = make_handle(10, last=5.0)
    assert LRUEviction().select_victim([moving, other], 5) == [other]


def test_all_pinned_raises_typed_error() -> None:
    handles = [make_handle(10, pinned=True) for _ in range(3)]
    with pytest.raises(KVAllPinnedError) as info:
        LRUEviction().select_victim(handles, 1)
    assert info.value.candidate_count == 3
    assert isinstance(info.value, KVCacheError)


def test_not_enough_evictable_tokens_raises_with_numbers() -> None:
    handles = [make_handle(10, pinned=True), make_handle(10), make_handle(5)]
    before = snapshot(handles)
    with pytest.raises(KVNoVictimError) as info:
        EvictionManager().select_victims(handles, 16)
    err = info.value
    assert (err.bytes_needed, err.pinned_count, err.total_count) == (16, 1, 3)
    assert err.context["evictable_tokens"] == 15
    assert snapshot(handles) == before


def test_freed_handles_are_neither_chosen_nor_counted() -> None:
    # A handle the caller freed but still lists (state FREE) was the coldest victim: evicting it
    # freed nothing, and its tokens counted toward the need, hiding that nothing could cover it.
    pool = KVPool(1000, 16)
    stale, live = (pool.alloc(100, "fp16", "contiguous", "cpu") for _ in range(2))
    pool.free(stale)
    assert EvictionManager().select_victims([stale, live], 50) == [live]
    with pytest.raises(KVNoVictimError) as info:
        EvictionManager().select_victims([stale, live], 150)
    assert info.value.context["evictable_tokens"] == 100
    with pytest.raises(KVNoVictimError):
        EvictionManager().select_victims([stale], 1)


def test_empty_candidates_with_need_raise_no_victim() -> None:
    with pytest.raises(KVNoVictimError) as info:
        LRUEviction().select_victim([], 1)
    assert info.value.total_count == 0


def test_zero_need_selects_nothing_even_when_all_pinned() -> None:
    assert LRUEviction().select_victim([make_handle(3, pinned=True)], 0) == []
    assert LRUEviction().select_victim([], 0) == []


def test_max_victims_caps_one_round() -> None:
    handles = [make_handle(1, last=float(i)) for i in range(10)]
    victims = LRUEviction().select_victim(handles, 8, max_victims=3)
    assert victims == handles[:3]


def test_duplicate_handles_count_once() -> None:
    handle = make_handle(10)
    with pytest.raises(KVNoVictimError):
        LRUEviction().select_victim([handle, handle], 20)
    assert LRUEviction().select_victim([handle, handle], 10) == [handle]


def test_negative_need_is_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="num_tokens_needed"):
        LRUEviction().select_victim([make_handle(1)], -1)


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_max_victims_is_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="max_victims"):
        LRUEviction().select_victim([make_handle(1)], 1, max_victims=bad)


@pytest.mark.parametrize("bad", [1.5, "3", True])
def test_non_int_need_is_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="num_tokens_needed"):
        LRUEviction().select_victim([make_handle(1)], bad)  # type: ignore[arg-type]


def test_numpy_integer_need_and_cap_are_ints() -> None:
    # The original took numpy integers here (the engine may sum token counts with numpy); they
    # were a TypeError ("must be an int, got int64").
    handles = [make_handle(4, created=1.0), make_handle(4, created=2.0), make_handle(4, created=3.0)]
    manager = EvictionManager(EvictionPolicy.FIFO, default_priority=np.int32(2))
    assert manager.default_priority == 2 and type(manager.default_priority) is int
    assert manager.select_victims(handles, np.int64(5)) == handles[:2]
    assert manager.select_victims(handles, np.uint16(12), max_victims=np.int64(1)) == handles[:1]
    with pytest.raises(TypeError, match="num_tokens_needed"):
        manager.select_victims(handles, np.bool_(True))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tokens_needed"):
        manager.select_victims(handles, np.int64(-1))


def test_non_handle_candidate_is_type_error_naming_type_and_index() -> None:
    handles: list[Any] = [make_handle(1), {"num_tokens": 4}]
    with pytest.raises(TypeError, match=r"candidates\[1\] is a dict"):
        LRUEviction().select_victim(handles, 1)


def test_candidates_may_be_any_iterable_but_a_mapping_or_one_handle() -> None:
    # The original took a generator and dict.values(); both were "candidates must be a sequence".
    handles = {"a": make_handle(4, created=2.0), "b": make_handle(4, created=1.0)}
    assert EvictionManager(EvictionPolicy.FIFO).select_victims(handles.values(), 4) == [handles["b"]]
    assert LRUEviction().select_victim((h for h in handles.values()), 8) == [handles["b"], handles["a"]]
    for bad in (handles, "ab", handles["a"], 3):
        with pytest.raises(TypeError, match="sequence"):
            LRUEviction().select_victim(bad, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("bad", "error"), [("high", TypeError), (float("nan"), ValueError), (None, TypeError)])
def test_priority_of_a_bad_value_is_a_typed_error(bad: Any, error: type[Exception]) -> None:
    handle = KVHandle.create(4, metadata={"priority": bad})
    with pytest.raises(error, match=f"metadata\\['priority'\\] of handle {handle.handle_id}"):
        PriorityEviction().priority_of(handle)
    with pytest.raises(error, match="metadata\\['priority'\\]"):
        PriorityEviction.check_priority(bad)


@pytest.mark.parametrize("bad", ["high", float("nan"), [1]])
def test_a_bad_priority_does_not_stop_eviction_of_the_others(bad: Any, caplog: pytest.LogCaptureFixture) -> None:
    # One handle's bad priority made every selection raise until that handle was freed. It is now
    # ordered with the default priority (5 here: after priority 1, before 9) and logged.
    # (A NaN key compared neither below nor above any other: a sort kept [9, nan, 1] as it was.)
    handles = [make_handle(4, priority=9), make_handle(4, priority=bad), make_handle(4, priority=1)]
    policy = PriorityEviction(default_priority=5)
    with caplog.at_level(logging.WARNING, logger="sagellm_kv_cache.eviction"):
        order = policy.select_victim(handles, 12)
    assert order == [handles[2], handles[1], handles[0]]
    assert policy.select_victim(handles, 4) == [handles[2]]
    messages = [r.getMessage() for r in caplog.records if r.name == "sagellm_kv_cache.eviction"]
    assert messages and all(str(handles[1].handle_id) in m and "default priority 5" in m for m in messages)
    manager = EvictionManager(EvictionPolicy.PRIORITY)
    assert manager.select_victims([handles[2], handles[1]], 4) == [handles[1]]  # the default 0 is below 1


def test_priorities_of_any_real_number_type_order() -> None:
    # A numpy scalar was a TypeError and an int past the float range an OverflowError.
    values = [np.int64(3), 2**2000, np.float32(-1.5), -(2**2000), 0]
    handles = [make_handle(4, priority=v) for v in values]
    order = [h.metadata["priority"] for h in PriorityEviction().select_victim(handles, 20)]
    assert order == [-(2**2000), np.float32(-1.5), 0, np.int64(3), 2**2000]


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        TTLEviction(ttl_seconds=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        EvictionManager(ttl_seconds=-1.0)


def test_ttl_is_expired_checks_its_arguments() -> None:
    # A None handle was an AttributeError, now="x" a TypeError about '-', and NaN read as unexpired.
    policy = TTLEviction(ttl_seconds=10.0)
    handle = make_handle(4, created=100.0)
    assert policy.is_expired(handle, 110) and not policy.is_expired(handle, 109.5)
    with pytest.raises(TypeError, match="handle must be a KVHandle, got NoneType"):
        policy.is_expired(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="now must be a number, got str"):
        policy.is_expired(handle, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="now must be a finite number, got nan"):
        policy.is_expired(handle, math.nan)


def test_ttl_past_the_float_range_never_expires() -> None:
    # An int TTL past the float range was a bare OverflowError from float(); it reads as float("inf").
    manager = EvictionManager(EvictionPolicy.TTL, ttl_seconds=10**400)
    assert manager.ttl_seconds == math.inf
    old, recent = make_handle(4, created=1.0, last=50.0), make_handle(4, created=2.0, last=10.0)
    assert manager.select_victims([old, recent], 4) == [recent]  # nothing expired: LRU
    with pytest.raises(ValueError, match="ttl_seconds must be > 0, got an int of"):
        TTLEviction(ttl_seconds=-(10**400))


def test_base_strategy_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        EvictionStrategy().select_victim([make_handle(1)], 1)


# --- manager -----------------------------------------------------------------------------------


def test_manager_switches_policy() -> None:
    old_hot = make_handle(4, created=1.0, last=10.0)
    young_cold = make_handle(4, created=5.0, last=5.0)
    manager = EvictionManager()
    assert manager.policy == EvictionPolicy.LRU
    assert manager.select_victims([old_hot, young_cold], 4) == [young_cold]
    manager.set_policy(EvictionPolicy.FIFO)
    assert manager.select_victims([old_hot, young_cold], 4) == [old_hot]
    manager.set_policy("priority")
    assert manager.policy == EvictionPolicy.PRIORITY


def test_manager_passes_ttl_and_priority_settings() -> None:
    manager = EvictionManager(policy=EvictionPolicy.TTL, ttl_seconds=12.0, default_priority=3)
    assert isinstance(manager.strategy, TTLEviction) and manager.strategy.ttl_seconds == 12.0
    manager.set_policy(EvictionPolicy.PRIORITY)
    assert isinstance(manager.strategy, PriorityEviction) and manager.strategy.default_priority == 3


@pytest.mark.parametrize("bad", ["most_recent", 7, None])
def test_unknown_policy_is_value_error_and_changes_nothing(bad: object) -> None:
    manager = EvictionManager(policy=EvictionPolicy.FIFO)
    with pytest.raises(ValueError, match=repr(bad)):
        manager.set_policy(bad)
    assert manager.policy == EvictionPolicy.FIFO


def test_lifetime_aware_orders_as_lru_as_in_the_original() -> None:
    # The original took LIFETIME_AWARE (EvictionManager, KVCacheManager, SchedulerBridge) and
    # ordered as LRU; ours refused it with ValueError.
    manager = EvictionManager(policy=EvictionPolicy.LIFETIME_AWARE)
    assert manager.policy == EvictionPolicy.LIFETIME_AWARE and isinstance(manager.strategy, LRUEviction)
    handles = [make_handle(16, created=float(i), last=float(10 - i)) for i in range(4)]
    assert manager.select_victims(handles, 16) == [handles[3]]
    manager.set_policy(EvictionPolicy.FIFO)
    assert manager.policy == EvictionPolicy.FIFO


def test_selection_over_many_handles() -> None:
    handles = [make_handle(16, created=float(i), last=float((i * 7919) % 20_000)) for i in range(20_000)]
    victims = EvictionManager().select_victims(handles, 16 * 100)
    assert len(victims) == 100
    assert [v.last_access for v in victims] == [float(i) for i in range(100)]


# --- property test against a plain model --------------------------------------------------------

_MODEL_POLICIES = [EvictionPolicy.LRU, EvictionPolicy.FIFO, EvictionPolicy.LFU, EvictionPolicy.PRIORITY]

handle_specs = st.lists(
    st.tuples(
        st.integers(0, 64),  # num_tokens
        st.integers(0, 20),  # created
        st.integers(0, 20),  # last access offset
        st.booleans(),  # pinned
        st.integers(-3, 3),  # priority
        st.integers(0, 5),  # access count
    ),
    max_size=25,
)


def model_select(
    handles: list[KVHandle], specs: Sequence[tuple[Any, ...]], policy: EvictionPolicy, need: int, cap: int | None
) -> list[KVHandle] | type[Exception]:
    """Straightforward reference: filter, stable-sort by the documented key, take greedily."""
    if need == 0:
        return []
    evictable = [(i, h) for i, h in enumerate(handles) if not specs[i][3]]
    if handles and not evictable:
        return KVAllPinnedError
    if sum(h.num_tokens for _, h in evictable) < need:
        return KVNoVictimError

    def key(item: tuple[int, KVHandle]) -> tuple[float, ...]:
        i, h = item
        if policy == EvictionPolicy.LRU:
            return (h.last_access, h.created_at, i)
        if policy == EvictionPolicy.FIFO:
            return (h.created_at, i)
        if policy == EvictionPolicy.LFU:
            return (h.access_count, h.last_access, h.created_at, i)
        return (h.metadata["priority"], h.last_access, h.created_at, i)

    chosen: list[KVHandle] = []
    covered = 0
    for _, h in sorted(evictable, key=key):
        if covered >= need or (cap is not None and len(chosen) >= cap):
            break
        chosen.append(h)
        covered += h.num_tokens
    return chosen


@settings(max_examples=300, deadline=None)
@given(
    specs=handle_specs,
    policy=st.sampled_from(_MODEL_POLICIES),
    need=st.integers(0, 400),
    cap=st.one_of(st.none(), st.integers(1, 10)),
)
def test_manager_matches_model(
    specs: list[tuple[int, int, int, bool, int, int]], policy: EvictionPolicy, need: int, cap: int | None
) -> None:
    handles = [
        make_handle(tokens, created=float(created), last=float(created + offset), pinned=pinned, priority=prio,
                    access_count=count)
        for tokens, created, offset, pinned, prio, count in specs
    ]  # fmt: skip
    before = snapshot(handles)
    expected = model_select(handles, specs, policy, need, cap)
    manager = EvictionManager(policy=policy)
    if isinstance(expected, type):
        with pytest.raises(expected):
            manager.select_victims(handles, need, max_victims=cap)
    else:
        got = manager.select_victims(handles, need, max_victims=cap)
        assert [h.handle_id for h in got] == [h.handle_id for h in expected]
        assert all(h.is_evictable() for h in got)
        assert cap is None or len(got) <= cap
        if cap is None or len(got) < cap:
            assert sum(h.num_tokens for h in got) >= need
    assert snapshot(handles) == before
