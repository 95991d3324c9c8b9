"""The same-host payload path: the memfd ring, its handover, and block transfers that use it.

The first half drives the handover directly in this process (and in a forked child that becomes
another user); the second half runs real processes over gloo on 127.0.0.1 with the harness of
``test_transfer_multiprocess``: byte-exact arrival through the ring, the fallback to gloo, and the
failure rules on this path (spec mismatch, corrupted chunk, a peer killed mid-transfer on either
side, a stalled source), each leaving the destination pool, its mappings and its descriptors as
they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import mmap
import os
import socket
import threading
import uuid
from typing import Any

import numpy as np
import pytest
from sagellm_kv_cache.transfer import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs Linux memfd, file seals and fd passing")


def _fds() -> dict[int, str]:
    """Open descriptors and what they are (not counting the one that lists them)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed by now
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _our_fds() -> dict[str, int]:
    """Descriptors this path could leak: ring memfds and Unix sockets (gloo's TCP ones come and go
    with its peers, the harness's pipes with its queues)."""
    with open("/proc/net/unix") as f:
        unix = {line.split()[6] for line in f.readlines()[1:]}
    counts = {"ring": 0, "unix": 0}
    for target in _fds().values():
        if target.startswith("/memfd:sagellm-kv-ring"):
            counts["ring"] += 1
        elif target.startswith("socket:[") and target[8:-1] in unix:
            counts["unix"] += 1
    return counts


def _offer_ring(slots: int = 2, slot_nbytes: int = 1 << 16) -> tuple[shm.ShmOffer, shm.SourceRing, uuid.UUID]:
    ring = shm.SourceRing(slots, slot_nbytes)
    tid = uuid.uuid4()
    return shm.ShmOffer(tid, lambda pid, held, r=ring: (r, held != r.ring_id)), ring, tid


# --- the handover, in one process ------------------------------------------------------------


