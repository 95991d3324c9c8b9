"""Block and handle transfers between real processes over gloo on 127.0.0.1.

Each session starts its ranks once (spawn; importing torch dominates the cost) and runs a fixed
sequence of scenarios in lockstep; the tests below assert on what each rank reported. Data checks
compare SHA-256 of the gathered bytes on both sides, so a test proves byte-exact arrival without
shipping the payload back to pytest.
"""

from __future__ import annotations

import functools
import hashlib
import math
import multiprocessing as mp
import os
import queue
import socket
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ports import free_port

torch = pytest.importorskip("torch")
pytest.importorskip("sagellm_comm")

pytestmark = pytest.mark.multiprocess

SPEC = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": "fp16", "block_size": 16}  # 512 B blocks
CHUNK_BYTES = 64 << 10  # small chunks: the 10,000-block transfer runs through 80 of them
TIMEOUT = 15.0


# --- harness ---------------------------------------------------------------------------------


def _entry(target: Callable[..., Any], rank: int, world: int, port: int, results: Any,
           pg_timeout: float | None = None) -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        from sagellm_comm import GlooBackend

        if pg_timeout is not None:  # GlooBackend.init takes no timeout: the process group's default it is
            from datetime import timedelta

            import torch.distributed.distributed_c10d as c10d

            c10d.default_pg_timeout = timedelta(seconds=pg_timeout)
        backend = GlooBackend()
        backend.init(rank, world, "127.0.0.1", port)
        results.put((rank, "ok", target(rank, backend)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)  # skip process-group teardown: a peer may be gone on purpose


def _run(target: Callable[..., Any], world: int, timeout: float = 90.0, expect_missing: int = 0,
         pg_timeout: float | None = None) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, r, world, port, results, pg_timeout), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    end = time.monotonic() + timeout
    try:
        while len(out) < world - expect_missing and time.monotonic() < end:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            if status == "error":
                pytest.fail(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert len(out) >= world - expect_missing, f"only ranks {sorted(out)} reported within {timeout}s"
    return out


def _fill(pool: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in range(pool.spec.num_layers):
        for view in (pool.key_cache(layer), pool.value_cache(layer)):
            bits = view.view(np.uint16)
            bits[...] = rng.integers(0, 1 << 16, size=bits.shape, dtype=np.uint16)


def _sha(pool: Any, ids: Any) -> str:
    return hashlib.sha256(pool.gather(np.asarray(ids, dtype=np.int32)).tobytes()).hexdigest()


def _digests(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32), dtype=np.uint8)


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any, float]:
    """(error class name or "ok", value or error details, seconds)."""
    start = time.monotonic()
    try:
        value = fn()
        return "ok", value, time.monotonic() - start
    except Exception as e:
        details = {"message": str(e), "field": getattr(e, "field", None), "context": getattr(e, "context", None)}
        return type(e).__name__, details, time.monotonic() - start


# --- two ranks: 0 sends, 1 receives ----------------------------------------------------------


