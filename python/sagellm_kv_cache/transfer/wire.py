"""Wire format of a pool-to-pool block transfer: fixed-size frames and the payload checksum.

One transfer is this exchange over one (source, destination) pair, all integers little-endian::

    source                                     destination
    HEADER  (128 B) ------------------------->  checks magic, header CRC, version, spec
            <-------------------------  REPLY  (32 B): OK, or why it refuses (nothing reserved)
    DIGESTS (n x 32 B, if flagged) ---------->
    CHUNK 0 (payload + 32 B footer) --------->  checks the chunk's checksum, scatters it
    ...                                         into blocks nobody else can see yet
    CHUNK k-1 ------------------------------->  publishes (the commit point), then
            <-------------------------  REPLY  (32 B): OK, or why it failed (nothing kept)

The payload checksum travels in each chunk's footer rather than in the header: the source gathers
chunk k+1 while chunk k is on the wire, so the whole payload's checksum is not known when the
header leaves. The destination verifies every chunk (while scattering it into blocks only it knows
about), and nothing it received is visible to anyone until every chunk has been verified; it
publishes, and then sends the final OK. A source that loses the final reply therefore cannot tell
whether the destination committed: its next header to that rank may carry the id of such a transfer
(``FLAG_QUERY``, 16 bytes after the fixed fields), and the destination answers in the header reply
(``a``, one of ``ANSWER_*``).

With ``FLAG_SHM`` the header also carries the source's boot id and pid (after the query id's
place): an offer of the same-host path (:mod:`.shm`). The header's OK reply says in ``b`` which
path the payload takes (``PATH_GLOO``: chunk frames as above; ``PATH_SHM``: the chunks are in the
source's shared ring and only their footers and acknowledgements, ``PHASE_ACK`` replies, travel,
over the handover's Unix socket); digests and the final reply stay on this transport.

Every frame ends with a CRC-32 of its own bytes, so a damaged frame is told apart from a spec
mismatch. Checksum algorithm ``segsum64`` (id 1) is built for speed on a busy host: the payload is
cut into 4 KiB segments, each segment's 512 little-endian 64-bit words are summed (mod 2**64; the
C++ gather and scatter compute these sums while they copy, so checking costs no extra pass over the
payload: ``PagedKVPool.gather_summed``/``scatter_summed``), and BLAKE2b-64 hashes the vector of segment sums, the
sub-segment tail and the length. Any change inside one segment changes its sum; the hash makes the
result depend on every segment and its position. zlib's CRC-32 runs at ~2-4 GB/s here, no faster
than the wire, so it is offered as algorithm 2 but is not the default. Neither is a MAC: they catch
damage and bugs, not an attacker who can rewrite the checksum too.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from sagellm_kv_cache import _core

__all__ = [
    "ANSWER_NONE",
    "ANSWER_NOT_PUBLISHED",
    "ANSWER_PUBLISHED",
    "ANSWER_UNKNOWN",
    "CHECKSUM_ALGORITHMS",
    "DIGEST_NBYTES",
    "FLAG_QUERY",
    "FLAG_SHM",
    "FOOTER_NBYTES",
    "HEADER_NBYTES",
    "MAX_CHUNK_BLOCKS",
    "REPLY_NBYTES",
    "SEGMENT_NBYTES",
    "SPEC_FIELDS",
    "WIRE_VERSION",
    "ChunkFooter",
    "Reply",
    "ReplyStatus",
    "TransferHeader",
    "WireFormatError",
    "checksum",
    "digests_checksum",
    "dtype_code",
    "dtype_from_code",
    "segment_sums_buffer",
    "segsum64_from_sums",
]

WIRE_VERSION = 1
HEADER_NBYTES = 128
REPLY_NBYTES = 32
FOOTER_NBYTES = 32
DIGEST_NBYTES = 32

_HEADER_MAGIC = b"SKVB"
_REPLY_MAGIC = b"SKVA"
_FOOTER_MAGIC = b"SKVC"

FLAG_DIGESTS = 1
#: Header flag: ``query_id`` names an earlier transfer whose outcome the source does not know.
FLAG_QUERY = 2

#: Header flag: the source offers the same-host path (boot id and pid follow the query id's place).
FLAG_SHM = 4

#: Answers to a query, in ``a`` of the header's OK reply.
ANSWER_NONE = 0  # nothing was asked
ANSWER_PUBLISHED = 1  # the destination committed that transfer (its blocks were published / handed over)
ANSWER_NOT_PUBLISHED = 2  # the destination refused or failed it: it kept nothing
ANSWER_UNKNOWN = 3  # no record (another process, or the record was dropped) or still running

#: Footer flag: the source failed locally; this chunk's bytes are meaningless and the transfer is off.
FOOTER_ABORT = 1

# magic, version, header size, flags, transfer id, layers, heads, head dim, block size, dtype code,
# num blocks, block bytes, chunk blocks, checksum algorithm, digests checksum, src rank, dst rank,
# then reserved bytes up to the CRC-32 of everything before it.
_HEADER = struct.Struct("<4sHHI16sIIIIIQQIIQii")
_HEADER_CRC = struct.Struct("<I")
# the transfer id a FLAG_QUERY header asks about, right after the fixed fields (reserved bytes before)
_HEADER_QUERY = struct.Struct("<16s")
# FLAG_SHM: the source's boot id and pid, right after the query id's place
_HEADER_SHM = struct.Struct("<16sI")
# magic, status, detail a, detail b, phase, CRC-32
_REPLY = struct.Struct("<4sIqQI")
# magic, chunk index, flags, payload bytes, checksum, CRC-32
_FOOTER = struct.Struct("<4sIIQQ")

assert _HEADER.size + _HEADER_QUERY.size + _HEADER_SHM.size + _HEADER_CRC.size <= HEADER_NBYTES
assert _REPLY.size + 4 == REPLY_NBYTES
assert _FOOTER.size + 4 == FOOTER_NBYTES

_DTYPE_CODES = {"fp32": 1, "fp16": 2, "bf16": 3, "fp8": 4, "int8": 5}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}

#: The spec fields a destination compares, in the order it compares them; a refusal names one.
SPEC_FIELDS = (
    "magic",
    "header_checksum",
    "version",
    "chunk_blocks",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "block_size",
    "block_nbytes",
    "checksum_algorithm",
    "dst_rank",
    "src_rank",
)

#: Bytes per segment of ``segsum64`` (4096; the C++ core's kSegmentBytes).
SEGMENT_NBYTES = _SEGMENT = int(_core.SEGMENT_BYTES)
CHECKSUM_ALGORITHMS = {"segsum64": 1, "crc32": 2}
#: The largest chunk_blocks the header holds (a 32-bit field).
MAX_CHUNK_BLOCKS = 2**32 - 1


class WireFormatError(ValueError):
    """A frame that is not what the protocol says at this point (damaged, or cross-talk)."""

    def __init__(self, field: str, message: str, expected: object = None, actual: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected
        self.actual = actual


def dtype_code(name: str) -> int:
    try:
        return _DTYPE_CODES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} has no wire code; known: {', '.join(_DTYPE_CODES)}") from None


def dtype_from_code(code: int) -> str:
    return _DTYPE_NAMES.get(code, f"unknown({code})")


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class TransferHeader:
    """What a source announces before any payload: who, what shape, how much, how it is checked."""

    transfer_id: uuid.UUID
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    num_blocks: int
    block_nbytes: int
    chunk_blocks: int
    checksum_algorithm: int
    has_digests: bool
    digests_checksum: int
    src_rank: int
    dst_rank: int
    version: int = WIRE_VERSION
    query_id: uuid.UUID | None = None
    #: Same-host offer: the source's boot id (16 bytes) and pid; None when it offers none.
    boot_id: bytes | None = None
    pid: int = 0

    @property
    def num_chunks(self) -> int:
        return -(-self.num_blocks // self.chunk_blocks) if self.num_blocks else 0

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Block positions ``[start, stop)`` that chunk ``k`` carries."""
        start = k * self.chunk_blocks
        return start, min(start + self.chunk_blocks, self.num_blocks)

    def spec_values(self) -> dict[str, object]:
        return {
            "version": self.version,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "block_nbytes": self.block_nbytes,
            "checksum_algorithm": self.checksum_algorithm,
            "dst_rank": self.dst_rank,
        }

    def pack(self, out: npt.NDArray[np.uint8]) -> None:
        """Writes the 128-byte frame into ``out`` (a uint8 array of at least that size)."""
        flags = ((FLAG_DIGESTS if self.has_digests else 0) | (FLAG_QUERY if self.query_id is not None else 0)
                 | (FLAG_SHM if self.boot_id is not None else 0))
        body = _HEADER.pack(
            _HEADER_MAGIC, self.version, HEADER_NBYTES, flags,
            self.transfer_id.bytes, self.num_layers, self.num_kv_heads, self.head_dim, self.block_size,
            dtype_code(self.dtype), self.num_blocks, self.block_nbytes, self.chunk_blocks,
            self.checksum_algorithm, self.digests_checksum, self.src_rank, self.dst_rank,
        )
        body += _HEADER_QUERY.pack(self.query_id.bytes if self.query_id is not None else bytes(16))
        if self.boot_id is not None:
            body += _HEADER_SHM.pack(self.boot_id, self.pid)
        frame = body.ljust(HEADER_NBYTES - _HEADER_CRC.size, b"\0")
        frame += _HEADER_CRC.pack(_crc(frame))
        out[:HEADER_NBYTES] = np.frombuffer(frame, dtype=np.uint8)

    @classmethod
    def unpack(cls, frame: npt.NDArray[np.uint8]) -> TransferHeader:
        """Parses a received frame; ``WireFormatError`` names the first thing that is wrong."""
        raw = frame[:HEADER_NBYTES].tobytes()
        if raw[:4] != _HEADER_MAGIC:
            raise WireFormatError("magic", f"not a block-transfer header (magic {raw[:4]!r})", _HEADER_MAGIC, raw[:4])
        (crc,) = _HEADER_CRC.unpack_from(raw, HEADER_NBYTES - _HEADER_CRC.size)
        actual_crc = _crc(raw[: HEADER_NBYTES - _HEADER_CRC.size])
        if crc != actual_crc:
            raise WireFormatError("header_checksum", "block-transfer header is damaged (CRC-32 mismatch)",
                                  f"{crc:08x}", f"{actual_crc:08x}")
        (_, version, size, flags, tid, layers, heads, head_dim, block_size, dtype, num_blocks, block_nbytes,
         chunk_blocks, algorithm, digests_checksum, src, dst) = _HEADER.unpack_from(raw)
        if version != WIRE_VERSION or size != HEADER_NBYTES:
            raise WireFormatError("version", f"wire version {version} (header {size} B) is not supported; "
                                             f"this side speaks version {WIRE_VERSION}", WIRE_VERSION, version)
        if num_blocks and chunk_blocks <= 0:
            raise WireFormatError("chunk_blocks", f"chunk_blocks must be > 0, got {chunk_blocks}", "> 0", chunk_blocks)
        query_id = uuid.UUID(bytes=_HEADER_QUERY.unpack_from(raw, _HEADER.size)[0]) if flags & FLAG_QUERY else None
        boot, pid = (_HEADER_SHM.unpack_from(raw, _HEADER.size + _HEADER_QUERY.size) if flags & FLAG_SHM
                     else (None, 0))
        return cls(
            transfer_id=uuid.UUID(bytes=tid), num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
            block_size=block_size, dtype=dtype_from_code(dtype), num_blocks=num_blocks, block_nbytes=block_nbytes,
            chunk_blocks=chunk_blocks, checksum_algorithm=algorithm, has_digests=bool(flags & FLAG_DIGESTS),
            digests_checksum=digests_checksum, src_rank=src, dst_rank=dst, version=version, query_id=query_id,
            boot_id=boot, pid=pid,
        )


