"""A router rebuilding a cache's contents from its KV events ends with exactly those contents, or, when
events were lost, with a view that holds no block the cache does not hold (and is told so).

Each test drives a real :class:`RadixPrefixCache` (or request managers over one), sends its events
through the wire encoder and decoder, and compares a router's view (:class:`DigestSetTracker`, the
set of block ids Dynamo's indexer keeps too) with what the cache really holds.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("zmq")
pytest.importorskip("msgpack")

import zmq  # noqa: E402
from sagellm_kv_cache import RadixPrefixCache  # noqa: E402
from sagellm_kv_cache.observability.events import (  # noqa: E402
    DigestSetTracker,
    KVEventPublisher,
    KVEventSubscriber,
    wire_block_id,
)
from sagellm_kv_cache.observability.kv_wire import decode_batch, encode_batch  # noqa: E402
from sagellm_kv_cache.observability.wiring import publish_prefix_events  # noqa: E402

BS = 2


class Router:
    """A router's view of one cache, fed batch by batch through the wire format."""

    def __init__(self) -> None:
        self.tracker = DigestSetTracker()
        self.seq = 0
        self.batches: list[list[dict[str, Any]]] = []
        self.orphans = 0  # stores whose parent the router does not hold: Dynamo's indexer skips them

    def drain(self, cache: RadixPrefixCache) -> list[dict[str, Any]]:
        events = cache.drain_events()
        if events:
            _, decoded = decode_batch(encode_batch(events))
            held_now = set(self.tracker.block_hashes)
            for event in decoded:
                if event["type"] == "stored":
                    parent = event["parent_block_hash"]
                    self.orphans += parent is not None and parent not in held_now
                    held_now.update(event["block_hashes"])
                elif event["type"] == "removed":
                    held_now.difference_update(event["block_hashes"])
                else:
                    held_now.clear()
            self.tracker.apply(self.seq, decoded)
            self.seq += 1
            self.batches.append(decoded)
        return events


def held(cache: RadixPrefixCache, digests: set[bytes]) -> set[int]:
    """The wire ids of the digests the cache holds now."""
    return {wire_block_id(d) for d in digests if cache.contains(d)}


def random_steps(cache: RadixPrefixCache, router: Router, seed: int, steps: int = 200) -> set[bytes]:
    """A random mix of inserts (salted, keyed, owned), matches, releases, evictions, invalidations and
    clears, drained at random points; returns every digest ever inserted."""
    rng = random.Random(seed)
    seen: set[bytes] = set()
    in_use: list[Any] = []
    next_id = 0
    for _ in range(steps):
        op = rng.random()
        if op < 0.5:
            n = rng.randint(1, 5)
            toks = np.array([rng.randint(0, 2) for _ in range(n * BS)], dtype=np.int64)
            ids = np.arange(next_id, next_id + n, dtype=np.int32)
            next_id += n
            _, _, digests = cache.insert_tokens(toks, ids, salt=rng.choice([None, b"a"]),
                                                extra=rng.choice([None, b"x"]), owner=rng.randint(0, 3),
                                                priority=rng.randint(0, 3))
            seen.update(bytes(d) for d in digests)
        elif op < 0.65:
            n, _, digests = cache.match_tokens(np.array([rng.randint(0, 2) for _ in range(4 * BS)], dtype=np.int64))
            if n:
                in_use.append(digests[:n])
        elif op < 0.75 and in_use:
            cache.release(in_use.pop(rng.randrange(len(in_use))))
        elif op < 0.85:
            cache.evict(rng.randint(1, 4))
        elif op < 0.95:
            cache.invalidate(rng.randint(0, 3))
        else:
            cache.clear()
        if rng.random() < 0.3:
            router.drain(cache)
    router.drain(cache)
    return seen


POLICIES = [("lru", {}), ("fifo", {}), ("priority", {}), ("ttl", {"ttl_seconds": 0.001})]


@pytest.mark.parametrize(("policy", "kwargs"), POLICIES, ids=[p for p, _ in POLICIES])
@pytest.mark.parametrize("capacity", [None, 6])
def test_router_view_equals_the_cache_without_loss(policy: str, kwargs: dict[str, Any], capacity: int | None) -> None:
    for seed in range(6):
        cache = RadixPrefixCache(block_size=BS, capacity_blocks=capacity, policy=policy,
                                 event_queue_capacity=100_000, **kwargs)
        router = Router()
        seen = random_steps(cache, router, seed)
        assert cache.stats()["events_dropped"] == 0
        assert router.tracker.block_hashes == held(cache, seen), seed
        assert router.tracker.consistent and router.orphans == 0  # every parent was stored before its child


