"""The seed's prefix package: PrefixIndex (token trie), fingerprints, request grouping."""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np
import pytest
from sagellm_kv_cache.prefix import (
    CIPrefixGrouper,
    FingerprintComputer,
    FingerprintConfig,
    FingerprintStrategy,
    GroupingConfig,
    PrefixGrouper,
    PrefixIndex,
    Request,
    RequestGroup,
    SegmentedHashComputer,
    SimpleHashComputer,
)

# --- PrefixIndex ---------------------------------------------------------------------------------


def test_index_insert_get_longest_match() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    index.insert([1, 2, 3], "a")
    index.insert((1, 2), "b")
    index.insert([1, 2, 3, 4, 5], "c")
    index.insert([9], "a")
    assert len(index) == 4
    assert (index.get([1, 2]), index.get([1]), index.get((1, 2, 3))) == ("b", None, "a")
    assert index.longest_prefix_match([1, 2, 3, 4]) == ("a", 3)
    assert index.longest_prefix_match([1, 2, 3, 4, 5, 6]) == ("c", 5)
    assert index.longest_prefix_match([1]) == (None, 0)
    assert index.longest_prefix_match([]) == (None, 0)
    index.insert([1, 2], "b2")  # replaces
    assert len(index) == 4 and index.get([1, 2]) == "b2"


def test_index_remove_and_remove_value() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    for key, value in [([1, 2, 3], "a"), ([1, 2], "b"), ([1, 2, 3, 4, 5], "c"), ([9], "a")]:
        index.insert(key, value)
    assert index.remove([1, 2]) is True and index.remove([1, 2]) is False and index.remove([42]) is False
    assert len(index) == 3 and index.longest_prefix_match([1, 2, 3]) == ("a", 3)
    assert index.remove_value("a") == 2 and len(index) == 1 and index.get([9]) is None
    assert index.longest_prefix_match([1, 2, 3, 4, 5]) == ("c", 5)
    assert index.remove([1, 2, 3, 4, 5]) and len(index) == 0
    assert index._root.children == {}  # removed branches are pruned


def test_index_takes_any_iterable_of_token_ids() -> None:
    # The original took a generator or a range; here they were "must be a list or tuple of ints".
    index: PrefixIndex[str] = PrefixIndex()
    index.insert((t for t in [1, 2]), "x")
    assert index.get(iter([1, 2])) == "x" and index.longest_prefix_match(range(1, 4)) == ("x", 2)
    assert index.remove(iter([1, 2])) and len(index) == 0
    for bad in ("ab", b"ab", {1: 2}, {1, 2}, 5):
        with pytest.raises(TypeError, match="prefix tokens must be a list or tuple of ints"):
            index.insert(bad, "y")  # type: ignore[arg-type]
    assert len(index) == 0


def test_index_remove_value_that_cannot_be_compared_changes_nothing() -> None:
    # remove_value cleared the matches it met before a comparison raised, and len() kept counting them.
    index: PrefixIndex[object] = PrefixIndex()
    index.insert([1, 2], np.array([1, 2]))
    index.insert([1, 4], "v")  # met first: the walk visits later children first
    index.insert([7], "v")
    with pytest.raises(ValueError, match="truth value"):
        index.remove_value("v")
    assert len(index) == 3 and index.get([1, 4]) == "v" and index.get([7]) == "v"
    assert index.longest_prefix_match([1, 4, 5]) == ("v", 2)


def test_index_against_a_dict_model() -> None:
    rng = random.Random(7)
    index: PrefixIndex[int] = PrefixIndex()
    model: dict[tuple[int, ...], int] = {}
    for step in range(2000):
        key = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 6)))
        op = rng.random()
        if op < 0.5:
            index.insert(list(key), step % 5)
            model[key] = step % 5
        elif op < 0.8:
            assert index.remove(key) == (model.pop(key, None) is not None)
        else:
            value = step % 5
            gone = [k for k, v in model.items() if v == value]
            assert index.remove_value(value) == len(gone)
            for k in gone:
                del model[k]
        query = tuple(rng.randrange(3) for _ in range(6))
        best = max((k for k in model if query[: len(k)] == k), key=len, default=None)
        assert index.longest_prefix_match(query) == ((model[best], len(best)) if best else (None, 0))
        assert len(index) == len(model)


def test_index_bad_input_changes_nothing() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    index.insert([1], "x")
    with pytest.raises(ValueError, match="prefix_tokens must not be empty"):
        index.insert([], "root")
    for bad in (None, "abc", [1.5], [True]):
        with pytest.raises(TypeError):
            index.insert(bad, "y")  # type: ignore[arg-type]
    assert len(index) == 1


