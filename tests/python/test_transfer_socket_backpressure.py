"""SocketTransferBackend backpressure: what a rank has not received yet stays bounded per source,
and a sender past the bound is held back by TCP. Real sockets on 127.0.0.1; the flooding sender
is a separate process, so the receiver's RSS is its own."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ports import free_port
from sagellm_kv_cache.transfer import SocketTransferBackend

MIB = 1 << 20


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _buffered(backend: SocketTransferBackend, src: int) -> tuple[int, int]:
    with backend._cond:
        return backend._buffered_bytes[src], backend._buffered_messages[src]


_FLOODER = """
import sys
import numpy as np
from sagellm_kv_cache.transfer import SocketTransferBackend
port0, port1, count, size = map(int, sys.argv[1:])
backend = SocketTransferBackend(rank=0, world_size=2, endpoints={0: ("127.0.0.1", port0), 1: ("127.0.0.1", port1)})
message = np.zeros(size, dtype=np.uint8)
for i in range(count):
    message[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
    backend.send(message, 1)
    print(i + 1, flush=True)
backend.close()
"""


def test_a_flooding_sender_is_held_back_and_every_message_still_arrives() -> None:
    count, size = 400, 256 << 10  # 100 MiB offered; the receiver holds at most 1 MiB of it
    endpoints = {0: ("127.0.0.1", free_port()), 1: ("127.0.0.1", free_port())}
    receiver = SocketTransferBackend(rank=1, world_size=2, endpoints=endpoints, recv_timeout_s=10.0,
                                     max_buffered_bytes=MIB, max_buffered_messages=64)
    receiver.start()
    import sagellm_kv_cache

    env = {**os.environ, "PYTHONPATH": str(Path(sagellm_kv_cache.__file__).resolve().parent.parent)}
    rss_before = _rss_bytes()
    sent = [0]
    with subprocess.Popen([sys.executable, "-c", _FLOODER, str(endpoints[0][1]), str(endpoints[1][1]), str(count),
                           str(size)], stdout=subprocess.PIPE, text=True, env=env) as flooder:
        assert flooder.stdout is not None
        stdout = flooder.stdout

        def follow() -> None:
            for line in stdout:
                sent[0] = int(line)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            _wait_until_stalled(sent)  # the sender's send blocks on a full TCP window
            held_bytes, held_messages = _buffered(receiver, 0)
            assert held_bytes <= MIB and held_messages <= 4, (held_bytes, held_messages)
            # What went out sits in the receiver's buffer and the two kernels' socket buffers, no more.
            assert 0 < sent[0] < count // 4, sent[0]
            assert _rss_bytes() - rss_before < 24 * MIB
            got = np.zeros(size, dtype=np.uint8)
            for i in range(count):  # the messages come through in order as room frees up
                receiver.recv(got, 0)
                assert int.from_bytes(got[:8].tobytes(), "little") == i
            assert flooder.wait(timeout=20) == 0 and sent[0] == count
        finally:
            flooder.kill()
            receiver.close()
    assert _buffered(receiver, 0) == (0, 0)


def _wait_for_buffered(backend: SocketTransferBackend, src: int, held: tuple[int, int], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while _buffered(backend, src) != held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _buffered(backend, src) == held


def _wait_until_stalled(progress: list[int], seconds: float = 0.5, limit: float = 20.0) -> None:
    """Returns once ``progress[0]`` has started and then not moved for ``seconds`` (the sender is blocked)."""
    deadline, last, still_since = time.monotonic() + limit, 0, time.monotonic()
    while time.monotonic() < deadline and (last == 0 or time.monotonic() - still_since < seconds):
        if progress[0] != last:
            last, still_since = progress[0], time.monotonic()
        time.sleep(0.02)


@pytest.fixture
def trio() -> Iterator[list[SocketTransferBackend]]:
    endpoints = {r: ("127.0.0.1", free_port()) for r in range(3)}
    ranks = [SocketTransferBackend(rank=r, world_size=3, endpoints=endpoints, recv_timeout_s=5.0,
                                   max_buffered_bytes=256 << 10, max_buffered_messages=4) for r in range(3)]
    for backend in ranks:
        backend.start()
    yield ranks
    for backend in ranks:
        backend.close()


def test_a_full_buffer_holds_up_neither_its_own_next_message_nor_other_ranks(
        trio: list[SocketTransferBackend]) -> None:
    flooder, other, receiver = trio
    count, size = 1000, 64 << 10  # 62.5 MiB offered
    sent = [0]

    def flood() -> None:
        message = np.zeros(size, dtype=np.uint8)
        for i in range(count):
            message[0] = i % 256
            flooder.send(message, 2)
            sent[0] = i + 1

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    _wait_for_buffered(receiver, 0, (4 * size, 4))  # the message bound, the byte bound just met
    _wait_until_stalled(sent)
    assert sent[0] < count and thread.is_alive()  # rank 0 is blocked in send
    assert _buffered(receiver, 0) == (4 * size, 4)
    # Rank 1 is not behind rank 0's full buffer: its message arrives at once.
    other.send(np.arange(3, dtype=np.int64), 2)
    small = np.zeros(3, dtype=np.int64)
    started = time.monotonic()
    receiver.recv(small, 1)
    assert small.tolist() == [0, 1, 2] and time.monotonic() - started < 1.0
    # The oldest of rank 0's messages is always buffered, so a recv from rank 0 never waits on the
    # bound; each one taken lets the reader, and so the sender, go on.
    got = np.zeros(size, dtype=np.uint8)
    for i in range(count):
        receiver.recv(got, 0)
        assert got[0] == i % 256
    thread.join(timeout=10)
    assert not thread.is_alive() and sent[0] == count and _buffered(receiver, 0) == (0, 0)


def test_a_connection_carries_one_source_rank(trio: list[SocketTransferBackend]) -> None:
    _, _, receiver = trio
    from sagellm_kv_cache.transfer.socket_backend import _HEADER, _MAGIC, _VERSION

    with socket.create_connection(receiver._endpoints[2]) as rogue:
        rogue.sendall(_HEADER.pack(_MAGIC, _VERSION, 0, 0, 4) + b"abcd")
        rogue.sendall(_HEADER.pack(_MAGIC, _VERSION, 0, 1, 4) + b"efgh")  # claims to be another rank
        rogue.settimeout(5.0)
        try:
            closed = rogue.recv(1) == b""
        except ConnectionResetError:  # closed with "efgh" unread
            closed = True
        assert closed
    got = np.zeros(4, dtype=np.uint8)
    receiver.recv(got, 0)
    assert got.tobytes() == b"abcd"
    with receiver._cond:
        assert not receiver._inboxes[1] and _buffered(receiver, 1) == (0, 0)


def test_a_message_over_the_byte_bound_gets_through_alone(trio: list[SocketTransferBackend]) -> None:
    sender, _, receiver = trio
    big = np.arange(1 << 20, dtype=np.uint8)  # 1 MiB, four times max_buffered_bytes
    thread = threading.Thread(target=lambda: [sender.send(big, 2) for _ in range(3)], daemon=True)
    thread.start()
    got = np.zeros_like(big)
    for _ in range(3):
        receiver.recv(got, 0)
        np.testing.assert_array_equal(got, big)
        assert _buffered(receiver, 0)[1] <= 1
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize(("option", "value"), [
    ("max_buffered_bytes", 0), ("max_buffered_bytes", True), ("max_buffered_messages", -1),
    ("max_buffered_messages", 2.0), ("max_message_bytes", 0), ("max_message_bytes", "1"),
])
def test_bounds_are_checked(option: str, value: object) -> None:
    endpoints = {0: ("127.0.0.1", 1), 1: ("127.0.0.1", 2)}
    with pytest.raises(ValueError, match=option):
        SocketTransferBackend(rank=0, world_size=2, endpoints=endpoints, **{option: value})  # type: ignore[arg-type]


def test_a_connection_that_never_says_who_it_is_is_closed() -> None:
    endpoints = {0: ("127.0.0.1", free_port()), 1: ("127.0.0.1", free_port())}
    # recv_timeout_s is also how long a new connection has for its first header.
    sender, receiver = (SocketTransferBackend(rank=r, world_size=2, endpoints=endpoints, recv_timeout_s=0.3)
                        for r in range(2))
    receiver.start()
    sender.send(np.arange(4, dtype=np.int32), 1)  # a real peer's connection stays open throughout
    got = np.zeros(4, dtype=np.int32)
    receiver.recv(got, 0)
    silent = [socket.create_connection(endpoints[1]) for _ in range(20)]
    silent[0].sendall(b"SKVS\x01\x00")  # half a header, then nothing
    try:
        for conn in silent:
            conn.settimeout(5.0)
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(1) == b""  # the receiver hung up on it
        deadline = time.monotonic() + 5.0
        while len(receiver._accepted) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(receiver._accepted) == 1 and len(receiver._threads) == 2  # the peer's reader, the listener
        sender.send(np.arange(4, dtype=np.int32) + 1, 1)  # the peer's idle connection was not cut
        receiver.recv(got, 0)
        assert got.tolist() == [1, 2, 3, 4]
    finally:
        for conn in silent:
            conn.close()
        sender.close()
        receiver.close()


def test_a_claimed_length_costs_memory_only_as_the_bytes_arrive(trio: list[SocketTransferBackend]) -> None:
    sender, _, receiver = trio
    from sagellm_kv_cache.transfer.socket_backend import _HEADER, _MAGIC, _VERSION

    rss_before = _rss_bytes()
    with socket.create_connection(receiver._endpoints[2]) as liar:
        liar.sendall(_HEADER.pack(_MAGIC, _VERSION, 0, 0, 512 * MIB) + bytes(MIB))  # claims 512 MiB, sends 1
        deadline = time.monotonic() + 5.0
        while receiver._buffered_messages[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the reader is inside the payload now
        assert _rss_bytes() - rss_before < 64 * MIB
    # The connection ended mid-message: nothing was filed and its room is given back.
    deadline = time.monotonic() + 5.0
    while _buffered(receiver, 0) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _buffered(receiver, 0) == (0, 0) and not receiver._inboxes[0]
    # A real message that long is read piece by piece and arrives intact.
    big = np.random.default_rng(7).integers(0, 256, size=40 * MIB + 3, dtype=np.uint8)
    thread = threading.Thread(target=sender.send, args=(big, 2), daemon=True)
    thread.start()
    got = np.zeros_like(big)
    receiver.recv(got, 0)
    thread.join(timeout=10)
    np.testing.assert_array_equal(got, big)


def test_close_ends_readers_held_at_the_bound_and_the_blocked_sender_fails() -> None:
    endpoints = {0: ("127.0.0.1", free_port()), 1: ("127.0.0.1", free_port())}
    # A sender that the stall check below caught between two sends (a loaded machine) makes its next
    # send reconnect to the closed receiver, which gives up after recv_timeout_s: 1 s, well inside
    # the bound asserted below (the default 5 s failed it ~1 run in 15).
    sender, receiver = (SocketTransferBackend(rank=r, world_size=2, endpoints=endpoints, max_buffered_messages=2,
                                              recv_timeout_s=1.0) for r in range(2))
    receiver.start()
    sent, errors = [0], []

    def flood() -> None:
        message = np.zeros(1 << 20, dtype=np.uint8)
        try:
            for i in range(1000):
                sender.send(message, 1)
                sent[0] = i + 1
        except Exception as e:  # checked below
            errors.append(e)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    _wait_for_buffered(receiver, 0, (2 << 20, 2))
    _wait_until_stalled(sent)
    assert thread.is_alive()
    started = time.monotonic()
    receiver.close()
    thread.join(timeout=5.0)
    assert time.monotonic() - started < 5.0 and not thread.is_alive()
    assert receiver._threads == [] and _buffered(receiver, 0) == (0, 0)
    assert len(errors) == 1 and type(errors[0]).__name__ == "KVTransferFailedError", errors
    sender.close()


def _pair(**options: Any) -> tuple[SocketTransferBackend, SocketTransferBackend]:
    endpoints = {0: ("127.0.0.1", free_port()), 1: ("127.0.0.1", free_port())}
    sender = SocketTransferBackend(rank=0, world_size=2, endpoints=endpoints, **options)
    receiver = SocketTransferBackend(rank=1, world_size=2, endpoints=endpoints, **options)
    receiver.start()
    return sender, receiver


def _send_in_thread(backend: SocketTransferBackend, message: np.ndarray) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            backend.send(message, 1)
            outcome.append("sent")
        except Exception as e:  # the test inspects it
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_close_fails_a_send_blocked_on_a_full_peer_instead_of_waiting_for_it() -> None:
    """close() waits for the sends in flight, so it must first make a send blocked under backpressure
    (the receiver never receives) fail; else it would wait forever."""
    sender, receiver = _pair(max_buffered_bytes=MIB, max_buffered_messages=1)
    try:
        sender.send(np.zeros(16, dtype=np.uint8), 1)  # fills the receiver's buffer of our messages
        thread, outcome = _send_in_thread(sender, np.zeros(64 * MIB, dtype=np.uint8))
        thread.join(1.0)
        assert thread.is_alive() and not outcome  # held back by TCP
        closer = threading.Thread(target=sender.close, daemon=True)
        closer.start()
        closer.join(10.0)
        assert not closer.is_alive(), "close() waited for a send blocked on a full peer"
        thread.join(10.0)
        assert len(outcome) == 1 and type(outcome[0]).__name__ == "KVTransferFailedError", outcome
        assert sender._peers == {}
    finally:
        sender.close()
        receiver.close()


def test_a_send_connecting_while_close_runs_leaves_no_connection_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() cleared the connections without the per-peer locks: a send that was connecting stored
    its new connection afterwards, and it stayed open after close() had returned."""
    sender, receiver = _pair()
    real_connect = socket.create_connection
    made: list[socket.socket] = []
    connecting, finish_connect = threading.Event(), threading.Event()

    def slow_connect(address: Any, timeout: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
        sock = real_connect(address, timeout, *args, **kwargs)
        made.append(sock)
        connecting.set()
        finish_connect.wait(10.0)  # close() starts while this send is connecting
        return sock

    monkeypatch.setattr(socket, "create_connection", slow_connect)
    try:
        thread, outcome = _send_in_thread(sender, np.zeros(16, dtype=np.uint8))
        assert connecting.wait(10.0)
        closer = threading.Thread(target=sender.close, daemon=True)
        closer.start()
        closer.join(0.5)  # the fixed close() waits here for the send in flight
        finish_connect.set()
        closer.join(10.0)
        thread.join(10.0)
        assert not closer.is_alive() and not thread.is_alive()
        assert sender._peers == {}
        assert [s.fileno() for s in made] == [-1], "a connection made during close() is still open"
        assert len(outcome) == 1 and type(outcome[0]).__name__ == "KVTransferFailedError", outcome
    finally:
        finish_connect.set()
        monkeypatch.undo()
        sender.close()
        receiver.close()


def _socket_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("kv-socket-"))


def _assert_let_go(before_threads: int, before_fds: int) -> None:
    """Within 5 s, the backends' threads and descriptors are back to what there was before."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (_socket_threads() > before_threads
                                           or len(os.listdir("/proc/self/fd")) > before_fds):
        time.sleep(0.02)
    assert _socket_threads() == before_threads
    assert len(os.listdir("/proc/self/fd")) <= before_fds


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_backends_dropped_without_close_let_go_of_their_threads_sockets_and_ports() -> None:
    # The accept and reader threads held their backend: one dropped without close() (a process
    # group re-created after a failure) was never collected, and kept its threads, its listening
    # socket (the port stayed bound) and its connections for the rest of the process.
    import gc

    before_fds, before_threads = len(os.listdir("/proc/self/fd")), _socket_threads()
    ports: dict[int, tuple[str, int]] = {}
    for _ in range(5):
        a, b = _pair(recv_timeout_s=2.0)
        a.send(np.arange(4, dtype=np.uint8), 1)
        got = np.zeros(4, dtype=np.uint8)
        b.recv(got, 0)
        assert got.tolist() == [0, 1, 2, 3]
        ports = dict(a._endpoints)
        del a, b
        gc.collect()
    _assert_let_go(before_threads, before_fds)
    again = SocketTransferBackend(rank=0, world_size=2, endpoints=ports)
    again.start()  # the last pair's port is free again
    again.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_a_backend_dropped_while_a_reader_waits_for_room_lets_go_of_it() -> None:
    # A reader waiting for buffer room held its backend: dropped without close() with a full buffer
    # (nobody would ever recv again), it was never collected, and its reader, accept thread, port and
    # connections stayed for the rest of the process.
    import gc
    import weakref

    before_fds, before_threads = len(os.listdir("/proc/self/fd")), _socket_threads()
    sender, receiver = _pair(recv_timeout_s=2.0, max_buffered_messages=1)
    sender.send(np.arange(4, dtype=np.uint8), 1)
    _wait_for_buffered(receiver, 0, (4, 1))
    sender.send(np.arange(4, dtype=np.uint8), 1)  # read by nobody: its reader waits for room
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not any(
            t.name.startswith("kv-socket-read-1") for t in threading.enumerate()):
        time.sleep(0.01)
    time.sleep(0.2)  # the second header is in: the reader is waiting for room
    port = receiver._endpoints[1]
    gone = weakref.ref(receiver)
    del receiver
    gc.collect()
    assert gone() is None
    sender.close()
    _assert_let_go(before_threads, before_fds)
    with socket.create_server(port):  # its port is free again
        pass


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_a_backend_dropped_while_a_reader_waits_for_the_rest_of_a_message_lets_go_of_it() -> None:
    # A reader held its backend while it read a payload: a peer that stalls mid-message (alive, its
    # connection open) kept a backend dropped without close() from being collected, and with it the
    # reader, the accept thread and the port, until that peer went.
    import gc
    import weakref

    from sagellm_kv_cache.transfer.socket_backend import _HEADER, _MAGIC, _VERSION

    before_threads = _socket_threads()
    _, receiver = _pair(recv_timeout_s=2.0)
    port = receiver._endpoints[1]
    with socket.create_connection(port) as stalled:
        stalled.sendall(_HEADER.pack(_MAGIC, _VERSION, 0, 0, 8) + b"abc")  # 3 of its 8 bytes
        _wait_for_buffered(receiver, 0, (8, 1))  # room taken: the reader waits for the other 5
        gone = weakref.ref(receiver)
        del receiver
        gc.collect()
        assert gone() is None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _socket_threads() > before_threads:
            time.sleep(0.02)
        assert _socket_threads() == before_threads  # while the peer is still connected
    with socket.create_server(port):  # its port is free again
        pass
