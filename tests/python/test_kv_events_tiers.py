"""KV events of the tiered cache: each tier reports its own contents under its medium ("GPU" device,
"CPU" host, "DISK" disk), so a router's view of each medium equals that tier after every drain.

Random mixes of requests (shared prefixes, two tenants, a LoRA), promotions and forced demotions run
through the wire encoder and decoder (and once through ZMQ), with demotions inline and in the
background; a router that lost events relearns the lower tiers whole. NVIDIA Dynamo's indexer is
driven with the same kind of scenario in ``test_kv_events_routers.py``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgpack")
pytest.importorskip("msgspec")

from kv_event_schemas import DECODERS as SCHEMAS
from sagellm_kv_cache.observability import KVEventPublisher, publish_prefix_events
from sagellm_kv_cache.observability.events import DigestSetTracker, KVEventSubscriber, wire_block_id
from sagellm_kv_cache.observability.kv_wire import decode_batch, encode_batch
from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.tiers import TIER_MEDIA, TieredPrefixCache
from tier_requests import serve, writes_fail_past

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="fp16", block_size=4)
BS = SPEC.block_size
KEYS: list[tuple[bytes | None, bytes | None]] = [(None, None), (b"tenant-a", None), (None, b"adapter-1")]


def request_tokens(rng: random.Random) -> np.ndarray:
    """A prompt of 1-5 blocks under one of three shared 2-block prefixes, or a fresh one."""
    head = rng.randrange(4)
    tail = [rng.randrange(6) for _ in range(rng.randrange(0, 4))]
    blocks = [head * 100, head * 100 + 1, *(head * 100 + 10 + t for t in tail)][: rng.randrange(1, 6)]
    return np.array([b * 10 + k for b in blocks for k in range(BS)], dtype=np.int64)


def contents(tc: TieredPrefixCache, universe: set[bytes]) -> dict[str, set[int]]:
    """What each tier holds now, as wire ids per medium."""
    assert tc.host is not None and tc.disk is not None
    held = {TIER_MEDIA[0]: {d for d in universe if tc.device.contains(d)},
            TIER_MEDIA[1]: set(tc.host.index), TIER_MEDIA[2]: set(tc.disk.index)}
    return {medium: {wire_block_id(d) for d in digests} for medium, digests in held.items()}


class Router:
    """Our subscriber side without the sockets: each drain goes through the encoder and the decoder."""

    def __init__(self) -> None:
        self.tracker = DigestSetTracker()
        self.seq = 0
        self.media: dict[str, int] = {}

    def drain(self, tc: TieredPrefixCache) -> list[dict[str, Any]]:
        events = tc.drain_events()
        payload = encode_batch(events, medium=None)
        for engine in SCHEMAS.values():  # every batch is one vLLM's and SGLang's decoders take
            engine.decode(payload)
        _, decoded = decode_batch(payload)
        for event in decoded:
            if event["type"] != "cleared":
                self.media[event["medium"]] = self.media.get(event["medium"], 0) + 1
        self.tracker.apply(self.seq, decoded)
        self.seq += 1
        return events

    def view(self) -> dict[str, set[int]]:
        return {medium: {int(h) for h in self.tracker.held(medium)} for medium in TIER_MEDIA}


def tiered(tmp_path: Path, *, background: bool, queue: int = 100_000, device: int = 6,
           pool_blocks: int = 16) -> TieredPrefixCache:
    return TieredPrefixCache(PagedKVPool(SPEC, pool_blocks), device_blocks=device, host_blocks=5, disk_dir=tmp_path,
                             disk_blocks=12, background=background, event_queue_capacity=queue)


def random_step(tc: TieredPrefixCache, rng: random.Random, universe: set[bytes]) -> None:
    """A request (its digests go into ``universe``), a demotion or room made on the device."""
    roll = rng.random()
    if roll < 0.8:
        universe.update(serve(tc, request_tokens(rng), *rng.choice(KEYS)))
    elif roll < 0.9:
        tc.demote(rng.randrange(1, 4))
    else:
        tc.make_room(rng.randrange(1, 12))


def random_steps(tc: TieredPrefixCache, rng: random.Random, universe: set[bytes], steps: int) -> None:
    for _ in range(steps):
        random_step(tc, rng, universe)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
@pytest.mark.parametrize("seed", range(4))
def test_each_medium_of_the_router_view_equals_its_tier(tmp_path: Path, seed: int, background: bool) -> None:
    rng = random.Random(seed)
    universe: set[bytes] = set()
    router = Router()
    with tiered(tmp_path, background=background) as tc:
        for _ in range(25):
            random_steps(tc, rng, universe, rng.randrange(1, 6))
            tc.flush()  # copies in flight land (a block is announced in a tier once its bytes are there)
            router.drain(tc)
            assert router.view() == contents(tc, universe), seed
            assert router.tracker.consistent
            held = contents(tc, universe)
            # The metadata kept for the events is exactly that of the blocks some tier holds.
            assert {wire_block_id(d) for d in tc._meta} == set().union(*held.values())
        assert tc.stats()["demoted_to_disk"] > 0 and tc.stats()["promoted_from_host"] > 0
        assert tc.stats()["promoted_from_disk"] > 0
    assert set(router.media) == set(TIER_MEDIA)


def test_threads_serving_and_draining_leave_the_router_view_equal_to_the_tiers(tmp_path: Path) -> None:
    """Two threads serve requests (promotions, demotions in the background) while a third drains; once
    they stop and the copies land, one more drain makes every medium of the view equal its tier."""
    import threading

    universe: set[bytes] = set()
    router = Router()
    errors: list[BaseException] = []
    stop = threading.Event()
    with tiered(tmp_path, background=True, pool_blocks=64) as tc:  # room for both threads' requests
        def worker(seed: int) -> None:
            rng, mine = random.Random(seed), set[bytes]()
            try:
                random_steps(tc, rng, mine, 150)
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)
            universe.update(mine)

        def drainer() -> None:
            while not stop.is_set():
                router.drain(tc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in (11, 12)]
        draining = threading.Thread(target=drainer)
        for t in [*threads, draining]:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        draining.join()
        assert not errors, errors
        tc.flush()
        router.drain(tc)
        assert router.view() == contents(tc, universe)
        assert {wire_block_id(d) for d in tc._meta} == set().union(*contents(tc, universe).values())
        assert router.seq > 2 and tc.stats()["promoted_from_disk"] > 0


def test_a_demotion_moves_a_block_between_media_and_a_promotion_moves_it_back(tmp_path: Path) -> None:
    router = Router()
    with tiered(tmp_path, background=False, device=2) as tc:
        first = serve(tc, np.arange(2 * BS, dtype=np.int64), None, None)
        router.drain(tc)
        assert router.view() == {"GPU": {wire_block_id(d) for d in first}, "CPU": set(), "DISK": set()}
        second = serve(tc, np.arange(100, 100 + 2 * BS, dtype=np.int64), None, None)  # pushes `first` to the host
        events = router.drain(tc)
        moved = [(e["type"], e["medium"]) for e in events if first[1] in e.get("digests", [])]
        assert moved == [("removed", "GPU"), ("stored", "CPU")]
        stored = next(e for e in events if e["type"] == "stored" and e["digests"] == [first[1]])
        # The host tier's stored event carries what a router re-hashes: the tokens and the parent.
        assert stored["parent"] == first[0] and list(stored["token_ids"]) == list(range(BS, 2 * BS))
        m = tc.match(first)
        tc.release(first)
        assert m.num_matched == 2
        events = router.drain(tc)
        assert ("removed", "CPU") in {(e["type"], e["medium"]) for e in events}
        # ... and `second` takes its place on the host (device_blocks=2).
        assert router.view() == {"GPU": {wire_block_id(d) for d in first}, "CPU": {wire_block_id(d) for d in second},
                                 "DISK": set()}


def test_a_router_that_lost_events_relearns_the_lower_tiers_whole(tmp_path: Path) -> None:
    """Behind an event queue of 2 the device's drains start with an events-lost clear, which routers
    apply to every medium: the lower tiers are then announced again in full, so they stay exact, and
    the device view holds no block the device lacks."""
    rng = random.Random(7)
    universe: set[bytes] = set()
    router = Router()
    cleared = 0
    with tiered(tmp_path, background=False, queue=2) as tc:
        for _ in range(20):
            random_steps(tc, rng, universe, rng.randrange(2, 6))
            events = router.drain(tc)
            cleared += any(e["type"] == "cleared" for e in events)
            view, truth = router.view(), contents(tc, universe)
            assert view["CPU"] == truth["CPU"] and view["DISK"] == truth["DISK"]
            assert view["GPU"] <= truth["GPU"]
        assert tc.device.stats()["events_dropped"] > 0
    assert cleared > 1


def test_events_over_zmq_follow_the_tiers(tmp_path: Path) -> None:
    rng = random.Random(3)
    universe: set[bytes] = set()
    tracker = DigestSetTracker()
    with (
        tiered(tmp_path, background=True) as tc,
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as publisher,
        KVEventSubscriber(publisher.endpoint, replay_endpoint=publisher.replay_endpoint) as subscriber,
    ):
        deadline = time.monotonic() + 10
        while (got := subscriber.receive(50)) is None:  # the subscription reaches the publisher
            assert time.monotonic() < deadline
            publisher.publish([])
        tracker.apply(*got)
        for _ in range(10):
            random_steps(tc, rng, universe, 4)
            tc.flush()
            publish_prefix_events(tc, publisher)
            publisher.publish([])  # a marker: everything before it has arrived when it does
            last = publisher.next_seq - 1
            while tracker.last_seq != last:
                batch = subscriber.receive(2000)
                assert batch is not None
                tracker.apply(*batch)
            assert {m: {int(h) for h in tracker.held(m)} for m in TIER_MEDIA} == contents(tc, universe)
    assert tracker.consistent and subscriber.missed_batches == 0


def test_insert_needs_token_ids_with_events_on(tmp_path: Path) -> None:
    with tiered(tmp_path, background=False) as tc:
        digests = tc.hash_tokens(np.arange(2 * BS, dtype=np.int64))
        ids = tc.allocate(2)
        with pytest.raises(ValueError, match="token_ids"):
            tc.insert(digests, ids)
        with pytest.raises(ValueError, match="token_ids holds 4 tokens"):
            tc.insert(digests, ids, token_ids=np.arange(BS))
        with pytest.raises(TypeError, match="token_ids"):
            tc.insert(digests, ids, token_ids="tokens")
        assert len(tc.device) == 0 and tc.drain_events() == [] and tc._meta == {}
        tc.pool.free(ids)
    with TieredPrefixCache(PagedKVPool(SPEC, 4)) as quiet:  # events off: nothing is kept, nothing drained
        ids = quiet.allocate(2)
        quiet.insert(digests, ids)
        assert quiet.drain_events() == [] and quiet._meta == {}


def test_blocks_a_reopened_disk_holds_are_promoted_once_a_match_names_their_tokens(tmp_path: Path) -> None:
    # Written with events off (or by an older version): the slots carry no token records.
    tokens = np.arange(3 * BS, dtype=np.int64)
    with tiered(tmp_path, background=False, device=1, queue=0) as tc:
        digests = serve(tc, tokens, b"tenant-a", None)
        serve(tc, np.arange(500, 500 + 6 * BS, dtype=np.int64), None, None)  # the first three go to disk
        tc.flush()
        assert [tc.location(d) for d in digests] == ["disk"] * 3
    router = Router()
    with tiered(tmp_path, background=False) as tc:  # a new process: the disk index, no tokens
        assert tc.disk is not None and len(tc.disk) == 3 and tc.disk.dropped_on_open == 0
        assert tc.drain_events() == []
        m = tc.match(digests)
        assert m.num_matched == 0 and [tc.location(d) for d in digests] == ["disk"] * 3
        with pytest.raises(ValueError, match="token_ids holds 4 tokens"):
            tc.match(digests, token_ids=tokens[:BS])  # refused before anything moves
        with pytest.raises(ValueError, match="do not hash to digests"):
            tc.match(digests, token_ids=tokens)  # hashed with a salt this call does not name
        assert [tc.location(d) for d in digests] == ["disk"] * 3 and tc.stats()["lookups"] == 1
        m = tc.match(digests, token_ids=tokens, cache_salt=b"tenant-a")
        assert m.num_matched == 3 and m.tiers.tolist() == [2, 2, 2]
        tc.release(digests)
        events = router.drain(tc)
        stored = [(e["medium"], e["digests"], list(e["token_ids"]), e["cache_salt"]) for e in events
                  if e["type"] == "stored"]
        assert stored == [("GPU", digests, tokens.tolist(), b"tenant-a")]
        assert router.view()["GPU"] == {wire_block_id(d) for d in digests}


@pytest.mark.parametrize("bad", [-1, 2**32], ids=["negative", "past-u32"])
def test_token_ids_outside_the_routers_u32_range_are_refused_before_anything_changes(tmp_path: Path, bad: int) -> None:
    """A stored event with such a token cannot be encoded: publishing would lose its whole batch (an
    ``AllBlocksCleared`` goes out instead) and with it the lower tiers, announced only once."""
    tokens = np.arange(2 * BS, dtype=np.int64)
    tokens[5] = bad
    with tiered(tmp_path, background=False) as tc:
        digests = tc.hash_tokens(np.arange(2 * BS, dtype=np.int64))
        ids = tc.allocate(2)
        with pytest.raises(ValueError, match=rf"token_ids\[5\] is {bad}, outside"):
            tc.insert(digests, ids, token_ids=tokens)
        if bad > 0:
            with pytest.raises(ValueError, match=rf"token_ids\[5\] is {bad}, outside"):
                tc.insert(digests, ids, token_ids=tokens.astype(np.uint64))  # not wrapped into int64 either
        with pytest.raises(ValueError, match=rf"token_ids\[5\] is {bad}, outside"):
            tc.match(digests, token_ids=tokens.tolist())
        assert len(tc.device) == 0 and tc.drain_events() == [] and tc._meta == {}
        assert tc.stats()["lookups"] == 0
        tc.pool.free(ids)


@pytest.mark.parametrize("events", [0, 100], ids=["events-off", "events-on"])
@pytest.mark.parametrize(("kwargs", "error", "named"), [
    ({"extra_key": 5}, TypeError, "extra_key must be bytes, str or None, got int"),
    ({"cache_salt": 1.5}, TypeError, "cache_salt must be bytes, str or None, got float"),
    ({"token_ids": np.arange(2 * BS), "extra_key": ["lora"]}, TypeError, "extra_key must be bytes, str or None"),
    ({"token_ids": "tokens"}, TypeError, "token_ids must be a sequence of ints, got str"),
    ({"token_ids": [0.5] * (2 * BS)}, TypeError, "token_ids must be a 1-D sequence of ints"),
    ({"token_ids": list(range(BS))}, ValueError, "token_ids holds 4 tokens, 2 blocks of 4 need 8"),
])
def test_match_refuses_a_bad_token_ids_extra_key_or_cache_salt_whether_or_not_events_use_it(
        tmp_path: Path, events: int, kwargs: dict[str, Any], error: type[Exception], named: str) -> None:
    """Before anything moves: the host blocks stay put, no lookup is counted, no event is queued."""
    tokens = np.arange(2 * BS, dtype=np.int64)
    with TieredPrefixCache(PagedKVPool(SPEC, 8), device_blocks=2, host_blocks=4, background=False,
                           event_queue_capacity=events) as tc:
        digests = tc.hash_tokens(tokens)
        ids = tc.allocate(2)
        tc.insert(digests, ids, token_ids=tokens)
        tc.pool.free(ids)
        tc.demote(2)
        tc.drain_events()
        with pytest.raises(error, match=named):
            tc.match(digests, **kwargs)
        assert [tc.location(d) for d in digests] == ["host", "host"] and tc.stats()["lookups"] == 0
        assert tc.drain_events() == []


def test_a_str_extra_key_and_salt_reach_every_medium_as_the_bytes_the_device_reports(tmp_path: Path) -> None:
    """The trie reports a str extra key or salt as its UTF-8 bytes; a lower tier's stored event of the same
    block (demoted, then after a reopen promoted from tokens a match names) says the same."""
    tokens = np.arange(2 * BS, dtype=np.int64)
    with tiered(tmp_path, background=False, device=2) as tc:
        digests = tc.hash_tokens(tokens, salt="tenant-é", extra="adapter-1")
        ids = tc.allocate(2)
        tc.insert(digests, ids, token_ids=tokens, extra_key="adapter-1", cache_salt="tenant-é")
        tc.pool.free(ids)
        tc.demote(2)
        stored = [e for e in tc.drain_events() if e["type"] == "stored"]
        assert [e["medium"] for e in stored] == ["GPU", "CPU", "CPU"]
        keys = {(e["extra_key"], e["cache_salt"]) for e in stored}
        assert keys == {(b"adapter-1", "tenant-é".encode())}, keys
        m = tc.match(digests, token_ids=tokens, extra_key="adapter-1", cache_salt="tenant-é")
        assert m.num_matched == 2 and m.tiers.tolist() == [1, 1]  # promoted from the host
        tc.release(digests)
        # And from what a match names: blocks of a reopened disk tier.
        tc.demote(2)
        tc.make_room(16)
        serve(tc, np.arange(500, 500 + 8 * BS, dtype=np.int64), None, None)  # pushes them to disk
        tc.flush()
        assert [tc.location(d.tobytes()) for d in digests] == ["disk", "disk"]
    with tiered(tmp_path, background=False) as tc:
        m = tc.match(digests, token_ids=tokens, extra_key="adapter-1", cache_salt="tenant-é")
        assert m.num_matched == 2
        tc.release(digests)
        tc.demote(2)
        mine = {d.tobytes() for d in digests}  # (the disk's other blocks are announced under DISK too)
        stored = [e for e in tc.drain_events() if e["type"] == "stored" and mine & set(e["digests"])]
        assert {e["medium"] for e in stored} == {"GPU", "CPU"}
        assert {(e["extra_key"], e["cache_salt"]) for e in stored} == {(b"adapter-1", "tenant-é".encode())}


def test_blocks_a_reopened_disk_holds_are_announced_there_once_an_insert_names_their_tokens(tmp_path: Path) -> None:
    """A request that does not name its tokens to match misses the reopened disk's blocks, computes them
    and inserts them with their tokens: from then on the disk's copies can be announced, and are (the
    router's DISK view left them out for as long as the disk held them). Written with events off: the
    slots carry no token records."""
    tokens = np.arange(3 * BS, dtype=np.int64)
    with tiered(tmp_path, background=False, device=1, queue=0) as tc:
        digests = serve(tc, tokens, None, None)
        serve(tc, np.arange(500, 500 + 6 * BS, dtype=np.int64), None, None)  # the first three go to disk
        tc.flush()
        assert [tc.location(d) for d in digests] == ["disk"] * 3
    router = Router()
    with tiered(tmp_path, background=False) as tc:
        universe = set(serve(tc, tokens, None, None))  # a miss: the disk's blocks have no tokens yet
        assert tc.stats()["hits"]["disk"] == 0
        router.drain(tc)
        truth = contents(tc, universe)
        assert truth["DISK"] == {wire_block_id(d) for d in digests} == truth["GPU"]
        assert router.view() == truth


def _to_disk(tmp_path: Path) -> tuple[dict[bytes, tuple[Any, ...]], list[list[bytes]]]:
    """Serves one 2-block request per key pair and pushes them to disk (events on); returns what the
    lower tiers' stored events said of each block, and each request's digests."""
    said: dict[bytes, tuple[Any, ...]] = {}
    with tiered(tmp_path, background=False, device=1) as tc:
        requests = [serve(tc, np.arange(i * 1000, i * 1000 + 2 * BS, dtype=np.int64), *keys)
                    for i, keys in enumerate(KEYS)]
        serve(tc, np.arange(500, 500 + 6 * BS, dtype=np.int64), None, None)  # the first requests go to disk
        tc.flush()
        for e in tc.drain_events():
            if e["type"] == "stored" and e["medium"] != "GPU":
                said[e["digests"][0]] = (list(e["token_ids"]), e["parent"], e["extra_key"], e["cache_salt"])
        assert tc.disk is not None and all(d in tc.disk.index for r in requests for d in r)
    return said, requests


def test_a_reopened_disk_tier_announces_its_blocks_with_their_tokens_at_the_first_drain(tmp_path: Path) -> None:
    """Each disk slot carries its block's token record: a new process's first drain announces every block
    the disk holds under DISK, parents first, as the writer announced it (tokens, parent, extra key,
    salt), and a match promotes them without naming their tokens (both waited for a request to name them)."""
    said, requests = _to_disk(tmp_path)
    router = Router()
    with tiered(tmp_path, background=False) as tc:
        assert tc.disk is not None and tc.disk.dropped_on_open == 0
        events = router.drain(tc)
        assert {e["medium"] for e in events} == {"DISK"} and {e["type"] for e in events} == {"stored"}
        order = [e["digests"][0] for e in events]
        assert sorted(order) == sorted(tc.disk.index)
        for e in events:
            assert (list(e["token_ids"]), e["parent"], e["extra_key"], e["cache_salt"]) == said[e["digests"][0]]
            assert e["parent"] not in tc.disk.index or order.index(e["parent"]) < order.index(e["digests"][0])
        assert router.view() == contents(tc, set())
        for digests in requests:
            m = tc.match(digests)
            assert m.num_matched == 2 and m.tiers.tolist() == [2, 2]
            tc.release(digests)
        router.drain(tc)
        assert router.view() == contents(tc, {d for r in requests for d in r})


def test_a_corrupt_token_record_drops_its_block_on_reopen(tmp_path: Path) -> None:
    """A token record that is not intact (a flipped token byte: its checksum; a token count past its page:
    its size; unknown flags) drops its block when the disk tier is reopened; the other blocks load and are
    announced, nothing raises."""
    from sagellm_kv_cache import tiers

    _, requests = _to_disk(tmp_path)
    victims = [requests[0][1], requests[1][1], requests[2][1]]
    with tiered(tmp_path, background=False, queue=0) as tc:
        assert tc.disk is not None
        on_disk = set(tc.disk.index)
        stride, header_at = tc.disk.slot_nbytes, tc.disk.payload_stride
        offsets = [tc.disk.index[d].slot * stride + header_at + tiers._RECORD_AT for d in victims]
    with open(tmp_path / "slots.bin", "r+b") as f:
        for at, (field, value) in zip(offsets, [(tiers._RECORD.size, None), (12, 2**31), (8, 0x80)], strict=True):
            f.seek(at + field)
            if value is None:  # flip the first token byte
                old = f.read(1)
                f.seek(at + field)
                f.write(bytes([old[0] ^ 0x01]))
            else:
                f.write(value.to_bytes(4, "little"))
    router = Router()
    with tiered(tmp_path, background=False) as tc:
        assert tc.disk is not None and tc.disk.dropped_on_open == 3
        assert set(tc.disk.index) == on_disk - set(victims)
        router.drain(tc)
        assert router.view() == contents(tc, set())
        assert router.view()["DISK"] == {wire_block_id(d) for d in on_disk - set(victims)}


def test_a_failed_spill_announces_no_removal_of_the_host_blocks_that_stay(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A demotion into a full host tier spills its two oldest blocks to a disk that takes the first
    write and fails the second (a real EFBIG past RLIMIT_FSIZE). The second never left its host slot:
    no drain, during the spill (its writes held there) or after it, says the host lost it (the victims
    were announced removed from "CPU" at the spill's start, the second for good)."""
    router, universe = Router(), set[bytes]()
    with tiered(tmp_path, background=True) as tc:
        assert tc.host is not None and tc.disk is not None
        for i in range(11):  # one block each: 6 on the device, 5 on the host (full)
            universe.update(serve(tc, np.arange(i * 100, i * 100 + BS, dtype=np.int64), None, None))
        tc.flush()
        router.drain(tc)
        first, second = list(tc.host.index)[:2]
        in_write, go_on, real_pwritev = threading.Event(), threading.Event(), os.pwritev

        def held_pwritev(fd: int, buffers: Any, offset: int) -> int:
            in_write.set()
            assert go_on.wait(10)
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", held_pwritev)
        with writes_fail_past(tc.disk.slot_nbytes):
            demotion = tc.demote(2)  # copied by the background thread, whose first write is held
            assert in_write.wait(10)
            events = router.drain(tc)  # mid-spill
            go_on.set()
            failed = [f.exception(timeout=10) for f in demotion]
        assert [type(e) for e in failed] == [OSError]
        events += router.drain(tc)
        removed_from_host = {d for e in events if e["type"] == "removed" and e["medium"] == "CPU" for d in e["digests"]}
        assert (tc.location(first), tc.location(second)) == ("disk", "host")
        assert removed_from_host == {first}
        assert router.view() == contents(tc, universe)
        assert tc.stats()["dropped"]["host"] == 0


