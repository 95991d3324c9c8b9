"""Tiered KV storage under the prefix cache: device pool -> host slab -> disk slots, moving real bytes.

Tiers (each with its own capacity and its own allocator of slots):

* **device**: a :class:`~sagellm_kv_cache.paged.PagedKVPool` (CPU or CUDA) under the native
  :class:`~sagellm_kv_cache.prefix_cache.RadixPrefixCache`; its capacity is ``device_blocks``.
* **host**: a :class:`HostTier`, fixed slots of one native ``HostSlab`` (page-locked through the CUDA
  allocator when the device pool is on a GPU, page-aligned host memory otherwise), an LRU index
  digest -> slot.
* **disk**: a :class:`DiskTier`, one preallocated file of fixed slots in a directory. Each slot is a
  payload padded to 4 KiB followed by a 4 KiB header page (magic, format version, digest, generation,
  payload size, payload checksum and a checksum of the header itself; with KV events on, also the block's
  token record: its tokens, parent, extra key and salt, under a checksum of their own), written with one request.
  ``O_DIRECT`` is used where the filesystem takes it (else buffered I/O; ``direct_io`` says which).
  Reopening the directory rebuilds the index from the headers, keeping the slots whose header and payload check out and
  dropping the rest, so the disk tier is a persistent prefix cache.

Movement. Evicting a cached block from the device tier *demotes* it: the native
``evict_detached`` takes it out of the trie while its block stays allocated, a background thread
copies its bytes into a host slot and only then frees the device block and publishes the digest in
the host index. A full host tier demotes its least recently stored block to disk the same way
(written, then published); a spill that fails (a disk write error) leaves the blocks it did not write
in their host slots, cached, and the demotion it made room for reports the error (its device blocks that
found no slot are dropped, the tails of their chains first: what lands is a prefix a match can reach).
The disk tier drops its least recently stored block when full (a write into its slot that fails keeps
it when its bytes read back intact); when every disk slot is claimed by promotions in flight, the
blocks being demoted there are dropped instead (from a device demotion, the tails of their chains). A lower
tier hit is *promoted* (copied into a fresh device block and inserted into the trie) before
:meth:`TieredPrefixCache.match` returns; the lower copy is then released (tiers are exclusive, so the
capacities add up). A block is visible in a tier only once its bytes landed there; a lookup of a
digest whose demotion is in flight waits for it. Every disk read is checked against the slot's
header (digest and payload checksum): a torn or stale slot is dropped and reported as a miss, never
served.

Durability: ``fsync=False`` (default) leaves written slots to the page cache, which survives a killed
process (``kill -9``) but not a power loss; ``fsync=True`` makes every slot durable before it is
published. Either way the checksums keep a torn slot from being served after a crash.

Digests are chained (a digest covers its whole prefix), so the lower tiers are flat maps keyed by
digest; the bytes of a digest are a function of the prefix and the model, so a slot of an old
generation holding the same digest holds the same bytes.

KV events (``event_queue_capacity > 0``): :meth:`TieredPrefixCache.drain_events` hands out what a
KV-aware router needs to know every tier, in vLLM's shapes with a ``medium`` per tier, as vLLM's
offloading connector tags its CPU tier: the device trie's stored/removed events as ``"GPU"``, the host
tier's as ``"CPU"``, the disk tier's as ``"DISK"``. Each medium reports its own contents, so a demotion
is a removal from one medium and a store into the next, and a promotion the reverse; a router's view of
each medium (NVIDIA Dynamo keeps one index per medium) equals that tier at each drain. A lower tier
reports what it holds at drain time (a block stored and dropped again between two drains is never
mentioned), a block once its bytes landed, as lookups see it. Routers re-hash the tokens, so with
events on :meth:`TieredPrefixCache.insert` needs the blocks' ``token_ids``. A disk slot written with
events on keeps them (the token record, when it fits the 4 KiB header page: up to ~970 tokens a block),
so a reopened disk directory's blocks are announced at the first drain (parents first) and promoted by
any match; a slot without a record (written with events off, or by an older version) is announced and
promoted once a :meth:`~TieredPrefixCache.match` passes its blocks' ``token_ids`` (announced, too, once an
insert of the same blocks names them).

Thread safety: every public method may be called from any thread; one lock guards the lower tiers'
indexes and slot allocators, the device trie has its own; copies run outside the lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from sagellm_kv_cache import _core
from sagellm_kv_cache._numbers import INT32_MAX, INT64_MAX, array_of, integer, positive_int, shown, text
from sagellm_kv_cache.errors import KVMetadataMismatchError, KVPoolFullError
from sagellm_kv_cache.paged import PagedKVPool
from sagellm_kv_cache.prefix_cache import RadixPrefixCache

__all__ = ["TIER_DEVICE", "TIER_DISK", "TIER_HOST", "TIER_MEDIA", "TIER_NAMES", "DiskTier", "HostTier", "TierMatch",
           "TieredPrefixCache"]

TIER_DEVICE, TIER_HOST, TIER_DISK = 0, 1, 2
TIER_NAMES = ("device", "host", "disk")
TIER_MEDIA = ("GPU", "CPU", "DISK")
"""The ``medium`` of each tier's KV events (vLLM's spellings; Dynamo's device, host-pinned and disk tiers)."""

_PAGE = 4096
_MAGIC = b"SGKVSLT1"
_FORMAT_VERSION = 2
# magic, version, reserved, generation, digest, payload bytes, payload checksum; then a checksum of those.
_HEADER = struct.Struct("<8sIIQ32sQQ")
_HEADER_CHECK = struct.Struct("<Q")
# A block's token record, at _RECORD_AT of the header page (optional: absent where the magic is not):
# magic, flags (_HAS_*), token count, extra key bytes, cache salt bytes, parent digest (zero without);
# then the tokens (u32), the extra key, the salt, and a checksum of the page up to there (binding the
# record to the header's digest and generation). A slot without one loads as before; a bad one drops it.
_RECORD_AT = 128
_RECORD_MAGIC = b"SGKVTOK1"
_RECORD = struct.Struct("<8sIIII32s")
_HAS_PARENT, _HAS_EXTRA, _HAS_SALT = 1, 2, 4
_META_FILE = "tier.json"
_SLOTS_FILE = "slots.bin"


_TOKEN_LIMIT = 2**32  # routers (vLLM, Dynamo) take token ids as u32
_MAX_BLOCK_NBYTES = 2**62  # a slot's size (rounded up to pages, plus a header page) stays an int64


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _digest_rows(digests: Any) -> npt.NDArray[np.uint8]:
    """Digests as an (n, 32) uint8 array: from such an array or a sequence of 32-byte buffers."""
    if isinstance(digests, np.ndarray):
        if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != 32:
            raise ValueError(f"digests must be an (n, 32) uint8 array, got {digests.dtype} {digests.shape}")
        return np.ascontiguousarray(digests)
    rows = []
    for i, d in enumerate(digests):
        b = bytes(d) if isinstance(d, bytes | bytearray | memoryview) else None
        if b is None or len(b) != 32:
            raise TypeError(f"digest {i} must be 32 bytes, got {type(d).__name__}")
        rows.append(b)
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 32)


# --- host tier ---------------------------------------------------------------------------------


class HostTier:
    """``num_blocks`` host slots of ``block_nbytes`` each (pinned when ``device`` is an accelerator).

    Holds the index digest -> slot in LRU order of storing; the owner (``TieredPrefixCache``) does
    all locking. Slot ids come from a native lock-free allocator.
    """

    def __init__(self, num_blocks: int, block_nbytes: int, device: str = "cpu") -> None:
        self.num_blocks = positive_int("host_blocks", num_blocks, maximum=INT32_MAX)
        self.block_nbytes = positive_int("block_nbytes", block_nbytes, maximum=_MAX_BLOCK_NBYTES)
        device = text("device", device)
        # Each slot has room for a disk slot's header page after the block, so a demotion to disk
        # is one contiguous write. Zero-filled: the pages are faulted in now, not on first use.
        self.slab = _core.HostSlab(self.num_blocks, _round_up(self.block_nbytes, _PAGE) + _PAGE, device, True)
        self.view = self.slab.view()
        self.slots = _core.BlockAllocator(self.num_blocks)
        self.index: OrderedDict[bytes, int] = OrderedDict()

    @property
    def pinned(self) -> bool:
        return bool(self.slab.pinned)

    def payload(self, slot: int) -> npt.NDArray[np.uint8]:
        """Slot ``slot``'s block bytes (a view). Checked here: numpy would read -1 as the last slot."""
        slot = integer("slot", slot)
        if not 0 <= slot < self.num_blocks:
            raise IndexError(f"slot {shown(slot)} out of range [0, {self.num_blocks})")
        return self.view[slot, : self.block_nbytes]

    def __len__(self) -> int:
        return len(self.index)


# --- disk tier ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _BlockMeta:
    """What a stored event says about a block besides its digest (kept while any tier holds it)."""

    tokens: npt.NDArray[np.int64]
    parent: bytes | None
    extra_key: bytes | None
    cache_salt: bytes | None


def _key_bytes(key: bytes | str | None) -> bytes | None:
    """An extra key or salt as a stored event of the device trie carries it (a str as its UTF-8 bytes)."""
    return key.encode("utf-8") if isinstance(key, str) else key


@dataclass
class _DiskSlot:
    slot: int
    generation: int


