"""KV-cache events over ZeroMQ, in the wire format vLLM's KV-aware routers already consume.

A KV-aware router keeps, per engine, the set of block digests that engine holds, and sends each
request where most of its prefix is cached. The prefix cache emits *stored*, *removed* and
*cleared* events; this module publishes them so such a router can follow along.

Wire format (what vLLM's ``ZmqEventPublisher`` sends with its array-like msgpack structs):

* every message is three ZMQ frames: ``[topic, seq, payload]``; ``seq`` is an 8-byte big-endian
  counter starting at 0, so a subscriber detects lost messages by a gap;
* ``payload`` is a msgpack batch ``[timestamp, [event, ...]]`` (a third element, a data-parallel
  rank, may follow; it is accepted and ignored);
* an event is a tagged array:
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, extra_key, medium]``,
  ``["BlockRemoved", block_hashes, medium]`` or ``["AllBlocksCleared"]``. Where vLLM carries a LoRA id
  our ``extra_key`` (LoRA id, multimodal hash or tenant salt: bytes, str or int, sent as is) goes;
  ``token_ids`` are the stored blocks' tokens, concatenated.

In Python the events are plain dicts, the shape the C++ prefix cache drains::

    {"type": "stored", "digests": [bytes, ...], "parent": bytes | None, "token_ids": [int, ...],
     "block_size": int, "extra_key": bytes | str | int | None}
    {"type": "removed", "digests": [bytes, ...]}
    {"type": "cleared"}

There is no replay channel: a subscriber that sees a sequence gap should treat its view as stale
until the next ``cleared`` event (see :class:`DigestSetTracker`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

try:
    import msgpack
    import zmq
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching _IMPORT_ERROR
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "DigestSetTracker",
    "KVEventDecodeError",
    "KVEventPublisher",
    "KVEventSubscriber",
    "decode_batch",
    "encode_batch",
    "rebuild_digests",
]

_STORED, _REMOVED, _CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"


class KVEventDecodeError(ValueError):
    """A message on the wire that is not a well-formed KV event batch."""


def _require_deps() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError("KV events need pyzmq and msgpack: pip install isagellm-kv-cache[events]") from _IMPORT_ERROR


# --- dict <-> wire ---------------------------------------------------------------------------------


def _digest_list(event_index: int, value: object) -> list[bytes]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"events[{event_index}]['digests'] must be a list of bytes, got {type(value).__name__}")
    digests: list[bytes] = []
    for i, digest in enumerate(value):
        if not isinstance(digest, bytes):
            raise TypeError(f"events[{event_index}]['digests'][{i}] must be bytes, got {type(digest).__name__}")
        digests.append(digest)
    return digests


def _to_wire(index: int, event: object, medium: str | None) -> list[Any]:
    """Validates one event dict and converts it to vLLM's tagged array."""
    if not isinstance(event, Mapping):
        raise TypeError(f"events[{index}] must be a dict, got {type(event).__name__}")
    kind = event.get("type")
    if kind == "stored":
        digests = _digest_list(index, event.get("digests"))
        parent = event.get("parent")
        if parent is not None and not isinstance(parent, bytes):
            raise TypeError(f"events[{index}]['parent'] must be bytes or None, got {type(parent).__name__}")
        raw_tokens = event.get("token_ids", [])
        if hasattr(raw_tokens, "tolist"):  # numpy arrays from the native fast path
            raw_tokens = raw_tokens.tolist()
        if isinstance(raw_tokens, (str, bytes)) or not isinstance(raw_tokens, Sequence):
            raise TypeError(f"events[{index}]['token_ids'] must be a list of int, got {type(raw_tokens).__name__}")
        tokens: list[int] = []
        for token in raw_tokens:
            if isinstance(token, bool) or not isinstance(token, int):
                raise TypeError(f"events[{index}]['token_ids'] must hold ints, found {type(token).__name__}")
            tokens.append(token)
        block_size = event.get("block_size")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"events[{index}]['block_size'] must be an int > 0, got {block_size!r}")
        extra = event.get("extra_key")
        if extra is not None and (isinstance(extra, bool) or not isinstance(extra, (bytes, str, int))):
            raise TypeError(f"events[{index}]['extra_key'] must be bytes, str, int or None, got {type(extra).__name__}")
        return [_STORED, digests, parent, tokens, block_size, extra, medium]
    if kind == "removed":
        return [_REMOVED, _digest_list(index, event.get("digests")), medium]
    if kind == "cleared":
        return [_CLEARED]
    raise ValueError(f"events[{index}] has unknown type {kind!r} (expected 'stored', 'removed' or 'cleared')")


