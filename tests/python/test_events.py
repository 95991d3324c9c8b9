"""KV events: vLLM 0.33 wire format, validation, replay, a subscriber in another process rebuilding the block set."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

from sagellm_kv_cache.observability import events as events_module  # noqa: E402
from sagellm_kv_cache.observability import kv_wire  # noqa: E402
from sagellm_kv_cache.observability.events import (  # noqa: E402
    DigestSetTracker,
    KVEventDecodeError,
    KVEventPublisher,
    KVEventSubscriber,
    decode_batch,
    encode_batch,
    rebuild_digests,
    wire_block_id,
)


def digest(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "little")).digest()


def low64(d: bytes) -> int:
    """vLLM's rule for integer block hashes, written out independently of the module under test."""
    return int.from_bytes(d, "big") & (2**64 - 1)


STORED = {
    "type": "stored",
    "digests": [digest(1), digest(2)],
    "parent": digest(0),
    "token_ids": list(range(32)),
    "block_size": 16,
    "extra_key": b"lora-7",
}


# --- wire format -------------------------------------------------------------------------------


def test_batch_is_vllm_tagged_map_format() -> None:
    payload = encode_batch([STORED, {"type": "removed", "digests": [digest(1)]}, {"type": "cleared"}], timestamp=12.5)
    raw = msgpack.unpackb(payload, raw=False)
    assert raw[0] == 12.5 and raw[2] == 0  # [ts, events, data_parallel_rank]
    stored = raw[1][0]
    assert list(stored) == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                            "medium", "lora_name", "extra_keys"]  # vLLM's field order; no salt, so no cache_salt
    assert stored == {
        "type": "BlockStored",
        "block_hashes": [low64(digest(1)), low64(digest(2))],
        "parent_block_hash": low64(digest(0)),
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": "lora-7",
        "extra_keys": [["lora-7"], ["lora-7"]],
    }
    assert raw[1][1:] == [
        {"type": "BlockRemoved", "block_hashes": [low64(digest(1))], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ]


def test_ids_are_derived_in_one_place_for_stores_parents_and_removals() -> None:
    assert wire_block_id(digest(5)) == low64(digest(5)) < 2**64
    # An xxh3_128 digest: 16 hash bytes and 16 zero bytes. Its id comes from the hash bytes.
    xxh = bytes(range(1, 17)) + bytes(16)
    assert wire_block_id(xxh) == int.from_bytes(bytes(range(9, 17)), "big") != 0
    child = {**STORED, "digests": [digest(3)], "parent": xxh, "token_ids": list(range(16)), "extra_key": None}
    raw = msgpack.unpackb(encode_batch([child, {"type": "removed", "digests": [xxh, digest(3)]}]), raw=False)
    assert raw[1][0]["parent_block_hash"] == wire_block_id(xxh)
    assert raw[1][1]["block_hashes"] == [wire_block_id(xxh), low64(digest(3))]
    with pytest.raises(ValueError, match="32 bytes"):
        wire_block_id(b"short")
    with pytest.raises(TypeError):
        wire_block_id("text")  # type: ignore[arg-type]


def test_salt_and_lora_travel_as_text() -> None:
    root = {**STORED, "parent": None, "cache_salt": b"tenant-a"}
    raw = msgpack.unpackb(encode_batch([root, {**STORED, "extra_key": None, "cache_salt": b"\xff\x00"}]), raw=False)
    first, second = raw[1]
    assert first["cache_salt"] == "tenant-a" and first["lora_name"] == "lora-7" and first["lora_id"] is None
    # vLLM's per-block order: the LoRA name, then the salt in a sequence's first block only.
    assert first["extra_keys"] == [["lora-7", "tenant-a"], ["lora-7"]]
    # A continuation (it has a parent) names the salt at the top level only; bytes that are not UTF-8 go as hex.
    assert second["cache_salt"] == "0xff00" and second["lora_name"] is None and second["extra_keys"] == [None, None]
    assert kv_wire.wire_text(7) == "7" and kv_wire.wire_text("x") == "x"


def test_round_trip_through_decode() -> None:
    ts, decoded = decode_batch(encode_batch([STORED, {"type": "cleared"}], timestamp=1.0))
    assert ts == 1.0
    assert decoded == [
        {
            "type": "stored",
            "block_hashes": [low64(digest(1)), low64(digest(2))],
            "parent_block_hash": low64(digest(0)),
            "token_ids": list(range(32)),
            "block_size": 16,
            "lora_name": "lora-7",
            "medium": "GPU",
            "cache_salt": None,
            "extra_keys": [["lora-7"], ["lora-7"]],
        },
        {"type": "cleared"},
    ]


def test_decoder_accepts_vllm_batches_with_extra_fields() -> None:
    # What vLLM 0.33 sends by default: bytes hashes, fields we do not use, no rank when it is None.
    payload = msgpack.packb(
        [3.0, [{"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": None,
                "token_ids": [1, 2], "block_size": 2, "lora_id": None, "medium": "GPU", "lora_name": None,
                "group_idx": 0, "kv_cache_spec_kind": "full"},
               {"type": "BlockRemoved", "block_hashes": [11], "medium": None}]],
        use_bin_type=True,
    )
    _, decoded = decode_batch(payload)
    assert decoded[0]["block_hashes"] == [b"\x01" * 32] and decoded[0]["medium"] == "GPU"
    assert decoded[1] == {"type": "removed", "block_hashes": [11], "medium": None}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never valid msgpack
        msgpack.packb({"ts": 1}),
        msgpack.packb([1.0]),
        msgpack.packb(["x", []]),
        msgpack.packb([1.0, [], "rank"]),
        msgpack.packb([1.0, [{"type": "Nope"}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": []}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": ["x"], "parent_block_hash": None,
                              "token_ids": [], "block_size": 4}]]),
        msgpack.packb([1.0, [{}]]),
        msgpack.packb([1.0, [{"type": "BlockRemoved"}]]),
        msgpack.packb([1.0, [["AllBlocksCleared"]], 0]),  # the old array-like events
    ],
)
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)