class ReplyStatus(IntEnum):
    """What the destination tells the source, after the header and after the last chunk."""

    OK = 0
    SPEC_MISMATCH = 1  # a = index into SPEC_FIELDS, b = the destination's value (dtype: its wire code)
    POOL_FULL = 2  # a = blocks needed, b = blocks free
    CHECKSUM_MISMATCH = 3  # a = chunk index (-1: the digests), b = the checksum the destination computed
    SOURCE_ABORTED = 4
    FAILED = 5  # the destination failed for a local reason
    FOOTER_DAMAGED = 6  # a = chunk index, b = the payload checksum the destination computed
    PUBLISH_FAILED = 7  # the destination's publish callback raised; it kept nothing


PHASE_HEADER = 1
PHASE_FINAL = 2
#: Same-host path: the destination is done with chunk ``a``'s ring slot (the source may refill it).
PHASE_ACK = 3

#: In the header's OK reply (``b``): the payload comes through the source's shared-memory ring.
PATH_GLOO, PATH_SHM = 0, 1


@dataclass(frozen=True)
class Reply:
    status: ReplyStatus
    phase: int
    a: int = 0
    b: int = 0

    def pack(self, out: npt.NDArray[np.uint8]) -> None:
        body = _REPLY.pack(_REPLY_MAGIC, int(self.status), self.a, self.b, self.phase)
        out[:REPLY_NBYTES] = np.frombuffer(body + struct.pack("<I", _crc(body)), dtype=np.uint8)

    @classmethod
    def unpack(cls, frame: npt.NDArray[np.uint8]) -> Reply:
        raw = frame[:REPLY_NBYTES].tobytes()
        if raw[:4] != _REPLY_MAGIC or struct.unpack_from("<I", raw, _REPLY.size)[0] != _crc(raw[: _REPLY.size]):
            raise WireFormatError("reply", "damaged or unexpected reply frame from the destination")
        _, status, a, b, phase = _REPLY.unpack_from(raw)
        try:
            return cls(ReplyStatus(status), phase, a, b)
        except ValueError:
            raise WireFormatError("reply", f"unknown reply status {status}") from None


