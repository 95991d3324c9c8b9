"""Transfer without processes: the seed engine's validation and records, the wire format, the
transport adapter's deadlines, and argument checks that must fail before anything is sent.

Real transfers between processes are in ``test_transfer_multiprocess.py``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
from sagellm_kv_cache import KVCacheSpec, KVHandle, KVTransferEngine, KVTransferFailedError, PagedKVPool
from sagellm_kv_cache.transfer import wire
from sagellm_kv_cache.transfer.transport import BackendThreadTransport, TransportError, TransportTimeout
from sagellm_protocol.kv import TransferDirection, TransferStatus


class RankedBackend:
    """Knows its rank and world size and records calls; carries no data anywhere."""

    def __init__(self, rank: int | None, world: int | None, fail: BaseException | None = None) -> None:
        self.rank, self.world, self.fail = rank, world, fail
        self.calls: list[tuple[str, int]] = []

    def get_rank(self) -> int | None:
        return self.rank

    def get_world_size(self) -> int | None:
        return self.world

    def send(self, tensor: Any, dst: int) -> None:
        self.calls.append(("send", dst))
        if self.fail:
            raise self.fail

    def recv(self, tensor: Any, src: int) -> None:
        self.calls.append(("recv", src))
        if self.fail:
            raise self.fail


# --- seed engine -----------------------------------------------------------------------------


def test_engine_needs_a_backend() -> None:
    with pytest.raises(ValueError, match="comm_backend"):
        KVTransferEngine(None)


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [(-1, 1, "invalid src_rank -1"), (0, 4, "invalid dst_rank 4"), (4, 0, "invalid src_rank 4"),
     (1, 1, "must differ"), (2, 3, "neither the source"), ("0", 1, "src_rank must be an int")],
)
def test_transfer_kv_handle_rejects_bad_ranks(src: Any, dst: int, message: str) -> None:
    backend = RankedBackend(rank=1, world=4)
    engine = KVTransferEngine(backend)
    with pytest.raises(ValueError, match=message):
        engine.transfer_kv_handle(KVHandle.create(16), src, dst, np.zeros(4))
    assert backend.calls == [] and engine.get_pending_count() == 0


def test_numpy_integer_ranks_are_ranks() -> None:
    # They were refused ("src_rank must be an int, got int64"), unlike in send_blocks / recv_blocks.
    backend = RankedBackend(rank=1, world=4)
    engine = KVTransferEngine(backend)
    handle = KVHandle.create(16)
    engine.transfer_kv_handle(handle, np.int64(0), np.int32(1), np.zeros(4))
    assert backend.calls == [("recv", 0)] and (handle.source_rank, handle.rank) == (0, 1)
    assert type(handle.source_rank) is int
    with pytest.raises(ValueError, match="src_rank must be an int, got bool"):
        engine.transfer_kv_handle(handle, np.bool_(False), 1, np.zeros(4))


def test_transfer_kv_handle_needs_a_tensor_on_either_side() -> None:
    # As in the seed: a missing tensor is a failed transfer (recorded), not a ValueError.
    handle = KVHandle.create(16)
    backend = RankedBackend(0, 2)
    engine = KVTransferEngine(backend)
    with pytest.raises(KVTransferFailedError, match="tensor is required for sender") as info:
        engine.transfer_kv_handle(handle, 0, 1)
    assert engine.get_transfer_status(uuid.UUID(info.value.transfer_id)) == TransferStatus.FAILED
    with pytest.raises(KVTransferFailedError, match="tensor is required for receiver"):
        KVTransferEngine(RankedBackend(1, 2)).transfer_kv_handle(handle, 0, 1, None)
    assert backend.calls == [] and handle.is_transferring is False


def test_transfer_kv_handle_needs_an_initialised_backend_and_a_handle() -> None:
    with pytest.raises(ValueError, match="not initialised"):
        KVTransferEngine(RankedBackend(None, None)).transfer_kv_handle(KVHandle.create(16), 0, 1, np.zeros(2))
    with pytest.raises(ValueError, match="KVHandle"):
        KVTransferEngine(RankedBackend(0, 2)).transfer_kv_handle(None, 0, 1, np.zeros(2))


def test_backend_failure_is_a_transfer_failed_error_recorded_as_failed() -> None:
    engine = KVTransferEngine(RankedBackend(0, 2, fail=RuntimeError("Send failed: connection reset")))
    handle = KVHandle.create(16)
    with pytest.raises(KVTransferFailedError, match="connection reset") as info:
        engine.transfer_kv_handle(handle, 0, 1, np.zeros(8, dtype=np.float16))
    tid = uuid.UUID(info.value.transfer_id)  # the seed keeps ids in errors as strings
    assert info.value.source == "rank_0:cpu" and info.value.target == "rank_1:cpu"
    assert engine.get_transfer_status(tid) == TransferStatus.FAILED
    assert engine.get_completed_count() == 1 and engine.get_pending_count() == 0  # finished, as in the seed
    assert handle.is_transferring is False


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, asyncio.CancelledError])
def test_a_transfer_ended_by_a_base_exception_is_recorded_as_failed(interruption: type[BaseException]) -> None:
    # Ctrl-C or a cancelled task inside the backend call: the record used to stay IN_PROGRESS for good
    # (running records are never dropped) and the handle marked as transferring.
    engine = KVTransferEngine(RankedBackend(0, 2, fail=interruption()))
    handle = KVHandle.create(16)
    with pytest.raises(interruption):
        engine.transfer_kv_handle(handle, 0, 1, np.zeros(8, dtype=np.float16))
    assert engine.get_transfer_status(handle.transfer_id) == TransferStatus.FAILED
    assert engine.get_pending_count() == 0 and engine.get_completed_count() == 1
    assert handle.is_transferring is False


def test_a_handle_that_cannot_be_marked_fails_the_transfer_on_record() -> None:
    # Setting the handle's transfer fields ran between the record going IN_PROGRESS and the guarded
    # call: a handle that refused left the record running for good and raised its own error.
    class FrozenHandle:
        handle_id = uuid.uuid4()

        @property
        def is_transferring(self) -> bool:
            return False

    backend = RankedBackend(0, 2)
    engine = KVTransferEngine(backend)
    with pytest.raises(KVTransferFailedError, match="is_transferring") as info:
        engine.transfer_kv_handle(FrozenHandle(), 0, 1, np.zeros(8, dtype=np.float16))
    assert engine.get_transfer_status(uuid.UUID(info.value.transfer_id)) == TransferStatus.FAILED
    assert engine.get_pending_count() == 0 and backend.calls == []


def test_a_failure_is_reported_when_its_record_is_dropped_at_once() -> None:
    # With max_finished_records=0 (or other transfers finishing meanwhile) the FAILED record is dropped
    # as it is made; the error path then asked for its retry count and raised KeyError instead.
    engine = KVTransferEngine(RankedBackend(0, 2, fail=RuntimeError("peer gone")), max_finished_records=0,
                              max_retries=1, retry_backoff_ms=0)
    with pytest.raises(KVTransferFailedError, match="peer gone") as info:
        engine.transfer_kv_handle(KVHandle.create(4), 0, 1, np.zeros(4))
    assert info.value.context["retries"] == 1 and info.value.context["error"] == "peer gone"
    assert engine.get_completed_count() == 1 and engine.get_pending_count() == 0


def test_records_are_found_by_the_str_ids_the_errors_carry() -> None:
    # The engine's errors carry the id as a str (as the seed's do); asked with that id, the engine said
    # "not found" of a record it holds.
    engine = KVTransferEngine(RankedBackend(0, 2, fail=RuntimeError("peer gone")))
    with pytest.raises(KVTransferFailedError) as info:
        engine.transfer_kv_handle(KVHandle.create(4), 0, 1, np.zeros(4))
    tid = info.value.transfer_id
    assert isinstance(tid, str)
    assert engine.get_transfer_status(tid) == TransferStatus.FAILED and engine.get_transfer_outcome(tid) == "failed"
    assert engine.get_retry_count(tid) == 0 and engine.get_transfer_metrics(tid)["status"] == "failed"
    assert engine.get_transfer_metadata(tid).transfer_id == uuid.UUID(tid)
    with pytest.raises(TypeError, match=r"transfer_id must be a uuid\.UUID or its str form, got int"):
        engine.get_transfer_status(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transfer_id 'req-1' is not a UUID"):
        engine.get_transfer_outcome("req-1")
    with pytest.raises(KeyError, match="not found"):
        engine.get_retry_count(str(uuid.uuid4()))


@pytest.mark.parametrize(("metadata", "error", "message"), [
    ({"num_layers": "x"}, TypeError, r"^handle.metadata\['num_layers'\] must be an int, got str$"),
    ({"num_layers": True}, TypeError, "must be an int, got bool"),
    ({"head_dim": 2.7}, TypeError, r"^handle.metadata\['head_dim'\] must be an int, got float$"),
    ({"num_kv_heads": None}, TypeError, r"\['num_kv_heads'\] must be an int, got NoneType"),
    ({"num_layers": -3}, ValueError, r"\['num_layers'\] must be >= 0, got -3"),
    ({"num_heads": 0}, ValueError, r"\['num_heads'\] must be > 0, got 0"),
])
def test_bad_handle_metadata_is_named_and_nothing_is_recorded(metadata: dict[str, Any], error: type,
                                                              message: str) -> None:
    # int() read these: 2.7 became a head_dim of 2 and True one layer on the record, "x" or None raised
    # int()'s own error, and -3 or 0 a pydantic error about KVTransferMetadata, none naming the key.
    backend = RankedBackend(0, 2)
    engine = KVTransferEngine(backend)
    handle = KVHandle.create(4, metadata=metadata)
    with pytest.raises(error, match=message):
        engine.transfer_kv_handle(handle, 0, 1, np.zeros(4))
    assert engine._records == {} and backend.calls == [] and handle.is_transferring is False
    tid = engine.transfer_kv_handle(KVHandle.create(4, metadata={"num_layers": np.int64(3), "head_dim": 8}), 0, 1,
                                    np.zeros(4))
    assert (engine.get_transfer_metadata(tid).layer_end, engine.get_transfer_metadata(tid).head_dim) == (3, 8)


def test_records_of_completed_transfers() -> None:
    backend = RankedBackend(1, 2)
    engine = KVTransferEngine(backend)
    handle = KVHandle.create(32, request_id="req-1", metadata={"num_layers": 4})
    buffer = np.zeros((32, 2, 64), dtype=np.float16)
    tid = engine.transfer_kv_handle(handle, 0, 1, buffer)
    assert backend.calls == [("recv", 0)]
    meta = engine.get_transfer_metadata(tid)
    assert meta.status == TransferStatus.COMPLETED
    assert (meta.request_id, meta.layer_end, meta.num_heads, meta.head_dim) == ("req-1", 4, 2, 64)
    assert (meta.total_bytes, meta.direction) == (buffer.nbytes, TransferDirection.RECV)
    assert (meta.source_device, meta.target_device) == ("rank_0:cpu", "rank_1:cpu")
    assert meta.started_at is not None and meta.completed_at is not None and meta.completed_at >= meta.started_at
    assert (handle.transfer_id, handle.source_rank, handle.rank) == (tid, 0, 1)
    assert engine.get_completed_count() == 1
    engine.clear_completed()
    assert engine.get_completed_count() == 0
    with pytest.raises(KeyError, match="not found"):
        engine.get_transfer_status(tid)


def test_finished_records_stay_bounded_and_still_count() -> None:
    # A long-running engine that never calls clear_completed keeps the newest finished records only.
    engine = KVTransferEngine(RankedBackend(0, 2, fail=RuntimeError("peer gone")))
    engine.max_finished_records = 50
    buffer = np.zeros((4, 2), dtype=np.float16)
    ids = []
    for i in range(400):
        engine.comm_backend.fail = None if i % 2 else RuntimeError("peer gone")
        try:
            ids.append(engine.transfer_kv_handle(KVHandle.create(4), 0, 1, buffer))
        except KVTransferFailedError as e:
            ids.append(uuid.UUID(e.transfer_id))
    assert len(engine._records) == 50 and len(engine._finished) == 50 and len(engine._retries) <= 50
    assert engine.get_completed_count() == 400
    assert engine.get_transfer_status(ids[-1]) == TransferStatus.COMPLETED
    with pytest.raises(KeyError, match="not found"):
        engine.get_transfer_status(ids[0])
    engine.clear_completed()
    assert engine.get_completed_count() == 0 and not engine._finished



def test_max_finished_records_is_a_keyword_checked_at_construction() -> None:
    # As HistoricalPredictor(max_sessions=) and the other bounded stores: set when the engine is made.
    # (It used to fall into the BlockTransfer options and fail only at the first block transfer.)
    engine = KVTransferEngine(RankedBackend(0, 2), max_finished_records=3)
    buffer = np.zeros((4, 2), dtype=np.float16)
    ids = [engine.transfer_kv_handle(KVHandle.create(4), 0, 1, buffer) for _ in range(5)]
    assert engine.max_finished_records == 3 and len(engine._records) == 3
    assert engine.get_completed_count() == 5
    with pytest.raises(KeyError, match="not found"):
        engine.get_transfer_status(ids[0])
    assert KVTransferEngine(RankedBackend(0, 2)).max_finished_records == 4096
    with pytest.raises(ValueError, match="max_finished_records"):
        KVTransferEngine(RankedBackend(0, 2), max_finished_records=-1)
    with pytest.raises(TypeError, match="max_finished_records"):
        KVTransferEngine(RankedBackend(0, 2), max_finished_records=2.5)


@pytest.mark.parametrize(("value", "error", "message"), [
    (-1, ValueError, r"^max_finished_records must be >= 0, got -1$"),
    (True, TypeError, r"^max_finished_records must be an int, got bool$"),
    (2.0, TypeError, r"^max_finished_records must be an int, got float$"),
    (math.nan, TypeError, r"^max_finished_records must be an int, got float$"),
    ("8", TypeError, r"^max_finished_records must be an int, got str$"),
    (None, TypeError, r"^max_finished_records must be an int, got NoneType$"),
])
def test_max_finished_records_set_on_an_engine_is_checked_as_at_construction(value: Any, error: type,
                                                                            message: str) -> None:
    # Assigned on the engine, any value was taken: -1 then kept no finished record at all, NaN every one
    # (the trim compared the count with max(value, 0)), and a str ended the next transfer with the trim's
    # TypeError.
    engine = KVTransferEngine(RankedBackend(0, 2), max_finished_records=3)
    with pytest.raises(error, match=message):
        engine.max_finished_records = value
    assert engine.max_finished_records == 3
    buffer = np.zeros((4, 2), dtype=np.float16)
    ids = [engine.transfer_kv_handle(KVHandle.create(4), 0, 1, buffer) for _ in range(5)]
    assert len(engine._records) == 3 and engine.get_transfer_status(ids[-1]) == TransferStatus.COMPLETED
    engine.max_finished_records = np.int64(1)  # a numpy integer is an int, as at construction
    engine.transfer_kv_handle(KVHandle.create(4), 0, 1, buffer)
    assert engine.max_finished_records == 1 and type(engine.max_finished_records) is int
    assert len(engine._records) == 1 and engine.get_completed_count() == 6


def test_unknown_block_options_are_refused_at_construction() -> None:
    # As Python refuses an unexpected keyword; they used to be kept and fail at the first block transfer.
    backend = RankedBackend(0, 2)
    with pytest.raises(TypeError, match=r"KVTransferEngine\(\) got unexpected keyword argument 'chunk_size' "):
        KVTransferEngine(backend, chunk_size=1 << 20)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments 'retries', 'checksums' \(the block transfer "
                                        r"options are chunk_bytes, pipeline_depth, timeout, checksum, transport"):
        KVTransferEngine(backend, timeout=5.0, retries=3, checksums="crc32")
    assert backend.calls == []


BAD_BLOCK_OPTIONS = [
    ({"chunk_bytes": 0}, ValueError, "chunk_bytes must be > 0, got 0"),
    ({"chunk_bytes": "4M"}, TypeError, "chunk_bytes must be an int, got str"),
    ({"chunk_bytes": 2.5}, TypeError, "chunk_bytes must be an int, got float"),
    ({"pipeline_depth": 0}, ValueError, "pipeline_depth must be > 0, got 0"),
    ({"pipeline_depth": True}, TypeError, "pipeline_depth must be an int, got bool"),
    ({"pipeline_depth": 257}, ValueError, "pipeline_depth must be at most 256, got 257"),
    ({"timeout": 0}, ValueError, "timeout must be > 0 seconds"),
    ({"timeout": float("nan")}, ValueError, "timeout must be > 0 seconds .*, got nan"),
    ({"timeout": "60"}, TypeError, "timeout must be a number of seconds, got str"),
    ({"checksum": "md5"}, ValueError, "checksum must be one of segsum64, crc32, got 'md5'"),
    ({"checksum": ["crc32"]}, TypeError, "checksum must be a str"),
    ({"transport": "tcp"}, ValueError, "transport must be one of auto, torch, backend, got 'tcp'"),
    ({"gather_thread": 1}, TypeError, "gather_thread must be a bool, got int"),
    ({"same_host": "no"}, TypeError, "same_host must be a bool, got str"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_BLOCK_OPTIONS)
def test_bad_block_options_are_refused_at_construction(options: dict[str, Any], error: type, message: str) -> None:
    # They used to be checked (some only by a comparison's own TypeError) when the first block transfer
    # made the BlockTransfer, long after the engine was built.
    backend = RankedBackend(0, 2)
    with pytest.raises(error, match=message):
        KVTransferEngine(backend, **options)
    assert backend.calls == []


# --- wire format -----------------------------------------------------------------------------


def _header(**changes: Any) -> wire.TransferHeader:
    fields: dict[str, Any] = {
        "transfer_id": uuid.uuid4(), "num_layers": 2, "num_kv_heads": 4, "head_dim": 64, "block_size": 16,
        "dtype": "bf16", "num_blocks": 1000, "block_nbytes": 32768, "chunk_blocks": 128, "checksum_algorithm": 1,
        "has_digests": True, "digests_checksum": 2**64 - 1, "src_rank": 3, "dst_rank": 0,
    }
    return wire.TransferHeader(**{**fields, **changes})


def test_header_round_trip_and_chunking() -> None:
    header = _header()
    frame = np.zeros(wire.HEADER_NBYTES, dtype=np.uint8)
    header.pack(frame)
    assert wire.TransferHeader.unpack(frame) == header
    assert header.num_chunks == 8 and header.chunk_range(7) == (896, 1000)
    assert _header(num_blocks=0).num_chunks == 0


@pytest.mark.parametrize(("offset", "field"), [(0, "magic"), (4, "header_checksum"), (60, "header_checksum"),
                                               (124, "header_checksum")])
def test_a_damaged_header_names_what_is_wrong(offset: int, field: str) -> None:
    frame = np.zeros(wire.HEADER_NBYTES, dtype=np.uint8)
    _header().pack(frame)
    frame[offset] ^= 1
    with pytest.raises(wire.WireFormatError) as info:
        wire.TransferHeader.unpack(frame)
    assert info.value.field == field and field in wire.SPEC_FIELDS


def test_a_newer_wire_version_is_refused() -> None:
    frame = np.zeros(wire.HEADER_NBYTES, dtype=np.uint8)
    _header(version=2).pack(frame)
    with pytest.raises(wire.WireFormatError, match="version 2") as info:
        wire.TransferHeader.unpack(frame)
    assert (info.value.expected, info.value.actual) == (wire.WIRE_VERSION, 2)


def test_reply_and_footer_round_trip() -> None:
    frame = np.zeros(32, dtype=np.uint8)
    reply = wire.Reply(wire.ReplyStatus.CHECKSUM_MISMATCH, wire.PHASE_FINAL, -1, 2**64 - 5)
    reply.pack(frame)
    assert wire.Reply.unpack(frame) == reply
    frame[9] ^= 0x10
    with pytest.raises(wire.WireFormatError):
        wire.Reply.unpack(frame)
    footer = wire.ChunkFooter(7, wire.FOOTER_ABORT, 4096, 12345)
    footer.pack(frame)
    assert wire.ChunkFooter.unpack(frame) == footer


@pytest.mark.parametrize("algorithm", sorted(wire.CHECKSUM_ALGORITHMS.values()))
def test_checksum_catches_every_single_byte_flip(algorithm: int) -> None:
    data = np.random.default_rng(0).integers(0, 256, size=3 * 4096 + 100, dtype=np.uint8)
    base = wire.checksum(data, algorithm)
    for i in range(0, data.size, 37):
        data[i] ^= 0x80
        assert wire.checksum(data, algorithm) != base, i
        data[i] ^= 0x80
    assert wire.checksum(data, algorithm) == base
    assert wire.checksum(data[:-1], algorithm) != base


def test_segsum64_depends_on_segment_order() -> None:
    data = np.random.default_rng(1).integers(0, 256, size=4 * 4096, dtype=np.uint8)
    swapped = np.concatenate([data[4096:8192], data[:4096], data[8192:]])
    assert wire.checksum(data, 1) != wire.checksum(swapped, 1)


def _segsum64_reference(data: np.ndarray) -> int:
    """segsum64 as wire.py's docstring defines it, in numpy (the C++ sums must agree with it)."""
    import hashlib

    head = data.size - data.size % 4096
    sums = data[:head].view("<u8").reshape(-1, 512).sum(axis=1, dtype=np.uint64)
    h = hashlib.blake2b(digest_size=8)
    h.update(sums.astype("<u8").tobytes() + data[head:].tobytes() + int(data.size).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def test_gather_and_scatter_compute_the_checksum_they_copy() -> None:
    # Layer pieces of 41 * 5 * 7 = 1435 bytes: words and segments straddle pieces and blocks.
    spec = KVCacheSpec(num_layers=3, num_kv_heads=5, head_dim=7, dtype="int8", block_size=41)
    src, dst = PagedKVPool(spec, 32), PagedKVPool(spec, 32)
    ids = src.allocate(9)
    src.scatter(np.random.default_rng(3).integers(0, 256, ids.size * spec.block_nbytes, dtype=np.uint8), ids)
    out = np.empty(ids.size * spec.block_nbytes, dtype=np.uint8)
    sums = wire.segment_sums_buffer(out.size)
    src.gather_summed(ids, out, sums)
    assert np.array_equal(out, src.gather(ids))
    assert wire.segsum64_from_sums(sums, out) == wire.checksum(out, 1) == _segsum64_reference(out)
    got = dst.allocate(9)
    again = np.zeros_like(sums)
    dst.scatter_summed(out, got, again)
    assert np.array_equal(dst.gather(got), out) and np.array_equal(again, sums)


def test_summed_copies_refuse_bad_sums_and_change_nothing() -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype="fp16", block_size=16)
    pool = PagedKVPool(spec, 8)
    ids = pool.allocate(2)
    out = np.full(ids.size * spec.block_nbytes, 7, dtype=np.uint8)
    n = out.size // wire.SEGMENT_NBYTES
    with pytest.raises(TypeError, match="uint64"):
        pool.gather_summed(ids, out, np.zeros(n, dtype=np.int64))
    with pytest.raises(ValueError, match=f"expected {n}"):
        pool.gather_summed(ids, out, np.zeros(n + 1, dtype=np.uint64))
    frozen = np.zeros(n, dtype=np.uint64)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        pool.scatter_summed(out, ids, frozen)
    with pytest.raises(ValueError, match="writable"):
        pool.scatter_summed(out, ids, np.zeros(2 * n, dtype=np.uint64)[::2])
    assert (out == 7).all() and not pool.gather(ids).any()  # nothing copied either way