def _pair_session(rank: int, backend: Any, same_host: bool = True) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, KVHandle, KVTransferEngine, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    spec = KVCacheSpec(**SPEC)
    # The gather thread on, whatever the machine (its default depends on the CPU count).
    bt = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, gather_thread=True, same_host=same_host)
    r: dict[str, Any] = {}
    if rank == 0:
        pool = PagedKVPool(spec, 13_000)
        _fill(pool, seed=7)
        for n in (1, 100, 10_000):
            ids = pool.allocate(n)[::-1].copy()  # any order: the destination keeps it
            r[f"sha{n}"] = _sha(pool, ids)
            digests = _digests(n, seed=n) if n == 100 else None
            # The largest one without a deadline (math.inf): the paths that block must accept it.
            timeout = math.inf if n == 10_000 else None
            r[f"send{n}"] = _outcome(functools.partial(bt.send_blocks, pool, ids, 1, digests=digests, timeout=timeout))
        few = pool.allocate(10)
        r["mismatch"] = _outcome(lambda: bt.send_blocks(pool, few, 1))

        def flip(k: int, payload: np.ndarray) -> None:
            if k == 1:
                payload[123] ^= 0x40

        bt._chunk_hook = flip
        r["corrupt"] = _outcome(lambda: bt.send_blocks(pool, pool.allocate(1000), 1))
        bt._chunk_hook = None
        r["full"] = _outcome(lambda: bt.send_blocks(pool, few, 1))
        # The backend's own blocking calls, gathering inline: 2 slots reused across 7 chunks.
        generic = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, transport="backend",
                                pipeline_depth=2, gather_thread=False)
        many = pool.allocate(800)
        r["sha_generic"] = _sha(pool, many)
        r["generic"] = _outcome(lambda: generic.send_blocks(pool, many, 1))

        engine = KVTransferEngine(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, same_host=same_host)
        tid = engine.send_blocks(pool, few, 1, request_id="req-7")
        r["engine_blocks"] = (str(engine.get_transfer_status(tid).value), engine.get_transfer_metadata(tid).total_bytes)
        r["zero"] = _outcome(lambda: bt.send_blocks(pool, [], 1))
        handle = KVHandle.create(16)
        data = torch.arange(2 * 16 * 8, dtype=torch.float16).reshape(2, 16, 8)
        tid = engine.transfer_kv_handle(handle, 0, 1, data)
        r["seed"] = (str(engine.get_transfer_status(tid).value), engine.get_completed_count() - 1,
                     engine.get_pending_count(), engine.get_transfer_metadata(tid).total_bytes)

        # Both directions at once between the same pair: separate tags keep them apart.
        import threading

        back = PagedKVPool(spec, 64)
        got: dict[str, Any] = {}
        t = threading.Thread(target=lambda: got.update(ids=bt.recv_blocks(back, 1)))
        t.start()
        r["both_send"] = _outcome(lambda: bt.send_blocks(pool, few, 1))
        t.join()
        r["both_sha_recv"] = _sha(back, got["ids"])
        r["sha_few"] = _sha(pool, few)

        backend.barrier()
        bt._chunk_hook = lambda k, payload: time.sleep(3.0) if k == 0 else None  # the stall
        r["stall"] = _outcome(lambda: bt.send_blocks(pool, pool.allocate(200), 1))
        return r

    pool = PagedKVPool(spec, 12_000)
    published: dict[bytes, int] = {}
    seen_at_publish: dict[str, str] = {}

    def publish(digests: np.ndarray, ids: np.ndarray) -> None:
        seen_at_publish["sha"] = _sha(pool, ids)  # the data must already be in place
        for d, i in zip(digests, ids, strict=True):
            published[d.tobytes()] = int(i)

    for n in (1, 100, 10_000):
        free_before = pool.num_free_blocks
        timeout = math.inf if n == 10_000 else None
        kind, ids, _ = _outcome(functools.partial(bt.recv_blocks, pool, 0, publish=publish, timeout=timeout))
        r[f"recv{n}"] = kind
        r[f"sha{n}"] = _sha(pool, ids) if kind == "ok" else None
        r[f"taken{n}"] = free_before - pool.num_free_blocks
        if n == 100:
            expected = {d.tobytes(): int(i) for d, i in zip(_digests(100, seed=100), ids, strict=True)}
            r["published_matches"] = published == expected
            r["sha_at_publish"] = seen_at_publish.get("sha")
    r["published_only_with_digests"] = len(published) == 100

    other = PagedKVPool(KVCacheSpec(**{**SPEC, "head_dim": 16}), 64)
    before = other.num_free_blocks
    r["mismatch"] = _outcome(lambda: bt.recv_blocks(other, 0))
    r["mismatch_free_same"] = other.num_free_blocks == before

    before = pool.num_free_blocks
    calls_before = len(published)
    r["corrupt"] = _outcome(lambda: bt.recv_blocks(pool, 0, publish=publish))
    r["corrupt_free_same"] = pool.num_free_blocks == before
    r["corrupt_not_published"] = len(published) == calls_before

    tiny = PagedKVPool(spec, 8)
    tiny.allocate(3)
    before = tiny.num_free_blocks
    r["full"] = _outcome(lambda: bt.recv_blocks(tiny, 0))
    r["full_free_same"] = tiny.num_free_blocks == before

    generic = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, transport="backend", pipeline_depth=2)
    kind, ids, _ = _outcome(lambda: generic.recv_blocks(pool, 0))
    r["generic"] = kind
    r["sha_generic"] = _sha(pool, ids) if kind == "ok" else None

    engine = KVTransferEngine(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, same_host=same_host)
    ids = engine.recv_blocks(pool, 0)
    meta = engine.get_transfer_metadata(next(iter(engine._records)))
    r["engine_blocks"] = (str(meta.status.value), meta.total_bytes, len(ids), engine.get_completed_count())
    before = pool.num_free_blocks
    zero = bt.recv_blocks(pool, 0)
    r["zero"] = (zero.dtype.name, zero.size, pool.num_free_blocks == before)
    handle = KVHandle.create(16)
    into = torch.zeros(2, 16, 8, dtype=torch.float16)
    tid = engine.transfer_kv_handle(handle, 0, 1, into)
    r["seed"] = (str(engine.get_transfer_status(tid).value), engine.get_completed_count() - 1,
                 engine.get_pending_count(), engine.get_transfer_metadata(tid).total_bytes)
    r["seed_exact"] = bool(torch.equal(into, torch.arange(2 * 16 * 8, dtype=torch.float16).reshape(2, 16, 8)))
    r["seed_handle"] = (handle.source_rank, handle.rank, handle.is_transferring, handle.transfer_id == tid)

    import threading

    sent: dict[str, Any] = {}
    mine = pool.allocate(10)
    _fill_ids(pool, mine)
    t = threading.Thread(target=lambda: sent.update(outcome=_outcome(lambda: bt.send_blocks(pool, mine, 0))))
    t.start()
    kind, ids, _ = _outcome(lambda: bt.recv_blocks(pool, 0))
    t.join()
    r["both_recv"] = kind
    r["both_sha_recv"] = _sha(pool, ids) if kind == "ok" else None
    r["both_send"] = sent["outcome"]
    r["both_sha_sent"] = _sha(pool, mine)

    backend.barrier()
    before = pool.num_free_blocks
    r["stall"] = _outcome(lambda: bt.recv_blocks(pool, 0, timeout=1.0))
    r["stall_free_same"] = pool.num_free_blocks == before
    r["broken_after"] = _outcome(lambda: bt.recv_blocks(pool, 0, timeout=1.0))
    return r