def test_index_takes_numpy_token_ids() -> None:
    # Token ids from a tokenizer are numpy integers; the original took them, here they were a
    # TypeError ("token 0 must be an int, got int64"). They are the same keys as Python ints.
    index: PrefixIndex[str] = PrefixIndex()
    index.insert([np.int64(1), np.int32(2)], "a")
    index.insert(np.array([1, 2, 3], dtype=np.uint32), "b")
    assert index.get([1, 2]) == "a" and index.longest_prefix_match(np.array([1, 2, 3, 4])) == ("b", 3)
    assert index.longest_prefix_match((1, np.int16(2), 9)) == ("a", 2)
    assert index.remove(np.array([1, 2, 3])) and len(index) == 1
    for bad in ([np.bool_(True)], [np.float64(1.0)], np.array([1.0, 2.0]), np.array([[1, 2]])):
        with pytest.raises(TypeError):
            index.insert(bad, "y")  # type: ignore[arg-type]
    assert len(index) == 1


# --- fingerprints --------------------------------------------------------------------------------


def fingerprint(strategy: FingerprintStrategy, tokens: list[int], **kw: int) -> bytes:
    return FingerprintComputer(FingerprintConfig(strategy=strategy, **kw)).compute(tokens)  # type: ignore[arg-type]


def test_simple_hash_covers_every_token() -> None:
    tokens = list(range(40))
    assert fingerprint(FingerprintStrategy.SIMPLE_HASH, tokens) != fingerprint(FingerprintStrategy.SIMPLE_HASH,
                                                                               tokens[:39])
    assert fingerprint(FingerprintStrategy.SIMPLE_HASH, []) == hashlib.sha256(b"").digest()
    assert SimpleHashComputer(FingerprintConfig()).compute([1, 2]) == FingerprintComputer().compute([1, 2])


@pytest.mark.parametrize("strategy", [FingerprintStrategy.SEGMENTED_HASH, FingerprintStrategy.WEIGHTED_HASH])
def test_segment_strategies_look_at_the_leading_segments_only(strategy: FingerprintStrategy) -> None:
    tokens = list(range(40))
    full = fingerprint(strategy, tokens, segment_size=4, max_segments=3)
    assert len(full) == 32
    assert full == fingerprint(strategy, tokens[:12] + [999] * 30, segment_size=4, max_segments=3)
    assert full != fingerprint(strategy, tokens[:11], segment_size=4, max_segments=3)
    assert full != fingerprint(strategy, [5, *tokens[1:]], segment_size=4, max_segments=3)
    assert fingerprint(strategy, [], segment_size=4, max_segments=3) == b""


def test_segmented_and_weighted_differ_and_adaptive_switches() -> None:
    tokens = list(range(40))
    seg = fingerprint(FingerprintStrategy.SEGMENTED_HASH, tokens)
    assert seg != fingerprint(FingerprintStrategy.WEIGHTED_HASH, tokens)
    assert fingerprint(FingerprintStrategy.ADAPTIVE_HASH, tokens) == seg  # 40 >= threshold 32
    short = tokens[:20]
    assert fingerprint(FingerprintStrategy.ADAPTIVE_HASH, short) == fingerprint(FingerprintStrategy.SIMPLE_HASH,
                                                                                short)
    assert SegmentedHashComputer(FingerprintConfig()).compute(tokens) == seg


def test_fingerprint_config_and_computer_surface() -> None:
    computer = FingerprintComputer(FingerprintConfig(strategy="segmented_hash", segment_size=4))  # type: ignore[arg-type]
    assert computer.config.strategy is FingerprintStrategy.SEGMENTED_HASH
    assert repr(computer) == "FingerprintComputer(strategy=segmented_hash)"
    assert computer.get_stats() == {"strategy": "segmented_hash", "segment_size": 4, "max_segments": 8}
    for kwargs, message in [({"segment_size": 0}, "segment_size must be positive, got 0"),
                            ({"max_segments": -1}, "max_segments must be positive"),
                            ({"weight_decay": 0.0}, r"weight_decay must be in \(0, 1\], got 0.0"),
                            ({"weight_decay": 1.5}, "weight_decay"), ({"adaptive_threshold": 0}, "adaptive_threshold"),
                            ({"strategy": "md5"}, "unknown fingerprint strategy")]:
        with pytest.raises(ValueError, match=message):
            FingerprintConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FingerprintComputer().compute([1.5, 2.5])  # type: ignore[list-item]


# --- grouping ------------------------------------------------------------------------------------


def test_request_group() -> None:
    now = time.time()
    group = RequestGroup(b"fp", created_at=now - 5)
    assert group.size() == 0 and group.get_queue_delay(now) == 0.0
    group.add_request(Request("x", [1], enqueue_time=now - 1))
    group.add_request(Request("y", [1], enqueue_time=now - 3))
    assert group.size() == 2 and group.get_queue_delay(now) == pytest.approx(3000.0)