def test_unknown_dtype_and_algorithm() -> None:
    with pytest.raises(ValueError, match="no wire code"):
        wire.dtype_code("int4")
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        wire.checksum(np.zeros(8, dtype=np.uint8), 99)


# --- transport deadlines ---------------------------------------------------------------------


class BlockingBackend(RankedBackend):
    def __init__(self, release: threading.Event, error: Exception | None = None) -> None:
        super().__init__(0, 2)
        self.release, self.error = release, error

    def recv(self, tensor: Any, src: int) -> None:
        self.release.wait(5)
        if self.error:
            raise self.error


def test_thread_transport_waits_with_a_deadline() -> None:
    release = threading.Event()
    transport = BackendThreadTransport(BlockingBackend(release))
    op = transport.irecv(None, 1, 0)
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        op.wait(0.2)
    assert time.monotonic() - start < 1.0
    release.set()
    op.wait(2.0)


@pytest.mark.parametrize(("message", "kind"), [("Recv failed: Connection closed by peer", TransportError),
                                               ("Timed out waiting 1000ms for recv", TransportTimeout)])
def test_thread_transport_reports_backend_errors(message: str, kind: type[Exception]) -> None:
    release = threading.Event()
    release.set()
    op = BackendThreadTransport(BlockingBackend(release, RuntimeError(message))).irecv(None, 1, 0)
    with pytest.raises(kind, match=message.split(":")[0]):
        op.wait(2.0)