def test_a_lost_removal_leaves_no_stale_block_in_the_router() -> None:
    """The queue overflows with a removal in it: the router must not keep the removed block."""
    cache = RadixPrefixCache(block_size=BS, event_queue_capacity=2)
    router = Router()
    _, _, first = cache.insert_tokens(np.array([1, 1], dtype=np.int64), [0])
    router.drain(cache)
    assert router.tracker.block_hashes == {wire_block_id(bytes(first[0]))}
    assert cache.evict(1) == 1  # a removed event ...
    _, _, later = cache.insert_tokens(np.array([2, 2, 3, 3], dtype=np.int64), [1, 2])  # ... then a stored one
    _, _, last = cache.insert_tokens(np.array([4, 4], dtype=np.int64), [3])  # the removal is pushed out
    assert cache.stats()["events_dropped"] == 1
    events = router.drain(cache)
    # Was: the removal vanished and the router kept the evicted block for good (a stale hit).
    assert events[0] == {**events[0], "type": "cleared", "events_lost": True}
    assert wire_block_id(bytes(first[0])) not in router.tracker.block_hashes
    assert router.tracker.block_hashes == held(cache, {bytes(d) for d in [*later, *last]})  # the events kept


@pytest.mark.parametrize(("policy", "kwargs"), POLICIES, ids=[p for p, _ in POLICIES])
@pytest.mark.parametrize("capacity", [None, 6])
def test_after_an_overflow_the_router_holds_only_cached_blocks(policy: str, kwargs: dict[str, Any],
                                                                capacity: int | None) -> None:
    overflowed = 0
    for seed in range(6):
        cache = RadixPrefixCache(block_size=BS, capacity_blocks=capacity, policy=policy, event_queue_capacity=5,
                                 **kwargs)
        router = Router()
        seen = random_steps(cache, router, seed)
        losses = sum(1 for batch in router.batches for e in batch if e["type"] == "cleared")
        overflowed += cache.stats()["events_dropped"] > 0
        assert losses or cache.stats()["events_dropped"] == 0
        # Was: 11 block ids in the router against 5 in the cache, with no sign anything was lost.
        assert router.tracker.block_hashes <= held(cache, seen), seed
    assert overflowed >= 5  # the queue of 5 did overflow


# --- concurrency: several threads change the cache and publish its events ------------------------------


def joined(publisher: KVEventPublisher, subscriber: KVEventSubscriber) -> None:
    """Publishes empty batches until the subscriber sees one (PUB/SUB has joined), then drains those."""
    while True:
        publisher.publish([])
        if subscriber.receive(50) is not None:
            break
    while subscriber.receive(50) is not None:
        pass


