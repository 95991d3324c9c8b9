"""KV-cache events over ZeroMQ in the wire format KV-aware routers consume (vLLM 0.33.0's schema).

A KV-aware router (NVIDIA Dynamo's KV router or standalone indexer, or anything that reads vLLM's
or SGLang's KV events) keeps, per engine, an index of the blocks that engine holds and sends each
request where most of its prefix is cached. The prefix cache emits *stored*, *removed* and
*cleared* events; :class:`KVEventPublisher` sends them so such a router can follow along.

Transport, as vLLM's ``ZmqEventPublisher`` does it:

* every message is three ZMQ frames ``[topic, seq, payload]`` on a PUB socket; ``seq`` is an
  8-byte big-endian counter from 0, so a subscriber detects lost messages by a gap; the default
  topic is vLLM's, the empty string;
* the payload is one msgpack batch; :mod:`~sagellm_kv_cache.observability.kv_wire` holds the
  schema (tagged-map events, 64-bit block ids derived from our 32-byte digests, ``lora_name``,
  ``medium``, ``cache_salt``, token ids);
* replay: with ``replay_endpoint`` the publisher also binds a ROUTER socket and keeps the last
  ``replay_buffer_steps`` batches. A client (a DEALER) sends ``[b"", start_seq]`` (8 bytes,
  big-endian) and gets back ``[b"", topic, seq, payload]`` for every buffered batch from
  ``start_seq`` on, then ``[b"", b"", -1 (8 bytes, signed), b""]``. A router that saw a gap asks
  for the missing batches there instead of staying stale (Dynamo's indexer does, given the
  endpoint on ``/register``; :class:`KVEventSubscriber` does, given ``replay_endpoint``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sagellm_kv_cache.observability.kv_wire import (
    MEDIA,
    VLLM_WIRE_SCHEMA,
    KVEventDecodeError,
    decode_batch,
    decode_batch_with_rank,
    encode_batch,
    wire_block_id,
)

try:
    import zmq
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching _IMPORT_ERROR
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "VLLM_WIRE_SCHEMA",
    "DigestSetTracker",
    "KVEventDecodeError",
    "KVEventPublisher",
    "KVEventSubscriber",
    "decode_batch",
    "encode_batch",
    "rebuild_digests",
    "wire_block_id",
]

END_SEQ = -1
"""The sequence number that ends a replay answer."""

_POLL_MS = 50  # how often the replay thread looks at its closed flag

_log = logging.getLogger(__name__)


def _require_deps() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError("KV events need pyzmq and msgpack: pip install isagellm-kv-cache[events]") from _IMPORT_ERROR


_C_INT_MAX = 2**31 - 1  # ZMQ socket options are C ints
_SEQ_MAX = 2**63 - 2  # sequence frames are signed 8-byte ints (-1 ends a replay); room for one batch


def _int_option(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; TypeError / ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_endpoint(name: str, value: Any) -> None:
    if not isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a ZMQ endpoint string, got {type(value).__name__}")


def _attach(socket: zmq.Socket[bytes], name: str, endpoint: str, *, bind: bool) -> None:
    """Binds or connects ``socket``; an endpoint zmq cannot use is a ValueError naming it (a port in
    use stays zmq's error: the value is fine, the port is taken)."""
    try:
        if bind:
            socket.bind(endpoint)
        else:
            socket.connect(endpoint)
    except zmq.ZMQError as err:
        if err.errno == zmq.EADDRINUSE:
            raise
        raise ValueError(f"{name} {endpoint!r} is not an endpoint zmq can {'bind' if bind else 'connect'}: "
                         f"{err.strerror}") from err


_Batch = tuple[int, list[dict[str, Any]], float, int | None]  # seq, events, timestamp, data_parallel_rank


def _seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


# --- publisher ------------------------------------------------------------------------------------


class KVEventPublisher:
    """Binds a ZMQ PUB socket (and optionally a replay ROUTER socket) and sends numbered batches.

    The publisher binds (the engine is the stable end; routers come and go). An endpoint with port
    ``*`` binds a free port; :attr:`endpoint` / :attr:`replay_endpoint` then tell the real ones.
    ``medium`` is where the published blocks live (``"GPU"`` for device memory, ``"CPU_PINNED"`` or
    ``"CPU"`` for host memory, ``"DISK"``); ``data_parallel_rank`` goes into every batch.
    ``publish`` and ``close`` are thread-safe; replay requests are answered by a background thread.

    Sequence numbers start at ``first_seq`` (0, as vLLM's). Routers (Dynamo's indexer,
    :class:`DigestSetTracker`) ignore a batch numbered at or below the last one they saw, taking it
    for a replayed duplicate: a publisher that replaces a closed one for the same engine must go on
    from ``first_seq=old.next_seq``, or routers ignore it until it passes the old numbers.
    """

    wire_schema = VLLM_WIRE_SCHEMA
    """The vLLM release whose KV-event schema the payloads follow."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        topic: str = "",
        *,
        medium: str | None = "GPU",
        data_parallel_rank: int = 0,
        replay_endpoint: str | None = None,
        replay_buffer_steps: int = 10_000,
        hwm: int = 100_000,
        linger_ms: int = 1000,
        first_seq: int = 0,
    ) -> None:
        _require_deps()
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        if medium not in MEDIA:
            raise ValueError(f"medium is {medium!r}; routers understand {MEDIA}")
        if isinstance(data_parallel_rank, bool) or not isinstance(data_parallel_rank, int) or data_parallel_rank < 0:
            raise ValueError(f"data_parallel_rank must be an int >= 0, got {data_parallel_rank!r}")
        _check_endpoint("endpoint", endpoint)
        if replay_endpoint is not None:
            _check_endpoint("replay_endpoint", replay_endpoint)
        # Checked here, not by the sockets: a linger that only fails in close() would leave the
        # endpoint bound for the life of the process. The replay socket's HWM is 2 * (steps + 1).
        _int_option("replay_buffer_steps", replay_buffer_steps, 1, _C_INT_MAX // 2 - 1)
        _int_option("hwm", hwm, 0, _C_INT_MAX)
        _int_option("first_seq", first_seq, 0, _SEQ_MAX)
        if linger_ms is not None:
            _int_option("linger_ms", linger_ms, -1, _C_INT_MAX)
        self.topic = topic
        self.medium = medium
        self.data_parallel_rank = data_parallel_rank
        self._topic_bytes = topic.encode("utf-8")
        self._linger_ms = linger_ms
        self._lock = threading.Lock()
        # Held from a drain to its publish, so batches leave in the order their events were drained.
        self._drain_lock = threading.Lock()
        self._seq = first_seq
        self._buffer: deque[tuple[int, bytes]] | None = None
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket[bytes] | None = None
        self.replay_endpoint: str | None = None
        try:
            self._socket.setsockopt(zmq.SNDHWM, hwm)
            _attach(self._socket, "endpoint", endpoint, bind=True)
            self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                # A whole answer plus its end marker must fit, or ROUTER drops the tail silently.
                self._replay.setsockopt(zmq.SNDHWM, 2 * (replay_buffer_steps + 1))
                _attach(self._replay, "replay_endpoint", replay_endpoint, bind=True)
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
                self._buffer = deque(maxlen=replay_buffer_steps)
        except Exception:
            self._socket.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)
            self._ctx.term()
            raise
        self._closed = False
        self._replays_served = 0
        self._replay_thread: threading.Thread | None = None
        if self._replay is not None:
            # The thread holds the publisher only while it answers a request: one dropped without
            # close() is collected, and the thread then closes the sockets and the context itself.
            self._replay_thread = threading.Thread(
                target=_serve_replays, args=(weakref.ref(self), self._ctx, self._socket, self._replay, linger_ms),
                name="kv-event-replay", daemon=True)
            self._replay_thread.start()

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._seq

    @property
    def replays_served(self) -> int:
        """Replay requests answered so far."""
        return self._replays_served

    def publish(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Sends one batch (possibly empty) and returns its sequence number.

        Every event is validated before anything is sent: a bad one raises ``TypeError`` or
        ``ValueError`` and neither sends nor consumes a sequence number.
        """
        if isinstance(events, Mapping) or not isinstance(events, Sequence):
            raise TypeError(f"events must be a list of dicts, got {type(events).__name__}")
        payload = encode_batch(events, medium=self.medium, data_parallel_rank=self.data_parallel_rank)
        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventPublisher is closed")
            seq = self._seq
            self._socket.send_multipart([self._topic_bytes, _seq_bytes(seq), payload])
            if self._buffer is not None:
                self._buffer.append((seq, payload))
            self._seq += 1
            return seq

    def publish_drained(self, drain: Callable[[], Sequence[Mapping[str, Any]]]) -> int:
        """Calls ``drain`` (e.g. a cache's ``drain_events``) and publishes what it returns as one batch;
        returns how many events that was (an empty drain sends nothing).

        Thread-safe in the way a router needs: two threads draining the same cache into this
        publisher send their batches in the order they drained them, so a router never applies a
        removal before the store it undoes. A closed publisher raises RuntimeError before ``drain``
        is called. When the drained events cannot be encoded (``TypeError``/``ValueError``: e.g. a
        stored block without its token ids) they are lost: an ``AllBlocksCleared`` batch goes out in
        their place, so routers drop what they may no longer know, and the error is raised.
        """
        with self._drain_lock:
            if self._closed:
                raise RuntimeError("KVEventPublisher is closed")
            events = drain()
            if not events:
                return 0
            try:
                self.publish(events)
            except (TypeError, ValueError):
                self.publish([{"type": "cleared"}])
                raise
            return len(events)

    def _answer_replay(self, replay: zmq.Socket[bytes]) -> bool:
        """Answers one request waiting on the replay socket; False once that socket is closed."""
        try:
            frames = replay.recv_multipart()
        except zmq.ZMQError:
            return False  # the socket was closed under us: we are shutting down
        # [client identity, empty delimiter, start seq]; anything else is not a replay request.
        if len(frames) != 3 or frames[1] or len(frames[2]) != 8:
            return True
        client, start = frames[0], int.from_bytes(frames[2], "big")
        with self._lock:
            answer = [] if self._buffer is None else [item for item in self._buffer if item[0] >= start]
        try:
            for seq, payload in answer:
                replay.send_multipart([client, b"", self._topic_bytes, _seq_bytes(seq), payload])
            replay.send_multipart([client, b"", b"", _seq_bytes(END_SEQ), b""])
        except zmq.ZMQError:
            return False
        self._replays_served += 1
        return True

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: :meth:`publish` then raises RuntimeError."""
        return self._closed

    def close(self) -> None:
        """Stops answering replays, flushes (up to ``linger_ms``) and closes the sockets; idempotent.

        Waits for a :meth:`publish_drained` under way, so events it drained are sent, not lost.
        """
        with self._drain_lock, self._lock:
            if self._closed:
                return
            self._closed = True
        if self._replay_thread is not None:
            self._replay_thread.join()
        if self._replay is not None:
            self._replay.close(linger=0)
        self._socket.close(linger=self._linger_ms)
        self._ctx.term()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _serve_replays(ref: weakref.ReferenceType[KVEventPublisher], ctx: zmq.Context[Any], socket: zmq.Socket[bytes],
                   replay: zmq.Socket[bytes], linger_ms: int | None) -> None:
    """The replay thread: answers requests while the publisher is open. Once the publisher was dropped
    without close() it closes the sockets and the context (nobody else can use them any more)."""
    while True:
        try:
            ready = replay.poll(_POLL_MS, zmq.POLLIN)
        except zmq.ZMQError:
            return  # closed under us: close() is shutting down
        publisher = ref()
        if publisher is None:
            replay.close(linger=0)
            socket.close(linger=linger_ms)
            ctx.term()
            return
        if publisher.closed or (ready and not publisher._answer_replay(replay)):
            return
        del publisher  # not held while polling


# --- subscriber -----------------------------------------------------------------------------------


class KVEventSubscriber:
    """Connects a ZMQ SUB socket to a publisher and decodes its batches.

    With ``replay_endpoint`` a sequence gap is repaired before :meth:`receive` returns: the
    missing batches are fetched from the publisher's replay buffer and handed out in order.
    Gaps the buffer no longer covers are counted in :attr:`missed_batches`. A replayed batch whose
    payload cannot be decoded costs only itself: it is counted in :attr:`malformed_batches`, logged,
    and handed out under its sequence number as ``[{"type": "cleared", "events_lost": True}]``, the
    mark a cache puts where it lost events (a router forgets its view there, so it never keeps a
    block whose removal it missed). After each :meth:`receive`, :attr:`last_timestamp` and
    :attr:`last_data_parallel_rank` are those of the batch it returned. Not thread-safe.
    """

    def __init__(
        self,
        endpoint: str,
        topic: str = "",
        *,
        replay_endpoint: str | None = None,
        replay_timeout_ms: int = 2000,
    ) -> None:
        _require_deps()
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        _check_endpoint("endpoint", endpoint)
        if replay_endpoint is not None:
            _check_endpoint("replay_endpoint", replay_endpoint)
        # Checked now: a bad one only failed at the first gap, inside receive(), and lost the live batch.
        _int_option("replay_timeout_ms", replay_timeout_ms, 1, _C_INT_MAX)
        self.endpoint = endpoint
        self.topic = topic
        self.replay_endpoint = replay_endpoint
        self.replay_timeout_ms = replay_timeout_ms
        self._topic_bytes = topic.encode("utf-8")
        self.last_timestamp: float | None = None
        self.last_data_parallel_rank: int | None = None
        self.last_seq: int | None = None
        self.missed_batches = 0
        self.replayed_batches = 0
        self.malformed_batches = 0
        self._pending: deque[_Batch] = deque()
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.SUB)
        try:
            self._socket.setsockopt(zmq.SUBSCRIBE, self._topic_bytes)
            _attach(self._socket, "endpoint", endpoint, bind=False)
            if replay_endpoint is not None:  # checked now: a bad one would only fail at the first gap
                probe = self._ctx.socket(zmq.DEALER)
                try:
                    _attach(probe, "replay_endpoint", replay_endpoint, bind=False)
                finally:
                    probe.close(linger=0)
        except Exception:
            self._socket.close(linger=0)
            self._ctx.term()
            raise
        self._closed = False

    @staticmethod
    def _decode(seq_frame: bytes, payload: bytes) -> _Batch:
        if len(seq_frame) != 8:
            raise KVEventDecodeError(f"sequence frame has {len(seq_frame)} bytes, expected 8")
        timestamp, events, rank = decode_batch_with_rank(payload)
        return int.from_bytes(seq_frame, "big"), events, timestamp, rank

    def replay(self, start_seq: int) -> list[tuple[int, list[dict[str, Any]]]]:
        """The publisher's buffered batches from ``start_seq`` on, as ``(seq, events)``, oldest first.

        Raises ``TimeoutError`` when no complete answer arrives within ``replay_timeout_ms`` and
        ``RuntimeError`` without a ``replay_endpoint``. A batch that cannot be decoded comes back as
        ``(seq, [{"type": "cleared", "events_lost": True}])`` (a frame without a readable sequence
        number is left out); both count in :attr:`malformed_batches`.
        """
        return [(seq, events) for seq, events, _, _ in self._replay(start_seq)]

    def _replay(self, start_seq: int) -> list[_Batch]:
        if self.replay_endpoint is None:
            raise RuntimeError("this subscriber has no replay_endpoint")
        if isinstance(start_seq, bool) or not isinstance(start_seq, int) or not 0 <= start_seq < 2**64:
            raise ValueError(f"start_seq must be an int in [0, 2**64), got {start_seq!r}")
        dealer = self._ctx.socket(zmq.DEALER)
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
            out: list[_Batch] = []
            deadline = time.monotonic() + self.replay_timeout_ms / 1000.0
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not dealer.poll(remaining_ms, zmq.POLLIN):
                    raise TimeoutError(f"no complete replay answer from {self.replay_endpoint} "
                                       f"within {self.replay_timeout_ms} ms")
                frames = dealer.recv_multipart()
                # [b"", topic, seq, payload] (vLLM >= 0.11) or [b"", seq, payload] (older publishers).
                body = frames[1:] if frames and frames[0] == b"" else frames
                if len(body) == 3:
                    body = body[1:]
                if len(body) != 2 or len(body[0]) != 8:
                    self._malformed(None, f"{len(frames)} frames")
                    continue
                if int.from_bytes(body[0], "big", signed=True) == END_SEQ:
                    return out
                try:
                    out.append(self._decode(body[0], body[1]))
                except KVEventDecodeError as err:
                    seq = int.from_bytes(body[0], "big")
                    self._malformed(seq, str(err))
                    out.append((seq, [{"type": "cleared", "events_lost": True}], time.time(), None))
        finally:
            dealer.close(linger=0)

    def _malformed(self, seq: int | None, why: str) -> None:
        """Counts and logs one replayed batch that cannot be decoded; the rest of the answer stands."""
        self.malformed_batches += 1
        where = "a replay frame" if seq is None else f"replayed batch {seq}"
        _log.warning("KV events from %s: %s is malformed (%s); its events are lost", self.replay_endpoint, where, why)

    def _repair_gap(self, live: _Batch) -> None:
        """Queues the missing batches before ``live`` (as far as the replay buffer has them), then it."""
        assert self.last_seq is not None
        expected, seq = self.last_seq + 1, live[0]
        try:
            replayed = self._replay(expected)
        except TimeoutError:
            replayed = []
        got = {batch[0]: batch for batch in replayed if expected <= batch[0] < seq}
        self.replayed_batches += len(got)
        self.missed_batches += (seq - expected) - len(got)
        self._pending.extend(got[s] for s in sorted(got))
        self._pending.append(live)

    def receive(self, timeout_ms: int = 1000) -> tuple[int, list[dict[str, Any]]] | None:
        """The next batch as ``(seq, events)``, or None when nothing arrives within ``timeout_ms``.

        Raises :class:`KVEventDecodeError` for a malformed message (it is consumed, so the next
        call moves on); ``timeout_ms`` is a number of milliseconds in [0, 2^31 - 1].
        """
        if self._closed:
            raise RuntimeError("KVEventSubscriber is closed")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float):
            raise TypeError(f"timeout_ms must be a number of milliseconds, got {type(timeout_ms).__name__}")
        if not 0 <= timeout_ms <= _C_INT_MAX:  # NaN fails too
            raise ValueError(f"timeout_ms must be in [0, {_C_INT_MAX}], got {timeout_ms!r}")
        if not self._pending:
            live = self._receive_live(timeout_ms)
            if live is None:
                return None
            if self.replay_endpoint is not None and self.last_seq is not None and live[0] > self.last_seq + 1:
                self._repair_gap(live)
            else:
                self._pending.append(live)
        # The batch handed out now is the one last_timestamp / last_data_parallel_rank describe.
        seq, events, self.last_timestamp, self.last_data_parallel_rank = self._pending.popleft()
        self.last_seq = seq
        return seq, events

    def _receive_live(self, timeout_ms: int) -> _Batch | None:
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
            return self._decode(frames[1], frames[2])

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


# --- rebuilding a router's view ---------------------------------------------------------------------


def _event_ids(event: Mapping[str, Any]) -> list[int | bytes]:
    """Block ids of a decoded wire event, or of one of our internal events (digests -> wire ids)."""
    if "block_hashes" in event:
        return list(event["block_hashes"])
    return [wire_block_id(d) for d in event.get("digests", ())]


_TIER_OF_MEDIUM: dict[str | None, str] = {None: "GPU", "GPU": "GPU", "CPU": "CPU", "CPU_PINNED": "CPU", "DISK": "DISK"}


class DigestSetTracker:
    """A router's view of one engine's cache: the block ids it holds, rebuilt from the event stream.

    Takes decoded wire events (64-bit ``block_hashes``) or our internal events (32-byte
    ``digests``, mapped to the same ids). ``consistent`` turns False when a sequence gap shows
    lost batches, and True again after a ``cleared`` event: from then on the view holds no block
    the cache lacks. (It is complete again too, unless the cleared event marks a cache's own lost
    events, ``events_lost``: then blocks stored before it stay unknown until stored again.)

    Like NVIDIA Dynamo's indexer it keeps one view per medium (:attr:`by_medium`, keyed ``"GPU"``,
    ``"CPU"``, ``"DISK"``: no medium counts as ``"GPU"``, ``"CPU_PINNED"`` as ``"CPU"``): a removal
    takes a block out of its own medium only, and ``cleared`` empties every medium.
    :attr:`block_hashes` is the union.
    """

    def __init__(self) -> None:
        self.by_medium: dict[str, set[int | bytes]] = {}
        self.last_seq: int | None = None
        self.missed_batches = 0
        self.consistent = True

    @property
    def block_hashes(self) -> set[int | bytes]:
        """The block ids held in any medium."""
        return set().union(*self.by_medium.values())

    @property
    def digests(self) -> set[int | bytes]:
        """The block ids held (the name from before ids were 64-bit)."""
        return self.block_hashes

    def held(self, medium: str | None = "GPU") -> set[int | bytes]:
        """The block ids held in ``medium`` (spelled as on the wire)."""
        return set(self.by_medium.get(_TIER_OF_MEDIUM.get(medium, str(medium)), ()))

    def _medium_set(self, event: Mapping[str, Any]) -> set[int | bytes]:
        medium = event.get("medium")
        return self.by_medium.setdefault(_TIER_OF_MEDIUM.get(medium, str(medium)), set())

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
                self._medium_set(event).update(_event_ids(event))
            elif kind == "removed":
                self._medium_set(event).difference_update(_event_ids(event))
            elif kind == "cleared":
                self.by_medium.clear()
                self.consistent = True


def rebuild_digests(batches: Iterable[tuple[int, Iterable[Mapping[str, Any]]]]) -> set[int | bytes]:
    """The block-id set a stream of ``(seq, events)`` batches leaves behind."""
    tracker = DigestSetTracker()
    for seq, events in batches:
        tracker.apply(seq, events)
    return tracker.block_hashes