# --- block transfer arguments ----------------------------------------------------------------

torch = pytest.importorskip("torch")


def _pool() -> PagedKVPool:
    return PagedKVPool(KVCacheSpec(1, 1, 8, "fp16", 16), 32)


@pytest.mark.parametrize(("options", "error", "message"), BAD_BLOCK_OPTIONS)
def test_block_transfer_options_are_checked(options: dict[str, Any], error: type, message: str) -> None:
    from sagellm_kv_cache.transfer import BlockTransfer

    with pytest.raises(error, match=message):
        BlockTransfer(RankedBackend(0, 2), **options)
    with pytest.raises(ValueError, match="comm_backend"):
        BlockTransfer(None)


@pytest.mark.parametrize(("timeout", "error", "message"), [
    (-1.0, ValueError, r"timeout must be > 0 seconds \(math.inf for none\), got -1.0"),
    (0, ValueError, "got 0$"), (float("nan"), ValueError, "got nan$"),
    ("5", TypeError, "timeout must be a number of seconds, got str"),
])
def test_a_bad_timeout_of_one_call_is_refused_and_leaves_the_link_usable(timeout: Any, error: type,
                                                                         message: str) -> None:
    # A deadline already past timed the call out at once, and a timeout marks the link to that peer
    # broken for good: every later transfer with it failed. A str failed on an unnamed TypeError.
    from sagellm_kv_cache.transfer import BlockTransfer

    backend = RankedBackend(0, 2)
    bt = BlockTransfer(backend, transport="backend")
    with pytest.raises(error, match=message):
        bt.send_blocks(_pool(), [0], 1, timeout=timeout)
    with pytest.raises(error, match=message):
        bt.recv_blocks(_pool(), 1, timeout=timeout)
    assert not bt.is_broken(1) and backend.calls == []