class _Descriptors:
    """A disk tier's open descriptors, kept apart from the tier so that a finaliser can close them when
    the tier is dropped without ``close()``: the buffered one (holding the directory's lock), the
    O_DIRECT one, and an O_DIRECT one retired after the file system refused its I/O."""

    __slots__ = ("buffered", "direct", "retired")

    def __init__(self) -> None:
        self.buffered = -1
        self.direct: int | None = None
        self.retired: list[int] = []

    def take(self) -> list[int]:
        """Every open descriptor, forgotten here (the caller closes them)."""
        fds = [fd for fd in (self.direct, self.buffered, *self.retired) if fd is not None and fd >= 0]
        self.buffered, self.direct, self.retired = -1, None, []
        return fds

    def close(self) -> None:
        for fd in self.take():
            with contextlib.suppress(OSError):
                os.close(fd)


class DiskTier:
    """A directory holding one preallocated file of fixed block slots, with a persistent index.

    Opening a directory that holds a tier of the same ``block_nbytes`` and checksum algorithm
    reuses it (growing the file if ``num_blocks`` is larger; a smaller ``num_blocks`` keeps only the
    slots below it) and rebuilds the index from the slot headers: a slot counts only if its header
    checksum, magic, version and size are right and (``verify_on_open``, default) its payload
    matches the recorded checksum; duplicates of a digest keep the newest generation. A directory
    holding another block size or checksum raises :class:`~sagellm_kv_cache.errors.KVMetadataMismatchError`.

    A slot may also carry its block's token record (tokens, parent digest, extra key, cache salt: what a
    KV event of the block says), written with ``write(..., meta=)`` in the header page when it fits there.
    On open a record is checked (its sizes, and a checksum binding it to the slot's header): a bad one
    drops its slot; with ``keep_records`` the good ones are kept in ``records`` (digest -> record).

    The owner does the locking of the index and the slot allocator; reads and writes of distinct
    slots may run concurrently (positional I/O, thread-local header buffers). Call :meth:`close`; a
    tier dropped without it closes its descriptors (and frees the directory's lock) when collected.
    """

    def __init__(self, directory: str | os.PathLike[str], num_blocks: int, block_nbytes: int, *,
                 direct_io: bool = True, fsync: bool = False, verify_on_open: bool = True,
                 keep_records: bool = False) -> None:
        self.num_blocks = positive_int("disk_blocks", num_blocks, maximum=INT32_MAX)
        self.block_nbytes = positive_int("block_nbytes", block_nbytes, maximum=_MAX_BLOCK_NBYTES)
        self.payload_stride = _round_up(self.block_nbytes, _PAGE)
        self.slot_nbytes = self.payload_stride + _PAGE  # payload, then its header page
        if self.num_blocks * self.slot_nbytes > INT64_MAX:  # the file's size is an off_t
            raise ValueError(f"disk_blocks ({self.num_blocks}) slots of {self.slot_nbytes} bytes exceed a file's "
                             "largest size")
        self.fsync = bool(fsync)
        self.directory = Path(directory)
        # I/O gate: close() waits for the reads and writes in flight before it closes descriptors
        # (a descriptor closed under another thread's I/O is a number the next open() reuses).
        self._io_cv = threading.Condition()
        self._io_active = 0
        # Closed by close(), or by this finaliser once the tier is collected without it (no I/O can
        # be in flight then: each holds the tier). An engine rebuilding its cache would otherwise
        # leak two descriptors per tier, and keep the directory locked for the rest of the process.
        self._fds = _Descriptors()
        self._finalizer = weakref.finalize(self, _Descriptors.close, self._fds)
        # Refuses a slot count the native allocator cannot hold before anything is created on disk.
        try:
            self.slots = _core.BlockAllocator(self.num_blocks)
        except ValueError as exc:
            raise ValueError(f"disk_blocks: {exc}") from None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"disk tier directory {str(directory)!r} cannot be created: {exc.strerror}") from None
        path = self.directory / _SLOTS_FILE
        try:
            self._fds.buffered = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # e.g. a directory in its place, or no permission
            raise ValueError(f"disk tier file {str(path)!r} cannot be opened: {exc.strerror}") from None
        try:
            import fcntl

            fcntl.flock(self._fds.buffered, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fds.close()
            raise ValueError(f"disk tier directory {str(directory)!r} is in use by another process") from None
        self.direct_io = False
        try:
            # Any failure from here closes the file again: a leaked descriptor would keep the lock,
            # and the directory would read as "in use" for the rest of the process.
            # The description is read or written only under the lock: two processes creating the
            # directory at once would otherwise both find none, and the loser's could stand last.
            self._check_meta()
            self._open_slots(path, direct_io, verify_on_open, keep_records)
        except BaseException:
            self.close()
            raise

    def _open_slots(self, path: Path, direct_io: bool, verify_on_open: bool, keep_records: bool) -> None:
        old_size = os.fstat(self._fds.buffered).st_size
        want = self.num_blocks * self.slot_nbytes
        if old_size < want:
            try:
                os.ftruncate(self._fds.buffered, want)
            except OSError as exc:
                raise ValueError(f"disk_blocks {self.num_blocks} ({want} bytes) do not fit a file in "
                                 f"{str(self.directory)!r}: {exc.strerror}") from None
        written_slots = min(self.num_blocks, old_size // self.slot_nbytes)  # beyond: never written
        if direct_io and hasattr(os, "O_DIRECT"):
            try:
                self._fds.direct = os.open(path, os.O_RDWR | os.O_DIRECT)
                self.direct_io = True
            except OSError:
                self._fds.direct = None
        self._local = threading.local()
        self.index: OrderedDict[bytes, _DiskSlot] = OrderedDict()
        self.generation = 0
        self.dropped_on_open = 0
        self.records: dict[bytes, _BlockMeta] = {}
        self._rebuild(written_slots, verify_on_open, keep_records)

    # --- metadata ------------------------------------------------------------------------------

    def _check_meta(self) -> None:
        meta = {"format": _FORMAT_VERSION, "block_nbytes": self.block_nbytes,
                "checksum": _core.block_checksum_algorithm(), "header_bytes": _PAGE,
                "layout": "payload-then-header"}
        path = self.directory / _META_FILE
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise KVMetadataMismatchError("tier.json", "a readable tier description", str(exc)) from None
            for key, want in meta.items():
                if not isinstance(old, dict) or old.get(key) != want:
                    got = old.get(key) if isinstance(old, dict) else old
                    raise KVMetadataMismatchError(key, want, got,
                                                  context={"directory": str(self.directory)})
            return
        # Durable before the slots are used: written whole to a temporary file, synced, renamed over
        # the name, and the rename synced with the directory (a crash leaves the old state or the new).
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = memoryview((json.dumps(meta) + "\n").encode("utf-8"))
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:  # a read-only or full file system, something else in the way
            raise ValueError(f"disk tier description {str(path)!r} cannot be written: {exc.strerror}") from None

    # --- buffers -------------------------------------------------------------------------------

    def _header_buffer(self) -> npt.NDArray[np.uint8]:
        buf = getattr(self._local, "header", None)
        if buf is None:
            slab = _core.HostSlab(1, _PAGE)
            buf = slab.view()[0]
            self._local.header = buf
        return buf

    def bounce_buffer(self) -> npt.NDArray[np.uint8]:
        """A page-aligned per-thread buffer of one payload stride (for O_DIRECT reads and writes)."""
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            slab = _core.HostSlab(1, self.slot_nbytes)
            buf = slab.view()[0]
            self._local.bounce = buf
        return buf

    def _aligned(self, buf: npt.NDArray[np.uint8]) -> bool:
        return buf.ctypes.data % _PAGE == 0 and buf.nbytes % _PAGE == 0

    # --- slot I/O ------------------------------------------------------------------------------

    def _encode_header(self, hdr: npt.NDArray[np.uint8], digest: bytes, generation: int, checksum: int) -> None:
        body = _HEADER.pack(_MAGIC, _FORMAT_VERSION, 0, generation, digest, self.block_nbytes, checksum)
        hdr[: _HEADER.size] = np.frombuffer(body, dtype=np.uint8)
        hdr[_HEADER.size: _HEADER.size + 8] = np.frombuffer(
            _HEADER_CHECK.pack(_core.block_checksum(hdr[: _HEADER.size])), dtype=np.uint8)

    def _decode_header(self, hdr: npt.NDArray[np.uint8]) -> tuple[bytes, int, int] | None:
        """(digest, generation, payload checksum), or None for an empty, torn or foreign header."""
        body = hdr[: _HEADER.size]
        (check,) = _HEADER_CHECK.unpack(hdr[_HEADER.size: _HEADER.size + 8].tobytes())
        if check != _core.block_checksum(body):
            return None
        magic, version, _, generation, digest, nbytes, checksum = _HEADER.unpack(body.tobytes())
        if magic != _MAGIC or version != _FORMAT_VERSION or nbytes != self.block_nbytes:
            return None
        return bytes(digest), int(generation), int(checksum)

    def _encode_record(self, hdr: npt.NDArray[np.uint8], meta: _BlockMeta | None) -> None:
        """Writes ``meta`` as the header page's token record, or marks the page as holding none (no
        metadata, or more than the page holds: the block is then stored without its tokens)."""
        hdr[_RECORD_AT: _RECORD_AT + len(_RECORD_MAGIC)] = 0  # a reused buffer's old record is not this block's
        if meta is None:
            return
        extra, salt = meta.extra_key or b"", meta.cache_salt or b""
        tokens = meta.tokens.astype("<u4").tobytes()  # token ids are checked to be u32 on insert and match
        end = _RECORD_AT + _RECORD.size + len(tokens) + len(extra) + len(salt)
        if end + _HEADER_CHECK.size > _PAGE:
            return
        flags = ((_HAS_PARENT if meta.parent is not None else 0) | (_HAS_EXTRA if meta.extra_key is not None else 0)
                 | (_HAS_SALT if meta.cache_salt is not None else 0))
        hdr[_HEADER.size + _HEADER_CHECK.size: _RECORD_AT] = 0  # covered by the record's checksum
        body = _RECORD.pack(_RECORD_MAGIC, flags, len(meta.tokens), len(extra), len(salt), meta.parent or bytes(32))
        hdr[_RECORD_AT: end] = np.frombuffer(body + tokens + extra + salt, dtype=np.uint8)
        hdr[end: end + _HEADER_CHECK.size] = np.frombuffer(_HEADER_CHECK.pack(_core.block_checksum(hdr[:end])),
                                                           dtype=np.uint8)

    def _decode_record(self, hdr: npt.NDArray[np.uint8]) -> _BlockMeta | None:
        """The header page's token record; None without one; ValueError for one that is not intact
        (a size out of the page, unknown flags, bytes set that its flags say are absent, a bad checksum)."""
        page = hdr.tobytes()  # one copy; the fields are read from it
        if page[_RECORD_AT: _RECORD_AT + len(_RECORD_MAGIC)] != _RECORD_MAGIC:
            return None
        _, flags, n_tokens, n_extra, n_salt, parent = _RECORD.unpack_from(page, _RECORD_AT)
        at = _RECORD_AT + _RECORD.size
        end = at + 4 * n_tokens + n_extra + n_salt
        if end + _HEADER_CHECK.size > _PAGE:
            raise ValueError(f"token record of {n_tokens} tokens, {n_extra} + {n_salt} key bytes overruns its page")
        if flags & ~(_HAS_PARENT | _HAS_EXTRA | _HAS_SALT):
            raise ValueError(f"token record flags {flags:#x} unknown")
        if (not flags & _HAS_PARENT and any(parent)) or (not flags & _HAS_EXTRA and n_extra) or (
                not flags & _HAS_SALT and n_salt):
            raise ValueError("token record holds bytes its flags say are absent")
        (check,) = _HEADER_CHECK.unpack_from(page, end)
        if check != _core.block_checksum(hdr[:end]):
            raise ValueError("token record checksum mismatch")
        tokens = np.frombuffer(page, dtype="<u4", count=n_tokens, offset=at).astype(np.int64)
        at += 4 * n_tokens
        extra, salt = page[at: at + n_extra], page[at + n_extra: end]
        return _BlockMeta(tokens, parent if flags & _HAS_PARENT else None,
                          extra if flags & _HAS_EXTRA else None, salt if flags & _HAS_SALT else None)

    def _split(self, buf: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.uint8]]:
        """The I/O vector of a slot for ``buf``: ``buf`` alone when it holds a whole slot (payload
        stride + header page: one contiguous request), else ``buf`` and a header buffer."""
        if buf.nbytes == self.slot_nbytes:
            return [buf]
        if buf.nbytes != self.payload_stride:
            raise ValueError(f"a disk slot buffer holds {self.payload_stride} or {self.slot_nbytes} bytes, "
                             f"got {buf.nbytes}")
        return [buf, self._header_buffer()]

    def _slot_args(self, slot: Any, digest: Any, buf: Any, what: str) -> int:
        """Checks a slot I/O's arguments before any I/O (the header's struct and the offsets would
        otherwise refuse them without naming them, or take an int as a digest's length)."""
        slot = integer("slot", slot)
        if not 0 <= slot < self.num_blocks:
            raise IndexError(f"slot {shown(slot)} out of range [0, {self.num_blocks})")
        if not isinstance(digest, bytes) or len(digest) != 32:
            got = f"{len(digest)} bytes" if isinstance(digest, bytes) else type(digest).__name__
            raise TypeError(f"digest must be 32 bytes, got {got}")
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            got = f"dtype {buf.dtype}, {buf.ndim} dimension(s)" if isinstance(buf, np.ndarray) else type(buf).__name__
            raise TypeError(f"{what} must be a 1-D C-contiguous uint8 array, got {got}")
        return slot

    def write(self, slot: int, digest: bytes, buf: npt.NDArray[np.uint8], generation: int,
              meta: _BlockMeta | None = None) -> None:
        """Writes one slot from ``buf`` (its first ``block_nbytes`` are the block; a whole-slot
        buffer also carries the header page, which this fills in), with the block's token record
        ``meta`` where given and it fits the header page."""
        slot = self._slot_args(slot, digest, buf, "buf")
        generation = integer("generation", generation)
        if not 0 <= generation < 2**64:
            raise ValueError(f"generation must be in [0, 2**64), got {shown(generation)}")
        iov = self._split(buf)
        checksum = _core.block_checksum(buf[: self.block_nbytes])
        self._encode_header(iov[-1][-_PAGE:], digest, generation, checksum)
        self._encode_record(iov[-1][-_PAGE:], meta)
        # One positional write of payload + header: a crash may land any part of it, which the
        # header and payload checksums catch on the next read or reopen.
        self._io(iov, slot * self.slot_nbytes, write=True, sync=self.fsync)

    def erase(self, slot: int) -> None:
        """Clears a slot's header, so that a reopen finds it never written. For a slot whose block
        left the tier with its bytes intact (a promotion, or a copy given up for another of its digest):
        left as it was, the block would come back when the directory is reopened, though the tier had
        removed (and announced removing) it."""
        if isinstance(slot, bool) or not isinstance(slot, int | np.integer) or not 0 <= slot < self.num_blocks:
            raise ValueError(f"slot must be an int in [0, {self.num_blocks}), got {shown(slot)}")
        hdr = self._header_buffer()
        hdr[:] = 0
        self._io([hdr], int(slot) * self.slot_nbytes + self.payload_stride, write=True, sync=self.fsync)

    def read(self, slot: int, digest: bytes, out: npt.NDArray[np.uint8]) -> bool:
        """Reads a slot into ``out`` (as for ``write``); False when the slot does not hold ``digest``
        intact (wrong digest, torn header or payload): then ``out`` must not be used."""
        slot = self._slot_args(slot, digest, out, "out")
        iov = self._split(out)
        self._io(iov, slot * self.slot_nbytes, write=False)
        decoded = self._decode_header(iov[-1][-_PAGE:])
        if decoded is None or decoded[0] != digest:
            return False
        return decoded[2] == _core.block_checksum(out[: self.block_nbytes])

    def _io(self, bufs: list[npt.NDArray[np.uint8]], off: int, *, write: bool, sync: bool = False) -> None:
        """pwritev / preadv of ``bufs`` at ``off``, through O_DIRECT when every buffer is aligned
        (then fdatasync when ``sync``). OSError(EBADF) once the tier is closed."""
        with self._io_cv:
            if self._fds.buffered < 0:
                raise OSError(errno.EBADF, "the disk tier is closed")
            self._io_active += 1
            buffered_fd, direct_fd = self._fds.buffered, self._fds.direct
        try:
            use_direct = direct_fd is not None and all(self._aligned(b) for b in bufs)
            fd = direct_fd if use_direct and direct_fd is not None else buffered_fd
            op = os.pwritev if write else os.preadv
            try:
                n = op(fd, cast(list[Any], bufs), off)
            except OSError as exc:
                if exc.errno != errno.EINVAL or fd == buffered_fd:
                    raise
                self._disable_direct()
                n = op(buffered_fd, cast(list[Any], bufs), off)
            want = sum(b.nbytes for b in bufs)
            if n != want:
                raise OSError(errno.EIO, f"short {'write' if write else 'read'} on the disk tier ({n} of {want} bytes)")
            if sync:
                os.fdatasync(buffered_fd)
        finally:
            with self._io_cv:
                self._io_active -= 1
                if self._io_active == 0:
                    self._io_cv.notify_all()

    def _pread(self, buf: npt.NDArray[np.uint8], off: int) -> None:
        self._io([buf], off, write=False)

    def _disable_direct(self) -> None:
        # The filesystem opened with O_DIRECT but refuses the I/O: fall back to buffered I/O. The
        # descriptor stays open until close(): another thread may be in an I/O on it.
        with self._io_cv:
            if self._fds.direct is not None:
                self._fds.retired.append(self._fds.direct)
                self._fds.direct = None
            self.direct_io = False

    # --- index ---------------------------------------------------------------------------------

    def _rebuild(self, written_slots: int, verify: bool, keep_records: bool) -> None:
        found: dict[bytes, _DiskSlot] = {}
        records: dict[bytes, _BlockMeta | None] = {}
        bounce = self.bounce_buffer()
        hdr = self._header_buffer()
        for slot in range(written_slots):
            off = slot * self.slot_nbytes
            self._pread(hdr, off + self.payload_stride)
            if not hdr[:8].any():
                continue  # never written
            decoded = self._decode_header(hdr)
            ok = decoded is not None
            if ok and verify:
                assert decoded is not None
                self._pread(bounce[: self.payload_stride], off)
                ok = decoded[2] == _core.block_checksum(bounce[: self.block_nbytes])
            try:
                record = self._decode_record(hdr) if ok else None
            except ValueError:
                ok = False  # a slot whose record is not intact is not trusted either
            if not ok or decoded is None:
                self.dropped_on_open += 1
                continue
            digest, generation, _ = decoded
            old = found.get(digest)
            if old is None or generation > old.generation:
                found[digest] = _DiskSlot(slot, generation)
                records[digest] = record
            self.generation = max(self.generation, generation)
        taken = {s.slot for s in found.values()}
        # Claim the slots in use from the fresh allocator: take all, give back the free ones.
        if taken:
            ids = self.slots.allocate(self.num_blocks)
            free = np.array(sorted(set(ids.tolist()) - taken), dtype=np.int32)
            if free.size:
                self.slots.free(free)
        for digest, entry in sorted(found.items(), key=lambda kv: kv[1].generation):
            self.index[digest] = entry
            record = records[digest]
            if keep_records and record is not None:
                self.records[digest] = record

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def close(self) -> None:
        """Closes the slot file once the reads and writes in flight have finished; later ones raise
        OSError(EBADF)."""
        with self._io_cv:
            fds = self._fds.take()
            while self._io_active:
                self._io_cv.wait()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.index))


