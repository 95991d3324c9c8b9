"""Same-host payload path of the block transfer: a staging ring in memfd shared memory.

When both ends of a transfer run on one host, the source gathers chunks into a ring of staging
slots that lives in an anonymous shared-memory file (``memfd_create``) and the destination checks
and scatters each chunk straight out of its own read-only mapping of that file: one copy into the
ring, one copy out, no payload on any socket. Each copy computes the chunk's checksum as it goes
(C++ ``gather_summed``/``scatter_summed``), so each side reads every byte once. gloo stays the
control channel of the transfer (header, header reply, digests, final reply: the commit protocol of
:mod:`.blocks` unchanged) and the cross-host data path. Per chunk, the 32-byte footer (source to
destination) and the acknowledgement that frees its slot (destination to source) go over the Unix
socket of the handover, straight between the two threads: a gloo message costs two extra thread
hops through gloo's I/O thread, which under load cost more than the copy of a chunk; and a dead
peer reads as end of file on that socket at once.

Handing the ring over. The source listens on an abstract Unix socket named after its pid and the
transfer id (``sagellm-kv/<pid>/<transfer id>``) while its header travels over gloo; the header
carries the source's boot id and pid. A destination that reads the same boot id connects, checks
with ``SO_PEERCRED`` that the listener is the process the header named and runs under its own
user, and sends a hello naming the transfer id (which only the gloo peer knows) and the ring it
already holds from that source, if any. The source checks the connecting process's user, checks
the transfer id, and answers with the ring's geometry, passing the file descriptor with
``SCM_RIGHTS`` unless the destination already holds that very ring. Anything unexpected on either
side closes the connection and the transfer runs over gloo instead; the destination says which
path it took in its header reply, so both sides always agree.

Security:

* no name to attach to: a memfd exists only as file descriptors; ``/proc/<pid>/fd`` of the owner
  is closed to other users by the kernel's ptrace check;
* the source hands a descriptor only to a process of its own user that presents the transfer id;
* a ring carries only transfers addressed to the one process it was handed to (a ring is never
  handed to a second process; a new peer process gets a new ring); never the pool arena;
* the destination maps the ring read-only (Python's mmap keeps its own duplicate of the descriptor
  while mapped), only after checking that it is a regular file whose
  size is exactly the announced geometry and that it is sealed against shrinking (so a page can
  never vanish under the mapping and raise SIGBUS), and every chunk's size and offset are checked
  against that geometry before any read. Checksums catch damage, as on the wire; like there, they
  are not a MAC against a hostile process of the same user.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import secrets
import select
import socket
import stat
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sagellm_kv_cache.transfer.transport import TransportError, TransportTimeout

__all__ = [
    "Channel",
    "HandoverRefused",
    "MappedRing",
    "ShmOffer",
    "SourceRing",
    "accept_offer",
    "available",
    "boot_id",
    "drop_mappings",
    "mapped_rings",
]

_HELLO = struct.Struct("<4s16sQ")  # magic, transfer id, ring id the destination holds (0: none)
_ANSWER = struct.Struct("<4s16sQQI")  # magic, transfer id, ring id, slot bytes, slots
_HELLO_MAGIC = b"SKVH"
_ANSWER_MAGIC = b"SKVR"
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL if hasattr(fcntl, "F_SEAL_SHRINK") else 0
#: Upper bounds on what a destination accepts from a peer.
MAX_SLOTS = 256
MAX_RING_BYTES = 16 << 30
#: Bound on each step of the handover (a live peer answers within microseconds).
HANDOVER_TIMEOUT = 5.0
#: Rings a destination keeps mapped between transfers (oldest unmapped first).
MAX_MAPPED = 32
#: How long a channel polls for the next frame before it sleeps in ``recv``: about one chunk's
#: copy. A destination that sleeps between footers makes the source pay for waking it on every
#: footer, which is slow on a virtual machine. The poll yields the CPU between tries, so on a
#: machine with more transfers than cores it gives way to the processes that have work (without
#: the yield, 4 concurrent transfers on 2 cores lost about a fifth of their throughput to it).
SPIN_SECONDS = 0.001


def available() -> bool:
    """True where the path can work: Linux with memfd, file seals and fd passing."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
            and _SEALS != 0 and boot_id() is not None)