def _fill_ids(pool: Any, ids: np.ndarray) -> None:
    rng = np.random.default_rng(99)
    pool.scatter(rng.integers(0, 256, size=len(ids) * pool.block_nbytes, dtype=np.uint8), ids)


@pytest.fixture(scope="module", params=["shm", "gloo"])
def pair(request: pytest.FixtureRequest) -> dict[int, Any]:
    """Every scenario on both payload paths: the same-host ring (the default between two processes
    of one host) and the transport (``same_host=False``, as between hosts)."""
    return _run(functools.partial(_pair_session, same_host=request.param == "shm"), world=2)


def test_one_hundred_and_ten_thousand_blocks_arrive_byte_exact(pair: dict[int, Any]) -> None:
    src, dst = pair[0], pair[1]
    for n in (1, 100, 10_000):
        assert src[f"send{n}"][0] == "ok", src[f"send{n}"]
        assert dst[f"recv{n}"] == "ok"
        assert dst[f"sha{n}"] == src[f"sha{n}"]
        assert dst[f"taken{n}"] == n


def test_publish_sees_digests_after_the_data_is_in_place(pair: dict[int, Any]) -> None:
    assert pair[1]["published_matches"]
    assert pair[1]["sha_at_publish"] == pair[0]["sha100"]
    assert pair[1]["published_only_with_digests"]  # transfers without digests publish nothing


def test_spec_mismatch_is_refused_before_anything_is_reserved(pair: dict[int, Any]) -> None:
    kind, details, _ = pair[1]["mismatch"]
    assert kind == "KVMetadataMismatchError" and details["field"] == "head_dim"
    assert pair[1]["mismatch_free_same"]
    kind, details, _ = pair[0]["mismatch"]
    assert kind == "KVMetadataMismatchError" and details["field"] == "head_dim"


def test_corrupted_payload_is_detected_and_nothing_stays_reserved(pair: dict[int, Any]) -> None:
    kind, details, _ = pair[1]["corrupt"]
    assert kind == "KVChecksumMismatchError", details
    assert details["context"]["where"] == "chunk 1"
    assert pair[1]["corrupt_free_same"] and pair[1]["corrupt_not_published"]
    assert pair[0]["corrupt"][0] == "KVChecksumMismatchError"


def test_full_destination_pool_refuses_and_the_source_learns_it(pair: dict[int, Any]) -> None:
    kind, _, _ = pair[1]["full"]
    assert kind == "KVPoolFullError"
    assert pair[1]["full_free_same"]
    kind, details, _ = pair[0]["full"]
    assert kind == "KVTransferFailedError" and details["context"]["remote_status"] == "POOL_FULL"


def test_generic_backend_transport_with_inline_gather_is_byte_exact(pair: dict[int, Any]) -> None:
    assert pair[0]["generic"][0] == "ok" and pair[1]["generic"] == "ok"
    assert pair[1]["sha_generic"] == pair[0]["sha_generic"]


