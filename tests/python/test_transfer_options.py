"""The seed's KVTransferEngine options: compression, checksum, retries, and the per-transfer metrics.

Two engines (rank 0 and rank 1) talk through an in-memory pipe that behaves like a point-to-point
backend: ``recv`` needs a buffer of exactly the size that was sent.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any

import numpy as np
import pytest
from lock_gaps import GapLock
from sagellm_kv_cache import KVChecksumMismatchError, KVHandle, KVMetadataMismatchError, KVTransferFailedError
from sagellm_kv_cache.transfer import KVTransferEngine, KVTransferError
from sagellm_protocol.kv import TransferStatus

torch = pytest.importorskip("torch")


class Pipe:
    """The wire between two ranks: each ``send`` queues a copy, each ``recv`` takes the oldest."""

    def __init__(self) -> None:
        self.frames: deque[Any] = deque()


class PipeBackend:
    def __init__(self, rank: int, pipe: Pipe, *, failures: int = 0) -> None:
        self.rank, self.pipe, self.failures = rank, pipe, failures
        self.calls = 0

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return 2

    def send(self, tensor: Any, dst: int) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset by peer")
        self.pipe.frames.append(tensor.clone() if hasattr(tensor, "clone") else np.array(tensor, copy=True))

    def recv(self, tensor: Any, src: int) -> None:
        frame = self.pipe.frames.popleft()
        if tuple(frame.shape) != tuple(tensor.shape):
            raise RuntimeError(f"size mismatch: sent {tuple(frame.shape)}, receiving {tuple(tensor.shape)}")
        tensor[...] = frame


def _pair(**options: Any) -> tuple[KVTransferEngine, KVTransferEngine, Pipe]:
    pipe = Pipe()
    return KVTransferEngine(PipeBackend(0, pipe), **options), KVTransferEngine(PipeBackend(1, pipe), **options), pipe


@pytest.mark.parametrize(
    "options",
    [{}, {"enable_checksum": True}, {"enable_compression": True}, {"enable_compression": True, "compression_level": 1,
                                                                   "enable_checksum": True}],
)
def test_round_trip_with_each_option(options: dict[str, Any]) -> None:
    sender, receiver, _ = _pair(**options)
    data = torch.arange(4 * 64, dtype=torch.bfloat16).reshape(4, 64) % 7  # compressible
    out = torch.zeros_like(data)
    handle = KVHandle.create(64, request_id="req-9")
    sent = sender.transfer_kv_handle(handle, 0, 1, data)
    got = receiver.transfer_kv_handle(handle, 0, 1, out)
    assert torch.equal(out, data)
    for engine, tid in ((sender, sent), (receiver, got)):
        metrics = engine.get_transfer_metrics(tid)
        assert set(metrics) == {"bytes", "latency_ms", "bandwidth_gbps", "shards", "compression_ratio", "retries",
                                "checksum", "status"}
        assert metrics["status"] == "completed" and metrics["retries"] == 0 and metrics["shards"] == 1
        meta = engine.get_transfer_metadata(tid)
        if options.get("enable_compression"):
            assert meta.is_compressed and meta.original_size == data.nbytes
            assert metrics["bytes"] < data.nbytes and metrics["compression_ratio"] > 1.0
        else:
            assert metrics["bytes"] == data.nbytes and metrics["compression_ratio"] == 1.0
        assert metrics["checksum"] == (f"{_crc(data):08x}" if options.get("enable_checksum") else "")


def _crc(tensor: Any) -> int:
    import zlib

    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def test_numpy_arrays_travel_framed_too() -> None:
    sender, receiver, _ = _pair(enable_compression=True, enable_checksum=True)
    data = np.tile(np.arange(32, dtype=np.float32), 8)
    out = np.zeros_like(data)
    handle = KVHandle.create(8)
    sender.transfer_kv_handle(handle, 0, 1, data)
    receiver.transfer_kv_handle(handle, 0, 1, out)
    np.testing.assert_array_equal(out, data)


def test_corrupted_payload_is_a_checksum_error_and_leaves_the_buffer_alone() -> None:
    sender, receiver, pipe = _pair(enable_checksum=True)
    data = torch.ones(128, dtype=torch.float16)
    handle = KVHandle.create(16)
    sender.transfer_kv_handle(handle, 0, 1, data)
    pipe.frames[1][5] ^= 0xFF  # flip one payload byte on the wire
    out = torch.full((128,), 3.0, dtype=torch.float16)
    with pytest.raises(KVChecksumMismatchError, match="Checksum mismatch: expected") as info:
        receiver.transfer_kv_handle(handle, 0, 1, out)
    assert torch.equal(out, torch.full((128,), 3.0, dtype=torch.float16))
    tid = uuid.UUID(info.value.transfer_id)
    assert receiver.get_transfer_status(tid) == TransferStatus.FAILED
    assert handle.is_transferring is False


def test_a_payload_of_the_wrong_size_is_refused_and_read_off_the_link() -> None:
    # The refusal came right after the header and left the payload on the link: the next transfer
    # from that sender read it as its header and failed too.
    sender, receiver, pipe = _pair(enable_compression=True)
    handle = KVHandle.create(16)
    sender.transfer_kv_handle(handle, 0, 1, torch.zeros(64))
    out = torch.zeros(32)
    with pytest.raises(KVMetadataMismatchError, match="total_bytes"):
        receiver.transfer_kv_handle(handle, 0, 1, out)
    assert torch.equal(out, torch.zeros(32)) and len(pipe.frames) == 0
    sender.transfer_kv_handle(handle, 0, 1, torch.ones(32))
    receiver.transfer_kv_handle(handle, 0, 1, out)
    assert torch.equal(out, torch.ones(32))


def test_a_read_only_buffer_is_refused_before_the_wire_is_read() -> None:
    # It was retried as a backend failure: the retry read past the consumed frame, and the error named
    # what it found there ("pop from an empty deque") instead of the buffer.
    sender, receiver, pipe = _pair(enable_checksum=True, max_retries=1, retry_backoff_ms=0)
    data = np.arange(16, dtype=np.float32)
    handle = KVHandle.create(4)
    sender.transfer_kv_handle(handle, 0, 1, data)
    frozen = np.zeros(16, dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(KVTransferFailedError, match="tensor is read-only") as info:
        receiver.transfer_kv_handle(handle, 0, 1, frozen)
    assert receiver.get_transfer_status(info.value.transfer_id) == TransferStatus.FAILED
    assert len(pipe.frames) == 2 and not frozen.any()  # the frame waits for a writable buffer
    out = np.zeros(16, dtype=np.float32)
    receiver.transfer_kv_handle(handle, 0, 1, out)
    np.testing.assert_array_equal(out, data)


def test_a_received_frame_that_cannot_be_written_is_not_retried() -> None:
    # An inference tensor refuses in-place writes outside inference mode, which only shows once the
    # frame has been read: a retry would read the sender's next frame (here: none).
    sender, receiver, pipe = _pair(enable_compression=True, max_retries=2, retry_backoff_ms=0)
    handle = KVHandle.create(4)
    sender.transfer_kv_handle(handle, 0, 1, torch.ones(16))
    with torch.inference_mode():
        out = torch.zeros(16)
    with pytest.raises(KVTransferFailedError, match="cannot be written into tensor: Inplace update") as info:
        receiver.transfer_kv_handle(handle, 0, 1, out)
    assert info.value.context["retries"] == 0 and receiver.get_retry_count(info.value.transfer_id) == 0
    assert len(pipe.frames) == 0


def test_a_receiver_that_wants_checksums_refuses_a_frame_without_one() -> None:
    # The receiver honoured the sender's flags: with enable_checksum it took a compressed-only frame,
    # unverified, and recorded it COMPLETED.
    pipe = Pipe()
    sender = KVTransferEngine(PipeBackend(0, pipe), enable_compression=True)
    receiver = KVTransferEngine(PipeBackend(1, pipe), enable_checksum=True)
    handle = KVHandle.create(4)
    sender.transfer_kv_handle(handle, 0, 1, torch.ones(16))
    out = torch.zeros(16)
    with pytest.raises(KVMetadataMismatchError, match="'frame_checksum': expected 'crc32', got 'none'") as info:
        receiver.transfer_kv_handle(handle, 0, 1, out)
    assert receiver.get_transfer_status(str(info.value.context["transfer_id"])) == TransferStatus.FAILED
    assert not out.any() and len(pipe.frames) == 0  # the frame was read: the next one is in step
    sender.enable_checksum = True
    sender.transfer_kv_handle(handle, 0, 1, torch.ones(16))
    receiver.transfer_kv_handle(handle, 0, 1, out)
    assert torch.equal(out, torch.ones(16))


def test_retries_with_backoff_then_success() -> None:
    pipe = Pipe()
    backend = PipeBackend(0, pipe, failures=2)
    engine = KVTransferEngine(backend, max_retries=3, retry_backoff_ms=1.0)
    tid = engine.transfer_kv_handle(KVHandle.create(16), 0, 1, torch.ones(8))
    assert backend.calls == 3 and len(pipe.frames) == 1
    assert engine.get_retry_count(tid) == 2 and engine.get_transfer_metrics(tid)["retries"] == 2
    assert engine.get_transfer_status(tid) == TransferStatus.COMPLETED


@pytest.mark.parametrize("gap", range(1, 7))
def test_metrics_see_a_record_dropped_on_another_thread_whole_or_not_at_all(gap: int) -> None:
    # get_transfer_metrics read the record, then (through get_retry_count) the record again and its retry
    # count: a transfer finishing on another thread in between and dropping the record (max_finished_records)
    # made it report 0 retries of a transfer that had one, or the KeyError of an id it had just read.
    engine = KVTransferEngine(PipeBackend(0, Pipe(), failures=1), max_retries=1, retry_backoff_ms=0,
                              max_finished_records=1)
    tid = engine.transfer_kv_handle(KVHandle.create(16), 0, 1, torch.ones(8))
    before = engine.get_transfer_metrics(tid)
    assert before["retries"] == 1 and before["status"] == "completed"
    engine._lock = gaps = GapLock(gap, lambda: engine.transfer_kv_handle(KVHandle.create(16), 0, 1,  # type: ignore[assignment]
                                                                         torch.ones(8)))
    gaps.arm()
    try:
        assert engine.get_transfer_metrics(tid) == before  # read before the drop
    except KeyError as e:  # or after it: as for any id the engine does not hold
        assert gaps.ran and e.args == (f"Transfer ID {tid} not found",)
    if not gaps.ran:  # the call was over before this gap
        engine.transfer_kv_handle(KVHandle.create(16), 0, 1, torch.ones(8))
    for query in (engine.get_transfer_metrics, engine.get_retry_count, engine.get_transfer_outcome):
        with pytest.raises(KeyError, match=f"^'Transfer ID {tid} not found'$"):
            query(tid)


def test_retries_exhausted_is_a_transfer_failed_error() -> None:
    backend = PipeBackend(0, Pipe(), failures=10)
    engine = KVTransferEngine(backend, max_retries=2, retry_backoff_ms=0)
    with pytest.raises(KVTransferError, match=r"failed: rank_0:cpu -> rank_1:cpu, reason: connection reset") as info:
        engine.transfer_kv_handle(KVHandle.create(16), 0, 1, torch.ones(8))
    assert isinstance(info.value, KVTransferFailedError) and KVTransferError is KVTransferFailedError
    assert info.value.context["error"] == "connection reset by peer" and info.value.context["retries"] == 2
    tid = uuid.UUID(info.value.transfer_id)
    assert backend.calls == 3 and engine.get_retry_count(tid) == 2
    assert engine.get_transfer_metrics(tid)["status"] == "failed"


@pytest.mark.parametrize(
    ("options", "message"),
    [({"compression_level": 10}, "compression_level"), ({"compression_level": "6"}, "compression_level"),
     ({"max_retries": -1}, "max_retries"), ({"retry_backoff_ms": -1.0}, "retry_backoff_ms"),
     ({"retry_backoff_ms": float("nan")}, "retry_backoff_ms"),
     # These were taken and then ended the first retried transfer with time.sleep's OverflowError as its
     # reason ("timestamp out of range"), in place of the backend's error.
     ({"retry_backoff_ms": float("inf")}, "retry_backoff_ms must be a finite non-negative number, got inf"),
     ({"retry_backoff_ms": 10**400}, "retry_backoff_ms must be a finite .* an int of 1329 bits"),
     ({"retry_backoff_ms": 1e300, "max_retries": 1}, r"retry wait retry_backoff_ms \* 2\*\*0, past the longest sleep"),
     ({"max_retries": 60}, r"max_retries=60 with retry_backoff_ms=50.0 makes the last retry wait .*2\*\*59")],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVTransferEngine(PipeBackend(0, Pipe()), **options)


@pytest.mark.parametrize("name", ["enable_compression", "enable_checksum"])
def test_the_framing_switches_must_be_bools(name: str) -> None:
    # bool() read any value: "false" (or "no", from a config file) turned the option on.
    for value, kind in (("false", "str"), (1, "int"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"^{name} must be a bool, got {kind}$"):
            KVTransferEngine(PipeBackend(0, Pipe()), **{name: value})
    assert getattr(KVTransferEngine(PipeBackend(0, Pipe()), **{name: np.bool_(True)}), name) is True


def test_many_retries_are_taken_when_their_waits_fit() -> None:
    assert KVTransferEngine(PipeBackend(0, Pipe()), max_retries=10**6, retry_backoff_ms=0).max_retries == 10**6
    assert KVTransferEngine(PipeBackend(0, Pipe()), max_retries=30).max_retries == 30  # last wait ~1.7 years


def test_unknown_ids_are_key_errors() -> None:
    engine = KVTransferEngine(PipeBackend(0, Pipe()))
    for method in (engine.get_retry_count, engine.get_transfer_metrics, engine.get_transfer_status):
        with pytest.raises(KeyError, match="not found"):
            method(uuid.uuid4())