@pytest.mark.parametrize(("ids", "dst", "options", "error", "message"), [
    ([0, 32], 1, {}, ValueError, "block id 32 is out of range"),
    ([0.5], 1, {}, TypeError, "block_ids must be integers"),
    ([0], 0, {}, ValueError, "own rank"),
    ([0], 2, {}, ValueError, "invalid dst_rank 2"),
    ([0], 1, {"digests": np.zeros((2, 32), np.uint8)}, ValueError, "digests must have shape"),
    ([0], 1, {"timeout": -1.0}, ValueError, "timeout must be > 0 seconds"),
    (32, 1, {}, ValueError, "block id 32 is out of range"),  # one id, as BlockTransfer.send_blocks takes it
])
def test_an_engine_send_refused_for_its_arguments_records_nothing(ids: Any, dst: int, options: dict[str, Any],
                                                                  error: type, message: str) -> None:
    # The record went in first, so each refusal left a FAILED transfer (counted as finished) that never
    # sent a byte; a single id failed on len() before the check that names it.
    backend = RankedBackend(0, 2)
    engine = KVTransferEngine(backend, transport="backend")
    with pytest.raises(error, match=message):
        engine.send_blocks(_pool(), ids, dst, **options)
    assert engine._records == {} and engine.get_completed_count() == 0 and engine.get_pending_count() == 0
    assert backend.calls == []