_BOOT_ID: bytes | None = None


def boot_id() -> bytes | None:
    """This boot's 16-byte id (``/proc/sys/kernel/random/boot_id``): equal only on one host."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = uuid.UUID(f.read().strip()).bytes
        except (OSError, ValueError):
            return None
    return _BOOT_ID


def socket_name(pid: int, transfer_id: uuid.UUID) -> str:
    """The abstract socket a source listens on for one transfer (leading NUL: no file anywhere)."""
    return f"\0sagellm-kv/{pid}/{transfer_id.hex}"


def _peer_cred(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid


# --- source side ---------------------------------------------------------------------------------


class SourceRing:
    """``slots`` staging slots of ``slot_nbytes`` in one sealed memfd, mapped read-write here.

    Handed to at most one destination process (``handed_to``), which maps it read-only.
    """

    def __init__(self, slots: int, slot_nbytes: int) -> None:
        if not 1 <= slots <= MAX_SLOTS or slot_nbytes <= 0:
            raise ValueError(f"bad ring geometry: {slots} slots of {slot_nbytes} B")
        self.slots, self.slot_nbytes = slots, slot_nbytes
        self.ring_id = secrets.randbits(63) + 1
        self.handed_to: int | None = None
        nbytes = slots * slot_nbytes
        self.fd = os.memfd_create("sagellm-kv-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.array: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_nbytes

    def slot(self, k: int) -> npt.NDArray[np.uint8]:
        """Slot of chunk ``k``."""
        s = k % self.slots
        return self.array[s * self.slot_nbytes : (s + 1) * self.slot_nbytes]

    def close(self) -> None:
        """Closes our descriptor; the memory goes once no process maps it any more."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


#: Picks the ring to hand to a connecting process: (peer pid, ring id it holds) -> (ring, send fd?).
RingProvider = Callable[[int, int], tuple[SourceRing, bool]]