DISK_ERRORS_SCRIPT = """
import random, resource, signal, sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_kv_events_tiers import SPEC, Router, contents, random_step
from sagellm_kv_cache.observability.events import wire_block_id
from sagellm_kv_cache.paged import PagedKVPool
from sagellm_kv_cache.tiers import TieredPrefixCache

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for seed in range(int(sys.argv[2])):
    with tempfile.TemporaryDirectory() as disk_dir:
        tc = TieredPrefixCache(PagedKVPool(SPEC, 64), device_blocks=6, host_blocks=5, disk_dir=disk_dir,
                               disk_blocks=12, background=seed % 2 == 0, event_queue_capacity=100_000)
        router, universe, errors, stop = Router(), set(), [], threading.Event()

        def worker(s):
            rng, mine = random.Random(s), set()
            try:
                for _ in range(150):
                    random_step(tc, rng, mine)
            except BaseException as exc:
                errors.append(repr(exc))
            universe.update(mine)

        def drainer():
            while not stop.is_set():
                router.drain(tc)

        def disk_limit():  # the slot file takes writes up to a limit that moves: none, a few slots, all
            rng = random.Random(seed)
            while not stop.is_set():
                limit = rng.choice([0, tc.disk.slot_nbytes * rng.randrange(1, 12), soft])
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
                time.sleep(0.002)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

        workers = [threading.Thread(target=worker, args=(seed * 10 + i,)) for i in range(3)]
        others = [threading.Thread(target=drainer), threading.Thread(target=disk_limit)]
        for t in workers + others:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        for t in others:
            t.join()
        tc.flush()
        router.drain(tc)
        held = contents(tc, universe)
        lost = {name: tier.num_blocks - tier.slots.num_available - len(tier.index)
                for name, tier in (("host", tc.host), ("disk", tc.disk))}
        print(seed, errors, router.view() == held, {wire_block_id(d) for d in tc._meta} == set().union(*held.values()),
              lost, tc.stats()["dropped"]["disk"] + tc.stats()["dropped"]["host"] > 0, flush=True)
        tc.close()
"""