def test_the_engine_hands_its_block_options_to_its_block_transfer() -> None:
    engine = KVTransferEngine(RankedBackend(0, 2), chunk_bytes=1 << 20, pipeline_depth=2, timeout=math.inf,
                              checksum="crc32", transport="backend", gather_thread=False, same_host=False)
    blocks = engine.blocks
    assert (blocks._chunk_bytes, blocks._depth, blocks._timeout) == (1 << 20, 2, math.inf)
    assert blocks._checksum_id == wire.CHECKSUM_ALGORITHMS["crc32"] and blocks._transport_kind == "backend"
    assert blocks._gather_thread is False and blocks._same_host is False


@pytest.mark.parametrize(
    ("ids", "dst", "digests", "error", "message"),
    [([0, 32], 1, None, ValueError, "block id 32 is out of range"), ([-1], 1, None, ValueError, "out of range"),
     ([0.5], 1, None, TypeError, "integers"), ([0, 1], 0, None, ValueError, "own rank"),
     ([0, 1], 2, None, ValueError, "invalid dst_rank 2"), ([0, 1], 1, np.zeros((1, 32)), ValueError, r"\(2, 32\)")],
)
def test_send_blocks_checks_arguments_before_sending(ids: Any, dst: int, digests: Any, error: type[Exception],
                                                     message: str) -> None:
    from sagellm_kv_cache.transfer import BlockTransfer

    backend = RankedBackend(0, 2)
    with pytest.raises(error, match=message):
        BlockTransfer(backend, transport="backend").send_blocks(_pool(), ids, dst, digests=digests)
    assert backend.calls == []


