"""KVTransferEngine keeps block sends in doubt only while the process-wide outcome ledger does.

Real block transfers over SocketTransferBackend on 127.0.0.1, in one process: the destination
holds its final OK until the source has given up (``KVTransferOutcomeUnknownError``), and the
ledger is shrunk to one entry per table so that a second doubt pushes the first one out. The
last tests use the same pairs for other one-process cases (bad arguments, a huge chunk size).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from lock_gaps import GapLock
from ports import free_port
from sagellm_kv_cache import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.errors import KVTransferOutcomeUnknownError
from sagellm_kv_cache.transfer import BlockTransfer, KVTransferEngine, SocketTransferBackend, blocks, wire
from sagellm_protocol.kv import TransferStatus

pytest.importorskip("torch")

SPEC = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": "fp16", "block_size": 16}


@pytest.fixture
def small_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    from sagellm_kv_cache.transfer import blocks

    monkeypatch.setattr(blocks, "_LEDGER", blocks._Ledger(capacity=1))


@pytest.fixture
def worlds() -> Iterator[list[list[SocketTransferBackend]]]:
    """Two separate worlds: ranks 0..2, and ranks 0..1."""
    made: list[list[SocketTransferBackend]] = []
    for size in (3, 2):
        endpoints = {r: ("127.0.0.1", free_port()) for r in range(size)}
        made.append([SocketTransferBackend(rank=r, world_size=size, endpoints=endpoints, recv_timeout_s=10.0)
                     for r in range(size)])
    for world in made:
        for backend in world:
            backend.start()
    yield made
    for world in made:
        for backend in world:
            backend.close()


def _send_in_doubt(engine: KVTransferEngine, pool: PagedKVPool, destination: SocketTransferBackend) -> uuid.UUID:
    """One real block send whose final reply arrives only after the source's deadline."""
    gave_up = threading.Event()
    receiver = BlockTransfer(destination, transport="backend", timeout=10.0, same_host=False)
    receiver._before_final_reply = lambda: gave_up.wait(10.0)
    dst_pool = PagedKVPool(KVCacheSpec(**SPEC), 8)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(receiver.recv_blocks(dst_pool, 0)), daemon=True)
    thread.start()
    ids = pool.allocate(2)
    before = set(engine._records)
    with pytest.raises(KVTransferOutcomeUnknownError):
        engine.send_blocks(pool, ids, destination.get_rank())
    gave_up.set()
    thread.join(timeout=10.0)
    assert len(got) == 1 and len(got[0]) == 2  # the destination did commit
    (tid,) = set(engine._records) - before
    return tid


def test_doubts_the_ledger_forgot_are_dropped_with_it(
        small_ledger: None, worlds: list[list[SocketTransferBackend]]) -> None:
    (a0, a1, a2), (b0, b1) = worlds
    pool = PagedKVPool(KVCacheSpec(**SPEC), 16)
    engine = KVTransferEngine(a0, transport="backend", timeout=0.3, same_host=False)
    first = _send_in_doubt(engine, pool, a1)
    assert engine.get_transfer_outcome(first) == "unknown" and BlockTransfer.outcome(first) == "unknown"
    # Another engine's doubt about rank 1 pushes the first one out of the (one-entry) ledger: no
    # later exchange can settle it any more.
    other = KVTransferEngine(b0, transport="backend", timeout=0.3, same_host=False)
    _send_in_doubt(other, pool, b1)
    assert BlockTransfer.outcome(first) is None
    # The next doubt of this engine prunes the stale one at once, with no query in between.
    last = _send_in_doubt(engine, pool, a2)
    assert engine._in_doubt.keys() == {last} and first not in engine._records
    assert engine.get_transfer_outcome(last) == "unknown"
    with pytest.raises(KeyError, match=str(first)):
        engine.get_transfer_outcome(first)
    # Forgotten like a finished record: no longer pending, still counted until clear_completed.
    assert (engine.get_pending_count(), engine.get_completed_count()) == (1, 1)
    engine.clear_completed()
    assert (engine.get_pending_count(), engine.get_completed_count()) == (1, 0)


