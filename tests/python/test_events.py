"""KV events: wire format, validation, and a subscriber in another process rebuilding the digest set."""

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
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

from sagellm_kv_cache.observability import events as events_module  # noqa: E402
from sagellm_kv_cache.observability.events import (  # noqa: E402
    DigestSetTracker,
    KVEventDecodeError,
    KVEventPublisher,
    KVEventSubscriber,
    decode_batch,
    encode_batch,
    rebuild_digests,
)


def digest(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "little")).digest()


STORED = {
    "type": "stored",
    "digests": [digest(1), digest(2)],
    "parent": digest(0),
    "token_ids": list(range(32)),
    "block_size": 16,
    "extra_key": b"lora-7",
}


# --- wire format -------------------------------------------------------------------------------


def test_batch_is_vllm_array_format() -> None:
    payload = encode_batch([STORED, {"type": "removed", "digests": [digest(1)]}, {"type": "cleared"}], timestamp=12.5)
    raw = msgpack.unpackb(payload, raw=False)
    assert raw[0] == 12.5
    assert raw[1] == [
        ["BlockStored", [digest(1), digest(2)], digest(0), list(range(32)), 16, b"lora-7", None],
        ["BlockRemoved", [digest(1)], None],
        ["AllBlocksCleared"],
    ]


def test_round_trip_through_decode() -> None:
    ts, decoded = decode_batch(encode_batch([STORED, {"type": "cleared"}], timestamp=1.0))
    assert ts == 1.0
    assert decoded == [STORED, {"type": "cleared"}]


def test_decoder_accepts_vllm_batches_with_extra_fields() -> None:
    # What vLLM's publisher sends: integer hashes, a LoRA id, a medium, a data-parallel rank.
    payload = msgpack.packb(
        [3.0, [["BlockStored", [11, 12], None, [1, 2], 1, None, "GPU", None], ["BlockRemoved", [11], "GPU"]], 0]
    )
    _, decoded = decode_batch(payload)
    assert decoded[0]["digests"] == [11, 12] and decoded[0]["medium"] == "GPU"
    assert decoded[1] == {"type": "removed", "digests": [11], "medium": "GPU"}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never valid msgpack
        msgpack.packb({"ts": 1}),
        msgpack.packb([1.0]),
        msgpack.packb(["x", []]),
        msgpack.packb([1.0, [["Nope"]]]),
        msgpack.packb([1.0, [["BlockStored", []]]]),
        msgpack.packb([1.0, [[]]]),
        msgpack.packb([1.0, [["BlockRemoved"]]]),
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
        ({"type": "stored", "digests": [b"a", 3], "block_size": 16}, TypeError, r"digests'\]\[1\]"),
        ({**STORED, "parent": "str"}, TypeError, "parent"),
        ({**STORED, "block_size": 0}, ValueError, "block_size"),
        ({**STORED, "token_ids": [1, "2"]}, TypeError, "token_ids"),
        ({**STORED, "extra_key": 1.5}, TypeError, "extra_key"),
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


def test_str_extra_key_round_trips() -> None:
    _, decoded = decode_batch(encode_batch([{**STORED, "extra_key": "tenant-a"}]))
    assert decoded[0]["extra_key"] == "tenant-a"


def test_numpy_token_ids_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    _, decoded = decode_batch(encode_batch([{**STORED, "token_ids": np.arange(32, dtype=np.int32)}]))
    assert decoded[0]["token_ids"] == list(range(32))


def test_tracker_applies_events_and_detects_gaps() -> None:
    tracker = DigestSetTracker()
    tracker.apply(0, [STORED])
    assert tracker.digests == {digest(1), digest(2)}
    tracker.apply(1, [{"type": "removed", "digests": [digest(1)]}])
    assert tracker.digests == {digest(2)} and tracker.consistent
    tracker.apply(1, [{"type": "cleared"}])  # duplicate seq: ignored
    assert tracker.digests == {digest(2)}
    tracker.apply(4, [])
    assert tracker.missed_batches == 2 and not tracker.consistent
    tracker.apply(5, [{"type": "cleared"}])
    assert tracker.digests == set() and tracker.consistent
    assert rebuild_digests([(0, [STORED]), (1, [{"type": "removed", "digests": [digest(2)]}])]) == {digest(1)}


def test_missing_dependencies_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "_IMPORT_ERROR", ImportError("No module named 'zmq'"))
    with pytest.raises(ImportError, match=r"isagellm-kv-cache\[events\]"):
        KVEventPublisher("tcp://127.0.0.1:*")
    with pytest.raises(ImportError, match=r"isagellm-kv-cache\[events\]"):
        encode_batch([])


def test_publisher_closed_and_bad_endpoint() -> None:
    publisher = KVEventPublisher("tcp://127.0.0.1:*")
    publisher.close()
    publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish([])
    with pytest.raises(Exception, match=r"(?i)invalid|protocol|argument"):
        KVEventPublisher("not-an-endpoint")


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
        KVEventPublisher("tcp://127.0.0.1:*", topic="kv-events") as publisher,
        KVEventSubscriber(publisher.endpoint, topic="kv-events") as subscriber,
    ):
        subscriber._socket.connect(other.endpoint)  # same prefix, different topic: must be skipped
        last = sync(publisher, subscriber)
        for _ in range(5):
            other.publish([STORED])
        seq = publisher.publish([STORED])
        assert seq == last + 1
        assert subscriber.receive(2000) == (seq, [STORED])
        assert subscriber.last_timestamp is not None and abs(subscriber.last_timestamp - time.time()) < 60
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
                pub.send_multipart([b"kv-events", b"\x00" * 8, encode_batch([])])
                if subscriber.receive(50) is not None:
                    break
            while subscriber.receive(50) is not None:
                pass
            pub.send_multipart([b"kv-events", b"\x01", b"x"])
            with pytest.raises(KVEventDecodeError, match="frames"):
                subscriber.receive(2000)
            pub.send_multipart([b"kv-events", b"\x00" * 8, b"\xc1"])
            with pytest.raises(KVEventDecodeError, match="msgpack"):
                subscriber.receive(2000)
    finally:
        pub.close(linger=0)
        ctx.term()


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
        "digests": sorted(d.hex() for d in tracker.digests),
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
    assert result["digests"] == sorted(d.hex() for d in model.blocks)
    assert len(result["digests"]) > 0