def test_recv_blocks_checks_the_source_rank_and_reserves_nothing() -> None:
    from sagellm_kv_cache.transfer import BlockTransfer

    pool = _pool()
    bt = BlockTransfer(RankedBackend(1, 2), transport="backend")
    for src, message in ((1, "own rank"), (5, "invalid src_rank 5"), (True, "must be an int")):
        with pytest.raises((ValueError, TypeError), match=message):
            bt.recv_blocks(pool, src)
    assert pool.num_free_blocks == 32


def test_publish_accepts_a_callable_or_a_cache_with_insert() -> None:
    from sagellm_kv_cache.transfer.blocks import DigestSink, _publish

    class Cache:
        def __init__(self) -> None:
            self.entries: dict[bytes, int] = {}

        def insert(self, digests: np.ndarray, block_ids: np.ndarray) -> None:
            self.entries.update({d.tobytes(): int(b) for d, b in zip(digests, block_ids, strict=True)})

    digests = np.arange(64, dtype=np.uint8).reshape(2, 32)
    ids = np.array([5, 9], dtype=np.int32)
    cache = Cache()
    assert isinstance(cache, DigestSink)
    _publish(cache, digests, ids)
    assert cache.entries == {digests[0].tobytes(): 5, digests[1].tobytes(): 9}
    seen: list[tuple[bytes, list[int]]] = []
    _publish(lambda d, b: seen.append((d.tobytes(), b.tolist())), digests, ids)
    assert seen == [(digests.tobytes(), [5, 9])]