@pytest.mark.parametrize(
    ("event", "error", "match"),
    [
        ({"type": "nope"}, ValueError, "unknown type 'nope'"),
        ({"type": "stored", "digests": "abc", "block_size": 16}, TypeError, "digests"),
        ({"type": "stored", "digests": [digest(1), 3], "block_size": 16}, TypeError, r"digests'\]\[1\]"),
        ({"type": "stored", "digests": [b"short"], "block_size": 16}, ValueError, "32-byte"),
        ({**STORED, "parent": "str"}, TypeError, "parent"),
        ({**STORED, "block_size": 0}, ValueError, "block_size"),
        ({**STORED, "token_ids": [1, "2"]}, TypeError, "token_ids"),
        ({**STORED, "token_ids": [-1] * 32}, ValueError, "u32"),
        ({**STORED, "token_ids": list(range(16))}, ValueError, "16 token ids for 2 blocks"),
        ({**STORED, "extra_key": 1.5}, TypeError, "extra_key"),
        ({**STORED, "cache_salt": ["x"]}, TypeError, "cache_salt"),
        ({**STORED, "medium": "HBM"}, ValueError, "medium"),
        ({"type": "removed"}, TypeError, "digests"),
        ("cleared", TypeError, "must be a dict"),
    ],
)
def test_bad_events_are_rejected_before_sending(event: Any, error: type[Exception], match: str) -> None:
    with KVEventPublisher("tcp://127.0.0.1:*") as publisher:
        with pytest.raises(error, match=match):
            publisher.publish([{"type": "cleared"}, event])
        assert publisher.next_seq == 0  # nothing sent, no sequence number used
        with pytest.raises(TypeError):
            publisher.publish({"type": "cleared"})  # type: ignore[arg-type]


