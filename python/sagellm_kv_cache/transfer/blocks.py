"""Moving KV blocks from one :class:`PagedKVPool` to another across processes.

The source gathers blocks in C++ into host staging buffers (numpy arrays seen by torch through
``torch.from_numpy``, no copy) and streams them in chunks; the destination checks the header
against its own spec before it reserves anything, checks each chunk's footer, scatters the chunk
into blocks only it knows about while computing its checksum in the same pass (C++
``scatter_summed``: each byte is read once, and the checksum covers exactly what the blocks
received), compares it with the source's, and hands the block ids to the caller (and their digests
to a prefix cache) only when every chunk has arrived intact; on any mismatch it frees the blocks
unseen. The source likewise checksums each chunk while gathering it (``gather_summed``). The
exchange is in :mod:`.wire`.

Pipelining: ``pipeline_depth`` staging buffers per side. On the source a gather thread fills chunk
k+1 while the sending thread is inside gloo's send of chunk k (gloo writes the socket from the
thread that calls send); on the destination gloo's I/O thread reads chunk k+1 while the caller's
thread checks and scatters chunk k. The C++ gather and scatter (with their checksums) release the
GIL.

Failure rules. The destination's commit point is the moment it has verified every chunk: it then
publishes the blocks (or hands them to the caller) and only afterwards sends its final OK. Before
that point any failure frees everything it reserved, so the destination pool is exactly as it
was. What the source reports:

* success: the destination committed;
* ``KVTransferFailedError`` / ``KVChecksumMismatchError`` / ``KVMetadataMismatchError`` /
  ``KVTransferTimeoutError``: the destination did not commit and kept nothing. A timeout is
  reported this way only while some chunk had not yet been handed to the transport (the
  destination cannot have all the data);
* ``KVTransferOutcomeUnknownError``: every chunk was sent but the final reply did not arrive (a
  deadline, a dead link, a damaged reply). The destination may or may not have committed. The
  source remembers the transfer id (process-wide) and asks about it in the header of its next
  transfer to the same rank, e.g. an empty one, also over a new process group; the destination
  answers from its own process-wide record. :meth:`BlockTransfer.outcome` then says "completed"
  or "failed" instead of "unknown".

Same host (:mod:`.shm`): when both ends run on one host and both allow it (``same_host``), the
payload does not travel through the transport at all. The header offers it (boot id and pid); the
destination takes the source's staging ring over a Unix socket before its header reply and says in
that reply which path the payload takes, so the two sides never disagree. Chunks are then gathered
into ring slots (checksummed in the same pass) and scattered and checked in one pass by the
destination from its mapping of the ring; footers and slot acknowledgements go over that socket.
Every rule above holds on this path too: nothing is reserved before the header is accepted, every
chunk's checksum is verified before any block becomes visible, publish and the final OK go over
the transport as before, and a source that dies mid-transfer is seen at once (end of file on the
socket), as is a destination that dies.

The destination commits even if its final reply cannot be sent (``ReceivedBlocks.reply_sent`` is
False then): the source reports "unknown" in that case, never "failed". A refusal (spec mismatch,
pool full, bad checksum) keeps both sides in step, so the pair stays usable. A timeout or a dead
peer breaks the pair (gloo closes it on a timeout); later transfers with that peer fail at once
with ``KVTransferFailedError`` instead of hanging, until a new process group is made. Over the
backend's own calls (``transport="backend"``) a ``KVTransferEngine``'s block transfers and tensor
transfers share that stream, and its break (see :mod:`.engine`).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import (
    KVCacheError,
    KVChecksumMismatchError,
    KVMetadataMismatchError,
    KVPoolFullError,
    KVTransferFailedError,
    KVTransferOutcomeUnknownError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.paged import PagedKVPool
from sagellm_kv_cache.transfer import shm, wire
from sagellm_kv_cache.transfer.options import check_block_options, check_timeout
from sagellm_kv_cache.transfer.transport import (
    BrokenLinks,
    Pending,
    TorchDistTransport,
    Transport,
    TransportError,
    TransportTimeout,
    make_transport,
)

__all__ = ["BlockTransfer", "DigestSink", "Outcome", "Publisher", "ReceivedBlocks"]

DigestArray = npt.NDArray[np.uint8]
BlockIdArray = npt.NDArray[np.int32]

_DATA = 0  # channel of header, digests and chunks (source -> destination)
_REPLY = 1  # channel of replies (destination -> source)


@runtime_checkable
class DigestSink(Protocol):
    """A prefix cache (or anything) that takes ownership of received blocks under their digests."""

    def insert(self, digests: DigestArray, block_ids: BlockIdArray) -> object: ...


#: Where the destination publishes the received blocks: ``publish(digests (n, 32) uint8, block_ids)``
#: or an object with such an ``insert`` method. It runs once the data is in place, never before.
Publisher = Callable[[DigestArray, BlockIdArray], object] | DigestSink


@dataclass(frozen=True)
class ReceivedBlocks:
    """What :meth:`BlockTransfer.receive` got: fresh block ids (ref count 1, owned by the caller)."""

    transfer_id: uuid.UUID
    block_ids: BlockIdArray
    digests: DigestArray | None
    nbytes: int
    checksum: str
    seconds: float
    #: False when the final OK could not be sent (the blocks are committed all the same; the
    #: source then reports the outcome as unknown until a later exchange settles it).
    reply_sent: bool = True
    #: How the payload came: "shm" (the source's shared-memory ring, same host) or "gloo".
    path: Literal["gloo", "shm"] = "gloo"


@dataclass(frozen=True)
class SendPlan:
    """A checked :meth:`BlockTransfer.send_blocks` call (:meth:`BlockTransfer.plan_send`): the block ids
    and digests as arrays, the peer and deadline checked, nothing sent yet."""

    pool: PagedKVPool
    ids: BlockIdArray
    digests: DigestArray | None
    dst_rank: int
    timeout: float
    transport: Transport
    src_rank: int

    @property
    def num_blocks(self) -> int:
        return int(self.ids.size)


#: What a source knows of one of its transfers.
Outcome = Literal["completed", "failed", "unknown"]

_PENDING, _PUBLISHED, _NOT_PUBLISHED = 0, 1, 2


class _Ledger:
    """Process-wide memory of transfer outcomes, so that a transfer whose final reply was lost can
    be settled by a later exchange between the same two ranks, over a new process group included.

    Destination side: transfer id -> pending / published / not published, for transfers whose
    header it accepted. Source side: ids in doubt per destination rank, and settled outcomes.
    Both are bounded (oldest first out); an id that fell out is answered "unknown".
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._received: OrderedDict[uuid.UUID, int] = OrderedDict()
        self._doubtful: dict[int, OrderedDict[uuid.UUID, None]] = {}
        self._settled: OrderedDict[uuid.UUID, bool] = OrderedDict()

    def _put(self, table: OrderedDict[uuid.UUID, Any], key: uuid.UUID, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._capacity:
            table.popitem(last=False)

    # destination
    def begin(self, tid: uuid.UUID) -> None:
        with self._lock:
            self._put(self._received, tid, _PENDING)

    def finish(self, tid: uuid.UUID, published: bool) -> None:
        with self._lock:
            self._put(self._received, tid, _PUBLISHED if published else _NOT_PUBLISHED)

    def answer(self, tid: uuid.UUID | None) -> int:
        if tid is None:
            return wire.ANSWER_NONE
        with self._lock:
            state = self._received.get(tid, _PENDING)
        return {_PUBLISHED: wire.ANSWER_PUBLISHED, _NOT_PUBLISHED: wire.ANSWER_NOT_PUBLISHED}.get(
            state, wire.ANSWER_UNKNOWN)

    # source
    def doubt(self, dst: int, tid: uuid.UUID) -> None:
        with self._lock:
            self._put(self._doubtful.setdefault(dst, OrderedDict()), tid, None)

    def next_question(self, dst: int) -> uuid.UUID | None:
        with self._lock:
            doubts = self._doubtful.get(dst)
            return next(iter(doubts)) if doubts else None

    def settle(self, dst: int, tid: uuid.UUID, answer: int) -> None:
        if answer not in (wire.ANSWER_PUBLISHED, wire.ANSWER_NOT_PUBLISHED):
            return  # still unknown: ask again next time
        with self._lock:
            self._doubtful.get(dst, OrderedDict()).pop(tid, None)
            self._put(self._settled, tid, answer == wire.ANSWER_PUBLISHED)

    def outcome(self, tid: uuid.UUID) -> Outcome | None:
        with self._lock:
            if tid in self._settled:
                return "completed" if self._settled[tid] else "failed"
            if any(tid in doubts for doubts in self._doubtful.values()):
                return "unknown"
        return None


_LEDGER = _Ledger()


class _Staging:
    """A host buffer and its torch view (same memory): numpy for the pool, torch for the wire.

    For a pool on an accelerator the buffer is page-locked (a one-slot ``HostSlab`` of that device,
    kept alive by the array), so the pool's device<->host copies into it run at DMA speed instead of
    going through the driver's pageable bounce buffer."""

    __slots__ = ("array", "device", "tensor")

    def __init__(self, nbytes: int, device: str = "cpu") -> None:
        self.device = device
        if device == "cpu":
            self.array: npt.NDArray[np.uint8] = np.empty(nbytes, dtype=np.uint8)
        else:
            self.array = _core.HostSlab(1, nbytes, device, False).view()[0, :nbytes]
        self.tensor = torch.from_numpy(self.array)


_SEGSUM64 = wire.CHECKSUM_ALGORITHMS["segsum64"]


def _gather_checksum(
    pool: PagedKVPool, ids: BlockIdArray, payload: npt.NDArray[np.uint8], sums: npt.NDArray[np.uint64],
    algorithm: int,
) -> int:
    """Gathers ``ids`` into ``payload`` and returns its checksum; for segsum64 in one pass over the
    bytes (the C++ gather sums each segment as it copies it). ``sums`` has room for the payload's."""
    if algorithm == _SEGSUM64:
        own = sums[: payload.size // wire.SEGMENT_NBYTES]
        pool.gather_summed(ids, payload, own)
        return wire.segsum64_from_sums(own, payload)
    pool.gather_into(ids, payload)
    return wire.checksum(payload, algorithm)


def _scatter_checksum(
    pool: PagedKVPool, payload: npt.NDArray[np.uint8], ids: BlockIdArray, sums: npt.NDArray[np.uint64],
    algorithm: int,
) -> int:
    """Scatters ``payload`` into ``ids`` and returns the checksum of the bytes that went in; for
    segsum64 in the same pass over the bytes, so it covers exactly what the blocks received even if
    the payload's memory changes meanwhile (a peer's shared ring). The caller compares it with the
    source's before anyone can see the blocks, and frees them on a mismatch."""
    if algorithm == _SEGSUM64:
        own = sums[: payload.size // wire.SEGMENT_NBYTES]
        pool.scatter_summed(payload, ids, own)
        return wire.segsum64_from_sums(own, payload)
    value = wire.checksum(payload, algorithm)
    pool.scatter(payload, ids)
    return value


class _StagingCache:
    """Reuses staging buffers between transfers: a fresh 4 MiB buffer costs ~1000 page faults (and a
    pinned one a page-locking call)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._free: dict[tuple[int, str], list[_Staging]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, count: int, device: str = "cpu") -> list[_Staging]:
        """``count`` buffers of ``nbytes`` for a pool on ``device`` (pinned unless it is the CPU)."""
        with self._lock:
            cached = self._free.get((nbytes, device), [])
            out = [cached.pop() for _ in range(min(count, len(cached)))]
            self._bytes -= nbytes * len(out)
        return out + [_Staging(nbytes, device) for _ in range(count - len(out))]

    def give(self, buffers: list[_Staging]) -> None:
        """Only for buffers no transport operation can still touch."""
        with self._lock:
            for b in buffers:
                if self._bytes + b.array.nbytes <= self._max_bytes:
                    self._free.setdefault((b.array.nbytes, b.device), []).append(b)
                    self._bytes += b.array.nbytes


class _Deadline:
    __slots__ = ("end", "start", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.start = time.monotonic()
        self.end = self.start + timeout

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _blocking_timeout(seconds: float) -> float | None:
    """``math.inf`` (no deadline) as Python's blocking calls spell it; never negative."""
    return None if math.isinf(seconds) else max(seconds, 0.0)


class _Refused(Exception):
    """The destination refused or failed; carries the error both sides raise."""

    def __init__(self, reply: wire.Reply, error: KVCacheError) -> None:
        super().__init__(str(error))
        self.reply = reply
        self.error = error


class _ChunkProducer:
    """Gathers and checksums chunks on its own thread, so the C++ gather of chunk k+1 runs while
    the sending thread is inside gloo's send of chunk k (gloo writes to the socket from the
    calling thread, so a single thread would serialise the two).

    Slot ``k % len(slots)`` carries chunk ``k``; before reusing a slot the producer waits for the
    send of the chunk that used it last, which the sending thread hands over through :meth:`sent`.
    """

    def __init__(
        self,
        pool: PagedKVPool,
        ids: BlockIdArray,
        header: wire.TransferHeader,
        slots: list[_Staging],
        deadline: _Deadline,
        hook: Callable[[int, npt.NDArray[np.uint8]], None] | None,
        threaded: bool,
    ) -> None:
        self._pool, self._ids, self._header, self._slots = pool, ids, header, slots
        self._deadline, self._hook = deadline, hook
        payload_max = min(header.chunk_blocks, header.num_blocks) * header.block_nbytes
        self._sums = [wire.segment_sums_buffer(payload_max) for _ in slots]
        self._ready: queue.SimpleQueue[tuple[int, int] | BaseException] = queue.SimpleQueue()
        self._sent: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.checksums: dict[int, int] = {}
        self.aborted: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kv-transfer-gather", daemon=True)
        # One chunk has nothing to overlap with: gather it inline and skip the thread's start-up.
        self._inline = not threaded or header.num_chunks <= 1
        if not self._inline:
            self._thread.start()

    def _run(self) -> None:
        try:
            for k in range(self._header.num_chunks):
                if not self._slot_free(k):
                    return
                self._ready.put(self._produce(k))
        except BaseException as e:  # a failed wait (dead link, deadline): the sending thread reports it
            self._ready.put(e)

    def _slot_free(self, k: int) -> bool:
        """Waits for the send of chunk ``k - len(slots)``, the last one on chunk k's slot."""
        if k < len(self._slots):
            return True
        previous = self._sent.get()
        if previous is None or self._stopping.is_set():
            return False
        previous.wait(self._deadline.remaining())
        return True

    def _produce(self, k: int) -> tuple[int, int]:
        header = self._header
        start, stop = header.chunk_range(k)
        nbytes = (stop - start) * header.block_nbytes
        slot = k % len(self._slots)
        frame = self._slots[slot].array
        payload = frame[:nbytes]
        value, flags = 0, 0
        if self.aborted is None:
            try:
                value = _gather_checksum(self._pool, self._ids[start:stop], payload, self._sums[slot],
                                         header.checksum_algorithm)
            except Exception as e:  # the destination must still get every frame it expects
                self.aborted = e
        if self.aborted is not None:
            flags = wire.FOOTER_ABORT
        self.checksums[k] = value
        wire.ChunkFooter(k, flags, nbytes, value).pack(frame[nbytes : nbytes + wire.FOOTER_NBYTES])
        if self._hook is not None:
            self._hook(k, payload)
        return slot, nbytes

    def next_chunk(self, k: int) -> tuple[int, int]:
        """(slot, payload bytes) of chunk ``k`` once it is ready to send."""
        if self._inline:
            self._slot_free(k)
            return self._produce(k)
        try:
            item = self._ready.get(timeout=_blocking_timeout(self._deadline.remaining()))
        except queue.Empty:
            raise TransportTimeout(f"chunk {k} was not ready before the deadline (the source stalled)") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def sent(self, work: Pending) -> None:
        self._sent.put(work)

    def join(self, timeout: float) -> bool:
        """True once the thread has finished (it never starts for a transfer of one chunk or none)."""
        if self._thread.ident is not None:
            self._thread.join(timeout=_blocking_timeout(timeout))
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._sent.put(None)


def _as_block_ids(block_ids: Any, pool: PagedKVPool) -> BlockIdArray:
    ids = np.ascontiguousarray(np.asarray(block_ids).reshape(-1) if np.ndim(block_ids) else [block_ids])
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"block_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= pool.num_blocks):
        bad = int(ids[(ids < 0) | (ids >= pool.num_blocks)][0])
        raise ValueError(f"block id {bad} is out of range [0, {pool.num_blocks})")
    return ids.astype(np.int32, copy=False)


def _as_digests(digests: Any, n: int) -> DigestArray | None:
    if digests is None:
        return None
    arr = np.ascontiguousarray(np.asarray(digests, dtype=np.uint8))
    if arr.shape != (n, wire.DIGEST_NBYTES):
        raise ValueError(f"digests must have shape ({n}, {wire.DIGEST_NBYTES}) (one per block), got {arr.shape}")
    return arr


def _publish(publish: Publisher, digests: DigestArray, block_ids: BlockIdArray) -> None:
    if isinstance(publish, DigestSink):
        publish.insert(digests, block_ids)
    else:
        publish(digests, block_ids)


class BlockTransfer:
    """Sends pool blocks to, and receives them from, other ranks of a comm backend.

    ``chunk_bytes`` is the payload of one message (rounded down to whole blocks, at least one);
    ``pipeline_depth`` (1 to ``shm.MAX_SLOTS``) staging buffers of that size are in flight per
    transfer; ``timeout`` (seconds > 0, ``math.inf`` for none) bounds each whole call unless the call
    gives its own;
    ``checksum`` is ``"segsum64"`` (fast, default) or ``"crc32"``; ``transport`` is ``"auto"``
    (torch.distributed for ``GlooBackend``), ``"torch"`` or ``"backend"`` (the backend's own
    blocking calls on a thread; any backend); ``gather_thread`` gathers on the source on a thread
    of its own while the sending thread is inside gloo, and on the same-host path gathers chunk k+1
    on a second thread while chunk k's gather finishes (default: when the machine has 4+ CPUs);
    ``same_host`` lets a transfer whose two ends share a host move its payload through a
    shared-memory ring (:mod:`.shm`) instead of the transport; both ends must allow it, and it falls
    back to the transport by itself when they are not on one host. Bad options are a ``TypeError`` /
    ``ValueError`` naming them (:func:`.options.check_block_options`).
    """

    def __init__(
        self,
        comm_backend: Any,
        *,
        chunk_bytes: int = 4 << 20,
        pipeline_depth: int = 4,
        timeout: float = 60.0,
        checksum: str = "segsum64",
        transport: str = "auto",
        gather_thread: bool | None = None,
        same_host: bool = True,
    ) -> None:
        if comm_backend is None:
            raise ValueError("comm_backend is required (e.g. an initialised sagellm_comm.GlooBackend)")
        options = check_block_options("BlockTransfer", {
            "chunk_bytes": chunk_bytes, "pipeline_depth": pipeline_depth, "timeout": timeout, "checksum": checksum,
            "transport": transport, "gather_thread": gather_thread, "same_host": same_host,
        })
        # The transport itself is made on first use: the backend may be initialised after us.
        self._backend = comm_backend
        self._transport_kind = options.transport
        self._transport: Transport | None = None
        self._chunk_bytes = options.chunk_bytes
        self._depth = options.pipeline_depth
        self._timeout = options.timeout
        self._checksum_id = wire.CHECKSUM_ALGORITHMS[options.checksum]
        # A gather thread pays off when it gets a core of its own; on a box of two or three cores
        # it only competes with gloo's I/O for them.
        self._gather_thread = (os.cpu_count() or 1) >= 4 if options.gather_thread is None else options.gather_thread
        self._staging = _StagingCache(max_bytes=4 * self._depth * (self._chunk_bytes + wire.FOOTER_NBYTES))
        self._lock = threading.Lock()
        self._peer_locks: dict[tuple[int, str], threading.Lock] = {}
        #: Peers whose stream is unusable; ``KVTransferEngine`` hands in its own when both run on one stream.
        self._links = BrokenLinks()
        self._same_host = options.same_host and shm.available()
        #: Payload per ring slot on the same-host path (at most ``chunk_bytes``): 4 MiB measured best
        #: here against 2 and 8 MiB; each slot costs one footer and one ack between the processes.
        self._shm_chunk_bytes = 4 << 20
        #: Same-host staging ring per destination rank (each handed to one destination process).
        self._rings: dict[int, shm.SourceRing] = {}
        #: Same-host path with ``gather_thread``: a second thread gathers chunk k+1 while chunk k's
        #: gather finishes (one core gathers ~8 GB/s here, one scatters ~14 GB/s on the other side).
        self._gather_pool: ThreadPoolExecutor | None = None
        #: Tests only: called on the source with (chunk index, payload view) after the chunk's checksum
        #: is taken and before it is sent, to damage the wire copy, stall, or kill the process.
        self._chunk_hook: Callable[[int, npt.NDArray[np.uint8]], None] | None = None
        #: Tests only: called on the destination after it committed, before its final OK is sent.
        self._before_final_reply: Callable[[], None] | None = None

    # --- public API ---------------------------------------------------------------------------

    def send_blocks(
        self,
        pool: PagedKVPool,
        block_ids: Any,
        dst_rank: int,
        *,
        digests: Any = None,
        timeout: float | None = None,
        transfer_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Sends the contents of ``block_ids`` (and their digests, if given) to ``dst_rank``.

        Returns once the destination confirmed every byte; the source blocks are untouched. Raises
        what the destination raised when it refuses (``KVMetadataMismatchError``,
        ``KVChecksumMismatchError``; ``KVTransferFailedError`` when its pool is full),
        ``KVTransferTimeoutError`` past the deadline, ``KVTransferFailedError`` on a dead link.
        ``timeout`` (seconds > 0, ``math.inf`` for none) replaces the constructor's for this call.
        """
        return self.send_planned(self.plan_send(pool, block_ids, dst_rank, digests=digests, timeout=timeout),
                                 transfer_id=transfer_id)

    def plan_send(
        self, pool: PagedKVPool, block_ids: Any, dst_rank: int, *, digests: Any = None, timeout: float | None = None
    ) -> SendPlan:
        """:meth:`send_blocks`' argument checks, with nothing sent: ``TypeError`` / ``ValueError`` naming a
        bad block id, digest array, peer or timeout. :meth:`send_planned` then sends."""
        ids = _as_block_ids(block_ids, pool)
        digest_array = _as_digests(digests, ids.size)
        deadline_s = self._timeout if timeout is None else check_timeout("timeout", timeout)
        transport = self._get_transport()
        me, world = transport.rank(), transport.world_size()
        _check_peer(dst_rank, me, world, "dst_rank")
        return SendPlan(pool, ids, digest_array, dst_rank, deadline_s, transport, me)

    def send_planned(self, plan: SendPlan, *, transfer_id: uuid.UUID | None = None) -> uuid.UUID:
        """Sends what :meth:`plan_send` checked, as :meth:`send_blocks` does (same errors but the argument
        checks)."""
        pool, ids, digest_array, dst_rank = plan.pool, plan.ids, plan.digests, plan.dst_rank
        transport, me = plan.transport, plan.src_rank
        tid = transfer_id or uuid.uuid4()
        spec = pool.spec
        header = wire.TransferHeader(
            transfer_id=tid, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
            block_size=spec.block_size, dtype=spec.dtype, num_blocks=int(ids.size), block_nbytes=pool.block_nbytes,
            # at most what the header's 32-bit field holds (more than any transfer's blocks: one chunk);
            # not the transfer's own count, which would size the same-host ring per transfer
            chunk_blocks=max(1, min(self._chunk_bytes // pool.block_nbytes, wire.MAX_CHUNK_BLOCKS)),
            checksum_algorithm=self._checksum_id,
            has_digests=digest_array is not None,
            digests_checksum=wire.digests_checksum(digest_array) if digest_array is not None else 0,
            src_rank=me, dst_rank=dst_rank, query_id=_LEDGER.next_question(dst_rank),
            boot_id=shm.boot_id() if self._shm_usable(transport) and ids.size else None, pid=os.getpid(),
        )
        deadline = _Deadline(plan.timeout)
        with self._peer(dst_rank, "send", tid, me, dst_rank):
            state: dict[str, Any] = {"phase": "header"}
            try:
                self._send(transport, pool, ids, digest_array, header, deadline, state)
            except _Refused as r:
                raise r.error from None
            except (TransportError, wire.WireFormatError) as e:
                if state.get("all_sent") and not state.get("source_aborted"):
                    # The destination may have committed: say so, and ask on the next exchange.
                    self._mark_broken(dst_rank, f"{type(e).__name__} during {state['phase']} of transfer {tid}")
                    _LEDGER.doubt(dst_rank, tid)
                    raise KVTransferOutcomeUnknownError(
                        tid, source=f"rank {me}", target=f"rank {dst_rank}",
                        reason=f"no final reply after {deadline.elapsed():.3f}s (timeout {deadline.timeout:.3f}s): {e}",
                        context={"side": "source", "phase": state["phase"], "src_rank": me, "dst_rank": dst_rank},
                    ) from e
                self._raise_send_failure(e, tid, me, dst_rank, deadline, state)
            except BaseException as e:
                if not isinstance(e, Exception):  # KeyboardInterrupt, a cancelled task: stopped mid-protocol
                    self._mark_broken(dst_rank, f"{type(e).__name__} during {state['phase']} of transfer {tid}")
                    if state.get("all_sent") and not state.get("source_aborted"):
                        _LEDGER.doubt(dst_rank, tid)  # the destination may have committed: ask on the next exchange
                raise
        return tid

    def _raise_send_failure(
        self, e: Exception, tid: uuid.UUID, me: int, dst_rank: int, deadline: _Deadline, state: dict[str, Any]
    ) -> None:
        """The destination cannot have committed (it never had every chunk): a plain failure."""
        if isinstance(e, TransportTimeout):
            self._mark_broken(dst_rank, f"timeout during {state['phase']} of transfer {tid}")
            raise KVTransferTimeoutError(
                tid, timeout_seconds=deadline.timeout, elapsed_seconds=deadline.elapsed(),
                context={"side": "source", "phase": state["phase"], "src_rank": me, "dst_rank": dst_rank},
            ) from e
        self._mark_broken(dst_rank, f"{type(e).__name__} during {state['phase']} of transfer {tid}")
        raise KVTransferFailedError(
            tid, source=f"rank {me}", target=f"rank {dst_rank}", reason=f"{state['phase']}: {e}",
            context={"side": "source", "phase": state["phase"]},
        ) from e

    @staticmethod
    def outcome(transfer_id: uuid.UUID) -> Outcome | None:
        """What this process knows of a transfer it sent whose outcome was in doubt.

        "unknown" after a ``KVTransferOutcomeUnknownError`` until a later transfer to the same rank
        (an empty one will do, over this or a new process group) settles it; then "completed" (the
        destination committed) or "failed" (it kept nothing). None for an id that was never in doubt:
        the call that sent it returned or raised the outcome.
        """
        return _LEDGER.outcome(transfer_id)

    def recv_blocks(
        self,
        pool: PagedKVPool,
        src_rank: int,
        *,
        publish: Publisher | None = None,
        timeout: float | None = None,
    ) -> BlockIdArray:
        """Receives one transfer from ``src_rank`` into fresh blocks of ``pool`` and returns their ids.

        The ids come in the source's order, each with ref count 1, owned by the caller (or by the
        prefix cache ``publish`` handed them to). On any error nothing stays reserved.
        """
        return self.receive(pool, src_rank, publish=publish, timeout=timeout).block_ids

    def receive(
        self,
        pool: PagedKVPool,
        src_rank: int,
        *,
        publish: Publisher | None = None,
        timeout: float | None = None,
    ) -> ReceivedBlocks:
        """:meth:`recv_blocks` with the transfer's id, digests and size."""
        deadline_s = self._timeout if timeout is None else check_timeout("timeout", timeout)
        transport = self._get_transport()
        me, world = transport.rank(), transport.world_size()
        _check_peer(src_rank, me, world, "src_rank")
        deadline = _Deadline(deadline_s)
        state: dict[str, Any] = {"phase": "header", "transfer_id": "unknown"}
        with self._peer(src_rank, "recv", "(not started)", src_rank, me):
            reserved: BlockIdArray | None = None
            try:
                reserved, result = self._receive(transport, pool, src_rank, me, deadline, state)
                self._commit(transport, src_rank, publish, result, deadline, state)
                reserved = None  # the caller (or the cache) owns them now
                return self._final_ok(transport, src_rank, result, deadline, state)
            except _Refused as r:
                raise r.error from None
            except TransportTimeout as e:
                self._mark_broken(src_rank, f"timeout during {state['phase']}")
                raise KVTransferTimeoutError(
                    state["transfer_id"], timeout_seconds=deadline.timeout, elapsed_seconds=deadline.elapsed(),
                    context={"side": "destination", "phase": state["phase"], "src_rank": src_rank, "dst_rank": me},
                ) from e
            except TransportError as e:
                self._mark_broken(src_rank, f"{type(e).__name__} during {state['phase']}")
                raise KVTransferFailedError(
                    state["transfer_id"], source=f"rank {src_rank}", target=f"rank {me}",
                    reason=f"{state['phase']}: {e}", context={"side": "destination", "phase": state["phase"]},
                ) from e
            except BaseException as e:
                if not isinstance(e, Exception):  # KeyboardInterrupt, a cancelled task: frames may be left unread
                    self._mark_broken(src_rank, f"{type(e).__name__} during {state['phase']}")
                raise
            finally:
                if reserved is not None:
                    pool.free(reserved)
                    if isinstance(state["transfer_id"], uuid.UUID):
                        _LEDGER.finish(state["transfer_id"], published=False)

    def _commit(
        self,
        transport: Transport,
        src: int,
        publish: Publisher | None,
        result: ReceivedBlocks,
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> None:
        """The commit point: every chunk is verified; publish, then record the transfer as published."""
        if publish is not None and result.digests is not None:
            state["phase"] = "publish"
            try:
                _publish(publish, result.digests, result.block_ids)
            except Exception as e:
                refusal = wire.Reply(wire.ReplyStatus.PUBLISH_FAILED, wire.PHASE_FINAL)
                self._reply(transport, src, deadline, refusal)
                raise _Refused(refusal, KVTransferFailedError(
                    result.transfer_id, source=f"rank {src}", target="this rank",
                    reason=f"publishing the received blocks failed: {e!r}", context={"side": "destination"},
                )) from e
        _LEDGER.finish(result.transfer_id, published=True)

    def _final_ok(
        self, transport: Transport, src: int, result: ReceivedBlocks, deadline: _Deadline, state: dict[str, Any]
    ) -> ReceivedBlocks:
        """Tells the source; the blocks stay committed whether or not the reply gets through."""
        state["phase"] = "final reply"
        if self._before_final_reply is not None:
            self._before_final_reply()
        try:
            self._reply(transport, src, deadline, wire.Reply(wire.ReplyStatus.OK, wire.PHASE_FINAL))
        except TransportError as e:  # the source will report "unknown" and can settle it later
            self._mark_broken(src, f"{type(e).__name__} during the final reply of transfer {result.transfer_id}")
            return replace(result, reply_sent=False, seconds=deadline.elapsed())
        return result

    # --- source -------------------------------------------------------------------------------

    def _send(
        self,
        transport: Transport,
        pool: PagedKVPool,
        ids: BlockIdArray,
        digests: DigestArray | None,
        header: wire.TransferHeader,
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> None:
        dst = header.dst_rank
        offer = self._offer(header)
        if offer is None and header.boot_id is not None:
            header = replace(header, boot_id=None, pid=0)
        try:
            frame = _Staging(wire.HEADER_NBYTES)
            header.pack(frame.array)
            transport.isend(frame.tensor, dst, _DATA).wait(deadline.remaining())
            reply = self._recv_reply(transport, dst, deadline, wire.PHASE_HEADER)
        finally:
            if offer is not None:
                offer.close()  # joins its thread: what it handed over is settled now
        if reply.status != wire.ReplyStatus.OK:
            raise _Refused(reply, self._refusal_error(reply, header, {}))
        if header.query_id is not None:
            _LEDGER.settle(dst, header.query_id, reply.a)
        ring = offer.handed if offer is not None and reply.b == wire.PATH_SHM else None
        channel = offer.channel if offer is not None else None
        if ring is None and channel is not None:
            channel.close()  # the destination did not take the ring after all
            channel = None
        if reply.b == wire.PATH_SHM and (ring is None or channel is None):
            raise wire.WireFormatError("reply", "the destination took the same-host path but no ring was handed over")
        state["path"] = "shm" if ring is not None else "gloo"

        pending: deque[Pending] = deque()
        if digests is not None and digests.size:
            state["phase"] = "digests"
            pending.append(transport.isend(torch.from_numpy(digests.reshape(-1)), dst, _DATA))
        if ring is not None and channel is not None:
            try:
                sent_checksums, aborted = self._send_chunks_shm(
                    channel, pool, ids, _shm_chunking(header, ring.slot_nbytes), ring, pending, deadline, state)
            finally:
                channel.close()
        else:
            sent_checksums, aborted = self._send_chunks(transport, pool, ids, header, pending, deadline, state)

        state["phase"] = "final reply"
        reply = self._recv_reply(transport, dst, deadline, wire.PHASE_FINAL)
        if aborted is not None:
            raise _Refused(reply, KVTransferFailedError(
                header.transfer_id, source=f"rank {header.src_rank}", target=f"rank {dst}",
                reason=f"the source failed while gathering: {aborted!r}", context={"side": "source"},
            )) from aborted
        if reply.status != wire.ReplyStatus.OK:
            raise _Refused(reply, self._refusal_error(reply, header, sent_checksums))

    def _send_chunks(
        self,
        transport: Transport,
        pool: PagedKVPool,
        ids: BlockIdArray,
        header: wire.TransferHeader,
        pending: deque[Pending],
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> tuple[dict[int, int], BaseException | None]:
        """gloo path: every chunk's payload and footer in one message."""
        dst = header.dst_rank
        num_chunks = header.num_chunks
        payload_max = min(header.chunk_blocks, header.num_blocks) * header.block_nbytes
        slots = self._staging.take(payload_max + wire.FOOTER_NBYTES, min(self._depth, num_chunks), pool.device)
        producer = _ChunkProducer(pool, ids, header, slots, deadline, self._chunk_hook, self._gather_thread)
        sent: list[Pending] = []
        clean = False
        try:
            for k in range(num_chunks):
                state["phase"] = f"chunk {k} of {num_chunks}"
                slot, nbytes = producer.next_chunk(k)
                work = transport.isend(slots[slot].tensor[: nbytes + wire.FOOTER_NBYTES], dst, _DATA)
                sent.append(work)
                producer.sent(work)
            state["all_sent"] = True  # from here on the destination may hold every chunk
            state["phase"] = "drain"
            # gloo counts completions per buffer: each send is waited for exactly once. The producer
            # has waited for all but the last send on each slot; it must finish before we wait.
            if not producer.join(deadline.remaining()):
                raise TransportTimeout("the gather thread did not finish before the deadline")
            for work in (*pending, *sent[max(0, num_chunks - len(slots)):]):
                work.wait(deadline.remaining())
            clean = True
        finally:
            producer.stop()
            state["source_aborted"] = producer.aborted is not None
        if clean:
            self._staging.give(slots)  # every send on them has completed and the producer is gone
        return producer.checksums, producer.aborted

    def _send_chunks_shm(
        self,
        channel: shm.Channel,
        pool: PagedKVPool,
        ids: BlockIdArray,
        header: wire.TransferHeader,
        ring: shm.SourceRing,
        pending: deque[Pending],
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> tuple[dict[int, int], BaseException | None]:
        """Same-host path: chunk k is gathered into ring slot k % slots; its footer goes through the
        transfer's channel.

        The slot is refilled only after the destination acknowledged the chunk that used it last
        (it acknowledges chunk j when j + slots < num_chunks, once it is done reading it).
        """
        num_chunks, slots = header.num_chunks, ring.slots
        executor = self._gather_executor() if self._gather_thread and num_chunks > 1 else None
        # Gathers in flight beyond the one whose footer is next: chunk k+1 is gathered (on a second
        # thread) while chunk k's gather finishes, so two cores read the pool. Inline: none.
        ahead = 1 if executor is not None else 0
        checksums: dict[int, int] = {}
        aborted: BaseException | None = None
        footer = np.empty(wire.FOOTER_NBYTES, dtype=np.uint8)
        sums = [wire.segment_sums_buffer(ring.slot_nbytes) for _ in range(min(slots, num_chunks))]

        def gather(k: int) -> int:
            start, stop = header.chunk_range(k)
            payload = ring.slot(k)[: (stop - start) * header.block_nbytes]
            return _gather_checksum(pool, ids[start:stop], payload, sums[k % slots], header.checksum_algorithm)

        in_flight: deque[tuple[int, Future[int] | None]] = deque()

        def send_footers(upto: int) -> None:
            """Footers of the chunks up to ``upto``, in order, each once its gather is done."""
            nonlocal aborted
            while in_flight and in_flight[0][0] <= upto:
                k, gathering = in_flight.popleft()
                start, stop = header.chunk_range(k)
                nbytes = (stop - start) * header.block_nbytes
                value, flags = 0, 0
                if aborted is None:
                    try:
                        value = (gather(k) if gathering is None
                                 else gathering.result(_blocking_timeout(deadline.remaining())))
                    except FutureTimeout:
                        raise TransportTimeout(f"chunk {k} was not gathered before the deadline") from None
                    except Exception as e:  # the destination must still get every footer it expects
                        aborted = e
                if aborted is not None:
                    flags = wire.FOOTER_ABORT
                checksums[k] = value
                wire.ChunkFooter(k, flags, nbytes, value).pack(footer)
                if self._chunk_hook is not None:
                    self._chunk_hook(k, ring.slot(k)[:nbytes])
                channel.send(footer.tobytes(), deadline.remaining())

        try:
            for k in range(num_chunks):
                state["phase"] = f"chunk {k} of {num_chunks}"
                if k >= slots:
                    send_footers(k - slots)
                    ack = wire.Reply.unpack(np.frombuffer(channel.recv(wire.REPLY_NBYTES, deadline.remaining()),
                                                          dtype=np.uint8))
                    if ack.phase != wire.PHASE_ACK or ack.a != k - slots:
                        raise wire.WireFormatError("reply", f"expected the ack of chunk {k - slots}, got phase "
                                                            f"{ack.phase} a={ack.a}")
                # The slot is free now (acknowledged, or never used): chunk k may be gathered into it.
                gathering = executor.submit(gather, k) if executor is not None and aborted is None else None
                in_flight.append((k, gathering))
                send_footers(k - ahead)
            send_footers(num_chunks)
        finally:
            # Nothing may still write into the ring once we return (it serves the next transfer).
            futures_wait([f for _, f in in_flight if f is not None])
        state["all_sent"] = True  # from here on the destination may hold every chunk
        state["source_aborted"] = aborted is not None
        state["phase"] = "drain"
        for work in pending:
            work.wait(deadline.remaining())
        return checksums, aborted

    def _gather_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._gather_pool is None:
                self._gather_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-transfer-shm-gather")
            return self._gather_pool

    def _offer(self, header: wire.TransferHeader) -> shm.ShmOffer | None:
        """Listens for the destination's handover, when this transfer offers the same-host path."""
        if header.boot_id is None:
            return None
        dst = header.dst_rank
        capacity = max(1, min(header.chunk_blocks * header.block_nbytes, self._shm_chunk_bytes)
                       // header.block_nbytes) * header.block_nbytes

        def provide(pid: int, held: int) -> tuple[shm.SourceRing, bool]:
            ring = self._rings.get(dst)
            fits = ring is not None and ring.slots == self._depth and ring.slot_nbytes == capacity
            if ring is not None and fits and ring.handed_to in (None, pid):
                return ring, not (ring.handed_to == pid and held == ring.ring_id)
            if ring is not None:  # another process (or another shape) had it: a new ring, never a shared one
                ring.close()
            ring = self._rings[dst] = shm.SourceRing(self._depth, capacity)
            return ring, True

        try:
            return shm.ShmOffer(header.transfer_id, provide)
        except OSError:
            return None

    def _recv_reply(self, transport: Transport, peer: int, deadline: _Deadline, phase: int) -> wire.Reply:
        frame = _Staging(wire.REPLY_NBYTES)
        transport.irecv(frame.tensor, peer, _REPLY).wait(deadline.remaining())
        reply = wire.Reply.unpack(frame.array)
        if reply.phase != phase:
            raise wire.WireFormatError("reply", f"reply for phase {reply.phase} while waiting for phase {phase}")
        return reply

    def _refusal_error(
        self, reply: wire.Reply, header: wire.TransferHeader, sent_checksums: dict[int, int]
    ) -> KVCacheError:
        tid, src, dst = header.transfer_id, f"rank {header.src_rank}", f"rank {header.dst_rank}"
        context = {"side": "source", "remote_status": reply.status.name, "dst_rank": header.dst_rank}
        if reply.status == wire.ReplyStatus.SPEC_MISMATCH:
            field = wire.SPEC_FIELDS[reply.a] if 0 <= reply.a < len(wire.SPEC_FIELDS) else f"field #{reply.a}"
            ours = header.spec_values().get(field, header.src_rank if field == "src_rank" else None)
            theirs: object = wire.dtype_from_code(reply.b) if field == "dtype" else reply.b
            return KVMetadataMismatchError(field, theirs, ours, context=context)
        if reply.status == wire.ReplyStatus.POOL_FULL:
            return KVTransferFailedError(
                tid, source=src, target=dst,
                reason=f"the destination pool is full: {reply.a} blocks needed, {reply.b} free",
                context={**context, "needed_blocks": reply.a, "free_blocks": reply.b},
            )
        if reply.status == wire.ReplyStatus.FOOTER_DAMAGED:
            return KVChecksumMismatchError(
                f"{sent_checksums.get(reply.a, 0):016x}", f"{reply.b:016x}", transfer_id=tid,
                context={**context, "where": f"chunk {reply.a} footer",
                         "detail": "the chunk's footer arrived damaged; checksums are of the payload on each side"},
            )
        if reply.status == wire.ReplyStatus.PUBLISH_FAILED:
            return KVTransferFailedError(tid, source=src, target=dst, context=context,
                                         reason="the destination verified every chunk but its publish callback "
                                                "raised; it released the blocks it had reserved")
        if reply.status == wire.ReplyStatus.CHECKSUM_MISMATCH:
            what = "digests" if reply.a < 0 else f"chunk {reply.a}"
            expected = header.digests_checksum if reply.a < 0 else sent_checksums.get(reply.a, 0)
            return KVChecksumMismatchError(
                f"{expected:016x}", f"{reply.b:016x}", transfer_id=tid, context={**context, "where": what},
            )
        return KVTransferFailedError(tid, source=src, target=dst, reason=f"the destination replied {reply.status.name}",
                                     context=context)

    # --- destination --------------------------------------------------------------------------

    def _receive(
        self,
        transport: Transport,
        pool: PagedKVPool,
        src: int,
        me: int,
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> tuple[BlockIdArray, ReceivedBlocks]:
        frame = _Staging(wire.HEADER_NBYTES)
        transport.irecv(frame.tensor, src, _DATA).wait(deadline.remaining())
        try:
            header = wire.TransferHeader.unpack(frame.array)
        except wire.WireFormatError as e:
            self._reply(transport, src, deadline, wire.Reply(
                wire.ReplyStatus.SPEC_MISMATCH, wire.PHASE_HEADER, wire.SPEC_FIELDS.index(e.field)))
            raise _Refused(wire.Reply(wire.ReplyStatus.SPEC_MISMATCH, wire.PHASE_HEADER), KVMetadataMismatchError(
                e.field, e.expected, e.actual, context={"side": "destination", "src_rank": src, "detail": str(e)},
            )) from e
        tid = header.transfer_id
        state["transfer_id"] = tid
        mismatch = _spec_mismatch(header, pool, src, me)
        if mismatch is not None:
            field, expected, actual = mismatch
            wire_expected = wire.dtype_code(str(expected)) if field == "dtype" else int(expected)
            self._reply(transport, src, deadline, wire.Reply(
                wire.ReplyStatus.SPEC_MISMATCH, wire.PHASE_HEADER, wire.SPEC_FIELDS.index(field), wire_expected))
            raise _Refused(wire.Reply(wire.ReplyStatus.SPEC_MISMATCH, wire.PHASE_HEADER), KVMetadataMismatchError(
                field, expected, actual, context={"side": "destination", "transfer_id": str(tid), "src_rank": src},
            ))

        n = header.num_blocks
        try:
            reserved = pool.allocate(n) if n else np.empty(0, dtype=np.int32)
        except KVPoolFullError as e:
            self._reply(transport, src, deadline, wire.Reply(
                wire.ReplyStatus.POOL_FULL, wire.PHASE_HEADER, n, pool.num_free_blocks))
            e.context.update({"transfer_id": str(tid), "needed_blocks": n, "src_rank": src})
            raise
        _LEDGER.begin(tid)
        ring: shm.MappedRing | None = None
        channel: shm.Channel | None = None
        try:
            ring, channel = self._take_ring(transport, header, deadline, state)
            answer = _LEDGER.answer(header.query_id)  # about an earlier transfer the source is unsure of
            path = wire.PATH_SHM if ring is not None else wire.PATH_GLOO
            self._reply(transport, src, deadline, wire.Reply(wire.ReplyStatus.OK, wire.PHASE_HEADER, answer, path))
            if ring is not None and channel is not None:
                result = self._receive_payload_shm(transport, channel, pool, src,
                                                   _shm_chunking(header, ring.slot_nbytes), reserved, ring, deadline,
                                                   state)
            else:
                result = self._receive_payload(transport, pool, src, header, reserved, deadline, state)
        except BaseException:
            pool.free(reserved)
            _LEDGER.finish(tid, published=False)
            if ring is not None:  # the source may be gone: map its ring afresh next time
                shm.drop_mappings(ring.src_pid)
            raise
        finally:
            if channel is not None:
                channel.close()
        return reserved, result

    def _shm_usable(self, transport: Transport) -> bool:
        """The same-host path needs tagged, non-blocking control messages (acks run against footers)."""
        return self._same_host and transport.name == TorchDistTransport.name

    def _take_ring(
        self, transport: Transport, header: wire.TransferHeader, deadline: _Deadline, state: dict[str, Any]
    ) -> tuple[shm.MappedRing | None, shm.Channel | None]:
        """The source's ring and channel when it offered them and both ends are on this host; else
        (None, None): the payload comes over the transport."""
        if header.boot_id is None or not self._shm_usable(transport) or header.num_blocks == 0:
            return None, None
        if header.boot_id != shm.boot_id():
            state["shm"] = "another host"
            return None, None
        state["phase"] = "same-host handover"
        try:  # a slot must hold at least one block: chunks on this path are as many blocks as fit a slot
            return shm.accept_offer(header.pid, header.transfer_id, header.block_nbytes, deadline.remaining())
        except shm.HandoverRefused as e:
            state["shm"] = str(e)
            return None, None

    def _receive_payload(
        self,
        transport: Transport,
        pool: PagedKVPool,
        src: int,
        header: wire.TransferHeader,
        reserved: BlockIdArray,
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> ReceivedBlocks:
        tid = header.transfer_id
        digests: DigestArray | None = None
        digest_work: Pending | None = None
        if header.has_digests:
            digests = np.empty((header.num_blocks, wire.DIGEST_NBYTES), dtype=np.uint8)
            if digests.size:
                digest_work = transport.irecv(torch.from_numpy(digests.reshape(-1)), src, _DATA)

        block_nbytes, algorithm, depth = header.block_nbytes, header.checksum_algorithm, self._depth
        num_chunks = header.num_chunks
        payload_max = min(header.chunk_blocks, header.num_blocks) * block_nbytes
        slots = self._staging.take(payload_max + wire.FOOTER_NBYTES, min(depth, num_chunks), pool.device)
        posted: deque[Pending] = deque()

        def post(k: int) -> None:
            start, stop = header.chunk_range(k)
            size = (stop - start) * block_nbytes + wire.FOOTER_NBYTES
            posted.append(transport.irecv(slots[k % len(slots)].tensor[:size], src, _DATA))

        for k in range(min(len(slots), num_chunks)):
            post(k)
        sums = wire.segment_sums_buffer(payload_max)
        failure, error = _await_digests(digest_work, digests, header, deadline, state)
        running = 0
        for k in range(num_chunks):
            state["phase"] = f"chunk {k} of {num_chunks}"
            posted.popleft().wait(deadline.remaining())
            start, stop = header.chunk_range(k)
            nbytes = (stop - start) * block_nbytes
            slot = slots[k % len(slots)].array
            if failure is None:
                failure, error = self._check_chunk(slot[:nbytes], slot[nbytes : nbytes + wire.FOOTER_NBYTES], k,
                                                   header)
            if failure is None:
                # Into blocks only this call knows about: nobody sees them before the last check.
                value = _scatter_checksum(pool, slot[:nbytes], reserved[start:stop], sums, algorithm)
                expected = wire.ChunkFooter.unpack(slot[nbytes : nbytes + wire.FOOTER_NBYTES]).checksum
                if value != expected:
                    failure = wire.Reply(wire.ReplyStatus.CHECKSUM_MISMATCH, wire.PHASE_FINAL, k, value)
                    error = KVChecksumMismatchError(
                        f"{expected:016x}", f"{value:016x}", transfer_id=tid,
                        context={"side": "destination", "where": f"chunk {k}", "blocks": (start, stop)},
                    )
                else:
                    running = (running * 0x100000001B3 + value) & 0xFFFFFFFFFFFFFFFF
            if k + len(slots) < num_chunks:
                post(k + len(slots))
        self._staging.give(slots)  # every receive into them has completed

        if failure is not None and error is not None:
            state["phase"] = "final reply"
            self._reply(transport, src, deadline, failure)
            raise _Refused(failure, error)
        return ReceivedBlocks(
            transfer_id=tid, block_ids=reserved, digests=digests, nbytes=header.num_blocks * block_nbytes,
            checksum=f"{_algorithm_name(algorithm)}:{running:016x}", seconds=deadline.elapsed(),
        )

    def _receive_payload_shm(
        self,
        transport: Transport,
        channel: shm.Channel,
        pool: PagedKVPool,
        src: int,
        header: wire.TransferHeader,
        reserved: BlockIdArray,
        ring: shm.MappedRing,
        deadline: _Deadline,
        state: dict[str, Any],
    ) -> ReceivedBlocks:
        """Same-host path: footers over the handover's socket, each chunk scattered from the source's
        ring and checked in the same pass.

        The ring's geometry was checked at the handover (its slots hold a whole chunk of this
        transfer); a footer must name exactly the chunk and size expected before its slot is used.
        """
        tid, num_chunks, slots = header.transfer_id, header.num_chunks, ring.slots
        block_nbytes, algorithm = header.block_nbytes, header.checksum_algorithm
        digests: DigestArray | None = None
        digest_work: Pending | None = None
        if header.has_digests:
            digests = np.empty((header.num_blocks, wire.DIGEST_NBYTES), dtype=np.uint8)
            if digests.size:
                digest_work = transport.irecv(torch.from_numpy(digests.reshape(-1)), src, _DATA)
        failure, error = _await_digests(digest_work, digests, header, deadline, state)
        running = 0
        ack = np.empty(wire.REPLY_NBYTES, dtype=np.uint8)
        sums = wire.segment_sums_buffer(ring.slot_nbytes)
        for k in range(num_chunks):
            state["phase"] = f"chunk {k} of {num_chunks}"
            footer = np.frombuffer(channel.recv(wire.FOOTER_NBYTES, deadline.remaining()), dtype=np.uint8)
            start, stop = header.chunk_range(k)
            nbytes = (stop - start) * block_nbytes
            payload = ring.slot(k)[:nbytes]
            if failure is None:
                failure, error = self._check_chunk(payload, footer, k, header)
            if failure is None:
                value = _scatter_checksum(pool, payload, reserved[start:stop], sums, algorithm)
                expected = wire.ChunkFooter.unpack(footer).checksum
                if value != expected:
                    failure = wire.Reply(wire.ReplyStatus.CHECKSUM_MISMATCH, wire.PHASE_FINAL, k, value)
                    error = KVChecksumMismatchError(
                        f"{expected:016x}", f"{value:016x}", transfer_id=tid,
                        context={"side": "destination", "where": f"chunk {k}", "blocks": (start, stop),
                                 "path": "shm"},
                    )
                else:
                    running = (running * 0x100000001B3 + value) & 0xFFFFFFFFFFFFFFFF
            if k + slots < num_chunks:  # done with its slot: the source may refill it
                wire.Reply(wire.ReplyStatus.OK, wire.PHASE_ACK, k).pack(ack)
                channel.send(ack.tobytes(), deadline.remaining())
        if failure is not None and error is not None:
            state["phase"] = "final reply"
            self._reply(transport, src, deadline, failure)
            raise _Refused(failure, error)
        return ReceivedBlocks(
            transfer_id=tid, block_ids=reserved, digests=digests, nbytes=header.num_blocks * block_nbytes,
            checksum=f"{_algorithm_name(algorithm)}:{running:016x}", seconds=deadline.elapsed(), path="shm",
        )

    @staticmethod
    def _check_chunk(
        payload: npt.NDArray[np.uint8], footer_frame: npt.NDArray[np.uint8], k: int, header: wire.TransferHeader
    ) -> tuple[wire.Reply | None, KVCacheError | None]:
        tid, nbytes = header.transfer_id, int(payload.size)
        try:
            footer = wire.ChunkFooter.unpack(footer_frame)

        except wire.WireFormatError as e:
            # The source's checksum is in the damaged footer; send ours so its message shows both.
            ours = wire.checksum(payload, header.checksum_algorithm)
            return (wire.Reply(wire.ReplyStatus.FOOTER_DAMAGED, wire.PHASE_FINAL, k, ours),
                    KVChecksumMismatchError("valid chunk footer", "damaged footer", transfer_id=tid,
                                            context={"side": "destination", "where": f"chunk {k} footer",
                                                     "payload_checksum": f"{ours:016x}", "detail": str(e)}))
        if footer.flags & wire.FOOTER_ABORT:
            return (wire.Reply(wire.ReplyStatus.SOURCE_ABORTED, wire.PHASE_FINAL, k),
                    KVTransferFailedError(tid, source=f"rank {header.src_rank}", target=f"rank {header.dst_rank}",
                                          reason=f"the source aborted at chunk {k}", context={"side": "destination"}))
        if footer.index != k or footer.payload_nbytes != nbytes:
            ours = wire.checksum(payload, header.checksum_algorithm)
            return (wire.Reply(wire.ReplyStatus.FOOTER_DAMAGED, wire.PHASE_FINAL, k, ours),
                    KVChecksumMismatchError(f"chunk {k} of {nbytes} B", f"chunk {footer.index} of "
                                            f"{footer.payload_nbytes} B", transfer_id=tid,
                                            context={"side": "destination", "where": f"chunk {k}"}))
        return None, None

    def _reply(self, transport: Transport, peer: int, deadline: _Deadline, reply: wire.Reply) -> None:
        frame = _Staging(wire.REPLY_NBYTES)
        reply.pack(frame.array)
        transport.isend(frame.tensor, peer, _REPLY).wait(deadline.remaining())

    # --- plumbing -----------------------------------------------------------------------------

    def _get_transport(self) -> Transport:
        with self._lock:
            if self._transport is None:
                try:
                    self._transport = make_transport(self._backend, self._transport_kind)
                except TransportError as e:
                    raise KVTransferFailedError("none", reason=f"no usable transport: {e}") from e
            return self._transport

    @contextmanager
    def _peer(self, peer: int, direction: str, tid: object, src: int, dst: int) -> Iterator[None]:
        """One transfer per (peer, direction) at a time; none at all once the link broke."""
        with self._lock:
            lock = self._peer_locks.setdefault((peer, direction), threading.Lock())
        broken = self._links.reason(peer)
        if broken is not None:
            raise KVTransferFailedError(
                str(tid), source=f"rank {src}", target=f"rank {dst}",
                reason=f"the link to rank {peer} is unusable after an earlier failure ({broken}); "
                       "re-create the process group",
            )
        with lock:
            yield

    def _mark_broken(self, peer: int, why: str) -> None:
        self._links.mark(peer, why)

    def is_broken(self, peer: int) -> bool:
        """True once a timeout or a transport error made the link to ``peer`` unusable (or, over the
        backend's own calls, a ``KVTransferEngine`` tensor transfer on the same stream did)."""
        return self._links.reason(peer) is not None


def _shm_chunking(header: wire.TransferHeader, slot_nbytes: int) -> wire.TransferHeader:
    """The header as the same-host path cuts it: chunks of as many whole blocks as one ring slot holds
    (a few MiB, so what the source gathers is still in cache when it checksums it), never more than
    the header's own chunks. Both sides derive it from the ring's checked geometry."""
    return replace(header, chunk_blocks=max(1, min(header.chunk_blocks, slot_nbytes // header.block_nbytes)))


def _await_digests(
    work: Pending | None, digests: DigestArray | None, header: wire.TransferHeader, deadline: _Deadline,
    state: dict[str, Any],
) -> tuple[wire.Reply | None, KVCacheError | None]:
    """Waits for the digests (if any) and checks them: the refusal to send and the error to raise, or Nones."""
    if work is None or digests is None:
        return None, None
    state["phase"] = "digests"
    work.wait(deadline.remaining())
    got = wire.digests_checksum(digests)
    if got == header.digests_checksum:
        return None, None
    return (wire.Reply(wire.ReplyStatus.CHECKSUM_MISMATCH, wire.PHASE_FINAL, -1, got),
            KVChecksumMismatchError(f"{header.digests_checksum:016x}", f"{got:016x}", transfer_id=header.transfer_id,
                                    context={"side": "destination", "where": "digests"}))


def _algorithm_name(algorithm: int) -> str:
    return next((name for name, code in wire.CHECKSUM_ALGORITHMS.items() if code == algorithm), str(algorithm))


def _check_peer(peer: Any, me: int, world: int, name: str) -> None:
    if isinstance(peer, bool) or not isinstance(peer, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(peer).__name__}")
    if not 0 <= peer < world:
        raise ValueError(f"invalid {name} {peer}: must be in [0, {world}) (world size {world})")
    if peer == me:
        raise ValueError(f"{name} {peer} is this process's own rank; a transfer needs two ranks")


def _spec_mismatch(header: wire.TransferHeader, pool: PagedKVPool, src: int, me: int) -> tuple[str, Any, Any] | None:
    spec = pool.spec
    ours: dict[str, Any] = {
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.dtype,
        "block_size": spec.block_size,
        "block_nbytes": pool.block_nbytes,
        "dst_rank": me,
    }
    theirs = header.spec_values()
    for field in wire.SPEC_FIELDS:
        if field in ours and theirs[field] != ours[field]:
            return field, ours[field], theirs[field]
    if header.checksum_algorithm not in wire.CHECKSUM_ALGORITHMS.values():
        return "checksum_algorithm", sorted(wire.CHECKSUM_ALGORITHMS.values())[0], header.checksum_algorithm
    if header.src_rank != src:
        return "src_rank", src, header.src_rank
    return None