def test_threads_over_a_disk_that_fails_writes_now_and_then_keep_the_view_and_every_slot() -> None:
    """Three request threads, a drain thread and a real write error now and then (a write past a moving
    RLIMIT_FSIZE fails with EFBIG; in a child process, which the limit then binds alone): after they
    stop, each medium of the router's view equals its tier, the metadata is that of the blocks held,
    and no host or disk slot is lost (a host slot leaked for good where a demotion found fewer host
    slots than blocks and the disk failed under the rest)."""
    import subprocess
    import sys

    pytest.importorskip("resource")
    seeds = 12
    out = subprocess.run([sys.executable, "-c", DISK_ERRORS_SCRIPT, str(Path(__file__).parent), str(seeds)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == seeds, out.stdout
    for line in lines:
        assert line.endswith("[] True True {'host': 0, 'disk': 0} True"), line


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_demotions_into_a_disk_whose_slots_promotions_claim_keep_the_view_and_the_counters(
        tmp_path: Path, background: bool) -> None:
    """Threads serve requests over a 1-block host and a 2-block disk tier (promotions claim the disk's
    blocks, emptying its index) while another demotes and a third drains. A demotion that reached the
    disk with every slot claimed failed with a bare KeyError; now its blocks are dropped: no demotion
    fails, each medium of the view equals its tier, the metadata is that of the blocks held, the
    counters balance and no slot is lost."""
    universe: set[bytes] = set()
    router = Router()
    errors: list[BaseException] = []
    stop = threading.Event()
    with TieredPrefixCache(PagedKVPool(SPEC, 32), device_blocks=4, host_blocks=1, disk_dir=tmp_path, disk_blocks=2,
                           background=background, event_queue_capacity=100_000) as tc:
        def worker(seed: int) -> None:
            rng, mine = random.Random(seed), set[bytes]()
            try:
                for _ in range(250):
                    mine.update(serve(tc, request_tokens(rng), *rng.choice(KEYS)))
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)
            universe.update(mine)

        def demoter() -> None:
            while not stop.is_set():
                try:
                    errors.extend(e for f in tc.demote(2) if (e := f.exception()) is not None)
                except BaseException as exc:  # handed to the main thread
                    errors.append(exc)

        def drainer() -> None:
            while not stop.is_set():
                router.drain(tc)

        workers = [threading.Thread(target=worker, args=(s,)) for s in (21, 22)]
        others = [threading.Thread(target=demoter), threading.Thread(target=drainer)]
        for t in [*workers, *others]:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        for t in others:
            t.join()
        assert not errors, errors[:3]
        tc.flush()
        router.drain(tc)
        held = contents(tc, universe)
        assert router.view() == held
        assert {wire_block_id(d) for d in tc._meta} == set().union(*held.values())
        s = tc.stats()
        assert tc.host is not None and tc.disk is not None
        assert s["blocks"]["host"] == (s["demoted_to_host"] - s["promoted_from_host"] - s["dropped"]["host"]
                                       - s["replaced"]["host"] - s["bytes_moved"]["host_to_disk"] // tc.block_nbytes)
        assert s["blocks"]["disk"] == (s["demoted_to_disk"] - s["promoted_from_disk"] - s["corrupt_reads"]
                                       - s["dropped"]["disk"] - s["replaced"]["disk"])
        for tier in (tc.host, tc.disk):
            assert tier.slots.num_available + len(tier.index) == tier.num_blocks
        assert s["promoted_from_disk"] > 0