def test_threads_publishing_the_same_cache_keep_the_event_order() -> None:
    """Four threads insert, evict and call publish_prefix_events on one cache and one publisher; a
    subscriber's view must end equal to the cache. Was: one thread drained, another drained and
    published first, so a removal reached the router before the store it undoes (the router then
    held 15 to 146 block ids for a cache of 8)."""
    cache = RadixPrefixCache(block_size=BS, capacity_blocks=8, event_queue_capacity=100_000)
    seen: set[bytes] = set()
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(k)
        for i in range(150):
            toks = np.array([rng.randint(0, 2) for _ in range(rng.randint(1, 4) * BS)], dtype=np.int64)
            first = k * 100_000 + i * 10
            _, _, digests = cache.insert_tokens(toks, np.arange(first, first + len(toks) // BS, dtype=np.int32))
            with lock:
                seen.update(bytes(d) for d in digests)
            if rng.random() < 0.2:
                cache.evict(1)
            publish_prefix_events(cache, publisher)

    with (
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as publisher,
        KVEventSubscriber(publisher.endpoint, replay_endpoint=publisher.replay_endpoint) as subscriber,
    ):
        joined(publisher, subscriber)
        tracker = DigestSetTracker()
        tracker.last_seq = subscriber.last_seq
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            if (batch := subscriber.receive(10)) is not None:
                tracker.apply(*batch)
        for thread in threads:
            thread.join()
        while (batch := subscriber.receive(200)) is not None:
            tracker.apply(*batch)
    assert tracker.consistent and subscriber.missed_batches == 0
    assert tracker.block_hashes == held(cache, seen)


def test_events_that_cannot_be_encoded_make_routers_forget() -> None:
    """A drained batch that fails to encode is gone from the cache's queue; routers are told to forget
    (AllBlocksCleared) instead of keeping a block whose removal was in that batch."""
    cache = RadixPrefixCache(block_size=BS, event_queue_capacity=64)
    with (
        KVEventPublisher("tcp://127.0.0.1:*") as publisher,
        KVEventSubscriber(publisher.endpoint) as subscriber,
    ):
        joined(publisher, subscriber)
        tracker = DigestSetTracker()
        tracker.last_seq = subscriber.last_seq
        _, _, kept = cache.insert_tokens(np.array([1, 1], dtype=np.int64), [0])
        assert publish_prefix_events(cache, publisher) == 1
        assert cache.evict(1) == 1
        tokenless = cache.hash_tokens(np.array([2, 2], dtype=np.int64))
        cache.insert(tokenless, [1])  # no token_ids: a router could not re-hash this block
        with pytest.raises(ValueError, match="token ids"):
            publish_prefix_events(cache, publisher)
        while (batch := subscriber.receive(200)) is not None:
            tracker.apply(*batch)
        # Was: the removal went down with the bad batch and the router kept the evicted block.
        assert wire_block_id(bytes(kept[0])) not in tracker.block_hashes
        assert tracker.block_hashes == set() and tracker.missed_batches == 0


def test_close_waits_for_a_drain_under_way() -> None:
    """A close while another thread has drained but not yet published: the drained events are sent,
    not lost with a RuntimeError (the cache's queue no longer has them)."""
    cache = RadixPrefixCache(block_size=BS, event_queue_capacity=64)
    cache.insert_tokens(np.array([1, 1], dtype=np.int64), [0])
    drained, go_on = threading.Event(), threading.Event()
    outcome: list[object] = []

    def slow_drain() -> list[dict[str, Any]]:
        events = cache.drain_events()
        drained.set()
        go_on.wait(5)
        return events

    publisher = KVEventPublisher("tcp://127.0.0.1:*")

    def publish() -> None:
        try:
            outcome.append(publisher.publish_drained(slow_drain))
        except RuntimeError as err:
            outcome.append(err)

    thread = threading.Thread(target=publish)
    thread.start()
    assert drained.wait(5)
    closer = threading.Thread(target=publisher.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # the close waits for the batch under way
    go_on.set()
    thread.join(5)
    closer.join(5)
    assert outcome == [1] and publisher.next_seq == 1 and publisher.closed
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish_drained(cache.drain_events)


# --- a publisher replaced for the same cache ---------------------------------------------------------


def test_a_replacement_publisher_continues_the_sequence() -> None:
    """Routers skip batches numbered at or below the last they saw (replayed duplicates), as Dynamo's
    indexer does: a publisher replacing a closed one goes on from first_seq, and the router follows.
    Was: a new publisher could only start again at 0, and the router ignored its batches."""
    cache = RadixPrefixCache(block_size=BS, event_queue_capacity=64)
    seen: set[bytes] = set()
    first = KVEventPublisher("tcp://127.0.0.1:*")
    endpoint = first.endpoint
    with KVEventSubscriber(endpoint) as subscriber:
        joined(first, subscriber)
        tracker = DigestSetTracker()
        tracker.last_seq = subscriber.last_seq
        for step in range(3):
            _, _, digests = cache.insert_tokens(np.array([step, step], dtype=np.int64), [step])
            seen.update(bytes(d) for d in digests)
            publish_prefix_events(cache, first)
        while (batch := subscriber.receive(200)) is not None:
            tracker.apply(*batch)
        first.close()
        cache.evict(2)  # changes while no publisher runs stay queued in the cache
        with KVEventPublisher(endpoint, first_seq=first.next_seq) as second:
            assert second.next_seq == first.next_seq
            while (batch := subscriber.receive(50)) is None:  # the subscriber reconnects by itself
                second.publish([])
            tracker.apply(*batch)  # empty batches sent while it reconnected were lost: a gap
            publish_prefix_events(cache, second)
            while (batch := subscriber.receive(200)) is not None:
                tracker.apply(*batch)
            assert tracker.last_seq == second.next_seq - 1  # the router took the new publisher's batches
    assert len(held(cache, seen)) == 1
    assert tracker.block_hashes == held(cache, seen)


@pytest.mark.parametrize("first_seq", [-1, 2**63, True, 1.5])
def test_first_seq_is_checked(first_seq: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="first_seq"):
        KVEventPublisher("tcp://127.0.0.1:*", first_seq=first_seq)


# --- error paths -------------------------------------------------------------------------------------


def test_a_bad_replay_endpoint_is_refused_up_front() -> None:
    """Was: accepted, then the first sequence gap raised zmq's 'Invalid argument' out of receive and
    lost the batch that showed the gap."""
    with pytest.raises(ValueError, match="not-an-endpoint"):
        KVEventSubscriber("tcp://127.0.0.1:9", replay_endpoint="not-an-endpoint")
    with pytest.raises(ValueError, match="bogus://x"):
        KVEventSubscriber("bogus://x")
    with pytest.raises(ValueError, match="not-an-endpoint"):
        KVEventPublisher("not-an-endpoint")
    with pytest.raises(ValueError, match="replay_endpoint 'tcp://nowhere'"):
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://nowhere")
    with KVEventPublisher("tcp://127.0.0.1:*") as publisher, pytest.raises(zmq.ZMQError, match="in use"):
        KVEventPublisher(publisher.endpoint)  # a port in use is not a bad value: zmq's error stays



# --- request managers publishing into one cache ---------------------------------------------------------


def manager_pool() -> Any:
    from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool

    return PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=4), 256)


def rehashes(cache: RadixPrefixCache, event: dict[str, Any]) -> bool:
    """What a router does with a stored event: hash its tokens under its parent, its salt (in a chain's
    first block only) and its extra key; true when that gives the event's own digests."""
    parent = event["parent"]
    digests = cache.hash_tokens(np.array(event["token_ids"], dtype=np.int64), parent=parent,
                                salt=event.get("cache_salt") if parent is None else None, extra=event["extra_key"])
    return [bytes(d) for d in digests] == event["digests"]


@pytest.mark.parametrize("capacity", [None, 32])
def test_two_managers_on_threads_and_a_drainer_keep_the_router_exact(capacity: int | None) -> None:
    """Four threads admit, append and finish requests through two request managers sharing one cache,
    with evictions, while a fifth drains the events: the router ends equal to the cache, and every
    stored event (salted, keyed, continuations) re-hashes to its digests from its own fields."""
    pool = manager_pool()
    cache = RadixPrefixCache(block_size=4, pool=pool, capacity_blocks=capacity, event_queue_capacity=1_000_000)
    from sagellm_kv_cache.manager import RequestManager

    managers = [RequestManager(pool, cache=cache) for _ in range(2)]
    router = Router()
    stored: list[dict[str, Any]] = []
    done = threading.Event()

    def drainer() -> None:
        while True:
            last = done.is_set()
            stored.extend(e for e in router.drain(cache) if e["type"] == "stored")
            if last:
                return

    def worker(k: int) -> None:
        rng = random.Random(k)
        manager, running = managers[k % 2], []
        for i in range(200):
            try:
                if rng.random() < 0.5 or not running:
                    prompt = np.array([rng.randint(0, 1) for _ in range(rng.randint(1, 24))], dtype=np.int64)
                    manager.admit(k * 1000 + i, prompt, salt=rng.choice([None, b"s"]), extra=rng.choice([None, b"x"]))
                    running.append(k * 1000 + i)
                elif rng.random() < 0.6:
                    manager.append(rng.choice(running), np.array([rng.randint(0, 1)] * rng.randint(1, 6)))
                else:
                    manager.finish([running.pop(rng.randrange(len(running)))])
            except MemoryError:
                pass  # the pool is short: the call changed nothing
            if rng.random() < 0.1:
                cache.evict(2)
        manager.finish(running)

    # One request of each kind first, so every kind of stored event is checked whatever the threads'
    # interleaving caches (under load one kind could be missing from their events).
    for j, (salt, extra) in enumerate([(None, None), (b"s", None), (None, b"x"), (b"s", b"x")]):
        for second, tail in enumerate(([8, 8, 8, 8, 9], [5, 5, 5, 5, 9])):  # the second continues the first's block
            rid = 900_000 + 2 * j + second
            managers[0].admit(rid, np.array([7, 7, 7, 7, *tail], dtype=np.int64), salt=salt, extra=extra)
            managers[0].finish([rid])
    threads = [threading.Thread(target=drainer), *(threading.Thread(target=worker, args=(k,)) for k in range(4))]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    done.set()
    threads[0].join()
    seen = {d for e in stored for d in e["digests"]}
    assert router.tracker.block_hashes == held(cache, seen) and len(cache) > 0
    assert all(rehashes(cache, e) for e in stored)
    assert {(e["parent"] is None, "cache_salt" in e, e["extra_key"] is not None) for e in stored} == {
        (first, salted, keyed) for first in (True, False) for salted in (True, False) for keyed in (True, False)}


def test_timestamps_follow_the_batches_handed_out_after_a_replay() -> None:
    """Was: after a repaired gap every batch handed out carried the timestamp of the last replayed one
    (the live batch's own was overwritten while the replay was decoded)."""
    with (
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", data_parallel_rank=3) as publisher,
        KVEventSubscriber(publisher.endpoint, replay_endpoint=publisher.replay_endpoint) as subscriber,
    ):
        joined(publisher, subscriber)
        deaf: Any = subscriber
        deaf._socket.setsockopt(zmq.UNSUBSCRIBE, b"")  # the subscriber misses what follows
        time.sleep(0.1)
        for _ in range(3):
            publisher.publish([])
            time.sleep(0.02)
        deaf._socket.setsockopt(zmq.SUBSCRIBE, b"")
        stamps: dict[int, float] = {}
        deadline = time.monotonic() + 10
        while True:  # until the subscription is back; the first batch it gets shows the gap
            assert time.monotonic() < deadline
            publisher.publish([])
            if (batch := subscriber.receive(50)) is not None:
                break
        while batch is not None:
            assert subscriber.last_timestamp is not None and subscriber.last_data_parallel_rank == 3
            stamps[batch[0]] = subscriber.last_timestamp
            batch = subscriber.receive(100)
        assert subscriber.replayed_batches >= 3
        ordered = [stamps[seq] for seq in sorted(stamps)]
        assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered), ordered


