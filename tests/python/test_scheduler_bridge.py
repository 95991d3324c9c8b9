"""SchedulerBridge: budgeted planning, prefix reuse by fingerprint, placement, typed errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sagellm_kv_cache import (
    KVBudgetExceededError,
    KVConfigInvalidError,
    KVHandle,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    PlacementStrategy,
    SchedulerBridge,
)
from sagellm_kv_cache.scheduler_bridge import KVRequestNotFoundError
from sagellm_protocol.kv import KVBlockState, RequestType, SchedulerPlan, SchedulerRequest, SchedulerState


def req(rid: str, prompt: int = 100, new: int = 28, **fields: Any) -> SchedulerRequest:
    return SchedulerRequest(request_id=rid, trace_id="trace", request_type=RequestType.PREFILL,
                            prompt_len=prompt, max_new_tokens=new, **fields)


def used(bridge: SchedulerBridge) -> int:
    return int(bridge.get_stats()["pool"]["used_tokens"])


def test_stats_keys_exactly() -> None:
    bridge = SchedulerBridge(max_tokens=1024)
    stats = bridge.get_stats()
    assert sorted(stats) == ["load_metrics", "num_requests", "placement", "pool"]
    assert list(stats["load_metrics"]) == ["cuda:0"] and stats["num_requests"] == 0
    assert stats["placement"] == {"total_placements": 0, "per_device": {}, "fallback_placements": 0}
    assert stats["pool"]["max_tokens"] == 1024 and stats["pool"]["block_size"] == 16


def test_allocate_and_free_request() -> None:
    bridge = SchedulerBridge(1024)
    handle = bridge.allocate_request("r1", 100, session_id="s1")
    assert isinstance(handle, KVHandle)
    assert (handle.request_id, handle.session_id, handle.device, handle.num_tokens) == ("r1", "s1", "cuda:0", 100)
    assert handle.is_pinned  # a running request's KV is never an eviction victim
    assert bridge.get_request_handle("r1") is handle
    stats = bridge.get_stats()
    assert stats["num_requests"] == 1 and stats["pool"]["used_tokens"] == 100
    assert stats["load_metrics"]["cuda:0"]["kv_tokens_used"] == 100
    assert stats["load_metrics"]["cuda:0"]["active_requests"] == 1
    bridge.free_request("r1")
    assert handle.state == KVBlockState.FREE and len(bridge) == 0 and used(bridge) == 0
    assert bridge.get_stats()["load_metrics"]["cuda:0"]["kv_tokens_used"] == 0


def test_request_errors_are_typed_and_change_nothing() -> None:
    bridge = SchedulerBridge(256, devices=["cuda:0", "cuda:1"])
    bridge.allocate_request("r1", 100)
    before = bridge.get_stats()["pool"]
    with pytest.raises(KVConfigInvalidError, match=r"'r1'.*already has KV"):
        bridge.allocate_request("r1", 10)
    with pytest.raises(KVRequestNotFoundError, match="'nope'") as info:
        bridge.free_request("nope")
    assert isinstance(info.value, KVHandleNotFoundError) and isinstance(info.value, KeyError)
    with pytest.raises(KVConfigInvalidError, match="cuda:7"):
        bridge.allocate_request("r2", 10, device="cuda:7")
    with pytest.raises(KVConfigInvalidError, match="tpu"):
        bridge.allocate_request("r2", 10, device="tpu:0")
    with pytest.raises(KVBudgetExceededError, match="requested 200"):
        bridge.allocate_request("r2", 200)  # r1 is pinned: nothing to evict
    with pytest.raises(KVConfigInvalidError, match="'num_tokens': 0"):
        bridge.allocate_request("r2", 0)
    with pytest.raises(TypeError, match="request_id"):
        bridge.allocate_request(7, 10)  # type: ignore[arg-type]
    with pytest.raises(KVConfigInvalidError, match="request_id"):
        bridge.allocate_request("", 10)
    with pytest.raises(TypeError, match="session_id"):
        bridge.allocate_request("r2", 10, session_id=3)  # type: ignore[arg-type]
    with pytest.raises(KVRequestNotFoundError):
        bridge.get_request_handle("r2")
    assert bridge.get_stats()["pool"] == before and len(bridge) == 1
    bridge.free_request("r1")
    with pytest.raises(KVRequestNotFoundError):
        bridge.free_request("r1")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_tokens": 0}, KVConfigInvalidError, "'max_tokens': 0"),
        ({"max_tokens": 64, "devices": []}, KVConfigInvalidError, "devices"),
        ({"max_tokens": 64, "devices": "cuda:0"}, TypeError, "devices"),
        ({"max_tokens": 64, "devices": ["cuda:0", "cuda"]}, KVConfigInvalidError, "twice"),
        ({"max_tokens": 64, "devices": ["npu:x"]}, KVConfigInvalidError, "npu:x"),
        ({"max_tokens": 64, "placement_strategy": "random"}, ValueError, "random"),
        ({"max_tokens": 64, "eviction_policy": "mru"}, KVConfigInvalidError, "mru"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SchedulerBridge(**kwargs)


# --- plan ----------------------------------------------------------------------------------------


def test_plan_admits_under_budget_and_defers_the_rest() -> None:
    bridge = SchedulerBridge(512)
    batch = [req("a", 100, 28), req("b", 200, 56), req("c", 100, 28), req("d", 50, 14)]
    plan = bridge.plan(batch)
    assert isinstance(plan, SchedulerPlan)
    # a (128) + b (256) = 384; c (128) would make 512, d (64) then no longer fits
    assert [r.request_id for r in bridge.last_scheduled] == ["a", "b", "c"]
    assert bridge.last_deferred == ["d"]
    # The original's plan: every input request, unchanged, and batch_size their number.
    assert plan.requests == batch and all(p is r for p, r in zip(plan.requests, batch, strict=True))
    assert all(r.state == SchedulerState.QUEUED for r in plan.requests)
    assert plan.batch_size == 4 and plan.total_kv_tokens == 512
    assert plan.placement == {"a": "cuda:0", "b": "cuda:0", "c": "cuda:0"}
    assert all(r.state == SchedulerState.SCHEDULED and r.scheduled_at == plan.created_at for r in bridge.last_scheduled)
    assert [r.kv_tokens_required for r in bridge.last_scheduled] == [128, 256, 128]
    assert used(bridge) == 512 and len(bridge) == 3
    bridge.free_request("b")
    again = bridge.plan([req("d", 50, 14)])
    assert list(again.placement) == ["d"] and bridge.last_deferred == []


def test_plan_order_priority_then_arrival_and_skips_what_does_not_fit() -> None:
    bridge = SchedulerBridge(256)
    batch = [
        req("late-low", 40, 24, queued_at=5.0),
        req("big", 200, 56, priority=1, queued_at=9.0),  # 256 tokens: fills the budget alone
        req("early-low", 40, 24, queued_at=1.0),
        req("urgent", 40, 24, priority=5, queued_at=7.0),
    ]
    bridge.plan(batch)
    assert [r.request_id for r in bridge.last_scheduled] == ["urgent", "early-low", "late-low"]
    assert bridge.last_deferred == ["big"]
    assert used(bridge) == 192


def test_kv_tokens_required_wins_and_oversized_requests_are_deferred() -> None:
    bridge = SchedulerBridge(256)
    plan = bridge.plan([req("sized", 10, 5, kv_tokens_required=64), req("huge", 10, 5, kv_tokens_required=1000)])
    assert [r.request_id for r in bridge.last_scheduled] == ["sized"] and plan.total_kv_tokens == 64
    assert bridge.last_deferred == ["huge"] and used(bridge) == 64


def test_plan_bad_input_reserves_nothing() -> None:
    bridge = SchedulerBridge(1024)
    bridge.allocate_request("running", 64)
    before = bridge.get_stats()["pool"]
    with pytest.raises(TypeError, match="sequence"):
        bridge.plan(req("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"requests\[1\] is a dict"):
        bridge.plan([req("x"), {"request_id": "y"}])  # type: ignore[list-item]
    with pytest.raises(KVConfigInvalidError, match=r"'x'.*twice"):
        bridge.plan([req("x"), req("y"), req("x")])
    with pytest.raises(KVConfigInvalidError, match=r"'running'.*already has KV"):
        bridge.plan([req("x"), req("running")])
    assert bridge.get_stats()["pool"] == before and len(bridge) == 1
    empty = bridge.plan([])
    assert empty.batch_size == 0 and empty.requests == [] and empty.placement == {}


@pytest.mark.parametrize(("field", "value"), [("kv_tokens_required", -5), ("kv_tokens_required", 1.5),
                                              ("prompt_len", "10"), ("prefix_hit_len", -1), ("max_new_tokens", True),
                                              ("priority", "high"), ("priority", None), ("priority", 1.5),
                                              ("queued_at", None), ("queued_at", "x"), ("queued_at", float("nan")),
                                              ("queued_at", -1.0)])
def test_plan_refuses_a_request_changed_after_validation_before_reserving(field: str, value: object) -> None:
    # pydantic does not re-validate assignments: such a request made plan raise half-way, after the
    # requests before it in the batch had been reserved (and stayed so). The admission order's keys
    # (priority, queued_at) were not checked at all: a str or None was "bad operand type for unary -"
    # or "'<' not supported", naming neither field nor request; NaN ordered the batch arbitrarily.
    bridge = SchedulerBridge(1024)
    bad = req("bad", 10, 6)
    setattr(bad, field, value)
    with pytest.raises(KVConfigInvalidError, match=f"{field}.*'bad'"):
        bridge.plan([req("a", 10, 6), bad])
    assert used(bridge) == 0 and len(bridge) == 0 and bridge.last_scheduled == []
    for field in ("prefix_fingerprint", "session_id"):  # a pinned handle was left behind for session_id
        odd = req("odd", 10, 6, prefix_fingerprint="fp")
        setattr(odd, field, ["x"])
        with pytest.raises(TypeError, match=f"{field} of request 'odd' must be a str or None, got list"):
            bridge.plan([req("a", 10, 6), odd])
        assert used(bridge) == 0 and len(bridge) == 0
    nothing = req("nothing", 0, 6)
    nothing.max_new_tokens = 0
    with pytest.raises(KVConfigInvalidError, match="'nothing' needs no KV"):
        bridge.plan([req("a", 10, 6), nothing])
    assert used(bridge) == 0 and len(bridge) == 0
    odd = req("odd", 10, 6)
    odd.device_affinity = 5  # type: ignore[assignment]
    with pytest.raises(TypeError, match="device_affinity of request 'odd' must be a str or None, got int"):
        bridge.plan([odd])
    assert len(bridge) == 0


def test_free_request_after_the_manager_dropped_its_handle_keeps_the_books() -> None:
    # The reservation was popped before manager.unpin raised, so the device's request count (the
    # load figures placement reads) stayed 1 for good.
    bridge = SchedulerBridge(1024, devices=["cuda:0", "cuda:1"])
    handle = bridge.allocate_request("gone", 100, device="cuda:1")
    bridge.manager.unpin(handle)
    bridge.manager.free(handle)
    with pytest.raises(KVRequestNotFoundError, match="gone"):
        bridge.free_request("gone")
    metrics = bridge.get_stats()["load_metrics"]["cuda:1"]
    assert len(bridge) == 0 and metrics["active_requests"] == 0 and metrics["kv_tokens_used"] == 0
    bridge.allocate_request("gone", 100, device="cuda:1")  # the id is free again
    # Pinned once more by someone else: refused with nothing changed; freed once they unpin.
    again = bridge.get_request_handle("gone")
    bridge.manager.pin(again)
    with pytest.raises(KVHandlePinnedError):
        bridge.free_request("gone")
    assert len(bridge) == 1 and used(bridge) == 100 and again.pin_count == 2
    bridge.manager.unpin(again)
    bridge.free_request("gone")
    assert len(bridge) == 0 and used(bridge) == 0
    assert bridge.get_stats()["load_metrics"]["cuda:1"]["active_requests"] == 0


def test_plan_takes_any_iterable_of_requests() -> None:
    # The original planned dict.values() (it has a length); here it was "requests must be a
    # sequence of SchedulerRequest, got dict_values". A generator is read once.
    bridge = SchedulerBridge(1000)
    queue = {"a": req("a", 10, 6), "b": req("b", 10, 6)}
    plan = bridge.plan(queue.values())
    assert plan.batch_size == 2 and plan.requests == list(queue.values()) and sorted(plan.placement) == ["a", "b"]
    plan = bridge.plan(r for r in [req("c", 10, 6)])
    assert plan.requests[0].request_id == "c" and list(plan.placement) == ["c"] and len(bridge) == 3
    for bad in (queue, "abc", 5):
        with pytest.raises(TypeError, match="requests must be a sequence of SchedulerRequest"):
            bridge.plan(bad)  # type: ignore[arg-type]
    assert len(bridge) == 3


def test_plan_refuses_an_id_that_free_request_refuses() -> None:
    # An empty id cannot be freed (free_request refuses it), so plan must not reserve KV for it.
    bridge = SchedulerBridge(1024)
    with pytest.raises(KVConfigInvalidError, match=r"request_id.*''.*empty"):
        bridge.plan([req("x"), req("")])
    assert used(bridge) == 0 and len(bridge) == 0 and bridge.last_scheduled == []


def test_prefix_reuse_by_fingerprint() -> None:
    bridge = SchedulerBridge(2048)
    first = bridge.plan([req("a", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    assert bridge.last_scheduled[0].prefix_hit_len == 0 and first.total_kv_tokens == 320
    second = bridge.plan([req("b", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256),
                          req("c", 280, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    assert [r.prefix_hit_len for r in bridge.last_scheduled] == [256, 256]
    assert second.total_kv_tokens == 64 + 44
    assert used(bridge) == 320 + 64 + 44
    stats = bridge.get_stats()["pool"]
    assert stats["num_handles"] == 4  # the shared prefix plus three requests' own tokens
    for rid in ("a", "b", "c"):
        bridge.free_request(rid)
    # The prefix stays cached (unpinned) after its users finish; a later request reuses it.
    assert used(bridge) == 256 and bridge.get_stats()["pool"]["pinned_tokens"] == 0
    later = bridge.plan([req("d", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    assert bridge.last_scheduled[0].prefix_hit_len == 256 and later.total_kv_tokens == 64


def test_fingerprint_without_hit_len_covers_the_prompt_but_leaves_one_token() -> None:
    bridge = SchedulerBridge(1024)
    bridge.plan([req("a", 64, 16, prefix_fingerprint="doc")])
    plan = bridge.plan([req("b", 64, 16, prefix_fingerprint="doc"),
                        req("c", 64, 1, kv_tokens_required=64, prefix_fingerprint="doc")])
    assert [r.prefix_hit_len for r in bridge.last_scheduled] == [64, 63]
    assert plan.total_kv_tokens == 16 + 1


def test_prefix_cache_disabled() -> None:
    bridge = SchedulerBridge(2048, enable_prefix_cache=False)
    bridge.plan([req("a", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    plan = bridge.plan([req("b", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    assert bridge.last_scheduled[0].prefix_hit_len == 0 and plan.total_kv_tokens == 320
    assert bridge.get_stats()["pool"]["num_handles"] == 2


def test_cold_prefixes_are_evicted_under_pressure() -> None:
    bridge = SchedulerBridge(512)
    bridge.plan([req("a", 256, 64, prefix_fingerprint="old", prefix_hit_len=256)])
    bridge.free_request("a")
    assert used(bridge) == 256  # the cached prefix
    plan = bridge.plan([req("b", 400, 112)])  # needs the whole budget: the cold prefix must go
    assert list(plan.placement) == ["b"] and used(bridge) == 512
    assert bridge.get_stats()["pool"]["evicted_handles"] == 1
    bridge.free_request("b")
    recomputed = bridge.plan([req("c", 256, 64, prefix_fingerprint="old", prefix_hit_len=256)])
    assert bridge.last_scheduled[0].prefix_hit_len == 0 and recomputed.total_kv_tokens == 320


def test_prefix_in_use_is_not_evicted_and_request_is_deferred() -> None:
    bridge = SchedulerBridge(512)
    bridge.plan([req("a", 256, 64, prefix_fingerprint="hot", prefix_hit_len=256)])
    plan = bridge.plan([req("b", 150, 42)])
    assert list(plan.placement) == ["b"]  # 320 + 192 = 512
    deferred = bridge.plan([req("c", 256, 64, prefix_fingerprint="hot", prefix_hit_len=256)])
    assert deferred.placement == {} and bridge.last_scheduled == [] and bridge.last_deferred == ["c"]
    assert bridge.get_stats()["pool"]["evicted_handles"] == 0 and used(bridge) == 512


def test_never_half_allocated_when_the_second_handle_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge = SchedulerBridge(1024)
    manager = bridge.manager
    real_alloc = manager.alloc
    calls = {"n": 0}

    def flaky_alloc(num_tokens: int, *args: Any, **kwargs: Any) -> KVHandle:
        calls["n"] += 1
        if calls["n"] == 2:  # the request's own tokens, after its prefix was allocated
            raise KVBudgetExceededError(num_tokens, 0)
        return real_alloc(num_tokens, *args, **kwargs)

    monkeypatch.setattr(manager, "alloc", flaky_alloc)
    plan = bridge.plan([req("a", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    assert plan.placement == {} and bridge.last_deferred == ["a"]
    assert used(bridge) == 0 and len(manager) == 0 and len(bridge) == 0
    monkeypatch.setattr(manager, "alloc", real_alloc)
    retry = bridge.plan([req("a", 300, 20, prefix_fingerprint="sys", prefix_hit_len=256)])
    assert list(retry.placement) == ["a"] and bridge.last_scheduled[0].prefix_hit_len == 0


# --- placement -----------------------------------------------------------------------------------


def test_load_aware_placement_spreads_and_tracks_usage() -> None:
    bridge = SchedulerBridge(4096, devices=["cuda:0", "cuda:1"], enable_load_awareness=True)
    plan = bridge.plan([req(f"r{i}", 100, 28) for i in range(4)])
    assert sorted(plan.placement.values()) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    metrics = bridge.get_stats()["load_metrics"]
    assert metrics["cuda:0"]["kv_tokens_used"] == metrics["cuda:1"]["kv_tokens_used"] == 256
    assert metrics["cuda:0"]["active_requests"] == 2
    assert bridge.get_stats()["placement"]["total_placements"] == 4
    on_zero = [rid for rid, device in plan.placement.items() if device == "cuda:0"]
    for rid in on_zero:
        bridge.free_request(rid)
    nxt = bridge.plan([req("n", 100, 28)])
    assert nxt.placement == {"n": "cuda:0"}  # the emptier device


def test_least_requests_strategy_and_affinity() -> None:
    bridge = SchedulerBridge(4096, devices=["cuda:0", "cuda:1", "cuda:2"], enable_load_awareness=True,
                             placement_strategy=PlacementStrategy.LEAST_REQUESTS)
    bridge.allocate_request("pinned", 1000, device="cuda:0")
    plan = bridge.plan([req("x", 10, 6), req("y", 10, 6, device_affinity="cuda:0"), req("z", 10, 6)])
    assert plan.placement == {"x": "cuda:1", "y": "cuda:0", "z": "cuda:2"}


def test_without_load_awareness_first_device_or_affinity() -> None:
    bridge = SchedulerBridge(4096, devices=["cuda:0", "cuda:1"])
    plan = bridge.plan([req("a"), req("b", device_affinity="cuda:1"), req("c", device_affinity="cuda:9")])
    assert plan.placement == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:0"}


def test_affinity_is_read_in_the_devices_spelling() -> None:
    """device_affinity "cuda" was compared as given with the bridge's "cuda:0" and silently ignored."""
    for aware in (False, True):
        bridge = SchedulerBridge(4096, devices=["cuda:1", "cuda:0"], enable_load_awareness=aware)
        plan = bridge.plan([req("a", 10, 6, device_affinity="cuda")])
        assert plan.placement == {"a": "cuda:0"}
        assert plan.requests[0].device_affinity == "cuda"  # the caller's request is not changed