class ShmOffer:
    """The source's side of one handover: a listener and a thread that serves one valid peer.

    ``handed`` is the ring given to the destination (set before the answer goes out) and
    ``channel`` the connection it came through. Read them only after :meth:`close`, which joins
    the thread; the caller owns ``channel`` then.
    """

    def __init__(self, transfer_id: uuid.UUID, provider: RingProvider) -> None:
        self.transfer_id = transfer_id
        self.name = socket_name(os.getpid(), transfer_id)
        self.handed: SourceRing | None = None
        self.channel: Channel | None = None
        self.refused: list[str] = []
        self._provider = provider
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(self.name)
            self._listener.listen(8)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self._listener.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="kv-transfer-shm-offer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._listener.fileno(), self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                conn, _ = self._listener.accept()
                if self._serve_one(conn):
                    self.channel = Channel(conn)  # the transfer's per-chunk footers and acks
                    return
                conn.close()
        except OSError as e:  # the listener failed: the destination falls back to gloo
            self.refused.append(f"listener: {e}")
        finally:
            self._listener.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        conn.settimeout(HANDOVER_TIMEOUT)
        try:
            pid, uid = _peer_cred(conn)
            if uid != os.geteuid():
                self.refused.append(f"pid {pid}: uid {uid} is not ours ({os.geteuid()})")
                return False
            hello = conn.recv(_HELLO.size + 1)
            if len(hello) != _HELLO.size:
                self.refused.append(f"pid {pid}: hello of {len(hello)} B")
                return False
            magic, tid, held = _HELLO.unpack(hello)
            if magic != _HELLO_MAGIC or tid != self.transfer_id.bytes:
                self.refused.append(f"pid {pid}: hello for another transfer")
                return False
            ring, send_fd = self._provider(pid, held)
            answer = _ANSWER.pack(_ANSWER_MAGIC, tid, ring.ring_id, ring.slot_nbytes, ring.slots)
            self.handed = ring
            ring.handed_to = pid
            if send_fd:
                socket.send_fds(conn, [answer], [ring.fd])
            else:
                conn.sendall(answer)
            return True
        except OSError as e:
            self.handed = None
            self.refused.append(f"handover failed: {e}")
            return False

    def close(self) -> None:
        """Stops listening (wakes the thread) and joins it; idempotent."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join()
            os.close(self._wake_w)
            os.close(self._wake_r)
            self._wake_w = self._wake_r = -1


class Channel:
    """The connected pair of one same-host transfer: fixed-size frames (footers one way, acks the
    other) straight between the two processes, with a deadline per call. A dead peer reads as
    end of file at once."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def send(self, frame: bytes, timeout: float) -> None:
        try:
            self._conn.settimeout(_socket_timeout(timeout))
            self._conn.sendall(frame)
        except TimeoutError as e:
            raise TransportTimeout(f"same-host channel: send did not complete within {timeout:.3f}s") from e
        except OSError as e:
            raise TransportError(f"same-host channel: {e}") from e

    def recv(self, nbytes: int, timeout: float) -> bytes:
        """The next frame. Polls without sleeping for up to :data:`SPIN_SECONDS` first: a frame
        due within that time (the next chunk's footer) is then taken without the peer having to
        wake this thread (see :data:`SPIN_SECONDS`)."""
        try:
            frame = None
            self._conn.settimeout(0.0)
            spin_until = time.perf_counter() + min(SPIN_SECONDS, timeout)
            while frame is None:
                try:
                    frame = self._conn.recv(nbytes + 1)
                except BlockingIOError:
                    if time.perf_counter() > spin_until:
                        break
                    os.sched_yield()  # a process that has work (another transfer's source) runs first
            if frame is None:
                self._conn.settimeout(_socket_timeout(timeout))
                frame = self._conn.recv(nbytes + 1)
        except TimeoutError as e:
            raise TransportTimeout(f"same-host channel: nothing arrived within {timeout:.3f}s") from e
        except OSError as e:
            raise TransportError(f"same-host channel: {e}") from e
        if not frame:
            raise TransportError("same-host channel: the peer closed the connection (it exited or gave up)")
        if len(frame) != nbytes:
            raise TransportError(f"same-host channel: a frame of {len(frame)} B where {nbytes} B were due")
        return frame

    def close(self) -> None:
        self._conn.close()


def _socket_timeout(seconds: float) -> float | None:
    return None if math.isinf(seconds) else max(seconds, 0.0005)


# --- destination side ----------------------------------------------------------------------------


@dataclass
class MappedRing:
    """A source's ring as the destination maps it: read-only, geometry checked."""

    src_pid: int
    ring_id: int
    slots: int
    slot_nbytes: int
    array: npt.NDArray[np.uint8]

    def slot(self, k: int) -> npt.NDArray[np.uint8]:
        s = k % self.slots
        return self.array[s * self.slot_nbytes : (s + 1) * self.slot_nbytes]


_MAPPED: OrderedDict[tuple[int, int], MappedRing] = OrderedDict()
_MAPPED_LOCK = threading.Lock()


def _held(src_pid: int) -> int:
    with _MAPPED_LOCK:
        ids = [ring_id for (pid, ring_id) in _MAPPED if pid == src_pid]
    return ids[-1] if ids else 0


def drop_mappings(src_pid: int | None = None) -> None:
    """Unmaps the rings of one source process (all with None); views already handed out stay valid."""
    with _MAPPED_LOCK:
        for key in [k for k in _MAPPED if src_pid is None or k[0] == src_pid]:
            del _MAPPED[key]