def test_negative_token_ids_are_refused_before_they_reach_an_event() -> None:
    """Routers read token ids as unsigned 32-bit: a negative one made its batch unencodable, so the
    publisher sent AllBlocksCleared in its place and every router forgot the whole cache. With events
    on, such ids are refused where they come in, naming the id and its position, and nothing changes."""
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.errors import KVCacheError
    from sagellm_kv_cache.manager import RequestManager

    cache = RadixPrefixCache(block_size=BS, event_queue_capacity=64)
    with pytest.raises(KVCacheError, match="token id -3 at position 1 is negative"):
        cache.insert_tokens(np.array([1, -3], dtype=np.int64), [0])
    digests = cache.hash_tokens(np.array([4, 4, 5, -5], dtype=np.int64))
    with pytest.raises(KVCacheError, match="token id -5 at position 3 is negative"):
        cache.insert(digests, [0, 1], token_ids=np.array([4, 4, 5, -5], dtype=np.int64))
    assert len(cache) == 0 and cache.drain_events() == []

    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=BS)
    pool = PagedKVPool(spec, 16, zero_fill=False)
    manager = RequestManager(pool, event_queue_capacity=64)
    with pytest.raises(KVCacheError, match="request 1 has token id -6 at position 5: negative"):
        manager.admit(1, [1, 2, 3, 4, 5, -6, 7])
    assert 1 not in manager and manager.num_free_blocks == 16
    manager.admit(2, [1, 2, 3])
    with pytest.raises(KVCacheError, match="request 2 has token id -1 at position 0: negative"):
        manager.append(2, [-1, 8])
    assert manager.num_tokens(2) == 3 and manager.num_free_blocks == 16 - 2
    manager.finish(2)
    assert all(t >= 0 for event in manager._cache.drain_events() for t in event.get("token_ids", []))
    # Without events the ids only feed the hash: they are taken as before.
    plain = RequestManager(PagedKVPool(spec, 16, zero_fill=False))
    plain.admit(1, [1, -2, 3])
    plain.finish(1)
