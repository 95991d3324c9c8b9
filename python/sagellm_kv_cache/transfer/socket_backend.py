"""A TCP point-to-point backend with the ``send``/``recv`` interface of a ``sagellm_comm`` backend.

For setups without torch.distributed: every rank listens on its own ``endpoints[rank]`` and
connects to a peer on first send. A message is a 24-byte header (magic ``SKVS``, version, source
rank, payload length) followed by the tensor's raw bytes; the receiver files it under the source
rank and ``recv`` takes the oldest message from that rank, checking that it has exactly the
buffer's size before writing. Nothing from the network is trusted: a bad magic, version or rank,
or a length over ``max_message_bytes``, closes that connection, and so does a connection that
has not sent its first header within ``recv_timeout_s`` (each costs a thread and a descriptor).
``recv`` waits at most ``recv_timeout_s`` (``KVTransferTimeoutError``). Thread-safe; one
connection per peer. Before each send the sender checks that the peer has not closed that
connection (a restarted peer), and connects anew if it has, so the message is not written into a
connection nobody reads.

Backpressure: what a source rank has sent and nobody has received yet is bounded, by default to
``max_buffered_messages=1024`` messages and ``max_buffered_bytes=64 MiB`` per source rank (one
larger message is taken when nothing else from that rank waits, so any message up to
``max_message_bytes`` still gets through). At the bound the connection's reader reads nothing
more of it until ``recv`` takes a message from that rank: the kernel's socket buffers fill and TCP
stops the sender, whose ``send`` blocks until there is room (the block transfer's transport runs
each call on a thread of its own and gives the caller a deadline). The bound is per source rank,
the unit ``recv`` chooses by, and a connection carries one source rank (its first header fixes it;
a header naming another closes it). So a full buffer never holds up a message ``recv`` can take:
from that rank it takes the oldest, which is buffered already, and every other rank has its own
connection and bound. Two ranks that each send more than the bound (plus what the kernels buffer)
to the other before either receives wait on each other, as over any bounded transport.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
import weakref
from collections import deque
from typing import Any

from sagellm_kv_cache.errors import KVMetadataMismatchError, KVTransferFailedError, KVTransferTimeoutError
from sagellm_kv_cache.transfer.engine import _nbytes, _tensor_bytes, _write_bytes

__all__ = ["SocketTransferBackend"]

_HEADER = struct.Struct("<4sHHIQ")  # magic, version, reserved, source rank, payload bytes
_MAGIC = b"SKVS"
_VERSION = 1
# accept() errors that pass (out of descriptors or memory, a connection reset before it was taken):
# the listener waits a moment and goes on; any other error means the listening socket is gone.
_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
                                      errno.EPROTO, errno.EPERM})
_ACCEPT_BACKOFF_S = 0.05


_PIECE_BYTES = 16 << 20  # a payload over this is read a piece at a time


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    """Reads exactly ``n`` bytes (None at the end of the stream).

    Beyond ``_PIECE_BYTES`` the buffer grows with what arrives, so a length that a peer merely
    claims (up to ``max_message_bytes``) costs no memory until the bytes come.
    """
    if n <= _PIECE_BYTES:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                return None
            got += k
        return buf
    out = bytearray()
    piece = memoryview(bytearray(_PIECE_BYTES))
    while len(out) < n:
        k = sock.recv_into(piece, min(_PIECE_BYTES, n - len(out)))
        if k == 0:
            return None
        out += piece[:k]
    return out


def _peer_closed(sock: socket.socket) -> bool:
    """True when the peer has closed or reset a connection we only write to (it never writes back)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing to read: the normal case
    except OSError:
        return True


def _shut_down(listening: list[socket.socket], accepted: list[socket.socket], peers: dict[int, socket.socket],
               cond: threading.Condition) -> None:
    """A backend dropped without close(): wakes its threads (each closes its own socket and ends; a
    reader waiting for buffer room finds the backend gone) and closes the connections it made."""
    with cond:
        cond.notify_all()
    for sock in (*listening, *accepted):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    for sock in list(peers.values()):
        with contextlib.suppress(OSError):
            sock.close()