def test_a_bridge_over_npu_devices() -> None:
    """An Ascend engine's devices ('npu:0', as str(param.device) spells them) were refused as an
    unknown device type; the original takes any label."""
    bridge = SchedulerBridge(4096, devices=["npu:0", "npu:1"])
    assert bridge.allocate_request("r", 10, device="npu:1").device == "npu:1"
    plan = bridge.plan([req("a", 10, 6), req("b", 10, 6, device_affinity="npu:1"),
                        req("c", 10, 6, device_affinity="npu")])
    assert plan.placement == {"a": "npu:0", "b": "npu:1", "c": "npu:0"}
    with pytest.raises(KVConfigInvalidError, match="not one of this bridge's devices"):
        bridge.allocate_request("d", 10, device="cuda:0")


@pytest.mark.parametrize("label", ["cuda:00", "CUDA:0", "cuda:", "gpu0", " cuda:0"])
def test_a_bad_affinity_label_is_refused_naming_the_request(label: str) -> None:
    bridge = SchedulerBridge(4096, devices=["cuda:0", "cuda:1"])
    with pytest.raises(KVConfigInvalidError, match=r"device_affinity.*request 'bad'") as info:
        bridge.plan([req("a", 10, 6), req("bad", 10, 6, device_affinity=label)])
    assert info.value.value == label
    assert used(bridge) == 0 and len(bridge) == 0 and bridge.last_scheduled == []