def test_handover_maps_the_sealed_ring_read_only_and_reuses_it() -> None:
    shm.drop_mappings()
    gc.collect()  # earlier tests' garbage closes its own descriptors now, not during the comparison below
    fds_before = _fds()
    offer, ring, tid = _offer_ring()
    seals = fcntl.fcntl(ring.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    ring.slot(1)[:4] = [1, 2, 3, 4]
    mapped, channel = shm.accept_offer(os.getpid(), tid, 1024, timeout=5.0)
    offer.close()
    assert offer.handed is ring and ring.handed_to == os.getpid() and offer.channel is not None
    channel.close()
    offer.channel.close()
    assert (mapped.slots, mapped.slot_nbytes, mapped.ring_id) == (ring.slots, ring.slot_nbytes, ring.ring_id)
    assert mapped.slot(1)[:4].tolist() == [1, 2, 3, 4]
    ring.slot(3)[0] = 9  # slot 3 is slot 1 again: the same shared page
    assert mapped.slot(1)[0] == 9
    with pytest.raises(ValueError, match="read-only"):
        mapped.slot(0)[0] = 1
    # A second transfer: the destination says it holds the ring, so no descriptor travels.
    tid2 = uuid.uuid4()
    offer2 = shm.ShmOffer(tid2, lambda pid, held, r=ring: (r, held != r.ring_id))
    again, channel2 = shm.accept_offer(os.getpid(), tid2, 1024, timeout=5.0)
    offer2.close()
    channel2.close()
    assert offer2.channel is not None
    offer2.channel.close()
    assert again is mapped and shm.mapped_rings() == 1
    shm.drop_mappings()
    assert shm.mapped_rings() == 0
    ring.close()
    del mapped, again, ring, offer, offer2
    gc.collect()
    # Received descriptor, mappings, listeners, channels: all closed. (Only new ones count: a thread
    # of an earlier test may still close one of its own in between.)
    assert {fd: what for fd, what in _fds().items() if fds_before.get(fd) != what} == {}


def test_no_listener_means_no_handover() -> None:
    with pytest.raises(shm.HandoverRefused, match="no listener"):
        shm.accept_offer(os.getpid(), uuid.uuid4(), 1024, timeout=1.0)


def test_listener_of_another_process_is_not_trusted() -> None:
    tid = uuid.uuid4()
    fake_pid = 1  # we listen under pid 1's name: SO_PEERCRED shows who really listens
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(shm.socket_name(fake_pid, tid))
    listener.listen(1)
    before = _fds()
    with pytest.raises(shm.HandoverRefused, match=f"expected pid {fake_pid}"):
        shm.accept_offer(fake_pid, tid, 1024, timeout=1.0)
    assert _fds() == before
    listener.close()


def _fake_source(tid: uuid.UUID, answer: bytes, fds: list[int]) -> tuple[socket.socket, threading.Thread]:
    """A listener that answers any hello with ``answer`` and ``fds``: a source that lies."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(shm.socket_name(os.getpid(), tid))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            socket.send_fds(conn, [answer], fds) if fds else conn.sendall(answer)
            conn.recv(1)  # until the destination hangs up

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener, t


def _memfd(nbytes: int, seal: bool) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unsealed", "not sealed"),
        ("short file", "regular file"),
        ("slot below a block", "out of bounds"),
        ("too many slots", "out of bounds"),
        ("two descriptors", "2 descriptors"),
        ("other transfer", "another transfer"),
        ("reuse of an unknown ring", "not mapped here"),
        ("pipe", "regular file"),
    ],
)
def test_destination_checks_what_the_source_hands_over(case: str, message: str) -> None:
    tid = uuid.uuid4()
    slots, slot_nbytes = 2, 4096
    fd = _memfd(slots * slot_nbytes, seal=case != "unsealed")
    fds = [fd]
    answer_tid = tid.bytes
    if case == "short file":
        slots = 3
    elif case == "slot below a block":
        slot_nbytes = 512
    elif case == "too many slots":
        slots = shm.MAX_SLOTS + 1
    elif case == "two descriptors":
        fds = [fd, fd]
    elif case == "other transfer":
        answer_tid = uuid.uuid4().bytes
    elif case == "reuse of an unknown ring":
        fds = []
    elif case == "pipe":
        r, w = os.pipe()
        os.close(w)
        os.close(fd)
        fd, fds = r, [r]
    answer = shm._ANSWER.pack(shm._ANSWER_MAGIC, answer_tid, 77, slot_nbytes, slots)
    listener, thread = _fake_source(tid, answer, fds)
    before = _fds()
    with pytest.raises(shm.HandoverRefused, match=message):
        shm.accept_offer(os.getpid(), tid, 1024, timeout=5.0)
    thread.join(timeout=5)
    assert _fds() == before  # every descriptor that arrived was closed
    assert shm.mapped_rings() == 0
    listener.close()
    os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user in a child")
def test_a_process_of_another_user_cannot_attach() -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    offer, ring, tid = _offer_ring()
    ring.slot(0)[:8] = 0x5A
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the attacker: another user, knowing the socket name, the transfer id and the fd number
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            results = []
            try:
                mapped, _ = shm.accept_offer(os.getppid(), tid, 1024, timeout=2.0)
                results.append(f"mapped:{mapped.slot(0)[0]}")
            except shm.HandoverRefused as e:
                results.append(f"refused:{e}")
            try:  # the kernel's own door to the descriptor
                with open(f"/proc/{os.getppid()}/fd/{ring.fd}", "rb") as f:
                    results.append(f"opened:{f.read(1)!r}")
            except OSError as e:
                results.append(f"proc:{type(e).__name__}")
            try:  # a raw connection presenting the right hello, without any check on our side
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(2.0)
                s.connect(shm.socket_name(os.getppid(), tid))
                s.sendall(shm._HELLO.pack(shm._HELLO_MAGIC, tid.bytes, 0))
                msg, fds, _, _ = socket.recv_fds(s, 64, 2)
                results.append(f"raw:{len(fds)} fds, {len(msg)} B")
            except (ConnectionResetError, BrokenPipeError):
                results.append("raw:closed")
            os.write(write_fd, "\n".join(results).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as f:
        results = f.read().split("\n")
    assert status == 0
    assert results[0].startswith("refused:") and "uid" in results[0], results
    assert results[1] == "proc:PermissionError", results
    # The source closed the connection without sending anything (no answer, no descriptor).
    assert results[2] in ("raw:0 fds, 0 B", "raw:closed"), results
    assert any(f"uid {nobody.pw_uid}" in r for r in offer.refused), offer.refused
    # The legitimate destination still gets the ring afterwards.
    mapped, channel = shm.accept_offer(os.getpid(), tid, 1024, timeout=5.0)
    offer.close()
    channel.close()
    assert offer.channel is not None
    offer.channel.close()
    assert int(mapped.slot(0)[0]) == 0x5A
    shm.drop_mappings()
    ring.close()


@pytest.mark.parametrize("query", [False, True])
def test_wire_header_carries_the_same_host_offer(query: bool) -> None:
    from sagellm_kv_cache.transfer import wire

    boot = shm.boot_id()
    assert boot is not None
    header = wire.TransferHeader(
        transfer_id=uuid.uuid4(), num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype="bf16",
        num_blocks=9, block_nbytes=32768, chunk_blocks=4, checksum_algorithm=1, has_digests=False,
        digests_checksum=0, src_rank=3, dst_rank=1, query_id=uuid.uuid4() if query else None,
        boot_id=boot, pid=os.getpid(),
    )
    frame = np.zeros(wire.HEADER_NBYTES, dtype=np.uint8)
    header.pack(frame)
    assert wire.TransferHeader.unpack(frame) == header
    plain = wire.TransferHeader(**{**header.__dict__, "boot_id": None, "pid": 0})
    plain.pack(frame)
    assert wire.TransferHeader.unpack(frame) == plain  # no offer: neither boot id nor pid


def test_ring_is_not_in_any_file_system() -> None:
    ring = shm.SourceRing(1, mmap.PAGESIZE)
    target = os.readlink(f"/proc/self/fd/{ring.fd}")
    assert target.startswith("/memfd:sagellm-kv-ring")  # anonymous: nothing to open by name
    ring.close()


# --- block transfers between processes -------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("sagellm_comm")

from test_transfer_multiprocess import SPEC, _digests, _fill, _outcome, _run, _sha  # noqa: E402

CHUNK_BYTES = 64 << 10  # 128 blocks of 512 B per chunk: 10,000 blocks run through 79 chunks and 4 ring slots
TIMEOUT = 15.0


def _pair_session(gather_thread: bool, rank: int, backend: Any) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer
    from sagellm_kv_cache.transfer import shm as shm_mod

    spec = KVCacheSpec(**SPEC)
    # gather_thread: the source gathers chunk k+1 on a second thread while chunk k's gather finishes.
    bt = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, gather_thread=gather_thread)
    r: dict[str, Any] = {}
    if rank == 0:
        pool = PagedKVPool(spec, 13_000)
        _fill(pool, seed=11)
        for n in (1, 100, 10_000):
            ids = pool.allocate(n)[::-1].copy()
            r[f"sha{n}"] = _sha(pool, ids)
            digests = _digests(n, seed=n) if n == 100 else None
            r[f"send{n}"] = _outcome(lambda ids=ids, digests=digests: bt.send_blocks(pool, ids, 1, digests=digests))
        gc.collect()
        r["fds_after_first"] = _our_fds()
        few = pool.allocate(10)
        r["mismatch"] = _outcome(lambda: bt.send_blocks(pool, few, 1))

        def flip(k: int, payload: np.ndarray) -> None:
            if k == 1:
                payload[77] ^= 0x10  # in the ring, after the checksum was taken

        bt._chunk_hook = flip
        r["corrupt"] = _outcome(lambda: bt.send_blocks(pool, pool.allocate(1000), 1))
        bt._chunk_hook = None
        r["sha_few"] = _sha(pool, few)
        r["to_gloo_dst"] = _outcome(lambda: bt.send_blocks(pool, few, 1))  # the destination declines
        plain = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, same_host=False)
        r["from_gloo_src"] = _outcome(lambda: plain.send_blocks(pool, few, 1))
        gc.collect()
        r["fds_end"] = _our_fds()
        backend.barrier()
        bt._chunk_hook = lambda k, payload: __import__("time").sleep(3.0) if k == 0 else None
        r["stall"] = _outcome(lambda: bt.send_blocks(pool, pool.allocate(500), 1))
        return r

    pool = PagedKVPool(spec, 12_000)
    published: dict[bytes, int] = {}

    def publish(digests: np.ndarray, ids: np.ndarray) -> None:
        r["sha_at_publish"] = _sha(pool, ids)
        published.update({d.tobytes(): int(i) for d, i in zip(digests, ids, strict=True)})

    for n in (1, 100, 10_000):
        kind, got, _ = _outcome(lambda: bt.receive(pool, 0, publish=publish))
        r[f"recv{n}"] = (kind, got.path if kind == "ok" else got)
        r[f"sha{n}"] = _sha(pool, got.block_ids) if kind == "ok" else None
    r["published"] = set(published) == {d.tobytes() for d in _digests(100, seed=100)}
    r["mapped_after_three"] = shm_mod.mapped_rings()  # one ring, handed over once and reused
    gc.collect()
    fds = _our_fds()

    other = PagedKVPool(KVCacheSpec(**{**SPEC, "head_dim": 16}), 64)
    r["mismatch"] = _outcome(lambda: bt.recv_blocks(other, 0))
    r["mismatch_free_same"] = other.num_free_blocks == 64

    before, calls = pool.num_free_blocks, len(published)
    r["corrupt"] = _outcome(lambda: bt.recv_blocks(pool, 0, publish=publish))
    r["corrupt_free_same"] = pool.num_free_blocks == before and len(published) == calls

    declining = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, same_host=False)
    kind, got, _ = _outcome(lambda: declining.receive(pool, 0))
    r["to_gloo_dst"] = (kind, got.path if kind == "ok" else got, _sha(pool, got.block_ids) if kind == "ok" else None)
    kind, got, _ = _outcome(lambda: bt.receive(pool, 0))
    r["from_gloo_src"] = (kind, got.path if kind == "ok" else got, _sha(pool, got.block_ids) if kind == "ok" else None)
    gc.collect()
    r["fds"] = (fds, _our_fds())

    backend.barrier()
    before = pool.num_free_blocks
    r["stall"] = _outcome(lambda: bt.recv_blocks(pool, 0, timeout=1.0))
    r["stall_free_same"] = pool.num_free_blocks == before
    r["stall_mapped"] = shm_mod.mapped_rings()
    return r


@pytest.fixture(scope="module", params=[False, True], ids=["inline-gather", "gather-thread"])
def pair(request: pytest.FixtureRequest) -> dict[int, Any]:
    import functools

    return _run(functools.partial(_pair_session, request.param), world=2)


def test_blocks_arrive_byte_exact_through_the_ring(pair: dict[int, Any]) -> None:
    src, dst = pair[0], pair[1]
    for n in (1, 100, 10_000):
        assert src[f"send{n}"][0] == "ok", src[f"send{n}"]
        assert dst[f"recv{n}"] == ("ok", "shm"), dst[f"recv{n}"]
        assert dst[f"sha{n}"] == src[f"sha{n}"]
    assert dst["published"] and dst["sha_at_publish"] == src["sha100"]
    assert dst["mapped_after_three"] == 1


def test_spec_mismatch_on_the_same_host(pair: dict[int, Any]) -> None:
    for rank in (0, 1):
        kind, details, _ = pair[rank]["mismatch"]
        assert kind == "KVMetadataMismatchError" and details["field"] == "head_dim"
    assert pair[1]["mismatch_free_same"]


def test_chunk_damaged_in_the_ring_is_refused_and_nothing_is_kept(pair: dict[int, Any]) -> None:
    kind, details, _ = pair[1]["corrupt"]
    assert kind == "KVChecksumMismatchError" and details["context"]["where"] == "chunk 1", details
    assert details["context"]["path"] == "shm"
    assert pair[1]["corrupt_free_same"]
    assert pair[0]["corrupt"][0] == "KVChecksumMismatchError"


def test_either_side_can_decline_and_the_payload_goes_over_gloo(pair: dict[int, Any]) -> None:
    for case in ("to_gloo_dst", "from_gloo_src"):
        assert pair[0][case][0] == "ok", pair[0][case]
        assert pair[1][case] == ("ok", "gloo", pair[0]["sha_few"]), pair[1][case]


def test_no_descriptor_leaks_across_transfers(pair: dict[int, Any]) -> None:
    before, after = pair[1]["fds"]
    assert before == {"ring": 1, "unix": 0}  # the mapping of the one ring it was handed
    # A refused transfer (the damaged chunk) drops the mapping; the next one gets the ring again.
    assert after["unix"] == 0 and after["ring"] <= 1
    assert pair[0]["fds_end"] == pair[0]["fds_after_first"]  # the ring's one descriptor, nothing per transfer


def test_stalled_source_times_out_and_the_ring_is_dropped(pair: dict[int, Any]) -> None:
    kind, details, seconds = pair[1]["stall"]
    assert kind == "KVTransferTimeoutError", (details, pair[0]["stall"])
    assert seconds < 2.5
    assert pair[1]["stall_free_same"] and pair[1]["stall_mapped"] == 0
    assert pair[0]["stall"][0] in ("KVTransferFailedError", "KVTransferTimeoutError")


def _kill_session(victim: int, gather_thread: bool, rank: int, backend: Any) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer
    from sagellm_kv_cache.transfer import shm as shm_mod

    class DyingPool(PagedKVPool):
        """Exits the process in the middle of the destination's scatters."""

        calls = 0

        def scatter_summed(self, data: Any, block_ids: Any, sums: Any) -> None:  # the receiver's (segsum64) scatter
            DyingPool.calls += 1
            if DyingPool.calls == 5:
                os._exit(1)
            super().scatter_summed(data, block_ids, sums)

    spec = KVCacheSpec(**SPEC)
    bt = BlockTransfer(backend, chunk_bytes=CHUNK_BYTES, timeout=TIMEOUT, gather_thread=gather_thread)
    if rank == 0:
        pool = PagedKVPool(spec, 12_000)
        if victim == 0:
            bt._chunk_hook = lambda k, payload: os._exit(1) if k == 5 else None
        gc.collect()
        fds = _our_fds()
        outcome = _outcome(lambda: bt.send_blocks(pool, pool.allocate(10_000), 1))
        gc.collect()  # a failed call's frames may sit in a reference cycle for a while
        # What stays: the ring's descriptor and its mapping's, kept for the next transfer to this rank.
        after = _our_fds()
        return {"outcome": outcome, "fds_added": {k: after[k] - fds[k] for k in after}}
    pool = DyingPool(spec, 12_000) if victim == 1 else PagedKVPool(spec, 12_000)
    gc.collect()
    fds = _our_fds()
    before = pool.num_free_blocks
    outcome = _outcome(lambda: bt.recv_blocks(pool, 0))
    gc.collect()  # the mapping of the dropped ring goes with the failed call's frames
    return {"outcome": outcome, "free_same": pool.num_free_blocks == before, "mapped": shm_mod.mapped_rings(),
            "fds_same": _our_fds() == fds}


@pytest.mark.parametrize("gather_thread", [False, True], ids=["inline-gather", "gather-thread"])
def test_source_killed_mid_transfer_leaves_the_destination_as_it_was(gather_thread: bool) -> None:
    import functools

    dst = _run(functools.partial(_kill_session, 0, gather_thread), world=2, expect_missing=1)[1]
    kind, details, seconds = dst["outcome"]
    assert kind in ("KVTransferFailedError", "KVTransferTimeoutError"), details
    assert seconds < 5.0  # the channel reads end of file at once
    assert dst["free_same"] and dst["mapped"] == 0 and dst["fds_same"]


@pytest.mark.parametrize("gather_thread", [False, True], ids=["inline-gather", "gather-thread"])
def test_destination_killed_mid_transfer_fails_the_source(gather_thread: bool) -> None:
    import functools

    src = _run(functools.partial(_kill_session, 1, gather_thread), world=2, expect_missing=1)[0]
    kind, details, seconds = src["outcome"]
    assert kind == "KVTransferFailedError", details  # not every chunk had gone: no doubt about the outcome
    assert seconds < 5.0
    assert src["fds_added"] == {"ring": 2, "unix": 0}