def test_a_query_drops_a_doubt_the_ledger_forgot(
        small_ledger: None, worlds: list[list[SocketTransferBackend]]) -> None:
    (a0, a1, _), (b0, b1) = worlds
    pool = PagedKVPool(KVCacheSpec(**SPEC), 16)
    engine = KVTransferEngine(a0, transport="backend", timeout=0.3, same_host=False)
    first = _send_in_doubt(engine, pool, a1)
    _send_in_doubt(KVTransferEngine(b0, transport="backend", timeout=0.3, same_host=False), pool, b1)
    assert engine.get_pending_count() == 0 and not engine._in_doubt
    with pytest.raises(KeyError):
        engine.get_transfer_metadata(first)


def _settled_by_a_later_exchange(tid: uuid.UUID, dst_rank: int) -> None:
    """What the next transfer to ``dst_rank`` records when the destination answers that it committed."""
    blocks._LEDGER.settle(dst_rank, tid, wire.ANSWER_PUBLISHED)


@pytest.mark.parametrize("gap", [1, 2, 3, 4])
def test_an_outcome_query_sees_a_settle_on_another_thread_whole_or_not_at_all(
        gap: int, worlds: list[list[SocketTransferBackend]]) -> None:
    # get_transfer_outcome read the record's status, and whether the send was in doubt in a second critical
    # section: a settle on another thread in between made it answer "in_progress", which the send never
    # was (it was in doubt, then completed).
    (a0, a1, _), _ = worlds
    engine = KVTransferEngine(a0, transport="backend", timeout=0.3, same_host=False)
    tid = _send_in_doubt(engine, PagedKVPool(KVCacheSpec(**SPEC), 16), a1)

    def settle() -> None:
        _settled_by_a_later_exchange(tid, 1)
        assert engine.get_pending_count() == 0  # this engine takes the settle in (any query does)

    engine._lock = gaps = GapLock(gap, settle)  # type: ignore[assignment]
    gaps.arm()
    assert engine.get_transfer_outcome(tid) in ("unknown", "completed")  # before the settle, or after it
    if not gaps.ran:  # the call was over before this gap
        settle()
    assert engine.get_transfer_outcome(tid) == "completed"


@pytest.mark.parametrize("gap", [1, 2, 3])
def test_a_settle_is_seen_whole_or_not_at_all(gap: int, worlds: list[list[SocketTransferBackend]]) -> None:
    # The engine took a settled doubt out of its doubts, and marked the record COMPLETED in a second
    # critical section: a query in between found a running record no longer in doubt ("in_progress").
    (a0, a1, _), _ = worlds
    engine = KVTransferEngine(a0, transport="backend", timeout=0.3, same_host=False)
    tid = _send_in_doubt(engine, PagedKVPool(KVCacheSpec(**SPEC), 16), a1)
    answers: list[str] = []
    engine._lock = gaps = GapLock(gap, lambda: answers.append(engine.get_transfer_outcome(tid)))  # type: ignore[assignment]
    _settled_by_a_later_exchange(tid, 1)
    gaps.arm()
    assert engine.get_pending_count() == 0
    assert gaps.ran and answers == ["completed"]
    assert engine.get_transfer_outcome(tid) == "completed" and not engine._in_doubt


def test_the_metrics_of_a_send_in_doubt_say_unknown_until_it_is_settled(
        worlds: list[list[SocketTransferBackend]]) -> None:
    # get_transfer_metrics read the record's status alone: "in_progress" for a send whose call was over,
    # where get_transfer_outcome says "unknown".
    (a0, a1, _), _ = worlds
    engine = KVTransferEngine(a0, transport="backend", timeout=0.3, same_host=False)
    tid = _send_in_doubt(engine, PagedKVPool(KVCacheSpec(**SPEC), 16), a1)
    assert engine.get_transfer_metrics(tid)["status"] == "unknown" == engine.get_transfer_outcome(tid)
    assert engine.get_transfer_status(tid) == TransferStatus.IN_PROGRESS  # the record itself, as before
    _settled_by_a_later_exchange(tid, 1)
    assert engine.get_transfer_metrics(tid)["status"] == "completed" == engine.get_transfer_outcome(tid)