def test_requests_sharing_a_prefix_follow_it_to_its_device() -> None:
    bridge = SchedulerBridge(4096, devices=["cuda:0", "cuda:1"], enable_load_awareness=True)
    plan = bridge.plan([req(f"r{i}", 100, 28, prefix_fingerprint="sys", prefix_hit_len=64) for i in range(3)]
                       + [req("other", 100, 28)])
    devices = {plan.placement[f"r{i}"] for i in range(3)}
    assert len(devices) == 1 and plan.placement["other"] not in devices


def test_reset() -> None:
    bridge = SchedulerBridge(1024, devices=["cuda:0", "cuda:1"], enable_load_awareness=True)
    bridge.plan([req("a", prefix_fingerprint="p", prefix_hit_len=32), req("b")])
    bridge.reset()
    stats = bridge.get_stats()
    assert stats["num_requests"] == 0 and stats["pool"]["used_tokens"] == 0
    assert stats["placement"]["total_placements"] == 0
    assert all(m["kv_tokens_used"] == 0 for m in stats["load_metrics"].values())
    bridge.plan([req("a", prefix_fingerprint="p", prefix_hit_len=32)])
    assert bridge.last_scheduled[0].prefix_hit_len == 0


def test_a_reset_of_the_manager_underneath_is_noticed() -> None:
    # bridge.manager.reset() dropped every handle while the bridge still counted its reservations:
    # it reported them, refused to plan their ids again ("already has KV") and freed handles that
    # no longer existed.
    bridge = SchedulerBridge(1024, devices=["cuda:0", "cuda:1"], enable_load_awareness=True)
    bridge.plan([req("a", prefix_fingerprint="p", prefix_hit_len=32), req("b")])
    bridge.allocate_request("c", 50, device="cuda:1")
    assert len(bridge) == 3
    generation = bridge.manager.generation
    bridge.manager.reset()
    assert bridge.manager.generation == generation + 1
    assert len(bridge) == 0 and bridge._request_handles == {}
    stats = bridge.get_stats()
    assert stats["num_requests"] == 0 and stats["pool"]["used_tokens"] == 0
    assert all(m["kv_tokens_used"] == 0 and m["active_requests"] == 0 for m in stats["load_metrics"].values())
    for rid in ("a", "b", "c"):
        with pytest.raises(KVRequestNotFoundError):
            bridge.get_request_handle(rid)
        with pytest.raises(KVRequestNotFoundError):
            bridge.free_request(rid)
    # The same ids plan again; the dropped prefix is computed anew, not claimed as reused.
    plan = bridge.plan([req("a", prefix_fingerprint="p", prefix_hit_len=32), req("b")])
    assert set(plan.placement) == {"a", "b"} and bridge.last_scheduled[0].prefix_hit_len == 0
    assert used(bridge) == 128 + 128 and len(bridge) == 2
    bridge.free_request("a")
    bridge.free_request("b")
    assert used(bridge) == 32  # the cached prefix, unpinned
    assert all(m["active_requests"] == 0 for m in bridge.get_stats()["load_metrics"].values())