def _from_wire(index: int, item: object) -> dict[str, Any]:
    if not isinstance(item, list) or not item or not isinstance(item[0], str):
        raise KVEventDecodeError(f"event {index} is not a tagged array: {item!r:.80}")
    tag, fields = item[0], item[1:]
    try:
        if tag == _STORED:
            if len(fields) < 4:
                raise KVEventDecodeError(f"event {index}: BlockStored has {len(fields)} fields, needs at least 4")
            event: dict[str, Any] = {
                "type": "stored",
                "digests": list(fields[0]),
                "parent": fields[1],
                "token_ids": list(fields[2]),
                "block_size": int(fields[3]),
                "extra_key": fields[4] if len(fields) > 4 else None,
            }
            if len(fields) > 5 and fields[5] is not None:
                event["medium"] = fields[5]
            return event
        if tag == _REMOVED:
            if len(fields) < 1:
                raise KVEventDecodeError(f"event {index}: BlockRemoved has no block hashes")
            event = {"type": "removed", "digests": list(fields[0])}
            if len(fields) > 1 and fields[1] is not None:
                event["medium"] = fields[1]
            return event
        if tag == _CLEARED:
            return {"type": "cleared"}
    except (TypeError, ValueError) as err:
        if isinstance(err, KVEventDecodeError):
            raise
        raise KVEventDecodeError(f"event {index} ({tag}) is malformed: {err}") from err
    raise KVEventDecodeError(f"event {index} has unknown tag {tag!r}")


def encode_batch(
    events: Iterable[Mapping[str, Any]], timestamp: float | None = None, medium: str | None = None
) -> bytes:
    """The msgpack payload of one batch; validates every event first (``TypeError``/``ValueError``)."""
    _require_deps()
    wire = [_to_wire(i, event, medium) for i, event in enumerate(events)]
    return msgpack.packb([time.time() if timestamp is None else float(timestamp), wire], use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]]]:
    """``(timestamp, events)`` from a payload; anything malformed is a :class:`KVEventDecodeError`."""
    _require_deps()
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as err:
        raise KVEventDecodeError(f"payload is not msgpack: {err}") from err
    if not isinstance(batch, list) or len(batch) not in (2, 3):
        raise KVEventDecodeError("payload is not a [timestamp, events] batch")
    timestamp, items = batch[0], batch[1]
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not isinstance(items, list):
        raise KVEventDecodeError("payload is not a [timestamp, events] batch")
    return float(timestamp), [_from_wire(i, item) for i, item in enumerate(items)]


# --- publisher / subscriber ------------------------------------------------------------------------