@dataclass(frozen=True)
class ChunkFooter:
    index: int
    flags: int
    payload_nbytes: int
    checksum: int

    def pack(self, out: npt.NDArray[np.uint8]) -> None:
        body = _FOOTER.pack(_FOOTER_MAGIC, self.index, self.flags, self.payload_nbytes, self.checksum)
        out[:FOOTER_NBYTES] = np.frombuffer(body + struct.pack("<I", _crc(body)), dtype=np.uint8)

    @classmethod
    def unpack(cls, frame: npt.NDArray[np.uint8]) -> ChunkFooter:
        raw = frame[:FOOTER_NBYTES].tobytes()
        if raw[:4] != _FOOTER_MAGIC or struct.unpack_from("<I", raw, _FOOTER.size)[0] != _crc(raw[: _FOOTER.size]):
            raise WireFormatError("chunk_footer", "damaged chunk footer")
        _, index, flags, nbytes, value = _FOOTER.unpack_from(raw)
        return cls(index, flags, nbytes, value)


def _segsum64(data: npt.NDArray[np.uint8]) -> int:
    sums = np.empty(int(data.size) // _SEGMENT, dtype=np.uint64)
    _core.segment_sums(data, sums)
    return segsum64_from_sums(sums, data)


def segment_sums_buffer(max_nbytes: int) -> npt.NDArray[np.uint64]:
    """Room for the segment sums of a payload of up to ``max_nbytes`` (slice it to the payload's)."""
    return np.empty(max_nbytes // _SEGMENT, dtype=np.uint64)


def segsum64_from_sums(sums: npt.NDArray[np.uint64], data: npt.NDArray[np.uint8]) -> int:
    """``segsum64`` of ``data`` given its segment sums (from a gather or scatter that computed them
    while copying, :meth:`PagedKVPool.gather_summed`): only the tail is read again."""
    n = int(data.size)
    head = n - n % _SEGMENT
    h = hashlib.blake2b(digest_size=8)
    h.update(sums.astype("<u8", copy=False).data)
    h.update(data[head:].data)
    h.update(n.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def checksum(data: npt.NDArray[np.uint8], algorithm: int) -> int:
    """64-bit checksum of a contiguous uint8 array under wire algorithm id ``algorithm``."""
    if algorithm == CHECKSUM_ALGORITHMS["segsum64"]:
        return _segsum64(data)
    if algorithm == CHECKSUM_ALGORITHMS["crc32"]:
        return zlib.crc32(data.data) & 0xFFFFFFFF
    raise ValueError(f"unknown checksum algorithm id {algorithm}; known: {CHECKSUM_ALGORITHMS}")


def digests_checksum(digests: npt.NDArray[np.uint8]) -> int:
    """BLAKE2b-64 of the digest bytes (small: 32 bytes per block)."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(digests).data, digest_size=8).digest(), "little")