def _accept_loop(ref: weakref.ReferenceType[SocketTransferBackend], server: socket.socket) -> None:
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                backend = ref()
                if backend is None or not backend._running:
                    return
                del backend  # not held while waiting
                continue
            except OSError as e:
                backend = ref()
                if backend is None or not backend._running or e.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    return
                del backend
                time.sleep(_ACCEPT_BACKOFF_S)  # e.g. at the descriptor limit until connections end
                continue
            backend = ref()
            if backend is None or not backend._running:
                conn.close()
                return
            backend._adopt(conn)
            del backend
    finally:
        if ref() is None:  # dropped without close(), which would close it
            server.close()


def _reserve(ref: weakref.ReferenceType[SocketTransferBackend], cond: threading.Condition, src: int,
             nbytes: int) -> bool:
    """Waits until ``src``'s buffer has room for ``nbytes`` more, and takes it; False once closing, or
    once the backend is gone. While this waits nobody reads the connection, so TCP holds the sender
    back; the backend is held only to look, so one dropped meanwhile (whose buffer nobody would ever
    empty) is collected, and its finaliser wakes this wait."""
    with cond:
        while True:
            backend = ref()
            if backend is None:
                return False
            got = backend._try_reserve(src, nbytes)
            del backend  # may run the finaliser here, on this thread: looked at again below
            if got is not False:  # room taken (True), or closing (None)
                return got is True
            if ref() is None:
                return False
            cond.wait()


def _read_loop(ref: weakref.ReferenceType[SocketTransferBackend], conn: socket.socket) -> None:
    try:
        with contextlib.suppress(OSError):
            source: int | None = None  # the rank this connection carries, fixed by its first header
            while True:
                header = _recv_exactly(conn, _HEADER.size)  # the backend is not held while waiting
                backend = ref()
                if header is None or backend is None or not backend._running:
                    return
                message = backend._check_header(conn, source, header)
                cond = backend._cond
                del backend
                if message is None or not _reserve(ref, cond, *message):  # not held while waiting for room
                    return
                source, nbytes = message
                payload = None
                try:
                    payload = _recv_exactly(conn, nbytes)  # nor while the bytes come (a peer may stall)
                finally:
                    backend = ref()
                    if backend is not None:
                        backend._file_payload(source, nbytes, payload)
                    del backend
                if payload is None:
                    return
    finally:
        # Every way out closes the connection and forgets it and this thread: a peer that
        # reconnects, or anything else that connects and goes, must not cost a descriptor.
        with contextlib.suppress(OSError):
            conn.close()
        backend = ref()
        if backend is not None:
            backend._reader_done(conn)