def test_a_receive_with_a_bad_request_id_is_refused_before_it_takes_blocks(
        worlds: list[list[SocketTransferBackend]]) -> None:
    # The record was built after the receive had committed: a request_id that is not a str failed
    # pydantic's validation there, and the received blocks (owned by the caller) were never handed back.
    (a0, a1, _), _ = worlds
    pool = PagedKVPool(KVCacheSpec(**SPEC), 8)
    source = BlockTransfer(a0, transport="backend", timeout=10.0, same_host=False)
    ids = pool.allocate(2)
    sent: list[Any] = []
    thread = threading.Thread(target=lambda: sent.append(source.send_blocks(pool, ids, 1)), daemon=True)
    thread.start()
    dst_pool = PagedKVPool(KVCacheSpec(**SPEC), 8)
    engine = KVTransferEngine(a1, transport="backend", timeout=3.0, same_host=False)
    for bad, kind in ((7, "int"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"^request_id must be a str, got {kind}$"):
            engine.recv_blocks(dst_pool, 0, request_id=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=f"^request_id must be a str, got {kind}$"):
            engine.send_blocks(pool, ids, 0, request_id=bad)  # type: ignore[arg-type]
    assert dst_pool.num_free_blocks == 8 and engine._records == {}
    got = engine.recv_blocks(dst_pool, 0, request_id="req-1")  # the transfer is still there to receive
    thread.join(timeout=10.0)
    assert len(got) == 2 and len(sent) == 1 and dst_pool.num_free_blocks == 6
    assert engine.get_transfer_metadata(sent[0]).request_id == "req-1"


def test_a_chunk_size_past_the_transfer_sends_one_chunk(worlds: list[list[SocketTransferBackend]]) -> None:
    # chunk_bytes // block_nbytes went into the header's 32-bit chunk_blocks as is: a chunk_bytes of
    # 2**45 failed every send with struct's "'I' format requires 0 <= number <= 4294967295".
    (a0, a1, _), _ = worlds
    pool = PagedKVPool(KVCacheSpec(**SPEC), 8)
    source = BlockTransfer(a0, transport="backend", timeout=10.0, same_host=False, chunk_bytes=2**45)
    ids = pool.allocate(3)
    sent: list[Any] = []
    thread = threading.Thread(target=lambda: sent.append(source.send_blocks(pool, ids, 1)), daemon=True)
    thread.start()
    dst_pool = PagedKVPool(KVCacheSpec(**SPEC), 8)
    got = BlockTransfer(a1, transport="backend", timeout=10.0, same_host=False).receive(dst_pool, 0)
    thread.join(timeout=10.0)
    assert len(sent) == 1 and got.transfer_id == sent[0] and len(got.block_ids) == 3


def test_the_latency_of_a_send_in_doubt_is_fixed_and_stays_when_it_is_settled(
        worlds: list[list[SocketTransferBackend]]) -> None:
    # latency_ms of a send in doubt was measured up to the query (the record has no completed_at while
    # it runs), so it grew with every call until a settle, and then froze at the settle's time.
    (a0, a1, _), _ = worlds
    engine = KVTransferEngine(a0, transport="backend", timeout=0.3, same_host=False)
    tid = _send_in_doubt(engine, PagedKVPool(KVCacheSpec(**SPEC), 16), a1)
    first = engine.get_transfer_metrics(tid)
    assert first["status"] == "unknown" and 300.0 <= float(first["latency_ms"]) < 10_000.0
    threading.Event().wait(0.3)
    assert engine.get_transfer_metrics(tid)["latency_ms"] == first["latency_ms"]
    _settled_by_a_later_exchange(tid, 1)
    threading.Event().wait(0.1)
    settled = engine.get_transfer_metrics(tid)
    assert settled["status"] == "completed" == engine.get_transfer_outcome(tid)
    assert settled["latency_ms"] == first["latency_ms"] and settled["bandwidth_gbps"] == first["bandwidth_gbps"]
    meta = engine.get_transfer_metadata(tid)
    assert meta.completed_at is not None and meta.started_at is not None
    assert (meta.completed_at - meta.started_at) * 1000.0 == pytest.approx(float(first["latency_ms"]))