def test_media_and_rank() -> None:
    for medium in ("GPU", "CPU_PINNED", "CPU", "DISK", None):
        raw = msgpack.unpackb(encode_batch([STORED], medium=medium, data_parallel_rank=3), raw=False)
        assert raw[1][0]["medium"] == medium and raw[2] == 3
    raw = msgpack.unpackb(encode_batch([{**STORED, "medium": "DISK"}], medium="GPU"), raw=False)
    assert raw[1][0]["medium"] == "DISK"  # an event may name its own tier
    with pytest.raises(ValueError, match="medium"):
        encode_batch([], medium="gpu")
    with pytest.raises(ValueError, match="data_parallel_rank"):
        encode_batch([], data_parallel_rank=-1)
    with pytest.raises(ValueError, match="medium"):
        KVEventPublisher("tcp://127.0.0.1:*", medium="SSD")
    with pytest.raises(ValueError, match="data_parallel_rank"):
        KVEventPublisher("tcp://127.0.0.1:*", data_parallel_rank=True)
    with pytest.raises(ValueError, match="replay_buffer_steps"):
        KVEventPublisher("tcp://127.0.0.1:*", replay_buffer_steps=0)
    assert KVEventPublisher.wire_schema == kv_wire.VLLM_WIRE_SCHEMA == "0.33.0"


def test_numpy_token_ids_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    _, decoded = decode_batch(encode_batch([{**STORED, "token_ids": np.arange(32, dtype=np.int32)}]))
    assert decoded[0]["token_ids"] == list(range(32))


def test_tracker_applies_events_and_detects_gaps() -> None:
    tracker = DigestSetTracker()
    tracker.apply(0, [STORED])  # our internal events: digests map to the wire ids
    assert tracker.digests == {low64(digest(1)), low64(digest(2))}
    _, wire_events = decode_batch(encode_batch([{"type": "removed", "digests": [digest(1)]}]))
    tracker.apply(1, wire_events)  # decoded wire events
    assert tracker.block_hashes == {low64(digest(2))} and tracker.consistent
    tracker.apply(1, [{"type": "cleared"}])  # duplicate seq: ignored
    assert tracker.block_hashes == {low64(digest(2))}
    tracker.apply(4, [])
    assert tracker.missed_batches == 2 and not tracker.consistent
    tracker.apply(5, [{"type": "cleared"}])
    assert tracker.block_hashes == set() and tracker.consistent
    assert rebuild_digests([(0, [STORED]), (1, [{"type": "removed", "digests": [digest(2)]}])]) == {low64(digest(1))}


def test_tracker_keeps_one_view_per_medium() -> None:
    """A block stored on the host tier and removed from the device tier is still held (on the host), as
    Dynamo's indexer keeps it; before, one set for all media lost it."""
    tracker = DigestSetTracker()
    both = [{**STORED, "medium": "GPU"}, {**STORED, "digests": [digest(1)], "token_ids": list(range(16)),
                                         "medium": "CPU_PINNED"}]
    _, wire_events = decode_batch(encode_batch(both))
    tracker.apply(0, wire_events)
    tracker.apply(1, [{"type": "removed", "digests": [digest(1), digest(2)], "medium": "GPU"}])
    assert tracker.held("GPU") == set() and tracker.held("CPU") == tracker.held("CPU_PINNED") == {low64(digest(1))}
    assert tracker.block_hashes == {low64(digest(1))}
    tracker.apply(2, [{"type": "removed", "digests": [digest(1)], "medium": "DISK"}])  # not there: no change
    assert tracker.by_medium == {"GPU": set(), "CPU": {low64(digest(1))}, "DISK": set()}
    tracker.apply(3, [{**STORED, "medium": None}])  # no medium: the device, as Dynamo reads it
    assert tracker.held("GPU") == tracker.held(None) == {low64(digest(1)), low64(digest(2))}
    tracker.apply(4, [{"type": "cleared"}])  # every medium
    assert tracker.block_hashes == set()


def test_missing_dependencies_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "_IMPORT_ERROR", ImportError("No module named 'zmq'"))
    monkeypatch.setattr(kv_wire, "_IMPORT_ERROR", ImportError("No module named 'msgpack'"))
    with pytest.raises(ImportError, match=r"isagellm-kv-cache\[events\]"):
        KVEventPublisher("tcp://127.0.0.1:*")
    with pytest.raises(ImportError, match=r"isagellm-kv-cache\[events\]"):
        encode_batch([])


def test_publisher_closed_and_bad_endpoint() -> None:
    publisher = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    publisher.close()
    publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish([])
    with pytest.raises(Exception, match=r"(?i)invalid|protocol|argument"):
        KVEventPublisher("not-an-endpoint")
    with pytest.raises(Exception, match=r"(?i)invalid|protocol|argument"):
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="not-an-endpoint")