def test_seed_transfer_kv_handle_between_processes(pair: dict[int, Any]) -> None:
    assert pair[0]["seed"] == ("completed", 1, 0, 2 * 16 * 8 * 2)
    assert pair[1]["seed"] == ("completed", 1, 0, 2 * 16 * 8 * 2)
    assert pair[1]["seed_exact"]
    assert pair[1]["seed_handle"] == (0, 1, False, True)


def test_engine_records_block_transfers_and_empty_transfers_work(pair: dict[int, Any]) -> None:
    assert pair[0]["engine_blocks"] == ("completed", 10 * 512)
    assert pair[1]["engine_blocks"] == ("completed", 10 * 512, 10, 1)
    assert pair[0]["zero"][0] == "ok"
    assert pair[1]["zero"] == ("int32", 0, True)


def test_transfers_both_ways_at_once(pair: dict[int, Any]) -> None:
    assert pair[0]["both_send"][0] == "ok" and pair[1]["both_recv"] == "ok"
    assert pair[1]["both_sha_recv"] == pair[0]["sha_few"]
    assert pair[1]["both_send"][0] == "ok"
    assert pair[0]["both_sha_recv"] == pair[1]["both_sha_sent"]


def test_stalled_source_times_out_and_breaks_the_link(pair: dict[int, Any]) -> None:
    kind, details, seconds = pair[1]["stall"]
    assert kind == "KVTransferTimeoutError", details
    assert seconds < 2.5
    assert pair[1]["stall_free_same"]
    kind, details, seconds = pair[1]["broken_after"]
    assert kind == "KVTransferFailedError" and "unusable" in details["message"] and seconds < 0.5
    assert pair[0]["stall"][0] in ("KVTransferFailedError", "KVTransferTimeoutError")


# --- a source that dies mid-transfer ---------------------------------------------------------


def _kill_session(rank: int, backend: Any) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    pool = PagedKVPool(KVCacheSpec(**SPEC), 12_000)
    bt = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, gather_thread=True)
    if rank == 0:
        bt._chunk_hook = lambda k, payload: os._exit(1) if k == 5 else None
        bt.send_blocks(pool, pool.allocate(10_000), 1)
        return {}
    before = pool.num_free_blocks
    outcome = _outcome(lambda: bt.recv_blocks(pool, 0))
    return {"outcome": outcome, "free_same": pool.num_free_blocks == before}


def test_peer_killed_mid_transfer_frees_what_was_reserved() -> None:
    dst = _run(_kill_session, world=2, expect_missing=1)[1]
    kind, details, seconds = dst["outcome"]
    assert kind in ("KVTransferFailedError", "KVTransferTimeoutError"), details
    assert seconds < TIMEOUT + 1
    assert dst["free_same"]


# --- a tensor send that fails partway, either end dying ----------------------------------------

_BIG = 32 << 20  # float32 elements: 128 MiB, far more than the kernel's socket buffers hold


def _steady() -> None:
    """Moves every object alive now (torch's many) out of the collector's reach: a full collection of them
    stalls the thread that watches the bytes arrive for tens of milliseconds, in which the whole payload
    can arrive."""
    import gc

    gc.collect()
    gc.freeze()