def mapped_rings() -> int:
    """How many source rings this process maps (for tests and monitoring)."""
    with _MAPPED_LOCK:
        return len(_MAPPED)


class HandoverRefused(Exception):
    """The handover did not happen; the transfer runs over gloo. The message says why."""


def accept_offer(
    src_pid: int, transfer_id: uuid.UUID, min_slot_nbytes: int, timeout: float
) -> tuple[MappedRing, Channel]:
    """The destination's side: connects to the source's listener and maps its ring.

    Returns the ring and the connection (the caller closes it). Raises :class:`HandoverRefused`
    (nothing mapped, no descriptor kept, connection closed) when anything is off.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    ok = False
    try:
        conn.settimeout(max(0.001, min(timeout, HANDOVER_TIMEOUT)))
        try:
            conn.connect(socket_name(src_pid, transfer_id))
        except OSError as e:
            raise HandoverRefused(f"no listener for this transfer ({e})") from e
        pid, uid = _peer_cred(conn)
        if pid != src_pid or uid != os.geteuid():
            raise HandoverRefused(f"listener is pid {pid} uid {uid}, expected pid {src_pid} uid {os.geteuid()}")
        held = _held(src_pid)
        conn.sendall(_HELLO.pack(_HELLO_MAGIC, transfer_id.bytes, held))
        msg, fds, _, _ = socket.recv_fds(conn, _ANSWER.size + 1, 2)
        if len(msg) != _ANSWER.size:
            raise HandoverRefused(f"answer of {len(msg)} B (the source refused or closed)")
        magic, tid, ring_id, slot_nbytes, slots = _ANSWER.unpack(msg)
        if magic != _ANSWER_MAGIC or tid != transfer_id.bytes:
            raise HandoverRefused("answer for another transfer")
        if not 1 <= slots <= MAX_SLOTS or not min_slot_nbytes <= slot_nbytes <= MAX_RING_BYTES // slots:
            raise HandoverRefused(f"ring geometry {slots} x {slot_nbytes} B is out of bounds "
                                  f"(need slots of >= {min_slot_nbytes} B)")
        if not fds:
            ring = _reuse(src_pid, ring_id, slots, slot_nbytes)
        elif len(fds) != 1:
            raise HandoverRefused(f"{len(fds)} descriptors instead of one")
        else:
            ring = _map(fds[0], src_pid, ring_id, slots, slot_nbytes)
            with _MAPPED_LOCK:
                _MAPPED[(src_pid, ring_id)] = ring
                while len(_MAPPED) > MAX_MAPPED:
                    _MAPPED.popitem(last=False)
        ok = True
        return ring, Channel(conn)
    except OSError as e:
        raise HandoverRefused(f"handover failed: {e}") from e
    finally:
        for fd in fds:
            os.close(fd)
        if not ok:
            conn.close()


def _reuse(src_pid: int, ring_id: int, slots: int, slot_nbytes: int) -> MappedRing:
    with _MAPPED_LOCK:
        ring = _MAPPED.get((src_pid, ring_id))
        if ring is None or (ring.slots, ring.slot_nbytes) != (slots, slot_nbytes):
            raise HandoverRefused(f"no descriptor, and ring {ring_id:x} of pid {src_pid} is not mapped here as "
                                  f"{slots} x {slot_nbytes} B")
        _MAPPED.move_to_end((src_pid, ring_id))
        return ring


def _map(fd: int, src_pid: int, ring_id: int, slots: int, slot_nbytes: int) -> MappedRing:
    nbytes = slots * slot_nbytes
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes:
        raise HandoverRefused(f"descriptor is not a {nbytes} B regular file (mode {st.st_mode:o}, "
                              f"size {st.st_size})")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL:
        raise HandoverRefused(f"ring is not sealed against shrinking (seals {seals:#x})")
    view = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    return MappedRing(src_pid, ring_id, slots, slot_nbytes, np.frombuffer(view, dtype=np.uint8))