# --- in-process pub/sub ------------------------------------------------------------------------


def sync(publisher: KVEventPublisher, subscriber: KVEventSubscriber) -> int:
    """Sends empty batches until the subscriber sees one (PUB/SUB drops messages sent before the
    subscription reaches the publisher); returns the last sequence number received."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish([])
        got = subscriber.receive(50)
        if got is not None:
            last = got[0]
            while (more := subscriber.receive(50)) is not None:
                last = more[0]
            return last
    raise AssertionError("subscriber never connected")


def test_in_process_stream_and_topic_filter() -> None:
    with (
        KVEventPublisher("tcp://127.0.0.1:*", topic="kv-events-2") as other,
        KVEventPublisher("tcp://127.0.0.1:*", topic="kv-events", data_parallel_rank=2) as publisher,
        KVEventSubscriber(publisher.endpoint, topic="kv-events") as subscriber,
    ):
        subscriber._socket.connect(other.endpoint)  # same prefix, different topic: must be skipped
        last = sync(publisher, subscriber)
        for _ in range(5):
            other.publish([STORED])
        seq = publisher.publish([STORED])
        assert seq == last + 1
        assert subscriber.receive(2000) == (seq, decode_batch(encode_batch([STORED]))[1])
        assert subscriber.last_timestamp is not None and abs(subscriber.last_timestamp - time.time()) < 60
        assert subscriber.last_data_parallel_rank == 2
        assert subscriber.receive(100) is None


def test_subscriber_rejects_malformed_frames() -> None:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        with KVEventSubscriber(f"tcp://127.0.0.1:{port}") as subscriber:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pub.send_multipart([b"", b"\x00" * 8, encode_batch([])])
                if subscriber.receive(50) is not None:
                    break
            while subscriber.receive(50) is not None:
                pass
            pub.send_multipart([b"", b"\x01", b"x"])
            with pytest.raises(KVEventDecodeError, match="frames"):
                subscriber.receive(2000)
            pub.send_multipart([b"", b"\x00" * 8, b"\xc1"])
            with pytest.raises(KVEventDecodeError, match="msgpack"):
                subscriber.receive(2000)
    finally:
        pub.close(linger=0)
        ctx.term()


# --- replay ------------------------------------------------------------------------------------


def stored(n: int) -> dict[str, Any]:
    return {"type": "stored", "digests": [digest(n)], "parent": None, "token_ids": [n] * 4, "block_size": 4,
            "extra_key": None}


def test_replay_protocol_is_vllms() -> None:
    import zmq

    with KVEventPublisher("tcp://127.0.0.1:*", topic="t", replay_endpoint="tcp://127.0.0.1:*",
                          replay_buffer_steps=3) as publisher:
        payloads = [encode_batch([stored(i)], timestamp=float(i)) for i in range(5)]
        for i in range(5):
            publisher.publish([stored(i)])
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        try:
            assert publisher.replay_endpoint is not None
            dealer.connect(publisher.replay_endpoint)
            dealer.send_multipart([b"", b"not a seq"])  # malformed: ignored, the next request is answered
            dealer.send_multipart([b"", (3).to_bytes(8, "big")])
            frames = [dealer.recv_multipart() for _ in range(3)]
        finally:
            dealer.close(linger=0)
            ctx.term()
    # Only seqs 3 and 4 from the bounded buffer (2, 3, 4); frames as vLLM's ROUTER sends them.
    assert [f[:3] for f in frames[:2]] == [[b"", b"t", (3).to_bytes(8, "big")], [b"", b"t", (4).to_bytes(8, "big")]]
    decoded = [decode_batch(f[3])[1] for f in frames[:2]]
    assert decoded == [decode_batch(payloads[3])[1], decode_batch(payloads[4])[1]]
    assert frames[2] == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
    assert publisher.replays_served == 1


def drain_after_resubscribe(publisher: KVEventPublisher, subscriber: KVEventSubscriber) -> list[int]:
    """Receives everything; sends empty batches until one arrives (the new subscription may take a
    moment to reach the publisher) and returns the sequence numbers seen."""
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        seen += [seq for seq, _ in subscriber.iter_batches(300)]
        if not seen:
            publisher.publish([])
    seen += [seq for seq, _ in subscriber.iter_batches(300)]
    return seen


def test_subscriber_recovers_missed_batches_through_replay() -> None:
    import zmq

    with (
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as publisher,
        KVEventSubscriber(publisher.endpoint, replay_endpoint=publisher.replay_endpoint) as subscriber,
    ):
        tracker = DigestSetTracker()
        tracker.apply(sync(publisher, subscriber), [])
        subscriber._socket.setsockopt(zmq.UNSUBSCRIBE, b"")  # the router goes deaf for a while
        time.sleep(0.1)
        missed = [publisher.publish([stored(i)]) for i in range(6)]
        subscriber._socket.setsockopt(zmq.SUBSCRIBE, b"")
        time.sleep(0.1)
        publisher.publish([stored(6)])
        batches: dict[int, list[dict[str, Any]]] = {}
        original_receive = subscriber.receive

        def recording_receive(timeout_ms: int = 1000) -> tuple[int, list[dict[str, Any]]] | None:
            got = original_receive(timeout_ms)
            if got is not None:
                batches[got[0]] = got[1]
                tracker.apply(*got)
            return got

        subscriber.receive = recording_receive  # type: ignore[method-assign]
        seen = drain_after_resubscribe(publisher, subscriber)
        assert seen == list(range(missed[0], publisher.next_seq))  # in order, nothing lost, nothing twice
        assert subscriber.replayed_batches >= len(missed) and subscriber.missed_batches == 0
        assert tracker.consistent and tracker.missed_batches == 0
        assert tracker.block_hashes == {low64(digest(i)) for i in range(7)}
        # A router that starts late bootstraps from the buffer.
        assert [seq for seq, _ in subscriber.replay(missed[0])] == seen
        with pytest.raises(ValueError):
            subscriber.replay(-1)


def test_a_malformed_replayed_batch_costs_only_itself() -> None:
    """One undecodable payload in a replay answer: the other batches still come back (before, the whole
    replay was dropped and all six counted as missed), and the bad one's place holds the events-lost mark."""
    import zmq

    with (
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as publisher,
        KVEventSubscriber(publisher.endpoint, replay_endpoint=publisher.replay_endpoint) as subscriber,
    ):
        tracker = DigestSetTracker()
        tracker.apply(sync(publisher, subscriber), [])
        subscriber._socket.setsockopt(zmq.UNSUBSCRIBE, b"")
        time.sleep(0.1)
        missed = [publisher.publish([stored(i)]) for i in range(6)]
        assert publisher._buffer is not None
        publisher._buffer = deque((seq, b"\xc1" if seq == missed[2] else payload) for seq, payload in publisher._buffer)
        subscriber._socket.setsockopt(zmq.SUBSCRIBE, b"")
        time.sleep(0.1)
        publisher.publish([stored(6)])
        got: dict[int, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 10
        while publisher.next_seq - 1 not in got:
            assert time.monotonic() < deadline, got
            if (batch := subscriber.receive(300)) is None:
                publisher.publish([])
                continue
            got[batch[0]] = batch[1]
            tracker.apply(*batch)
        assert missed[0] in got and sorted(got) == list(range(missed[0], publisher.next_seq))
        assert got[missed[2]] == [{"type": "cleared", "events_lost": True}]
        assert subscriber.malformed_batches == 1 and subscriber.missed_batches == 0
        assert subscriber.replayed_batches >= len(missed)
        # The router forgot what it knew before the loss, so it holds no block it may have missed the removal of.
        assert tracker.consistent and tracker.block_hashes == {low64(digest(i)) for i in (3, 4, 5, 6)}
        assert [seq for seq, _ in subscriber.replay(missed[0])][:6] == missed
        assert subscriber.malformed_batches == 2


def test_gap_beyond_the_buffer_is_counted_as_missed() -> None:
    import zmq

    with (
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", replay_buffer_steps=2) as publisher,
        KVEventSubscriber(publisher.endpoint, replay_endpoint=publisher.replay_endpoint) as subscriber,
    ):
        last = sync(publisher, subscriber)
        subscriber._socket.setsockopt(zmq.UNSUBSCRIBE, b"")
        time.sleep(0.1)
        for i in range(5):
            publisher.publish([stored(i)])
        subscriber._socket.setsockopt(zmq.SUBSCRIBE, b"")
        seen = drain_after_resubscribe(publisher, subscriber)
        assert seen == list(range(seen[0], publisher.next_seq))
        assert seen[0] >= publisher.next_seq - 2  # nothing older than the 2-batch buffer could come back
        assert subscriber.missed_batches + len(seen) == publisher.next_seq - 1 - last


def test_replay_without_endpoint_or_answer() -> None:
    with (
        KVEventPublisher("tcp://127.0.0.1:*") as publisher,
        KVEventSubscriber(publisher.endpoint) as subscriber,
        pytest.raises(RuntimeError, match="replay_endpoint"),
    ):
        subscriber.replay(0)
    with (
        KVEventSubscriber("tcp://127.0.0.1:9", replay_endpoint="tcp://127.0.0.1:9", replay_timeout_ms=100) as lonely,
        pytest.raises(TimeoutError),
    ):
        lonely.replay(0)


# --- another process ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    from sagellm_kv_cache.observability.events import DigestSetTracker, KVEventSubscriber

    endpoint, topic = sys.argv[1], sys.argv[2]
    tracker = DigestSetTracker()
    with KVEventSubscriber(endpoint, topic) as sub:
        first = None
        while first is None:
            first = sub.receive(100)
        print("SYNCED", first[0], flush=True)
        last = int(sys.stdin.readline().split()[1])
        seq = first[0]
        tracker.apply(*first)
        while seq < last:
            got = sub.receive(10_000)
            if got is None:
                break
            seq = got[0]
            tracker.apply(*got)
    print(json.dumps({
        "digests": sorted(tracker.block_hashes),
        "missed": tracker.missed_batches,
        "last_seq": tracker.last_seq,
    }), flush=True)
    """
)


class ModelCache:
    """A small LRU prefix cache that reports events the way the C++ prefix cache drains them."""

    def __init__(self, capacity: int, block_size: int = 4) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.blocks: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, tokens: list[int]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        parent = b""
        new: list[bytes] = []
        new_tokens: list[int] = []
        first_parent: bytes | None = None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            chunk = tokens[start : start + self.block_size]
            key = hashlib.sha256(parent + bytes(str(chunk), "ascii")).digest()
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                if not new:
                    first_parent = parent or None
                new.append(key)
                new_tokens.extend(chunk)
                self.blocks[key] = None
            parent = key
        if new:
            events.append(
                {
                    "type": "stored",
                    "digests": new,
                    "parent": first_parent,
                    "token_ids": new_tokens,
                    "block_size": self.block_size,
                    "extra_key": None,
                }
            )
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        if evicted:
            events.append({"type": "removed", "digests": evicted})
        return events


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(Path(p).resolve()) for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@pytest.mark.multiprocess
def test_subscriber_in_another_process_rebuilds_digest_set(tmp_path: Path) -> None:
    script = tmp_path / "subscriber.py"
    script.write_text(CHILD)
    rng = random.Random(7)
    model = ModelCache(capacity=40)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(2, 6) * 4)] for _ in range(12)]

    with KVEventPublisher("tcp://127.0.0.1:*", topic="kv-test") as publisher:
        child = subprocess.Popen(
            [sys.executable, str(script), publisher.endpoint, "kv-test"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=tmp_path,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(child.stdout.readline()))  # type: ignore[union-attr]
            reader.start()
            deadline = time.monotonic() + 30
            while reader.is_alive() and time.monotonic() < deadline:
                publisher.publish([])
                time.sleep(0.02)
            reader.join(timeout=1)
            assert line and line[0].startswith("SYNCED"), (
                f"child did not sync: {child.stderr.read() if child.stderr else ''}"
            )

            batches: list[list[dict[str, Any]]] = []
            for step in range(300):
                if step % 97 == 96:
                    model.blocks.clear()
                    batches.append([{"type": "cleared"}])
                    continue
                tokens = prompts[rng.randrange(len(prompts))] + [rng.randrange(1000) for _ in range(8)]
                batches.append(model.insert(tokens))
            last_seq = publisher.next_seq + len(batches) - 1
            child.stdin.write(f"LAST {last_seq}\n")
            child.stdin.flush()
            for batch in batches:
                publisher.publish(batch)
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["missed"] == 0
    assert result["last_seq"] == last_seq
    assert result["digests"] == sorted(low64(d) for d in model.blocks)
    assert len(result["digests"]) > 0


# --- the tenant salt leaves the prefix cache with its stored events -------------------------------------


def test_prefix_cache_stored_events_carry_the_salt() -> None:
    np = pytest.importorskip("numpy")
    from sagellm_kv_cache import RadixPrefixCache

    cache = RadixPrefixCache(block_size=4, event_queue_capacity=64)
    prompt = np.arange(12, dtype=np.int64)
    cache.insert_tokens(prompt, [0, 1, 2], salt=b"tenant-a")
    cache.insert_tokens(prompt, [3, 4, 5], salt=b"tenant-b")
    cache.insert_tokens(prompt, [6, 7, 8])
    longer = np.arange(16, dtype=np.int64)
    cache.insert_tokens(longer, [9, 10, 11, 12], salt=b"tenant-a")  # 3 blocks redundant, 1 new with a parent
    digests = cache.hash_tokens(np.arange(20, dtype=np.int64), salt=b"tenant-b")
    cache.insert(digests[3:], [13, 14], parent=digests[2], token_ids=list(range(12, 20)), cache_salt=b"tenant-b")
    stored = [e for e in cache.drain_events() if e["type"] == "stored"]
    assert [e.get("cache_salt") for e in stored] == [b"tenant-a", b"tenant-b", None, b"tenant-a", b"tenant-b"]
    assert stored[3]["parent"] is not None and len(stored[3]["digests"]) == 1
    raw = msgpack.unpackb(encode_batch(stored), raw=False)
    assert [e.get("cache_salt") for e in raw[1]] == ["tenant-a", "tenant-b", None, "tenant-a", "tenant-b"]
    assert raw[1][0]["extra_keys"] == [["tenant-a"], None, None]  # the salt enters the first block only
    quiet = RadixPrefixCache(block_size=4)  # events off: nothing is queued
    quiet.insert_tokens(prompt, [0, 1, 2], salt=b"tenant-a")
    assert quiet.drain_events() == []


def test_salts_survive_concurrent_drains() -> None:
    np = pytest.importorskip("numpy")
    from sagellm_kv_cache import RadixPrefixCache

    cache = RadixPrefixCache(block_size=4, event_queue_capacity=100_000)
    tenants = [f"tenant-{i}".encode() for i in range(4)]
    drained: list[dict[str, Any]] = []
    done = threading.Event()

    def drainer() -> None:
        while not done.is_set():
            drained.extend(cache.drain_events())

    def inserter(salt: bytes) -> None:
        ids = iter(range(tenants.index(salt) * 10_000, (tenants.index(salt) + 1) * 10_000))
        for n in range(200):
            prompt = np.arange(n * 8, n * 8 + 8, dtype=np.int64)
            cache.insert_tokens(prompt, [next(ids), next(ids)], salt=salt)

    thread = threading.Thread(target=drainer)
    thread.start()
    workers = [threading.Thread(target=inserter, args=(salt,)) for salt in tenants]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    thread.join()
    drained.extend(cache.drain_events())
    owner = {bytes(d): salt for salt in tenants for n in range(200)
             for d in cache.hash_tokens(np.arange(n * 8, n * 8 + 8, dtype=np.int64), salt=salt)}
    stored = [e for e in drained if e["type"] == "stored"]
    assert len(stored) == 800
    assert all(e["cache_salt"] == owner[e["digests"][0]] for e in stored)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"linger_ms": "1000"}, TypeError, "linger_ms"),  # was: accepted, then close() failed with the port still bound
    ({"linger_ms": -2}, ValueError, "linger_ms"),
    ({"hwm": -1}, ValueError, "hwm"),  # was: zmq.ZMQError "Invalid argument"
    ({"hwm": 2**40}, ValueError, "hwm"),  # was: OverflowError
    ({"replay_buffer_steps": 2**40, "replay_endpoint": "tcp://127.0.0.1:*"}, ValueError, "replay_buffer_steps"),
    ({"endpoint": None}, TypeError, "endpoint"),
    ({"replay_endpoint": 5557}, TypeError, "replay_endpoint"),
])
def test_publisher_options_are_checked_before_anything_binds(kwargs: dict[str, Any], error: type[Exception],
                                                             match: str) -> None:
    with pytest.raises(error, match=match):
        KVEventPublisher(**{"endpoint": "tcp://127.0.0.1:*", **kwargs})


@pytest.mark.parametrize(("timeout", "error"), [("2000", TypeError), (True, TypeError), (2.5, TypeError),
                                              (0, ValueError), (-5, ValueError), (2**40, ValueError)])
def test_subscriber_replay_timeout_is_checked_at_construction(timeout: Any, error: type[Exception]) -> None:
    """A bad replay_timeout_ms was accepted; at the first gap receive() raised TypeError (or timed out at
    once), the live batch it had read was lost, and every later receive failed the same way."""
    with pytest.raises(error, match="replay_timeout_ms"):
        KVEventSubscriber("tcp://127.0.0.1:9", replay_endpoint="tcp://127.0.0.1:9", replay_timeout_ms=timeout).close()


@pytest.mark.parametrize(("timeout", "error"), [("100", TypeError), (None, TypeError), (True, TypeError),
                                              (-1, ValueError), (float("nan"), ValueError), (10**30, ValueError)])
def test_receive_timeout_is_checked(timeout: Any, error: type[Exception]) -> None:
    """receive('100') and receive(None) were TypeErrors about '>' between int and str / NoneType, -1 and NaN
    silently meant 0, 10**30 an OverflowError from zmq's poll; none named timeout_ms."""
    with KVEventPublisher("tcp://127.0.0.1:*") as publisher, KVEventSubscriber(publisher.endpoint) as subscriber:
        sync(publisher, subscriber)
        publisher.publish([stored(1)])
        with pytest.raises(error, match="timeout_ms"):
            subscriber.receive(timeout)
        with pytest.raises(error, match="timeout_ms"):
            next(subscriber.iter_batches(timeout))
        got = subscriber.receive(2000)  # the batch waiting was not consumed by the refused calls
        assert got is not None and got[1][0]["type"] == "stored"


def test_replay_start_beyond_64_bits_is_a_value_error() -> None:
    with (
        KVEventSubscriber("tcp://127.0.0.1:9", replay_endpoint="tcp://127.0.0.1:9", replay_timeout_ms=50) as sub,
        pytest.raises(ValueError, match="start_seq"),
    ):
        sub.replay(2**64)  # was: OverflowError from int.to_bytes
    with pytest.raises(TypeError, match="endpoint"):
        KVEventSubscriber(None)  # type: ignore[arg-type]


def _threads_named(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_a_replaying_publisher_dropped_without_close_lets_go_of_its_thread_sockets_and_ports() -> None:
    # The replay thread held the publisher: one dropped without close() (an engine that rebuilds
    # its publisher) was never collected, and kept its thread, its context's descriptors and both
    # bound ports for the rest of the process.
    import gc

    before_fds, before_threads = len(os.listdir("/proc/self/fd")), _threads_named("kv-event-replay")
    for _ in range(10):
        publisher = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", linger_ms=0)
        endpoint, replay_endpoint = publisher.endpoint, publisher.replay_endpoint
        publisher.publish([{"type": "cleared"}])
        del publisher
        gc.collect()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (_threads_named("kv-event-replay") > before_threads
                                           or len(os.listdir("/proc/self/fd")) > before_fds):
        time.sleep(0.02)
    assert _threads_named("kv-event-replay") == before_threads
    assert len(os.listdir("/proc/self/fd")) <= before_fds
    # The last one's ports are free again.
    with KVEventPublisher(endpoint, replay_endpoint=replay_endpoint, linger_ms=0) as again:
        assert (again.endpoint, again.replay_endpoint) == (endpoint, replay_endpoint)