def _bytes_received() -> int:
    """Bytes this process's TCP sockets have taken in so far (``tcp_info.tcpi_bytes_received``, summed):
    how far gloo's receive has got, wherever gloo puts the bytes."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as s:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:  # closed since listdir, or not a socket we can ask
            continue
        if len(info) >= 136:
            total += struct.unpack_from("Q", info, 128)[0]
    return total


def _partway(attempt: Callable[[], dict[str, Any]], attempts: int = 3) -> dict[str, Any]:
    """The first of up to ``attempts`` runs of a dying-peer session whose kill landed partway through the
    payload. The killing thread polls the bytes that have arrived; a run in which it got to act only after
    most of them were in (a stalled thread on a busy machine) did not test a partway failure, so it is run
    again rather than judged."""
    missed = []
    for _ in range(attempts):
        result = attempt()
        if "missed" not in result:
            return result
        missed.append(result["missed"])
    pytest.fail(f"no run killed the peer partway through the payload: {missed}")


def _dying_sender_session(rank: int, backend: Any, framed: bool) -> dict[str, Any]:
    import signal
    import threading

    from sagellm_kv_cache import KVHandle, KVTransferEngine

    engine = KVTransferEngine(backend, enable_checksum=framed)
    pid = torch.tensor([os.getpid()], dtype=torch.int64)
    _steady()
    if rank == 0:
        data = torch.ones(_BIG)
        backend.send(pid, 1)
        engine.transfer_kv_handle(KVHandle.create(16), 0, 1, data)  # rank 1 kills this process partway
        time.sleep(60)
        return {}
    backend.recv(pid, 0)
    out = torch.full((_BIG,), 7.0)
    box: list[Any] = []
    start = _bytes_received()
    thread = threading.Thread(target=lambda: box.append(_outcome(
        lambda: engine.transfer_kv_handle(KVHandle.create(16), 0, 1, out))))
    thread.start()
    read = 0
    while read < _BIG and thread.is_alive():  # until a quarter of the payload has arrived
        time.sleep(0.0005)
        read = _bytes_received() - start
    late = not thread.is_alive()
    os.kill(int(pid), signal.SIGKILL)
    thread.join(timeout=30.0)
    if late or read >= 2 * _BIG:
        return {"missed": f"the kill came after {read} of {4 * _BIG} payload bytes had arrived"
                          + (" and the receive had ended" if late else "")}
    (record,) = engine._records.values()
    return {"outcome": box[0] if box else None, "untouched": bool((out == 7.0).all()),
            "neither": int(((out != 7.0) & (out != 1.0)).sum()),  # neither as it was nor as sent
            "status": record.status.value, "read": read}


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"),
                    reason="needs Linux's TCP_INFO to see the bytes arrive")
@pytest.mark.parametrize("framed", [False, True])
def test_a_tensor_send_that_dies_partway_fails_the_receive(framed: bool) -> None:
    # A send that fails partway (here its process dies) over real gloo: the receive fails, recorded FAILED.
    # The framed path writes the caller's tensor only after the whole frame is in; the plain path receives
    # straight into it, where gloo writes as the bytes arrive (documented), never anything but those.
    # gloo waits for the rest of a message whose sender died until the process group's timeout (30 min
    # by default): 10 s here, so that the receive ends.
    dst = _partway(lambda: _run(functools.partial(_dying_sender_session, framed=framed), world=2,
                                expect_missing=1, pg_timeout=10.0)[1])
    assert dst["outcome"] is not None, "the receive did not end"
    kind, details, seconds = dst["outcome"]
    assert kind == "KVTransferFailedError" and seconds < 25.0, details
    assert _BIG <= dst["read"] < 4 * _BIG  # it died partway through the payload
    assert dst["status"] == "failed" and dst["neither"] <= 1, dst["neither"]  # at most the float it broke inside
    if framed:
        assert dst["untouched"]


def _dying_receiver_session(rank: int, backend: Any, framed: bool, report: str) -> dict[str, Any]:
    import signal
    import threading

    from sagellm_kv_cache import KVHandle, KVTransferEngine

    engine = KVTransferEngine(backend, enable_checksum=framed, max_retries=2, retry_backoff_ms=10.0)
    _steady()
    if rank == 1:
        out = torch.zeros(_BIG)
        backend.send(torch.zeros(1), 0)  # ready
        start = _bytes_received()

        def die_partway() -> None:
            read = 0
            while read < _BIG:  # a quarter of the payload has arrived
                time.sleep(0.0005)
                read = _bytes_received() - start
            with open(report, "w") as f:  # how far the payload had got, for the test to see
                f.write(str(read))
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=die_partway, daemon=True).start()
        engine.transfer_kv_handle(KVHandle.create(16), 0, 1, out)
        time.sleep(60)
        return {}
    data = torch.ones(_BIG)
    backend.recv(torch.zeros(1), 1)
    failed = _outcome(lambda: engine.transfer_kv_handle(KVHandle.create(16), 0, 1, data))
    (tid,) = engine._records
    after = _outcome(lambda: engine.transfer_kv_handle(KVHandle.create(16), 0, 1, data))
    return {"failed": failed, "status": engine.get_transfer_status(tid).value,
            "retries": engine.get_retry_count(tid), "after": after}


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"),
                    reason="needs Linux's TCP_INFO to see the bytes arrive")
@pytest.mark.parametrize("framed", [False, True])
def test_a_tensor_send_whose_receiver_dies_partway_fails_at_once_retries_included(framed: bool, tmp_path: Path) -> None:
    # The send itself fails and gloo closes the connection, so it delivered nothing a retry could
    # duplicate: each retry fails at once, the record is FAILED, and a framed send that failed after its
    # header leaves the link to that rank unusable. gloo notices the dead peer of a message in flight
    # only at the process group's timeout (30 min by default): 10 s here.
    report = tmp_path / "read"

    def attempt() -> dict[str, Any]:
        report.unlink(missing_ok=True)
        src = _run(functools.partial(_dying_receiver_session, framed=framed, report=str(report)), world=2,
                   expect_missing=1, pg_timeout=10.0)[0]
        read = int(report.read_text()) if report.exists() else None
        if read is None or read >= 2 * _BIG:
            return {"missed": f"the receiver died after {read} of {4 * _BIG} payload bytes had arrived"}
        return src

    src = _partway(attempt)
    kind, details, seconds = src["failed"]
    assert kind == "KVTransferFailedError" and seconds < 25.0, details
    assert details["context"]["retries"] == src["retries"] == 2 and src["status"] == "failed"
    kind, details, seconds = src["after"]
    assert kind == "KVTransferFailedError" and seconds < 1.0, details
    if framed:
        assert "is unusable after an earlier failure (a framed send to rank 1 ended between its header and " \
               "its payload)" in details["message"]


# --- three ranks: 0 and 1 send to 2 at the same time -----------------------------------------


def _fan_in_session(rank: int, backend: Any) -> dict[str, Any]:
    import threading

    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    pool = PagedKVPool(KVCacheSpec(**SPEC), 4096)
    bt = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT)
    if rank < 2:
        _fill(pool, seed=rank)
        ids = pool.allocate(1000 + rank)
        digests = _digests(len(ids), seed=10 + rank)
        return {"outcome": _outcome(lambda: bt.send_blocks(pool, ids, 2, digests=digests))[0], "sha": _sha(pool, ids)}
    published: dict[bytes, int] = {}
    lock = threading.Lock()

    def publish(digests: np.ndarray, ids: np.ndarray) -> None:
        with lock:
            published.update({d.tobytes(): int(i) for d, i in zip(digests, ids, strict=True)})

    got: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda s=s: got.update({s: bt.recv_blocks(pool, s, publish=publish)}))
               for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {d.tobytes() for s in (0, 1) for d in _digests(1000 + s, seed=10 + s)}
    return {"sha": {s: _sha(pool, got[s]) for s in got}, "published": set(published) == expected,
            "used": pool.num_used_blocks}


def test_three_processes_fan_in() -> None:
    out = _run(_fan_in_session, world=3)
    assert out[0]["outcome"] == "ok" and out[1]["outcome"] == "ok"
    assert out[2]["sha"] == {0: out[0]["sha"], 1: out[1]["sha"]}
    assert out[2]["published"]
    assert out[2]["used"] == 2001


# --- pools on a CUDA device (skipped without one) ----------------------------------------------


def _cuda_session(rank: int, backend: Any) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype="fp16", block_size=16)  # 32 KiB blocks
    pool = PagedKVPool(spec, 512, "cuda:0")
    out: dict[str, Any] = {}
    for same_host in (False, True):
        bt = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, same_host=same_host)
        if rank == 0:
            ids = pool.allocate(200)[::-1].copy()
            pool.scatter(np.random.default_rng(int(same_host)).integers(0, 256, 200 * spec.block_nbytes,
                                                                          dtype=np.uint8), ids)
            out[f"sha{same_host}"] = _sha(pool, ids)
            out[f"send{same_host}"] = _outcome(lambda bt=bt, ids=ids: bt.send_blocks(pool, ids, 1))
            # staging for a device pool is page-locked host memory (a HostSlab of the pool's device)
            cached = [b for bufs in bt._staging._free.values() for b in bufs]
            out[f"pinned{same_host}"] = bool(cached) and all(b.device == "cuda:0" for b in cached)
            pool.free(ids)
        else:
            got = bt.receive(pool, 0)
            out[f"sha{same_host}"] = _sha(pool, got.block_ids)
            out[f"path{same_host}"] = got.path
            pool.free(got.block_ids)
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pools_transfer_byte_exact_on_both_paths_through_pinned_staging() -> None:
    out = _run(_cuda_session, world=2)
    for same_host in (False, True):
        assert out[0][f"send{same_host}"][0] == "ok", out[0][f"send{same_host}"]
        assert out[1][f"sha{same_host}"] == out[0][f"sha{same_host}"]
    assert out[1]["pathTrue"] == "shm" and out[1]["pathFalse"] == "gloo"
    assert out[0]["pinnedFalse"]