class KVEventPublisher:
    """Binds a ZMQ PUB socket and sends numbered event batches.

    The publisher binds (the engine is the stable end; routers come and go). An endpoint with port
    ``*`` binds a free port; :attr:`endpoint` then tells the real one. ``publish`` is thread-safe.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        topic: str = "kv-events",
        *,
        medium: str | None = None,
        hwm: int = 100_000,
        linger_ms: int = 1000,
    ) -> None:
        _require_deps()
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        self.topic = topic
        self.medium = medium
        self._topic_bytes = topic.encode("utf-8")
        self._linger_ms = linger_ms
        self._lock = threading.Lock()
        self._seq = 0
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.PUB)
        try:
            self._socket.setsockopt(zmq.SNDHWM, hwm)
            self._socket.bind(endpoint)
            self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception:
            self._socket.close(linger=0)
            self._ctx.term()
            raise
        self._closed = False

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._seq

    def publish(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Sends one batch (possibly empty) and returns its sequence number.

        Every event is validated before anything is sent: a bad one raises ``TypeError`` or
        ``ValueError`` and neither sends nor consumes a sequence number.
        """
        if isinstance(events, Mapping) or not isinstance(events, Sequence):
            raise TypeError(f"events must be a list of dicts, got {type(events).__name__}")
        payload = encode_batch(events, medium=self.medium)
        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventPublisher is closed")
            seq = self._seq
            self._socket.send_multipart([self._topic_bytes, seq.to_bytes(8, "big"), payload])
            self._seq += 1
            return seq

    def close(self) -> None:
        """Flushes (up to ``linger_ms``) and closes the socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close(linger=self._linger_ms)
            self._ctx.term()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class KVEventSubscriber:
    """Connects a ZMQ SUB socket to a publisher and decodes its batches."""

    def __init__(self, endpoint: str, topic: str = "kv-events") -> None:
        _require_deps()
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        self.endpoint = endpoint
        self.topic = topic
        self._topic_bytes = topic.encode("utf-8")
        self.last_timestamp: float | None = None
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.SUB)
        try:
            self._socket.setsockopt(zmq.SUBSCRIBE, self._topic_bytes)
            self._socket.connect(endpoint)
        except Exception:
            self._socket.close(linger=0)
            self._ctx.term()
            raise
        self._closed = False

    def receive(self, timeout_ms: int = 1000) -> tuple[int, list[dict[str, Any]]] | None:
        """The next batch as ``(seq, events)``, or None when nothing arrives within ``timeout_ms``.

        Raises :class:`KVEventDecodeError` for a malformed message (it is consumed, so the next
        call moves on).
        """
        if self._closed:
            raise RuntimeError("KVEventSubscriber is closed")
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000.0
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart()
            # ZMQ filters by prefix: "kv-events" also lets "kv-events-2" through.
            if frames and frames[0] != self._topic_bytes:
                continue
            if len(frames) != 3 or len(frames[1]) != 8:
                raise KVEventDecodeError(f"expected [topic, seq(8 bytes), payload] frames, got {len(frames)} frames")
            seq = int.from_bytes(frames[1], "big")
            self.last_timestamp, events = decode_batch(frames[2])
            return seq, events

    def iter_batches(self, idle_timeout_ms: int = 1000) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """Yields batches until none arrives for ``idle_timeout_ms``."""
        while (batch := self.receive(idle_timeout_ms)) is not None:
            yield batch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> KVEventSubscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- rebuilding the cached-digest view --------------------------------------------------------------


class DigestSetTracker:
    """A router's view of one engine's cache: the digests it holds, rebuilt from the event stream.

    ``consistent`` turns False when a sequence gap shows lost batches, and True again after a
    ``cleared`` event (from then on the view is complete again).
    """

    def __init__(self) -> None:
        self.digests: set[bytes] = set()
        self.last_seq: int | None = None
        self.missed_batches = 0
        self.consistent = True

    def apply(self, seq: int, events: Iterable[Mapping[str, Any]]) -> None:
        """Applies one batch; a batch at or below the last seen sequence (a duplicate) is ignored."""
        if self.last_seq is not None:
            if seq <= self.last_seq:
                return
            if seq != self.last_seq + 1:
                self.missed_batches += seq - self.last_seq - 1
                self.consistent = False
        self.last_seq = seq
        for event in events:
            kind = event.get("type")
            if kind == "stored":
                self.digests.update(event["digests"])
            elif kind == "removed":
                self.digests.difference_update(event["digests"])
            elif kind == "cleared":
                self.digests.clear()
                self.consistent = True


def rebuild_digests(batches: Iterable[tuple[int, Iterable[Mapping[str, Any]]]]) -> set[bytes]:
    """The digest set a stream of ``(seq, events)`` batches leaves behind."""
    tracker = DigestSetTracker()
    for seq, events in batches:
        tracker.apply(seq, events)
    return tracker.digests