def test_a_reset_of_the_pool_two_levels_down_is_noticed() -> None:
    # bridge.manager.pool.reset(): the manager notices at the bridge's next call (its generation
    # moves), so the bridge forgets the reservations whose handles went.
    bridge = SchedulerBridge(1024, devices=["cuda:0", "cuda:1"], enable_load_awareness=True)
    bridge.plan([req("a", prefix_fingerprint="p", prefix_hit_len=32), req("b")])
    assert len(bridge) == 2
    bridge.manager.pool.reset()
    assert len(bridge) == 0 and bridge._request_handles == {}
    stats = bridge.get_stats()
    assert stats["num_requests"] == 0 and stats["pool"]["used_tokens"] == 0
    assert all(m["kv_tokens_used"] == 0 and m["active_requests"] == 0 for m in stats["load_metrics"].values())
    with pytest.raises(KVRequestNotFoundError):
        bridge.free_request("a")
    plan = bridge.plan([req("a", prefix_fingerprint="p", prefix_hit_len=32)])
    assert set(plan.placement) == {"a"} and bridge.last_scheduled[0].prefix_hit_len == 0
    bridge.free_request("a")
    assert used(bridge) == 32  # the new prefix, cached


def test_reservations_made_after_a_manager_reset_are_kept() -> None:
    bridge = SchedulerBridge(1024)
    bridge.allocate_request("old", 100)
    bridge.manager.reset()
    # The manager now holds a handle the bridge does not know (as one racing the reset would).
    bridge.manager.alloc(16)
    handle = bridge.allocate_request("new", 100)  # the first call after the reset catches up
    assert bridge._request_handles == {"new": handle} and len(bridge) == 1
    assert bridge.get_stats()["load_metrics"]["cuda:0"]["active_requests"] == 1