class SocketTransferBackend:
    """See the module docstring."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        endpoints: dict[int, tuple[str, int]],
        recv_timeout_s: float = 5.0,
        max_message_bytes: int = 1 << 34,
        max_buffered_bytes: int = 64 << 20,
        max_buffered_messages: int = 1024,
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        missing = [r for r in range(world_size) if r not in endpoints]
        if missing:
            raise ValueError(f"endpoints has no (host, port) for ranks {missing}")
        if not recv_timeout_s > 0:
            raise ValueError(f"recv_timeout_s must be > 0, got {recv_timeout_s!r}")
        for name, value in (("max_message_bytes", max_message_bytes), ("max_buffered_bytes", max_buffered_bytes),
                            ("max_buffered_messages", max_buffered_messages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._rank = rank
        self._world_size = world_size
        self._endpoints = {r: (str(endpoints[r][0]), int(endpoints[r][1])) for r in range(world_size)}
        self._recv_timeout_s = float(recv_timeout_s)
        self._max_message_bytes = max_message_bytes
        self._max_buffered_bytes = max_buffered_bytes
        self._max_buffered_messages = max_buffered_messages
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._accepted: list[socket.socket] = []
        self._peers: dict[int, socket.socket] = {}
        # A send holds its peer's lock for the whole call (connect and write). _peers_lock guards
        # _peers and _closing only and is never held across a socket call.
        self._peer_locks = {r: threading.Lock() for r in range(world_size)}
        self._peers_lock = threading.Lock()
        self._closing = False  # close() is running: a connection made now is closed, not kept
        self._inboxes: dict[int, deque[bytearray]] = {r: deque() for r in range(world_size)}
        # Per source rank, what its inbox holds plus the messages being read into it (under _cond).
        self._buffered_bytes = dict.fromkeys(range(world_size), 0)
        self._buffered_messages = dict.fromkeys(range(world_size), 0)
        self._cond = threading.Condition()
        self._running = False
        # The threads hold this backend only weakly (a reader holds it while it files a message): one
        # dropped without close() is collected, and this finaliser then shuts its sockets down; the
        # accept thread closes the listening socket, each reader its connection. Otherwise each
        # dropped backend kept its threads, its bound port and its connections for good.
        self._listening: list[socket.socket] = []  # the server socket while started (for the finaliser)
        self._finalizer = weakref.finalize(self, _shut_down, self._listening, self._accepted, self._peers, self._cond)

    def get_rank(self) -> int:
        return self._rank

    def get_world_size(self) -> int:
        return self._world_size

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Listens on this rank's endpoint (idempotent)."""
        with self._cond:
            if self._running:
                return
            server = socket.create_server(self._endpoints[self._rank], reuse_port=False)
            server.settimeout(0.2)
            self._server = server
            self._listening.append(server)
            self._running = True
        thread = threading.Thread(target=_accept_loop, args=(weakref.ref(self), server),
                                  name=f"kv-socket-accept-{self._rank}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stops listening and closes every connection; pending messages are dropped.

        A send in flight fails with ``KVTransferFailedError``, also one blocked on a peer's full
        buffer (its connection is shut down first, which wakes it) and one still connecting (its new
        connection is closed, not kept), so no connection outlives the call. A send that takes its
        peer after ``close`` returned connects anew, as any later send does.
        """
        with self._cond:
            self._running = False
            self._cond.notify_all()
            accepted, threads = list(self._accepted), list(self._threads)
        with self._peers_lock:
            self._closing = True
            peers = list(self._peers.values())
        sockets = [s for s in (self._server, *accepted, *peers) if s is not None]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # Wait out the sends in flight: each ends promptly now (a write fails on its shut-down
        # connection, a connect gives up within recv_timeout_s), so none is inside a call on a
        # socket closed below, and none registers a connection after the snapshot above.
        for lock in self._peer_locks.values():
            with lock:
                pass
        with self._peers_lock:
            sockets.extend(self._peers.values())
            self._peers.clear()
            self._closing = False
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(timeout=2.0)
        with self._cond:
            self._threads.clear()
            self._accepted.clear()
            self._listening.clear()
            for src, inbox in self._inboxes.items():
                while inbox:
                    self._take(src)
        self._server = None

    def _adopt(self, conn: socket.socket) -> None:
        """Starts a reader for a connection the accept thread took."""
        conn.settimeout(self._recv_timeout_s)  # for the first header; a peer sends it on connecting
        reader = threading.Thread(target=_read_loop, args=(weakref.ref(self), conn), daemon=True,
                                  name=f"kv-socket-read-{self._rank}")
        with self._cond:
            self._accepted.append(conn)
            self._threads.append(reader)
        reader.start()

    def _reader_done(self, conn: socket.socket) -> None:
        with self._cond:
            with contextlib.suppress(ValueError):  # close() may have cleared the lists already
                self._accepted.remove(conn)
            with contextlib.suppress(ValueError):
                self._threads.remove(threading.current_thread())

    def _check_header(self, conn: socket.socket, source: int | None, header: bytearray) -> tuple[int, int] | None:
        """A header's (source rank, payload bytes), or None when the connection is to be dropped (not
        our protocol, a hostile length, a second source)."""
        magic, version, _, src, nbytes = _HEADER.unpack(header)
        if magic != _MAGIC or version != _VERSION or not 0 <= src < self._world_size or \
                nbytes > self._max_message_bytes or (source is not None and src != source):
            return None
        if source is None:
            conn.settimeout(None)  # a peer's connection may then idle between messages
        return src, nbytes

    def _file_payload(self, src: int, nbytes: int, payload: bytearray | None) -> None:
        """Files a message whose room ``_reserve`` took in its source's inbox; None: the connection
        ended mid-message, and its room is given back."""
        with self._cond:
            if payload is None:
                self._buffered_bytes[src] -= nbytes
                self._buffered_messages[src] -= 1
            else:
                self._inboxes[src].append(payload)
            self._cond.notify_all()

    def _try_reserve(self, src: int, nbytes: int) -> bool | None:
        """Takes room for ``nbytes`` more in ``src``'s buffer if it has it (True), else False; None once
        closing. A message over ``max_buffered_bytes`` fits when nothing else from ``src`` is buffered.
        ``_cond`` held."""
        if not self._running:
            return None
        held = self._buffered_messages[src]
        if held == 0 or (held < self._max_buffered_messages and
                         self._buffered_bytes[src] + nbytes <= self._max_buffered_bytes):
            self._buffered_messages[src] += 1
            self._buffered_bytes[src] += nbytes
            return True
        return False

    def _take(self, src: int) -> bytearray:
        """Removes the oldest message from ``src``'s inbox and frees its room (``_cond`` held)."""
        data = self._inboxes[src].popleft()
        self._buffered_bytes[src] -= len(data)
        self._buffered_messages[src] -= 1
        self._cond.notify_all()  # a reader may be waiting for that room
        return data

    # --- data -------------------------------------------------------------------------------

    def _check_peer(self, name: str, peer: Any) -> int:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self._world_size:
            raise ValueError(f"invalid {name} {peer!r}: must be in [0, {self._world_size})")
        if peer == self._rank:
            raise ValueError(f"{name} {peer} is this rank; a transfer needs two ranks")
        return peer

    def _forget(self, dst: int, sock: socket.socket) -> None:
        with self._peers_lock:
            if self._peers.get(dst) is sock:
                del self._peers[dst]
        with contextlib.suppress(OSError):
            sock.close()

    def _connection(self, dst: int) -> socket.socket:
        with self._peers_lock:
            sock = self._peers.get(dst)
        if sock is not None:
            if not _peer_closed(sock):
                return sock
            # The peer closed it (e.g. it restarted): a write would still succeed locally and its
            # bytes would be lost, so connect anew.
            self._forget(dst, sock)
        deadline = time.monotonic() + self._recv_timeout_s
        while True:  # the peer may not be listening yet
            try:
                sock = socket.create_connection(self._endpoints[dst], timeout=self._recv_timeout_s)
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise KVTransferFailedError(f"socket:{self._rank}->{dst}", source=f"rank_{self._rank}",
                                                target=f"rank_{dst}", reason=f"cannot connect: {e}") from e
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        with self._peers_lock:
            closing = self._closing
            if not closing:
                self._peers[dst] = sock
        if closing:
            with contextlib.suppress(OSError):
                sock.close()
            raise KVTransferFailedError(f"socket:{self._rank}->{dst}", source=f"rank_{self._rank}",
                                        target=f"rank_{dst}", reason="the backend was closed while connecting")
        return sock

    def send(self, tensor: Any, dst_rank: int) -> None:
        """Sends ``tensor``'s bytes to ``dst_rank`` (connecting on first use).

        Blocks while ``dst_rank`` holds its full buffer of our messages (see the module docstring).
        """
        dst = self._check_peer("dst_rank", dst_rank)
        data = _tensor_bytes(tensor)
        with self._peer_locks[dst]:
            sock = self._connection(dst)
            try:
                sock.sendall(_HEADER.pack(_MAGIC, _VERSION, 0, self._rank, len(data)))
                sock.sendall(data)
            except OSError as e:
                self._forget(dst, sock)
                raise KVTransferFailedError(f"socket:{self._rank}->{dst}", source=f"rank_{self._rank}",
                                            target=f"rank_{dst}", reason=f"send failed: {e}") from e

    def recv(self, tensor: Any, src_rank: int) -> None:
        """Fills ``tensor`` with the oldest message from ``src_rank`` (same byte size), waiting for it."""
        src = self._check_peer("src_rank", src_rank)
        expected = _nbytes(tensor)
        start = time.monotonic()
        with self._cond:
            if not self._running:
                raise RuntimeError("SocketTransferBackend is not started; call start() first")
            inbox = self._inboxes[src]
            while not inbox:
                left = self._recv_timeout_s - (time.monotonic() - start)
                if left <= 0 or not self._running:
                    raise KVTransferTimeoutError(f"socket:{src}->{self._rank}", timeout_seconds=self._recv_timeout_s,
                                                 elapsed_seconds=time.monotonic() - start)
                self._cond.wait(left)
            data = self._take(src)  # a message of the wrong size is consumed too, never half-applied
            if len(data) != expected:
                raise KVMetadataMismatchError("nbytes", expected, len(data), context={"src_rank": src})
        _write_bytes(tensor, data)