# --- the tiered prefix cache -------------------------------------------------------------------


@dataclass
class TierMatch:
    """Outcome of :meth:`TieredPrefixCache.match`: the first ``num_matched`` digests are now device
    blocks ``block_ids`` (acquired: release them with the digests); ``tiers[i]`` is where block i was
    found (0 device, 1 host, 2 disk) before promotion."""

    num_matched: int
    block_ids: npt.NDArray[np.int32]
    tiers: npt.NDArray[np.int8]

    def hits(self, tier: int) -> int:
        return int(np.count_nonzero(self.tiers == tier))


_PATHS = ("device_to_host", "host_to_device", "host_to_disk", "disk_to_device", "device_to_disk")


def _block_tokens(token_ids: Any, num_blocks: int, block_size: int) -> npt.NDArray[np.int64]:
    """``token_ids`` as int64, checked to hold ``block_size`` tokens per block (at least ``num_blocks``)."""
    if token_ids is None:
        raise ValueError("token_ids are needed with KV events on (event_queue_capacity > 0): routers re-hash "
                         "each block's tokens")
    if isinstance(token_ids, str | bytes):
        raise TypeError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
    tokens = array_of("token_ids", token_ids, "a sequence of ints")
    if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
        raise TypeError(f"token_ids must be a 1-D sequence of ints, got {tokens.dtype} {tokens.shape}")
    if len(tokens) < num_blocks * block_size:
        raise ValueError(f"token_ids holds {len(tokens)} tokens, {num_blocks} blocks of {block_size} need "
                         f"{num_blocks * block_size}")
    # Routers take token ids as u32 (a stored event holding another cannot be encoded: its whole
    # batch would be lost, and the lower tiers with it, as they are announced only once).
    if tokens.size and (tokens.min() < 0 or tokens.max() >= _TOKEN_LIMIT):
        pos = int(np.flatnonzero((tokens < 0) | (tokens >= _TOKEN_LIMIT))[0])
        raise ValueError(f"token_ids[{pos}] is {shown(tokens[pos].item())}, outside the routers' token id range "
                         "[0, 2**32)")
    return tokens.astype(np.int64, copy=False)