# --- property: random plan/free sequences keep the books straight -----------------------------------

_request = st.builds(
    lambda i, prompt, new, fp, prio: req(f"q{i}", prompt, new, prefix_fingerprint=fp, prefix_hit_len=prompt // 2,
                                         priority=prio),
    st.integers(0, 11), st.integers(1, 200), st.integers(1, 64),
    st.sampled_from([None, None, "a", "b"]), st.integers(0, 2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.lists(_request, max_size=5), st.integers(0, 11)), max_size=25))
def test_random_plans_and_frees_keep_budget_and_books(steps: list[Any]) -> None:
    bridge = SchedulerBridge(512, devices=["cuda:0", "cuda:1"], enable_load_awareness=True)
    active: set[str] = set()
    for step in steps:
        if isinstance(step, int):
            rid = f"q{step}"
            if rid in active:
                bridge.free_request(rid)
                active.discard(rid)
            else:
                with pytest.raises(KVRequestNotFoundError):
                    bridge.free_request(rid)
            continue
        unique = {r.request_id: r for r in step if r.request_id not in active}
        plan = bridge.plan(list(unique.values()))
        admitted = {r.request_id for r in bridge.last_scheduled}
        assert set(plan.placement) == admitted and plan.batch_size == len(unique)
        assert admitted | set(bridge.last_deferred) == set(unique) and not admitted & set(bridge.last_deferred)
        active |= admitted
        stats = bridge.get_stats()
        pool = stats["pool"]
        assert pool["used_tokens"] <= 512 and stats["num_requests"] == len(active)
        # every admitted request's own tokens are pinned; only cached prefixes may be unpinned
        own = sum(bridge.get_request_handle(rid).num_tokens for rid in active)
        assert own <= pool["pinned_tokens"] <= pool["used_tokens"]
        load = stats["load_metrics"]
        assert sum(m["kv_tokens_used"] for m in load.values()) == pool["used_tokens"]
        assert sum(m["active_requests"] for m in load.values()) == len(active)