def test_grouper_window_and_stats() -> None:
    grouper = PrefixGrouper(GroupingConfig(aggregation_window_ms=10, max_queue_delay_ms=50,
                                           fingerprint_config=FingerprintConfig(
                                               strategy=FingerprintStrategy.SEGMENTED_HASH, segment_size=4,
                                               max_segments=2)))
    assert repr(grouper) == "PrefixGrouper(active=True, groups=0, requests=0, hit_rate=0.00%)"
    shared = list(range(8))
    now = time.time()
    for i in range(3):
        grouper.add_request(Request(f"a{i}", [*shared, i], enqueue_time=now))
    grouper.add_request(Request("b", [7] * 8, enqueue_time=now))
    assert len(grouper) == 2
    assert grouper.get_ready_groups(current_time=now) == []
    ready = grouper.get_ready_groups(current_time=time.time() + 0.02)
    assert [[r.request_id for r in g.requests] for g in ready] == [["a0", "a1", "a2"], ["b"]]
    assert all(r.fingerprint == ready[0].fingerprint for r in ready[0].requests)
    stats = grouper.get_stats()
    assert stats == {
        "total_requests": 4, "total_groups": 2, "active_groups": 0, "total_timeouts": 0, "grouping_active": True,
        "prefix_group_size": 2.0, "prefix_group_hit_rate": 0.5, "extra_queue_delay_ms": pytest.approx(10.0),
        "aggregation_window_ms": 10, "max_queue_delay_ms": 50,
    }
    assert repr(grouper) == "PrefixGrouper(active=True, groups=0, requests=4, hit_rate=50.00%)"


def test_force_all_clear_and_disable() -> None:
    grouper = PrefixGrouper()
    grouper.add_request(Request("x", [1, 2]))
    grouper.add_request(Request("y", [1, 2]))
    assert [g.size() for g in grouper.get_ready_groups(force_all=True)] == [2]
    grouper.add_request(Request("z", [3]))
    grouper.clear()
    assert len(grouper) == 0 and grouper.get_stats()["total_requests"] == 3
    grouper.disable_grouping()
    assert not grouper.is_enabled() and not grouper.get_stats()["grouping_active"]
    with pytest.raises(ValueError, match="Grouping is disabled"):
        grouper.add_request(Request("w", [1]))
    assert grouper.get_stats()["total_requests"] == 3
    grouper.enable_grouping()
    grouper.add_request(Request("w", [1]))
    assert grouper.is_enabled() and len(grouper) == 1
    assert not PrefixGrouper(GroupingConfig(enable_grouping=False)).is_enabled()


def test_timeout_releases_early_and_auto_disables() -> None:
    grouper = PrefixGrouper(GroupingConfig(aggregation_window_ms=1000, max_queue_delay_ms=50))
    now = time.time()
    grouper.add_request(Request("old", [1, 2], enqueue_time=now - 1.0))
    ready = grouper.get_ready_groups(current_time=now)
    assert [g.requests[0].request_id for g in ready] == ["old"]
    stats = grouper.get_stats()
    assert stats["total_timeouts"] == 1 and stats["grouping_active"] is False and grouper.is_enabled()
    # inactive: every request goes out at once, alone
    grouper.add_request(Request("p", [1, 2]))
    grouper.add_request(Request("q", [1, 2]))
    assert [g.size() for g in grouper.get_ready_groups()] == [1, 1]
    grouper.enable_grouping()
    assert grouper.get_stats()["grouping_active"] is True

    keep = PrefixGrouper(GroupingConfig(aggregation_window_ms=1000, max_queue_delay_ms=50,
                                        auto_disable_on_timeout=False))
    keep.add_request(Request("old", [1, 2], enqueue_time=now - 1.0))
    keep.get_ready_groups(current_time=now)
    assert keep.get_stats()["grouping_active"] is True and keep.get_stats()["total_timeouts"] == 1


def test_ci_grouper_uses_the_first_tokens() -> None:
    grouper = CIPrefixGrouper()
    base = list(range(300))
    grouper.add_request(Request("a", base))
    grouper.add_request(Request("b", [*base[:5], 999, *base[6:]]))
    grouper.add_request(Request("c", [999, *base[1:]]))
    assert grouper.get_stats()["total_groups"] == 2
    groups = grouper.get_ready_groups(force_all=True)
    assert [[r.request_id for r in g.requests] for g in groups] == [["a", "b"], ["c"]]
    assert len(groups[0].fingerprint) == 8


def test_grouping_bad_input() -> None:
    with pytest.raises(ValueError, match="aggregation_window_ms"):
        GroupingConfig(aggregation_window_ms=-1)
    with pytest.raises(TypeError):
        PrefixGrouper().add_request("request")  # type: ignore[arg-type]
    grouper = PrefixGrouper()
    with pytest.raises(TypeError):
        grouper.add_request(Request("x", ["a", "b"]))  # type: ignore[list-item]
    assert grouper.get_stats()["total_requests"] == 0