@dataclass
class _Stats:
    lookups: int = 0
    queried_blocks: int = 0
    hits: list[int] = field(default_factory=lambda: [0, 0, 0])
    demoted_to_host: int = 0
    demoted_to_disk: int = 0
    promoted_from_host: int = 0
    promoted_from_disk: int = 0
    dropped: list[int] = field(default_factory=lambda: [0, 0, 0])  # blocks that fell off each tier
    # copies a lower tier gave up for a newer copy of the same digest (same bytes): a rewrite in place,
    # or a second slot of it freed
    replaced: list[int] = field(default_factory=lambda: [0, 0, 0])
    corrupt_reads: int = 0
    disk_write_errors: int = 0  # disk writes that failed (each raised to its demotion)
    bytes_moved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PATHS, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_PATHS, 0.0))



class TieredPrefixCache:
    """A prefix cache over a device pool, a host tier and a disk tier (see the module docstring).

    ``event_queue_capacity > 0`` turns on KV events for routers (:meth:`drain_events`, one medium per
    tier; the device trie queues at most that many events between drains, as ``RadixPrefixCache``).

    >>> # pool = PagedKVPool(spec, 1024); tc = TieredPrefixCache(pool, device_blocks=1000, host_blocks=10_000,
    >>> #                                                      disk_dir="/var/kv", disk_blocks=100_000)
    >>> # m = tc.match(digests)            # promotes lower-tier hits; then allocate, insert, release
    """

    def __init__(
        self,
        pool: PagedKVPool,
        *,
        device_blocks: int | None = None,
        host_blocks: int = 0,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_blocks: int = 0,
        policy: str = "lru",
        hash_algorithm: str = "sha256",
        direct_io: bool = True,
        fsync: bool = False,
        verify_on_open: bool = True,
        background: bool = True,
        event_queue_capacity: int = 0,
    ) -> None:
        if not isinstance(pool, PagedKVPool):
            raise TypeError(f"pool must be a PagedKVPool, got {type(pool).__name__}")
        self.pool = pool
        self.block_nbytes = pool.block_nbytes
        if device_blocks is None:
            device_blocks = pool.num_blocks
        self.device_blocks = positive_int("device_blocks", device_blocks)
        if self.device_blocks > pool.num_blocks:
            raise ValueError(f"device_blocks ({self.device_blocks}) exceeds the pool's {pool.num_blocks} blocks")
        host_blocks = positive_int("host_blocks", host_blocks, allow_zero=True)
        disk_blocks = positive_int("disk_blocks", disk_blocks, allow_zero=True)
        if disk_blocks and disk_dir is None:
            raise ValueError("disk_blocks > 0 needs disk_dir")
        self.device = RadixPrefixCache(block_size=pool.spec.block_size, pool=pool, policy=policy,
                                       hash_algorithm=hash_algorithm, event_queue_capacity=event_queue_capacity)
        self.block_size = int(pool.spec.block_size)
        self._events = event_queue_capacity > 0
        # With events: each cached block's metadata, and per lower tier the blocks routers were told it
        # holds, the blocks whose membership changed since the last drain, and the promotions claiming
        # a block (claimed blocks stay held until the promotion frees or returns them).
        self._meta: dict[bytes, _BlockMeta] = {}
        self._announced: tuple[set[bytes], ...] = (set(), set(), set())
        self._changed: tuple[dict[bytes, None], ...] = ({}, {}, {})
        self._claims: tuple[dict[bytes, int], ...] = ({}, {}, {})
        self.host = HostTier(host_blocks, self.block_nbytes, pool.device) if host_blocks else None
        self.disk = (DiskTier(disk_dir, disk_blocks, self.block_nbytes, direct_io=direct_io, fsync=fsync,
                              verify_on_open=verify_on_open, keep_records=self._events)
                     if disk_blocks and disk_dir is not None else None)
        if self.disk is not None and self._events:
            self._adopt_disk_records(self.disk)
        self._lock = threading.RLock()
        self._pending: dict[bytes, Future[None]] = {}
        self._stats = _Stats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-tiers") if background else None
        self._closed = False

    def _adopt_disk_records(self, disk: DiskTier) -> None:
        """Makes the blocks a reopened disk tier holds token records of known (their tokens hash to their
        digests): the first drain announces them under DISK, parents first, and a match promotes them
        without ``token_ids``. A record of another block size or hash is left unused."""
        records, disk.records = disk.records, {}
        order: list[bytes] = []
        seen: set[bytes] = set()
        for key in records:
            chain: list[bytes] = []
            at: bytes | None = key
            while at is not None and at in records and at not in seen:
                seen.add(at)
                chain.append(at)
                at = records[at].parent
            order.extend(reversed(chain))
        for key in order:
            meta = records[key]
            if len(meta.tokens) != self.block_size or self.hash_tokens(
                    meta.tokens, parent=meta.parent, salt=meta.cache_salt, extra=meta.extra_key)[0].tobytes() != key:
                continue
            self._meta[key] = meta
            self._changed[TIER_DISK][key] = None

    # --- hashing and the request protocol ----------------------------------------------------

    def hash_tokens(self, tokens: Any, **kwargs: Any) -> npt.NDArray[np.uint8]:
        return self.device.hash_tokens(tokens, **kwargs)

    def match(self, digests: Any, *, token_ids: Any = None, extra_key: bytes | None = None,
              cache_salt: bytes | None = None) -> TierMatch:
        """Longest prefix cached in any tier, promoted to the device and acquired there.

        Release ``digests[:num_matched]`` when the request ends (as with ``RadixPrefixCache``).
        With KV events on, a lower-tier block whose tokens this process never saw (a reopened disk
        tier's) is promoted only when ``token_ids`` (and the ``extra_key`` / ``cache_salt`` the digests
        were hashed with) are given: its stored event needs them. A ``token_ids``, ``extra_key`` or
        ``cache_salt`` of the wrong type (or too few tokens) raises before anything moves, events on or off.
        """
        self._check_open()
        digests = _digest_rows(digests)
        # Checked whether or not events use them: a wrong argument is refused, never silently ignored.
        for name, key in (("extra_key", extra_key), ("cache_salt", cache_salt)):
            if key is not None and not isinstance(key, bytes | str):
                raise TypeError(f"{name} must be bytes, str or None, got {type(key).__name__}")
        tokens = None if token_ids is None else _block_tokens(token_ids, len(digests), self.block_size)
        if self._events and tokens is not None:
            # They go into stored events as these blocks' tokens: they must be the ones hashed.
            hashed = self.hash_tokens(tokens[: len(digests) * self.block_size], salt=cache_salt, extra=extra_key)
            if not np.array_equal(hashed, digests):
                raise ValueError("token_ids (with extra_key and cache_salt) do not hash to digests")
        n0, ids0 = self.device.match(digests)
        held = n0  # digests[:held] hold a use on the device: given back if this lookup fails (a close() meanwhile)
        try:
            run = self._claim_run(digests, n0, tokens, extra_key, cache_salt)
            promoted = self._promote(digests, n0, run) if run else np.empty(0, np.int32)
            held += len(promoted)
            tiers = [TIER_DEVICE] * n0 + [t for _, t, _ in run[: len(promoted)]]
            with self._lock:
                s = self._stats
                s.lookups += 1
                s.queried_blocks += len(digests)
                for t in tiers:
                    s.hits[t] += 1
            ids = np.concatenate([ids0[:n0], promoted]).astype(np.int32, copy=False)
        except BaseException:
            if held:
                self.device.release(digests[:held])
            raise
        return TierMatch(len(ids), ids, np.asarray(tiers, dtype=np.int8))

    def _claim_run(self, digests: npt.NDArray[np.uint8], n0: int, tokens: npt.NDArray[np.int64] | None,
                   extra_key: bytes | None, cache_salt: bytes | None) -> list[tuple[bytes, int, int]]:
        """Claims the lower-tier blocks that continue the device prefix ``digests[:n0]``, up to the first
        miss (with events: or the first whose stored event cannot be written): (digest, tier, slot) each.
        On a failure none stays claimed."""
        run: list[tuple[bytes, int, int]] = []
        try:
            for i in range(n0, len(digests)):
                digest = digests[i].tobytes()
                claimed = self._claim(digest)
                if claimed is None:
                    break
                run.append((digest, *claimed))
                if self._events and not self._known(digest, i, digests, tokens, extra_key, cache_salt):
                    self._unclaim([run.pop()])
                    break
        except BaseException:
            self._unclaim(run)
            raise
        return run

    def release(self, digests: Any) -> None:
        """Drops the uses ``match`` took; device blocks beyond ``device_blocks`` are then demoted."""
        self.device.release(digests)
        self._trim()

    def _trim(self) -> None:
        excess = len(self.device) - self.device_blocks
        if excess > 0:
            self._demote(excess)

    def insert(self, digests: Any, block_ids: Any, *, parent: Any = None, token_ids: Any = None,
               extra_key: bytes | None = None, cache_salt: bytes | None = None) -> int:
        """Publishes freshly computed device blocks (as ``RadixPrefixCache.insert``), then demotes the
        least recently used device blocks beyond ``device_blocks``. Returns how many were inserted.

        ``token_ids`` (``block_size`` per block), ``extra_key`` and ``cache_salt`` go into the KV events;
        with events on the tokens are required (routers re-hash them)."""
        self._check_open()
        if not self._events:
            n, _ = self.device.insert(digests, block_ids, parent=parent, token_ids=token_ids, extra_key=extra_key,
                                      cache_salt=cache_salt)
            self._trim()
            return n
        rows = _digest_rows(digests)
        tokens = _block_tokens(token_ids, len(rows), self.block_size)
        if len(tokens) != len(rows) * self.block_size:
            raise ValueError(f"token_ids holds {len(tokens)} tokens for {len(rows)} blocks of {self.block_size}")
        with self._lock:  # the trie and the metadata change together (a drain or a demotion sees both)
            n, _ = self.device.insert(rows, block_ids, parent=parent, token_ids=tokens, extra_key=extra_key,
                                      cache_salt=cache_salt)
            first_parent = None if parent is None else bytes(parent)
            for i in range(len(rows)):
                key = rows[i].tobytes()
                if key in self._meta:
                    continue
                self._meta[key] = _BlockMeta(tokens[i * self.block_size: (i + 1) * self.block_size].copy(),
                                             rows[i - 1].tobytes() if i else first_parent, _key_bytes(extra_key),
                                             _key_bytes(cache_salt))
                for tier in (TIER_HOST, TIER_DISK):  # a reopened disk's copy: announced from the next drain
                    if self._held(tier, key):
                        self._changed[tier][key] = None
        self._trim()
        return n

    def allocate(self, num_blocks: int) -> npt.NDArray[np.int32]:
        """Device blocks for a request, demoting cached blocks first when the pool is short."""
        self._check_open()
        self.make_room(num_blocks)
        return self.pool.allocate(num_blocks)

    def make_room(self, num_blocks: int) -> None:
        """Demotes cached device blocks until ``num_blocks`` are free in the pool (or none is evictable)."""
        self._check_open()
        # What the pool can hand out now, signed: under a budget lowered below the blocks in use it
        # is short by the excess (num_free_blocks reads 0 then), which demotion makes up first.
        headroom = self.pool.budget_blocks - self.pool.num_used_blocks
        short = positive_int("num_blocks", num_blocks, allow_zero=True) - headroom
        if short > 0:
            for fut in self._demote(short):
                # A demotion that failed (a lower tier's I/O error) still freed its device blocks:
                # their copies are dropped, and the room is there. The error is the demotion's (its
                # future from demote()), not this caller's lookup or allocation.
                fut.exception()

    # --- demotion ------------------------------------------------------------------------------

    def _submit(self, fn: Any, *args: Any) -> Future[None]:
        if self._executor is None:
            fut: Future[None] = Future()
            try:
                fn(*args)
                fut.set_result(None)
            except BaseException as exc:  # handed to the waiter
                fut.set_exception(exc)
            return fut
        return self._executor.submit(fn, *args)

    def demote(self, num_blocks: int) -> list[Future[None]]:
        """Demotes up to ``num_blocks`` least recently used unreferenced device blocks now (e.g. ahead
        of a large batch). Returns the futures of the copies; they land in the background."""
        self._check_open()
        return self._demote(positive_int("num_blocks", num_blocks, allow_zero=True))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TieredPrefixCache is closed")

    def _demote(self, n: int) -> list[Future[None]]:
        n = min(n, INT32_MAX)  # "up to": past the most blocks a pool has, everything evictable goes
        if n == 0 or self._closed:  # a closed cache keeps its device blocks where they are
            return []
        if self.host is None and self.disk is None:
            with self._lock:
                digests, ids = self.device._native.evict_detached(n)
                if len(ids):
                    self._stats.dropped[TIER_DEVICE] += len(ids)
                    for row in digests:
                        self._forget_if_gone(row.tobytes())
            if len(ids):
                self.pool.free(ids)
            return []
        with self._lock:
            # Taken out of the trie and registered as in flight under one hold of the lock: a lookup
            # in between would find the digests in no tier (a miss) instead of waiting for the copy.
            if self._closed:  # close() sets it under this lock before shutting the executor down
                return []
            digests, ids = self.device._native.evict_detached(n)
            if len(ids) == 0:
                return []
            return [self._submit_locked([row.tobytes() for row in digests], ids)]

    def _submit_locked(self, keys: list[bytes], ids: npt.NDArray[np.int32]) -> Future[None]:
        # Registered as pending before the job can run, so a lookup of these digests waits for it.
        fut: Future[None] = Future()
        for k in keys:
            self._pending[k] = fut
        try:
            inner = self._submit(self._demote_job, keys, ids)
        except BaseException as exc:
            # Not queued (executor refused): a waiter must not block forever on these digests.
            for k in keys:
                if self._pending.get(k) is fut:
                    del self._pending[k]
                self._forget_if_gone(k)
            self.pool.free(ids)
            fut.set_exception(exc)
            raise

        def done(f: Future[None]) -> None:
            exc = f.exception()
            with self._lock:
                for k in keys:
                    if self._pending.get(k) is fut:
                        del self._pending[k]
                    if self._events:
                        self._forget_if_gone(k)  # dropped on the way down (no room, an I/O error)
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(None)

        inner.add_done_callback(done)
        return fut

    def _demote_job(self, keys: list[bytes], ids: npt.NDArray[np.int32]) -> None:
        settled: list[bytes] = []  # landed in a lower tier, or counted as dropped
        try:
            if self.host is not None:
                self._demote_to_host(keys, ids, settled)
            else:
                self._demote_to_disk_from_device(keys, ids, settled)
        except BaseException:
            with self._lock:  # the rest fell off the device without landing anywhere (a failing disk)
                self._stats.dropped[TIER_DEVICE] += len(keys) - len(settled)
            raise
        finally:
            self.pool.free(ids)

    def _demote_to_host(self, keys: list[bytes], ids: npt.NDArray[np.int32], settled: list[bytes]) -> None:
        """``keys`` come leaf first (a block after its descendants): the newest, the heads of their chains,
        take the host slots there are (at most a host tier's worth) and the rest go straight to disk. (Put
        through the host a tier's worth at a time, the tail landed there first and the head, pushing it on
        towards a failing disk, was the part dropped: a tail no match can reach, kept instead of its head.)"""
        host = self.host
        assert host is not None
        slots, spill_error = self._host_slots(min(len(keys), host.num_blocks))
        past = len(keys) - len(slots)
        # The newest go into the slots there are first: an error past the host tier (a failing disk)
        # then costs only the blocks bound there, not these slots.
        if len(slots):
            self._copy_to_host(keys[past:], ids[past:], slots)
            settled.extend(keys[past:])
        if past:  # every host slot is claimed, or a spill failed: the oldest go past the host tier
            self._demote_past_host(keys[:past], ids[:past], settled)
        if spill_error is not None:  # the demotion's future reports the disk's error
            raise spill_error

    def _copy_to_host(self, keys: list[bytes], ids: npt.NDArray[np.int32], slots: npt.NDArray[np.int32]) -> None:
        """Copies device blocks into the host slots taken for them and publishes them there."""
        host = self.host
        assert host is not None
        t0 = time.perf_counter()
        try:
            host.slab.copy_from_pool(self.pool._native, ids, slots)
        except BaseException:
            with self._lock:  # not copied: the slots go back (the tier would shrink for good)
                host.slots.free(slots)
            raise
        dt = time.perf_counter() - t0
        with self._lock:
            for k, slot in zip(keys, slots.tolist(), strict=True):
                old = host.index.pop(k, None)
                if old is not None:  # stored again meanwhile (same bytes): keep one copy
                    host.slots.free(np.array([old], np.int32))
                    self._stats.replaced[TIER_HOST] += 1
                host.index[k] = slot
                if self._events:
                    self._touch(TIER_HOST, k)
            self._account("device_to_host", len(keys), dt)
            self._stats.demoted_to_host += len(keys)

    def _demote_past_host(self, keys: list[bytes], ids: npt.NDArray[np.int32], settled: list[bytes]) -> None:
        """Device blocks the host tier has no slot for: to disk, or dropped without one."""
        if self.disk is not None:
            self._demote_to_disk_from_device(keys, ids, settled)
            return
        with self._lock:
            self._stats.dropped[TIER_DEVICE] += len(keys)
        settled.extend(keys)

    def _host_slots(self, n: int) -> tuple[npt.NDArray[np.int32], Exception | None]:
        """Up to n free host slots, demoting the host tier's oldest blocks to disk (or dropping them)
        first; fewer when the other slots are all claimed by promotions in flight (nothing to demote)
        or a spill to disk failed (then with its error: the victims it did not write stay cached)."""
        host = self.host
        assert host is not None
        out: list[int] = []
        while len(out) < n:
            with self._lock:
                free = min(host.slots.num_available, n - len(out))
                if free:
                    out.extend(host.slots.allocate(free).tolist())
                    continue
                if not host.index:
                    break
                victims = [host.index.popitem(last=False) for _ in range(min(n - len(out), len(host.index)))]
                spill: Future[None] = Future()
                for key, _ in victims:  # in flight to disk: a lookup waits for it
                    self._pending.setdefault(key, spill)
                    if self._events:  # held in the CPU view until it leaves: one that stays is never removed
                        self._add_claim(TIER_HOST, key)
            gone: list[bytes] = []
            error: BaseException | None = None
            try:
                self._spill_host(victims, gone)
            except BaseException as exc:
                error = exc
            with self._lock:  # the victims not written (bytes intact in their slots) stay cached
                out.extend(slot for _, slot in victims[: len(gone)])
                self._keep_host_victims(victims[len(gone):])
                for key, _ in victims:
                    if self._pending.get(key) is spill:
                        del self._pending[key]
                    if self._events:
                        self._drop_claim(TIER_HOST, key)
                        self._touch(TIER_HOST, key)
                if out and error is not None and not isinstance(error, Exception):  # interrupted: none used
                    host.slots.free(np.asarray(out, dtype=np.int32))
            spill.set_result(None)
            if isinstance(error, Exception):
                return np.asarray(out, dtype=np.int32), error
            if error is not None:
                raise error
        return np.asarray(out, dtype=np.int32), None

    def _keep_host_victims(self, victims: list[tuple[bytes, int]]) -> None:
        """Puts spill victims whose bytes are still in their host slots back at the oldest end of the
        index, in order (a digest stored into the host tier again meanwhile keeps that copy: same bytes).
        The caller holds the lock."""
        host = self.host
        assert host is not None
        for key, slot in reversed(victims):
            if key in host.index:
                host.slots.free(np.array([slot], np.int32))
                self._stats.replaced[TIER_HOST] += 1
            else:
                host.index[key] = slot
                host.index.move_to_end(key, last=False)

    def _spill_host(self, victims: list[tuple[bytes, int]], gone: list[bytes]) -> None:
        """Moves host victims (already out of the index) to disk in order, noting each in ``gone`` once
        it landed there (or, without a disk tier, as dropped): its slot is then reusable. Stops at the
        first write that fails."""
        host = self.host
        assert host is not None
        if self.disk is None:
            with self._lock:
                self._stats.dropped[TIER_HOST] += len(victims)
            gone.extend(key for key, _ in victims)
            return
        t0 = time.perf_counter()
        written = 0
        try:
            for key, slot in victims:
                if self._write_disk(key, host.view[slot]):
                    written += 1
                else:  # no disk slot to take (all claimed by promotions in flight): dropped, as without a disk
                    with self._lock:
                        self._stats.dropped[TIER_HOST] += 1
                gone.append(key)
        finally:  # the blocks that landed before a write failed moved their bytes too
            with self._lock:
                self._account("host_to_disk", written, time.perf_counter() - t0)

    def _demote_to_disk_from_device(self, keys: list[bytes], ids: npt.NDArray[np.int32],
                                    settled: list[bytes]) -> None:
        """Writes device blocks (``keys`` leaf first) to disk head first, so that a write that fails
        drops the tails of their chains, not heads the landed tails would hang from unreachable; the
        disk index then orders them leaf first as before (a chain's tail is evicted before its head).
        Past the disk's size only the newest are written (the others would displace each other)."""
        disk = self.disk
        assert disk is not None
        skip = max(len(keys) - disk.num_blocks, 0)
        if skip:
            with self._lock:
                self._stats.dropped[TIER_DEVICE] += skip
            settled.extend(keys[:skip])
        bounce = disk.bounce_buffer()
        t0 = time.perf_counter()
        landed: list[bytes] = []
        try:
            for k, block in zip(reversed(keys[skip:]), reversed(ids[skip:].tolist()), strict=True):
                self.pool.gather_into([block], bounce[: self.block_nbytes])
                if not self._write_disk(k, bounce):
                    # Every disk slot is claimed by promotions in flight: this block and the rest (the
                    # tails of their chains) are dropped, as past a full tier; what landed is a prefix.
                    rest = keys[skip: len(keys) - len(landed)]
                    with self._lock:
                        self._stats.dropped[TIER_DEVICE] += len(rest)
                    settled.extend(rest)
                    break
                settled.append(k)
                landed.append(k)
        finally:  # the blocks that landed before a write failed moved their bytes too
            with self._lock:
                self._account("device_to_disk", len(landed), time.perf_counter() - t0)
                for k in reversed(landed):
                    if k in disk.index:
                        disk.index.move_to_end(k)

    def _write_disk(self, key: bytes, payload: npt.NDArray[np.uint8]) -> bool:
        """Writes one block to a disk slot and publishes it; evicts the disk tier's oldest when full.
        When the write fails, the block whose slot it took (the oldest, or an older copy of ``key``)
        stays cached if its bytes are still intact there (read back and checked). False, with nothing
        written or changed, when the tier has no slot to give: every one is claimed by a promotion in
        flight (its index is empty); the caller drops the block."""
        disk = self.disk
        assert disk is not None
        with self._lock:
            if not disk.index and not disk.slots.num_available:
                return False
            displaced = self._displace_for(key)
            slot = displaced[1].slot if displaced is not None else int(disk.slots.allocate(1)[0])
            generation = disk.next_generation()
            meta = self._meta.get(key)  # with events: the slot carries the block's tokens for a reopen
        try:
            disk.write(slot, key, payload, generation, meta)
        except BaseException:
            intact = displaced is not None and self._disk_slot_holds(slot, displaced[0])
            with self._lock:
                self._stats.disk_write_errors += 1
                if displaced is not None and intact:
                    self._keep_displaced(displaced, oldest=displaced[0] != key)
                else:
                    disk.slots.free(np.array([slot], np.int32))
                self._settle_displaced(displaced, dropped=not intact)  # torn: gone, its own older copy too
                self._touch(TIER_DISK, key)
            raise
        with self._lock:
            # Written to another slot meanwhile (an inline demotion of the same digest in another
            # thread): same bytes, so keep this copy and free that slot rather than lose it.
            other = disk.index.pop(key, None)
            if other is not None and other.slot != slot:
                self._free_superseded_disk_slot(other.slot)
            rewritten = displaced is not None and displaced[0] == key
            if rewritten:  # its own older copy, rewritten in place
                self._stats.replaced[TIER_DISK] += 1
            disk.index[key] = _DiskSlot(slot, generation)
            self._settle_displaced(displaced, dropped=not rewritten)
            self._touch(TIER_DISK, key)
            self._stats.demoted_to_disk += 1
        return True

    def _displace_for(self, key: bytes) -> tuple[bytes, _DiskSlot] | None:
        """The index entry whose slot a write of ``key`` takes, out of the index: an older copy of
        ``key`` (same bytes: rewritten in place) or, on a full tier, the oldest block; None when a slot
        is free (the caller takes it). Held in the DISK view until its bytes are overwritten. Under the lock;
        the caller has checked that the index holds an entry or a slot is free."""
        disk = self.disk
        assert disk is not None
        old = disk.index.pop(key, None)
        if old is not None:
            displaced = (key, old)
        elif disk.slots.num_available:
            return None
        else:
            displaced = disk.index.popitem(last=False)
        if self._events:
            self._add_claim(TIER_DISK, displaced[0])
        return displaced

    def _disk_slot_holds(self, slot: int, key: bytes) -> bool:
        """Whether a disk slot a write failed on still holds ``key`` intact (the write was refused
        before any byte landed). Reads into a buffer of its own: the write's may be this thread's bounce."""
        disk = self.disk
        assert disk is not None
        buf = _core.HostSlab(1, disk.slot_nbytes).view()[0]
        try:
            return disk.read(slot, key, buf)
        except OSError:
            return False

    def _keep_displaced(self, displaced: tuple[bytes, _DiskSlot], *, oldest: bool) -> None:
        """Puts a displaced entry whose bytes are intact back (a copy stored meanwhile is kept instead:
        same bytes). Under the lock."""
        disk = self.disk
        assert disk is not None
        key, entry = displaced
        if key in disk.index:
            self._free_superseded_disk_slot(entry.slot)
            return
        disk.index[key] = entry
        if oldest:
            disk.index.move_to_end(key, last=False)

    def _free_superseded_disk_slot(self, slot: int) -> None:
        """Gives up a disk slot holding a copy of a digest the index holds in another slot (same bytes),
        its header erased first: left valid, the copy would come back when the directory is reopened
        once the other had left the tier (promoted), as a block the tier had removed. A failed erase
        costs only that. Under the lock (the slot is in no index and not free: nobody else writes it)."""
        disk = self.disk
        assert disk is not None
        with contextlib.suppress(OSError):
            disk.erase(slot)
        disk.slots.free(np.array([slot], np.int32))
        self._stats.replaced[TIER_DISK] += 1

    def _settle_displaced(self, displaced: tuple[bytes, _DiskSlot] | None, *, dropped: bool) -> None:
        """Ends the hold ``_displace_for`` took; ``dropped``: the displaced copy is gone (counted so)."""
        if displaced is None:
            return
        if dropped:
            self._stats.dropped[TIER_DISK] += 1
        if self._events:
            self._drop_claim(TIER_DISK, displaced[0])
            self._touch(TIER_DISK, displaced[0])

    # --- promotion -----------------------------------------------------------------------------

    def _claim(self, digest: bytes) -> tuple[int, int] | None:
        """Takes ``digest`` out of the host or disk index (so nobody evicts it meanwhile): (tier, slot)."""
        while True:
            with self._lock:
                pending = self._pending.get(digest)
                if pending is None:
                    if self.host is not None and digest in self.host.index:
                        if self._events:
                            self._add_claim(TIER_HOST, digest)
                        return TIER_HOST, self.host.index.pop(digest)
                    if self.disk is not None and digest in self.disk.index:
                        if self._events:
                            self._add_claim(TIER_DISK, digest)
                        return TIER_DISK, self.disk.index.pop(digest).slot
                    return None
            # Visible only once landed: wait for the in-flight copy, then look again. A failed one
            # (taken out of _pending before its future fails) may leave another copy of the digest.
            with contextlib.suppress(Exception):
                pending.result()

    def _promote(self, digests: npt.NDArray[np.uint8], n0: int, run: list[tuple[bytes, int, int]]) -> np.ndarray:
        """Copies the claimed lower-tier blocks into fresh device blocks and inserts them acquired.

        Returns the device block ids of the promoted prefix (shorter than ``run`` when a disk slot
        fails its check or the device has no room; the claims past it go back to their tiers)."""
        try:
            self.make_room(len(run))
            ids = self.pool.allocate(len(run))
        except KVPoolFullError:
            self._unclaim(run)
            return np.empty(0, np.int32)
        except BaseException:
            self._unclaim(run)
            raise
        try:
            return self._promote_into(digests, n0, run, ids)
        finally:
            self.pool.free(ids)  # the trie holds its own references on what it kept

    def _promote_into(self, digests: npt.NDArray[np.uint8], n0: int, run: list[tuple[bytes, int, int]],
                      ids: npt.NDArray[np.int32]) -> np.ndarray:
        good = len(run)
        bad: set[int] = set()
        try:
            host_pos = [i for i, (_, t, _) in enumerate(run) if t == TIER_HOST]
            if host_pos and self.host is not None:
                t0 = time.perf_counter()
                self.host.slab.copy_to_pool(self.pool._native, [run[i][2] for i in host_pos], ids[host_pos])
                with self._lock:
                    self._account("host_to_device", len(host_pos), time.perf_counter() - t0)
            disk_pos = [i for i, (_, t, _) in enumerate(run) if t == TIER_DISK]
            if disk_pos and self.disk is not None:
                bounce = self.disk.bounce_buffer()
                t0 = time.perf_counter()
                moved = 0
                for i in disk_pos:
                    key, _, slot = run[i]
                    try:
                        intact = self.disk.read(slot, key, bounce)
                    except OSError:
                        intact = False  # an unreadable slot (I/O error) is a miss, as a torn one
                    if not intact:
                        bad.add(i)  # torn or stale: never served, the slot is dropped
                        good = min(good, i)
                        continue
                    self.pool.scatter(bounce[: self.block_nbytes], [int(ids[i])])
                    moved += 1
                with self._lock:
                    self._account("disk_to_device", moved, time.perf_counter() - t0)
                    self._stats.corrupt_reads += len(bad)
        except BaseException:
            self._unclaim(run)  # nothing was promoted: every claim goes back to its tier
            raise
        out = np.empty(0, np.int32)
        with self._lock:  # on the device before the lower copies go: its metadata stays meanwhile
            try:
                if good:
                    self._insert_promoted(digests, n0, good, ids)
            except BaseException:
                self._free_lower([run[i] for i in sorted(bad)])
                self._unclaim([r for i, r in enumerate(run) if i not in bad])  # not promoted: they stay
                raise
            try:
                # Promoted (and corrupt) lower copies are released; the rest of the run goes back (copied
                # to the device too, past a corrupt read, but not promoted: not counted so).
                tiers = [t for _, t, _ in run[:good]]
                self._stats.promoted_from_host += tiers.count(TIER_HOST)
                self._stats.promoted_from_disk += tiers.count(TIER_DISK)
                self._free_lower([r for i, r in enumerate(run) if i < good or i in bad])
                self._unclaim([r for i, r in enumerate(run) if i >= good and i not in bad])
                if good:
                    # A concurrent request may have cached some of these meanwhile: serve the cached blocks.
                    _, cached = self.device.peek(digests[: n0 + good])
                    out = np.asarray(cached[n0: n0 + good], dtype=np.int32)
            except BaseException:
                if good:  # the insert acquired them for this lookup, which fails
                    self.device.release(digests[n0: n0 + good])
                raise
        return out

    def _insert_promoted(self, digests: npt.NDArray[np.uint8], n0: int, good: int, ids: npt.NDArray[np.int32]) -> None:
        """Inserts the promoted blocks into the trie, acquired; with events, with their stored metadata
        (one insert per run of blocks that share an extra key and salt: a stored event carries one)."""
        if not self._events:
            parent = digests[n0 - 1] if n0 else None
            self.device._native.insert(digests[n0: n0 + good], ids[:good], parent=parent, acquire=True)
            return
        metas = [self._meta[digests[n0 + i].tobytes()] for i in range(good)]
        start = 0
        while start < good:
            end = start + 1
            while end < good and (metas[end].extra_key, metas[end].cache_salt) == (metas[start].extra_key,
                                                                                     metas[start].cache_salt):
                end += 1
            at = n0 + start
            self.device._native.insert(digests[at: n0 + end], ids[start:end], parent=digests[at - 1] if at else None,
                                       acquire=True, token_ids=np.concatenate([m.tokens for m in metas[start:end]]),
                                       extra_key=metas[start].extra_key, cache_salt=metas[start].cache_salt)
            start = end

    def _unclaim(self, run: list[tuple[bytes, int, int]]) -> None:
        # A digest stored into its tier again while claimed (computed and demoted anew) keeps that
        # copy (same bytes); the claimed slot is freed, not written over the new entry (which would
        # lose the new entry's slot for good), and the claimed copy counts as replaced.
        events = self._events
        with self._lock:
            for key, tier, slot in run:
                if events:
                    self._drop_claim(tier, key)
                if tier == TIER_HOST and self.host is not None:
                    if key in self.host.index:
                        self.host.slots.free(np.array([slot], np.int32))
                        self._stats.replaced[TIER_HOST] += 1
                    else:
                        self.host.index[key] = slot
                elif tier == TIER_DISK and self.disk is not None:
                    if key in self.disk.index:
                        self._free_superseded_disk_slot(slot)
                    else:
                        self.disk.index[key] = _DiskSlot(slot, self.disk.next_generation())
                if events:
                    self._touch(tier, key)

    def _free_lower(self, run: list[tuple[bytes, int, int]]) -> None:
        if self.disk is not None:
            # Erased while still claimed (no other write can take the slot meanwhile), so that a
            # reopen does not bring a block back that left the tier. A failed erase costs only that.
            for _, tier, slot in run:
                if tier == TIER_DISK:
                    with contextlib.suppress(OSError):
                        self.disk.erase(slot)
        events = self._events
        with self._lock:
            for key, tier, slot in run:
                if events:
                    self._drop_claim(tier, key)
                if tier == TIER_HOST and self.host is not None:
                    self.host.slots.free(np.array([slot], np.int32))
                elif tier == TIER_DISK and self.disk is not None:
                    self.disk.slots.free(np.array([slot], np.int32))
                if events:
                    self._touch(tier, key)

    # --- KV events -----------------------------------------------------------------------------
    # Callers hold self._lock for all of these.

    def _held(self, tier: int, key: bytes) -> bool:
        index = self.host.index if tier == TIER_HOST and self.host is not None else (
            self.disk.index if tier == TIER_DISK and self.disk is not None else {})
        return key in index or key in self._claims[tier]

    def _add_claim(self, tier: int, key: bytes) -> None:
        if self._events:
            self._claims[tier][key] = self._claims[tier].get(key, 0) + 1

    def _drop_claim(self, tier: int, key: bytes) -> None:
        if self._events:
            left = self._claims[tier].pop(key, 0) - 1
            if left > 0:
                self._claims[tier][key] = left

    def _touch(self, tier: int, key: bytes) -> None:
        """Notes that ``key`` may have entered or left ``tier``; the next drain reports the difference."""
        if not self._events:
            return
        if self._held(tier, key):
            self._changed[tier][key] = None
            return
        if key in self._announced[tier]:
            self._changed[tier][key] = None
        else:  # came and went between two drains: nothing to report
            self._changed[tier].pop(key, None)
        self._forget_if_gone(key)

    def _forget_if_gone(self, key: bytes) -> None:
        """Drops the metadata of a block no tier holds and no copy is carrying (keeps it bounded)."""
        if (self._events and key in self._meta and key not in self._pending
                and not any(self._held(t, key) for t in (TIER_HOST, TIER_DISK))
                and not self.device.contains(key)):
            del self._meta[key]

    def _known(self, digest: bytes, i: int, digests: npt.NDArray[np.uint8], tokens: npt.NDArray[np.int64] | None,
               extra_key: bytes | None, cache_salt: bytes | None) -> bool:
        """Whether the stored event of a promotion of ``digests[i]`` can be written (from what an earlier
        insert recorded, or from the tokens the caller passed to match)."""
        with self._lock:
            if digest in self._meta:
                return True
            if tokens is None:
                return False
            self._meta[digest] = _BlockMeta(tokens[i * self.block_size: (i + 1) * self.block_size].copy(),
                                            digests[i - 1].tobytes() if i else None, _key_bytes(extra_key),
                                            _key_bytes(cache_salt))
            return True

    def _stored_event(self, tier: int, key: bytes) -> dict[str, Any]:
        meta = self._meta[key]
        return {"type": "stored", "digests": [key], "parent": meta.parent, "token_ids": meta.tokens,
                "block_size": self.block_size, "extra_key": meta.extra_key, "cache_salt": meta.cache_salt,
                "medium": TIER_MEDIA[tier]}

    def _lower_tier_events(self, reset: bool) -> list[dict[str, Any]]:
        """What each lower tier gained and lost since the last drain; with ``reset`` (routers dropped
        their whole view at a cleared event) everything each tier holds."""
        out: list[dict[str, Any]] = []
        for tier, store in ((TIER_HOST, self.host), (TIER_DISK, self.disk)):
            if store is None:
                continue
            announced, changed = self._announced[tier], self._changed[tier]
            if reset:
                announced.clear()
                changed.clear()
                changed.update(dict.fromkeys([*store.index, *self._claims[tier]]))
            gone = [k for k in changed if k in announced and not self._held(tier, k)]
            if gone:
                out.append({"type": "removed", "digests": gone, "medium": TIER_MEDIA[tier]})
                announced.difference_update(gone)
            for key in changed:
                if key not in announced and key in self._meta and self._held(tier, key):
                    out.append(self._stored_event(tier, key))
                    announced.add(key)
            changed.clear()
        return out

    def drain_events(self) -> list[dict[str, Any]]:
        """KV events since the last drain, every tier's, each stored/removed one tagged with its tier's
        ``medium`` (:data:`TIER_MEDIA`): the device trie's first (in their order, which may start with
        an events-lost ``cleared``), then each lower tier's removals and stores. After a ``cleared``
        (which routers apply to every medium) the lower tiers' whole contents follow. Empty without
        events (``event_queue_capacity=0``)."""
        if not self._events:
            return []
        with self._lock:
            events = self.device.drain_events()
            for event in events:
                if event["type"] != "cleared":
                    event["medium"] = TIER_MEDIA[TIER_DEVICE]
            events.extend(self._lower_tier_events(any(e["type"] == "cleared" for e in events)))
        return events

    # --- bookkeeping ---------------------------------------------------------------------------

    def _account(self, path: str, blocks: int, seconds: float) -> None:
        self._stats.bytes_moved[path] += blocks * self.block_nbytes
        self._stats.seconds[path] += seconds

    def flush(self) -> None:
        """Waits until every demotion submitted so far has landed."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        with self._lock:
            pending = list(self._pending.values())
        for fut in pending:
            fut.exception()

    def location(self, digest: bytes) -> str | None:
        """Tier that holds ``digest`` now ("device", "host", "disk"), or None."""
        if not isinstance(digest, bytes | bytearray | memoryview | np.ndarray):  # bytes(5) would be 5 zero bytes
            raise TypeError(f"digest must be bytes (or a uint8 row of digests), got {type(digest).__name__}")
        digest = bytes(digest)
        if self.device.contains(digest):
            return "device"
        with self._lock:
            if self.host is not None and digest in self.host.index:
                return "host"
            if self.disk is not None and digest in self.disk.index:
                return "disk"
        return None

    def stats(self) -> dict[str, Any]:
        """Counters since construction and the tiers' sizes. The counters balance: from a fresh directory,
        ``blocks["host"] == demoted_to_host - promoted_from_host - spilled - dropped["host"] - replaced["host"]``
        (``spilled``: ``bytes_moved["host_to_disk"] // block_nbytes``) and ``blocks["disk"] == demoted_to_disk -
        promoted_from_disk - corrupt_reads - dropped["disk"] - replaced["disk"]``; ``demoted_to_disk`` blocks
        moved ``bytes_moved["host_to_disk"] + bytes_moved["device_to_disk"]``; ``disk_write_errors`` writes
        failed (written + failed = attempted). ``replaced``: copies a tier gave
        up for a newer copy of the same digest (same bytes), e.g. a block computed again and demoted again."""
        with self._lock:
            s = self._stats
            hits_total = sum(s.hits)
            bandwidth = {p: (s.bytes_moved[p] / s.seconds[p] if s.seconds[p] > 0 else None) for p in _PATHS}
            return {
                "lookups": s.lookups,
                "queried_blocks": s.queried_blocks,
                "hits": dict(zip(TIER_NAMES, s.hits, strict=True)),
                "hit_blocks": hits_total,
                "hit_ratio": hits_total / s.queried_blocks if s.queried_blocks else 0.0,
                "hit_ratio_by_tier": {t: (h / s.queried_blocks if s.queried_blocks else 0.0)
                                      for t, h in zip(TIER_NAMES, s.hits, strict=True)},
                "demoted_to_host": s.demoted_to_host,
                "demoted_to_disk": s.demoted_to_disk,
                "promoted_from_host": s.promoted_from_host,
                "promoted_from_disk": s.promoted_from_disk,
                "dropped": dict(zip(TIER_NAMES, s.dropped, strict=True)),
                "replaced": dict(zip(TIER_NAMES, s.replaced, strict=True)),
                "corrupt_reads": s.corrupt_reads,
                "disk_write_errors": s.disk_write_errors,
                "bytes_moved": dict(s.bytes_moved),
                "copy_seconds": dict(s.seconds),
                "bandwidth_bytes_per_s": bandwidth,
                # `is not None`, not truthiness: an empty tier has len() 0 but is still there.
                "blocks": {"device": len(self.device), "host": len(self.host) if self.host is not None else 0,
                           "disk": len(self.disk) if self.disk is not None else 0},
                "capacity": {"device": self.device_blocks,
                             "host": self.host.num_blocks if self.host is not None else 0,
                             "disk": self.disk.num_blocks if self.disk is not None else 0},
                "disk_direct_io": bool(self.disk.direct_io) if self.disk is not None else None,
                "host_pinned": bool(self.host.pinned) if self.host is not None else None,
            }

    def close(self) -> None:
        """Waits for copies in flight, then closes the disk tier (its slots stay for a reopen)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()

    def __enter__(self) -> TieredPrefixCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()["blocks"]
        return (f"TieredPrefixCache(device={s['device']}/{self.device_blocks}, host={s['host']}, "
                f"disk={s['disk']})")