def test_engine_contract_truthy_request_handles_and_plan_memory() -> None:
    # What the sageLLM engine's scheduler reads (isagellm-core 0.5.4.x): `if bridge:` on an empty
    # bridge, `bridge._request_handles[rid]._blocks`, `plan.total_memory_mb` and `plan.placement`.
    bridge = SchedulerBridge(max_tokens=192, block_size=16)
    assert bool(bridge) and len(bridge) == 0 and bridge.kv_pool is bridge.manager.pool
    plan = bridge.plan([req("a", prompt=6, new=100), req("b", prompt=39, new=100)])
    assert list(plan.placement) == ["a"] and bridge.last_deferred == ["b"]
    assert plan.total_kv_tokens == 106 and plan.total_memory_mb == pytest.approx(106 * 4 / 2**20)
    handles = bridge._request_handles
    assert list(handles) == ["a"] and handles["a"] is bridge.get_request_handle("a")
    table = [b.block_id for b in handles["a"]._blocks]
    assert table == handles["a"].block_ids.tolist() and len(table) == 7
    assert all(isinstance(b, int) for b in table)
    metrics = bridge.get_stats()["load_metrics"]["cuda:0"]
    assert metrics["memory_capacity_mb"] == pytest.approx(192 * 4 / 2**20)
    assert metrics["memory_used_mb"] == pytest.approx(106 * 4 / 2**20)
    bridge.free_request("a")
    assert bridge._request_handles == {} and bool(bridge)
    assert SchedulerBridge(max_tokens=64, bytes_per_token=32).plan([req("c", 10, 6)]).total_memory_mb == (
        pytest.approx(16 * 32 / 2**20))
