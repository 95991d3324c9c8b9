"""DeviceLoadMetrics, LoadMetricsCollector and LoadAwareScheduler."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from sagellm_kv_cache.load_aware_scheduler import LoadAwareScheduler, PlacementStrategy
from sagellm_kv_cache.load_metrics import DeviceLoadMetrics, LoadMetricsCollector
from sagellm_protocol.kv import RequestType, SchedulerRequest

# --- DeviceLoadMetrics -------------------------------------------------------------------------


def test_create_and_derived_numbers() -> None:
    m = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=1000, memory_capacity_mb=2048.0)
    assert m.updated_at > 0
    m.update_kv_usage(250)
    m.update_request_count(active=3, queued=2)
    m.update_memory_usage(1024.0)
    m.update_wait_time(avg_ms=5.0, max_ms=20.0)
    assert m.kv_utilization() == 0.25
    assert m.memory_utilization() == 0.5
    assert m.total_requests() == 5
    assert m.available_kv_tokens() == 750
    assert not m.is_overloaded()
    assert m.is_overloaded(kv_threshold=0.2)
    assert m.is_overloaded(memory_threshold=0.5)
    data = m.to_dict()
    assert data["device"] == "cuda:0" and data["kv_utilization"] == 0.25 and data["available_kv_tokens"] == 750


def test_unknown_capacity_reads_zero_utilization() -> None:
    m = DeviceLoadMetrics.create("cpu")
    m.update_kv_usage(10)
    assert m.kv_utilization() == 0.0 and m.memory_utilization() == 0.0 and m.available_kv_tokens() == 0


def test_over_commit_is_reported_not_hidden() -> None:
    m = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=100)
    m.update_kv_usage(150)
    assert m.kv_utilization() == 1.5 and m.available_kv_tokens() == 0 and m.is_overloaded()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m: m.update_kv_usage(-1), ValueError),
        (lambda m: m.update_kv_usage(1.5), TypeError),
        (lambda m: m.update_request_count(1, -1), ValueError),
        (lambda m: m.update_memory_usage(float("nan")), ValueError),
        (lambda m: m.update_wait_time(10.0, 5.0), ValueError),
        (lambda m: m.update_wait_time(1.0, "2"), TypeError),
    ],
)
def test_bad_updates_change_nothing(call: Any, error: type[Exception]) -> None:
    m = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=100)
    m.update_request_count(4, 4)
    before = m.model_dump()
    with pytest.raises(error):
        call(m)
    assert m.model_dump() == before


def test_numpy_numbers_are_accepted() -> None:
    # The original took numpy numbers (usage read from numpy arrays); an int64 count was a
    # TypeError ("must be an int, got int64") and a float32 amount one too.
    c = collector_with(("cuda:0", 100), ("cuda:1", 100))
    c.register_device("cuda:1", kv_tokens_capacity=np.int64(200), memory_capacity_mb=np.float32(500.0))
    c.update_kv_usage("cuda:0", np.int64(90))
    c.update_request_count("cuda:0", np.int32(3), np.uint8(1))
    c.update_memory_usage("cuda:0", np.float32(12.5))
    c.update_wait_time("cuda:0", np.float64(1.0), np.int64(2))
    m = c.get_metrics("cuda:0")
    assert (m.kv_tokens_used, m.active_requests, m.queue_length, m.memory_used_mb) == (90, 3, 1, 12.5)
    assert type(m.kv_tokens_used) is int and c.get_metrics("cuda:1").kv_tokens_capacity == 200
    s = LoadAwareScheduler(c)
    assert s.select_device(["cuda:0", "cuda:1"], np.int64(20)) == "cuda:1"
    with pytest.raises(TypeError, match="kv_tokens_used"):
        c.update_kv_usage("cuda:0", np.bool_(True))
    with pytest.raises(ValueError, match="kv_tokens_required"):
        s.select_device(["cuda:0"], np.int64(-1))
    assert c.get_metrics("cuda:0").kv_tokens_used == 90 and s.get_placement_stats()["total_placements"] == 1


def test_field_validation() -> None:
    with pytest.raises(ValidationError):
        DeviceLoadMetrics(device="x", active_requests=-1)
    with pytest.raises(ValueError, match="device"):
        DeviceLoadMetrics.create("")
    # inf / inf was a NaN utilization, and is_overloaded() False for an infinitely used device.
    with pytest.raises(ValidationError, match="memory_used_mb"):
        DeviceLoadMetrics(device="x", memory_used_mb=float("inf"), memory_capacity_mb=float("inf"))
    m = DeviceLoadMetrics(device="x", memory_capacity_mb=10.0)
    with pytest.raises(ValidationError, match="avg_wait_time_ms"):
        m.avg_wait_time_ms = float("inf")
    assert m.avg_wait_time_ms == 0.0 and m.memory_utilization() == 0.0


# --- LoadMetricsCollector ----------------------------------------------------------------------


def collector_with(*devices: tuple[str, int]) -> LoadMetricsCollector:
    c = LoadMetricsCollector()
    for device, capacity in devices:
        c.register_device(device, kv_tokens_capacity=capacity, memory_capacity_mb=1000.0)
    return c


def test_collector_registry() -> None:
    c = collector_with(("cuda:0", 1000), ("cuda:1", 2000))
    assert c.list_devices() == ["cuda:0", "cuda:1"]
    assert len(c) == 2 and "cuda:1" in c
    c.update_kv_usage("cuda:0", 500)
    c.update_request_count("cuda:0", 2, 1)
    c.update_memory_usage("cuda:0", 100.0)
    c.update_wait_time("cuda:0", 1.0, 2.0)
    m = c.get_metrics("cuda:0")
    assert (m.kv_tokens_used, m.total_requests(), m.memory_used_mb, m.max_wait_time_ms) == (500, 3, 100.0, 2.0)
    m.kv_tokens_used = 0  # a copy: the collector is unaffected
    assert c.get_metrics("cuda:0").kv_tokens_used == 500
    assert set(c.get_all_metrics()) == {"cuda:0", "cuda:1"}


def test_re_register_updates_capacity_and_keeps_usage() -> None:
    c = collector_with(("cuda:0", 1000))
    c.update_kv_usage("cuda:0", 400)
    c.register_device("cuda:0", kv_tokens_capacity=4000)
    m = c.get_metrics("cuda:0")
    assert (m.kv_tokens_capacity, m.kv_tokens_used) == (4000, 400)


def test_unknown_device_is_key_error_naming_it() -> None:
    c = collector_with(("cuda:0", 1000))
    for call in (
        lambda: c.get_metrics("cuda:9"),
        lambda: c.update_kv_usage("cuda:9", 1),
    ):
        with pytest.raises(KeyError, match="Device cuda:9 not registered"):
            call()
    c.unregister_device("cuda:9")  # unknown: ignored, as in the seed
    assert c.list_devices() == ["cuda:0"]


def test_unregistered_candidates_are_skipped() -> None:
    s = LoadAwareScheduler(loaded_cluster())
    assert s.select_device(["cuda:7", "cuda:2"]) == "cuda:2"
    assert s.get_placement_stats()["per_device"] == {"cuda:2": 1}


def test_unregister_and_reset() -> None:
    c = collector_with(("cuda:0", 1000), ("cuda:1", 1000))
    c.update_kv_usage("cuda:1", 999)
    c.unregister_device("cuda:0")
    assert c.list_devices() == ["cuda:1"]
    c.reset()
    m = c.get_metrics("cuda:1")
    assert (m.kv_tokens_used, m.kv_tokens_capacity) == (0, 1000)


def test_collector_bad_update_changes_nothing() -> None:
    c = collector_with(("cuda:0", 1000))
    c.update_request_count("cuda:0", 2, 2)
    with pytest.raises(ValueError):
        c.update_request_count("cuda:0", 5, -1)
    assert c.get_metrics("cuda:0").total_requests() == 4


def test_concurrent_updates() -> None:
    c = collector_with(*[(f"cuda:{i}", 1000) for i in range(4)])

    def work(i: int) -> None:
        for n in range(500):
            c.update_kv_usage(f"cuda:{i % 4}", n)
            c.get_all_metrics()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(m.kv_tokens_used == 499 for m in c.get_all_metrics().values())


# --- LoadAwareScheduler ------------------------------------------------------------------------


def loaded_cluster() -> LoadMetricsCollector:
    c = collector_with(("cuda:0", 1000), ("cuda:1", 1000), ("cuda:2", 1000))
    c.update_kv_usage("cuda:0", 800)
    c.update_request_count("cuda:0", 1, 0)
    c.update_kv_usage("cuda:1", 300)
    c.update_request_count("cuda:1", 6, 4)
    c.update_kv_usage("cuda:2", 500)
    c.update_request_count("cuda:2", 2, 0)
    return c


DEVICES = ["cuda:0", "cuda:1", "cuda:2"]


def test_strategy_values() -> None:
    assert PlacementStrategy.LOWEST_KV.value == "lowest_kv"
    assert {s.value for s in PlacementStrategy} == {"lowest_kv", "least_requests", "round_robin", "balanced",
                                                    "shortest_queue", "best_fit"}
    assert {"ROUND_ROBIN", "LOWEST_KV", "SHORTEST_QUEUE", "BEST_FIT"} <= set(PlacementStrategy.__members__)  # seed


def test_seed_strategies_shortest_queue_and_best_fit() -> None:
    c = LoadMetricsCollector()
    for device in ("a", "b"):
        c.register_device(device, kv_tokens_capacity=1000)
    c.update_request_count("a", 5, 2)
    c.update_request_count("b", 1, 2)  # same queue, fewer running
    assert LoadAwareScheduler(c, PlacementStrategy.SHORTEST_QUEUE).select_device(["a", "b"]) == "b"
    assert LoadAwareScheduler(c, PlacementStrategy.BEST_FIT).select_device(["a", "b"]) == "b"
    c.update_request_count("a", 9, 0)
    assert LoadAwareScheduler(c, PlacementStrategy.SHORTEST_QUEUE).select_device(["a", "b"]) == "a"


def test_lowest_kv() -> None:
    s = LoadAwareScheduler(loaded_cluster())
    assert s.is_enabled()
    assert s.select_device(DEVICES) == "cuda:1"


def test_least_requests() -> None:
    s = LoadAwareScheduler(loaded_cluster(), PlacementStrategy.LEAST_REQUESTS)
    assert s.select_device(DEVICES) == "cuda:0"


def test_balanced_weighs_kv_and_requests() -> None:
    s = LoadAwareScheduler(loaded_cluster(), PlacementStrategy.BALANCED)
    # cuda:0: .5*.8 + .3*.1 = .43; cuda:1: .5*.3 + .3*1 = .45; cuda:2: .5*.5 + .3*.2 = .31
    assert s.select_device(DEVICES) == "cuda:2"


def test_round_robin_rotates_over_devices_with_room() -> None:
    s = LoadAwareScheduler(loaded_cluster(), PlacementStrategy.ROUND_ROBIN)
    picks = [s.select_device(DEVICES, kv_tokens_required=300) for _ in range(4)]
    assert picks == ["cuda:1", "cuda:2", "cuda:1", "cuda:2"]  # cuda:0 has only 200 tokens free


def test_devices_without_room_are_skipped() -> None:
    s = LoadAwareScheduler(loaded_cluster(), PlacementStrategy.LEAST_REQUESTS)
    assert s.select_device(DEVICES, kv_tokens_required=400) == "cuda:2"


def test_overloaded_devices_are_avoided() -> None:
    c = loaded_cluster()
    c.update_kv_usage("cuda:0", 10)
    c.update_memory_usage("cuda:0", 950.0)  # memory above the 0.9 threshold
    s = LoadAwareScheduler(c)
    assert s.select_device(DEVICES) == "cuda:1"


def test_fallback_when_nothing_has_room_is_counted() -> None:
    s = LoadAwareScheduler(loaded_cluster())
    assert s.select_device(DEVICES, kv_tokens_required=5000) == "cuda:1"
    stats = s.get_placement_stats()
    assert stats["fallback_placements"] == 1 and stats["total_placements"] == 1


def test_disabled_awareness_picks_first_candidate() -> None:
    s = LoadAwareScheduler(LoadMetricsCollector(), enable_load_awareness=False)
    assert not s.is_enabled()
    assert s.select_device(["cuda:3", "cuda:0"], kv_tokens_required=10**9) == "cuda:3"


def test_placement_stats_and_reset() -> None:
    s = LoadAwareScheduler(loaded_cluster())
    for _ in range(3):
        s.select_device(DEVICES)
    s.select_device(["cuda:2"])
    assert s.get_placement_stats() == {
        "total_placements": 4,
        "per_device": {"cuda:1": 3, "cuda:2": 1},
        "fallback_placements": 0,
    }
    s.reset_stats()
    assert s.get_placement_stats() == {"total_placements": 0, "per_device": {}, "fallback_placements": 0}


def request(**overrides: Any) -> SchedulerRequest:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "trace_id": "t1",
        "request_type": RequestType.PREFILL,
        "prompt_len": 200,
        "max_new_tokens": 100,
    }
    fields.update(overrides)
    return SchedulerRequest(**fields)


def test_select_for_request_uses_prompt_plus_new_tokens() -> None:
    s = LoadAwareScheduler(loaded_cluster(), PlacementStrategy.LEAST_REQUESTS)
    # needs 300 tokens: cuda:0 (200 free) cannot take it
    assert s.select_device_for_request(request()) == "cuda:2"
    assert s.select_device_for_request(request(kv_tokens_required=100)) == "cuda:0"


def test_select_for_request_honours_affinity_with_room() -> None:
    s = LoadAwareScheduler(loaded_cluster())
    assert s.select_device_for_request(request(device_affinity="cuda:2")) == "cuda:2"
    # no room on cuda:0 for 300 tokens: affinity yields to normal placement
    assert s.select_device_for_request(request(device_affinity="cuda:0")) == "cuda:1"
    assert s.select_device_for_request(request(), candidate_devices=["cuda:0", "cuda:2"]) == "cuda:2"


def test_select_for_request_checks_candidates_before_affinity() -> None:
    """The affinity shortcut ran before the candidates were checked: a str was searched as a substring
    ("cuda:2,cuda:1" placed on cuda:2) and a list holding a non-name was accepted, both counted."""
    s = LoadAwareScheduler(loaded_cluster())
    with pytest.raises(TypeError, match="list of device names"):
        s.select_device_for_request(request(device_affinity="cuda:2"), candidate_devices="cuda:2,cuda:1")
    with pytest.raises(TypeError, match=r"candidate_devices\[1\] must be a non-empty str, got 5"):
        s.select_device_for_request(request(device_affinity="cuda:2"), candidate_devices=["cuda:2", 5])
    with pytest.raises(ValueError, match="No candidate devices provided"):
        s.select_device_for_request(request(device_affinity="cuda:2"), candidate_devices=[])
    assert s.get_placement_stats()["total_placements"] == 0


def test_select_for_request_without_devices() -> None:
    s = LoadAwareScheduler(LoadMetricsCollector())
    with pytest.raises(ValueError, match="no candidate devices"):
        s.select_device_for_request(request())
    with pytest.raises(TypeError, match="SchedulerRequest"):
        s.select_device_for_request({"request_id": "x"})


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([],), ValueError, "No candidate devices provided"),
        (("cuda:0",), TypeError, "list of device names"),
        ((["cuda:0", 3],), TypeError, r"candidate_devices\[1\]"),
        ((["cuda:0"], -1), ValueError, "kv_tokens_required"),
        ((["cuda:0"], 1.5), TypeError, "kv_tokens_required"),
        ((["cuda:7", "cuda:8"],), RuntimeError, r"No suitable device found among \['cuda:7', 'cuda:8'\]"),
    ],
)
def test_bad_selection_input_changes_no_stats(args: tuple[Any, ...], error: type[Exception], match: str) -> None:
    s = LoadAwareScheduler(loaded_cluster())
    with pytest.raises(error, match=match):
        s.select_device(*args)
    assert s.get_placement_stats()["total_placements"] == 0


def test_candidates_may_be_any_iterable_of_names() -> None:
    # The original took a generator and dict.keys(); both were "must be a list of device names".
    s = LoadAwareScheduler(loaded_cluster(), PlacementStrategy.ROUND_ROBIN)
    first = s.select_device(d for d in ["cuda:0", "cuda:1"])
    second = s.select_device({"cuda:0": 1, "cuda:1": 2}.keys())
    assert {first, second} == {"cuda:0", "cuda:1"}
    assert s.select_device_for_request(request(), iter(["cuda:1"])) == "cuda:1"
    for bad in ({"cuda:0": 1}, "cuda:0", 3):
        with pytest.raises(TypeError, match="list of device names"):
            s.select_device(bad)  # type: ignore[arg-type]
    assert s.get_placement_stats()["total_placements"] == 3


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="LoadMetricsCollector"):
        LoadAwareScheduler({})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement strategy"):
        LoadAwareScheduler(LoadMetricsCollector(), "fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_threshold"):
        LoadAwareScheduler(LoadMetricsCollector(), kv_threshold=0.0)
    assert LoadAwareScheduler(LoadMetricsCollector(), "balanced").strategy is PlacementStrategy.BALANCED  # type: ignore[arg-type]


def test_seed_reprs() -> None:
    c = LoadMetricsCollector()
    assert repr(c) == "LoadMetricsCollector(devices=0)" and bool(c)
    c.register_device("cuda:0", kv_tokens_capacity=1000)
    c.update_kv_usage("cuda:0", 250)
    c.update_request_count("cuda:0", 3, 2)
    assert repr(c) == "LoadMetricsCollector(devices=1)"
    assert repr(c.get_metrics("cuda:0")) == "DeviceLoadMetrics(device=cuda:0, active=3, queued=2, kv_util=0.25)"


def test_seed_scheduler_repr() -> None:
    c = LoadMetricsCollector()
    c.register_device("cuda:0", kv_tokens_capacity=1000)
    s = LoadAwareScheduler(c)
    assert repr(s) == "LoadAwareScheduler(strategy=lowest_kv, enabled=True, placements=0)"
    s.select_device(["cuda:0"])
    assert repr(s) == "LoadAwareScheduler(strategy=lowest_kv, enabled=True, placements=1)"


def test_seed_enable_load_awareness_attribute() -> None:
    assert LoadAwareScheduler(LoadMetricsCollector(), enable_load_awareness=False).enable_load_awareness is False
    assert LoadAwareScheduler(LoadMetricsCollector()).enable_load_awareness is True
