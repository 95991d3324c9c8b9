"""KVTransferPipeline (concurrent transfers with futures), CommTransferBackendAdapter, and the TCP
SocketTransferBackend between two ranks in one process (real sockets on localhost)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from ports import free_port
from sagellm_kv_cache import (
    KVCacheError,
    KVCacheSpec,
    KVHandle,
    KVMetadataMismatchError,
    KVTransferFailedError,
    KVTransferTimeoutError,
    PagedKVPool,
)
from sagellm_kv_cache.transfer import (
    CommTransferBackendAdapter,
    KVTransferEngine,
    KVTransferPipeline,
    SocketTransferBackend,
)
from sagellm_kv_cache.transfer.engine import _FLAG_CRC32, _FRAME_MAGIC
from sagellm_protocol.kv import TransferStatus

torch = pytest.importorskip("torch")


class SlowBackend:
    def __init__(self, rank: int = 0) -> None:
        self.rank, self.sent = rank, 0
        self.lock = threading.Lock()

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return 2

    def send(self, tensor: Any, dst: int) -> None:
        time.sleep(0.05)
        with self.lock:
            self.sent += 1

    def recv(self, tensor: Any, src: int) -> None:
        tensor.fill_(3)


def test_pipeline_runs_transfers_concurrently() -> None:
    backend = SlowBackend()
    pipeline = KVTransferPipeline(KVTransferEngine(backend), max_workers=4)
    assert pipeline.get_stats() == {"submitted": 0, "completed": 0, "failed": 0, "in_flight": 0}
    done: list[tuple[bool, Exception | None]] = []
    started = time.monotonic()
    futures = [pipeline.submit(KVHandle.create(8), 0, 1, torch.ones(4),
                               on_done=lambda tid, err: done.append((tid is not None, err))) for _ in range(8)]
    ids = pipeline.wait_all(timeout=10)
    assert time.monotonic() - started < 8 * 0.05  # overlapped, not one after another
    assert sorted(ids) == sorted(f.result() for f in futures) and all(isinstance(i, uuid.UUID) for i in ids)
    assert backend.sent == 8 and done == [(True, None)] * 8
    assert pipeline.get_stats() == {"submitted": 8, "completed": 8, "failed": 0, "in_flight": 0}
    bad = pipeline.submit(KVHandle.create(8), 0, 0, torch.ones(4))
    with pytest.raises(ValueError, match="cannot be the same"):
        bad.result()
    assert pipeline.wait_all() == [] and pipeline.get_stats()["failed"] == 1 and pipeline.pending_count() == 0
    pipeline.shutdown()
    with pytest.raises(RuntimeError, match="already shut down"):
        pipeline.submit(KVHandle.create(8), 0, 1, torch.ones(4))
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        KVTransferPipeline(KVTransferEngine(backend), max_workers=0)


def test_adapter_delegates_and_names_the_link() -> None:
    inner = SlowBackend(rank=1)
    adapter = CommTransferBackendAdapter(inner, interconnect="nvlink")
    assert (adapter.interconnect, adapter.get_rank(), adapter.get_world_size()) == ("nvlink", 1, 2)
    out = torch.zeros(4)
    KVTransferEngine(adapter).transfer_kv_handle(KVHandle.create(4), 0, 1, out)
    assert torch.equal(out, torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="comm_backend cannot be None"):
        CommTransferBackendAdapter(None)
    with pytest.raises(TypeError, match="send"):
        CommTransferBackendAdapter(object())
    with pytest.raises(ValueError, match="interconnect"):
        CommTransferBackendAdapter(inner, interconnect="")


@pytest.fixture
def pair() -> Iterator[tuple[SocketTransferBackend, SocketTransferBackend]]:
    endpoints = {0: ("127.0.0.1", free_port()), 1: ("127.0.0.1", free_port())}
    a = SocketTransferBackend(rank=0, world_size=2, endpoints=endpoints, recv_timeout_s=0.5)
    b = SocketTransferBackend(rank=1, world_size=2, endpoints=endpoints, recv_timeout_s=0.5)
    a.start()
    b.start()
    yield a, b
    a.close()
    b.close()


def test_socket_backend_moves_tensors_and_arrays(pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    a, b = pair
    data = torch.arange(64, dtype=torch.bfloat16).reshape(8, 8)
    a.send(data, 1)
    out = torch.zeros_like(data)
    b.recv(out, 0)
    assert torch.equal(out, data)
    b.send(np.arange(5, dtype=np.int64), 0)
    got = np.zeros(5, dtype=np.int64)
    a.recv(got, 1)
    np.testing.assert_array_equal(got, np.arange(5))


def test_socket_backend_under_the_engine_with_checksums(
        pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    a, b = pair
    sender, receiver = KVTransferEngine(a, enable_checksum=True), KVTransferEngine(b, enable_checksum=True)
    handle = KVHandle.create(16)
    data = torch.randn(16, 4)
    out = torch.zeros(16, 4)
    thread = threading.Thread(target=sender.transfer_kv_handle, args=(handle.model_copy(), 0, 1, data))
    thread.start()
    tid = receiver.transfer_kv_handle(handle, 0, 1, out)
    thread.join()
    assert torch.equal(out, data) and receiver.get_transfer_metrics(tid)["checksum"] != ""


@pytest.mark.parametrize("receiver_retries", [False, True])
def test_a_framed_send_retried_after_its_payload_failed_sends_one_frame(
        pair: tuple[SocketTransferBackend, SocketTransferBackend], receiver_retries: bool) -> None:
    # The retry sent the header again: the receiver took the second header for the payload (a size
    # mismatch) and the real payload was left for the next transfer to read as its header. With
    # receiver_retries the receiver's wait for the payload times out (0.5 s) before the sender's retry
    # (0.8 s): the receiver's retry must then wait for that payload too, not read it as a header.
    a, b = pair
    a.send(torch.zeros(1), 1)  # the connection that the payload's failure resets
    b.recv(torch.zeros(1), 0)
    data = torch.arange(8 << 20, dtype=torch.int32)  # 32 MiB: more than the kernel buffers
    sender = KVTransferEngine(a, enable_checksum=True, max_retries=1, retry_backoff_ms=800 if receiver_retries else 100)
    receiver = KVTransferEngine(b, enable_checksum=True, max_retries=5 if receiver_retries else 0, retry_backoff_ms=0)
    b._max_message_bytes = 1 << 20  # rank 1 closes the connection on the payload's length: a real reset
    sent: list[Any] = []
    thread = threading.Thread(target=lambda: sent.append(sender.transfer_kv_handle(KVHandle.create(16), 0, 1, data)))
    thread.start()
    deadline = time.monotonic() + 10.0
    while b._accepted and time.monotonic() < deadline:  # until rank 1's reader has dropped the connection
        time.sleep(0.005)
    b._max_message_bytes = 1 << 34  # the retry's payload gets through
    out = torch.zeros_like(data)
    got = receiver.transfer_kv_handle(KVHandle.create(16), 0, 1, out)
    thread.join(timeout=10.0)
    assert len(sent) == 1 and torch.equal(out, data)
    assert sender.get_retry_count(sent[0]) == 1 and sender.get_transfer_outcome(sent[0]) == "completed"
    assert (receiver.get_retry_count(got) > 0) == receiver_retries
    assert receiver.get_transfer_outcome(got) == "completed"
    small = torch.arange(16, dtype=torch.float32)  # the link is in step: the next frame is the next thing on it
    thread = threading.Thread(target=sender.transfer_kv_handle, args=(KVHandle.create(4), 0, 1, small))
    thread.start()
    after = torch.zeros(16)
    receiver.transfer_kv_handle(KVHandle.create(4), 0, 1, after)
    thread.join(timeout=10.0)
    assert torch.equal(after, small) and not b._inboxes[0]


@pytest.mark.parametrize(("damage", "late_payload", "error", "why"), [
    ((0, 1 << 16), False, "'frame_magic'", rf"damaged frame header from rank 0 \(magic {_FRAME_MAGIC ^ 1 << 16:#x}\)"),
    ((2, 1 << 40), False, "'payload_bytes'", r"announced 1099511627840 payload bytes \(damaged, or a larger"),
    ((2, 1 << 63), False, "'payload_bytes'", r"announced -9223372036854775744 payload bytes"),
    # not damaged, but the payload comes after the receiver gave up waiting for it (recv_timeout_s 0.5 s)
    ((3, 1 << 6), True, "'total_bytes'", r"reading off the 64-byte payload of a refused frame from rank 0 failed"),
    (None, True, "timed out", r"a framed receive from rank 0 ended between its header and its payload"),
])
def test_a_frame_whose_payload_is_left_on_the_link_makes_it_unusable(
        pair: tuple[SocketTransferBackend, SocketTransferBackend], damage: tuple[int, int] | None,
        late_payload: bool, error: str, why: str) -> None:
    # The receiver refused the header and went on using the link: the payload it left there (its size
    # unknown, or not read in time) was read by the next transfer as its header.
    a, b = pair
    data = torch.arange(16, dtype=torch.float32)
    raw = data.numpy().tobytes()
    header = [_FRAME_MAGIC, _FLAG_CRC32, len(raw), len(raw), zlib.crc32(raw)]  # the sender's real header
    if damage is not None:
        field, bit = damage
        header[field] ^= bit  # one bit flipped on its way
    receiver = KVTransferEngine(b, enable_checksum=True)
    out = torch.full((16,), 7.0)
    a.send(torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in header], dtype=torch.int64), 1)
    if not late_payload:
        a.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), 1)
    with pytest.raises(KVCacheError, match=error) as info:
        receiver.transfer_kv_handle(KVHandle.create(4), 0, 1, out)
    if late_payload:
        a.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), 1)
    (failed,) = receiver._records
    assert receiver.get_transfer_status(failed) == TransferStatus.FAILED and "unusable" in str(info.value.context)
    KVTransferEngine(a, enable_checksum=True).transfer_kv_handle(KVHandle.create(4), 0, 1, data)  # a good frame
    deadline = time.monotonic() + 5.0
    while len(b._inboxes[0]) < 3 and time.monotonic() < deadline:  # the stale payload and the good frame
        time.sleep(0.005)
    for peer_sends in (False, True):  # neither direction: the process group must be made anew
        with pytest.raises(KVTransferFailedError, match=f"the link to rank 0 is unusable after an earlier failure "
                                                        f"\\(.*{why}.*\\); re-create the process group") as refused:
            receiver.transfer_kv_handle(KVHandle.create(4), 1 if peer_sends else 0, 0 if peer_sends else 1, out)
        assert receiver.get_transfer_status(refused.value.transfer_id) == TransferStatus.FAILED
    assert torch.equal(out, torch.full((16,), 7.0))  # the destination is as it was
    assert len(b._inboxes[0]) == 3  # nothing more was read off the link


def test_a_framed_send_that_fails_after_its_header_makes_the_link_unusable(
        pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    # With no retry left, the sender went on: its next header reached a receiver still waiting for the
    # payload of the first, which took that header for the payload.
    a, b = pair
    a.send(torch.zeros(1), 1)  # the connection that the payload's failure resets
    b.recv(torch.zeros(1), 0)
    b._max_message_bytes = 1 << 20  # rank 1 closes the connection on the payload's length: a real reset
    sender = KVTransferEngine(a, enable_checksum=True)
    with pytest.raises(KVTransferFailedError, match="send failed") as info:
        sender.transfer_kv_handle(KVHandle.create(16), 0, 1, torch.arange(8 << 20, dtype=torch.int32))
    assert info.value.context["link"] == "unusable: a framed send to rank 1 ended between its header and its payload"
    b._max_message_bytes = 1 << 34
    with pytest.raises(KVTransferFailedError, match=r"the link to rank 1 is unusable after an earlier failure \(a "
                                                    r"framed send to rank 1 ended .*\); re-create the process group"):
        sender.transfer_kv_handle(KVHandle.create(4), 0, 1, torch.ones(16))
    time.sleep(0.05)
    assert len(b._inboxes[0]) == 1  # the first header alone: nothing was sent after it


def _wait_for(inbox: Any, count: int) -> None:
    deadline = time.monotonic() + 5.0
    while len(inbox) < count and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.parametrize("transport", ["backend", "auto"])  # auto: the backend's calls, as it is not gloo
def test_a_damaged_frame_makes_the_stream_unusable_for_block_transfers_too(
        pair: tuple[SocketTransferBackend, SocketTransferBackend], transport: str) -> None:
    # The tensor link was refused, but the engine's block transfers run over the same untagged stream
    # and went on using it: a receive read the frame's stale payload as its header, a send waited out
    # its deadline for a reply.
    a, b = pair
    receiver = KVTransferEngine(b, enable_checksum=True, transport=transport, timeout=2.0)
    a.send(torch.tensor([_FRAME_MAGIC ^ 1 << 16, _FLAG_CRC32, 64, 64, 0], dtype=torch.int64), 1)
    a.send(torch.zeros(64, dtype=torch.uint8), 1)  # its payload: the receiver cannot know its size
    with pytest.raises(KVMetadataMismatchError, match="'frame_magic'"):
        receiver.transfer_kv_handle(KVHandle.create(4), 0, 1, torch.zeros(16))
    _wait_for(b._inboxes[0], 1)
    pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="fp16", block_size=16), 4)
    started = time.monotonic()
    for call in (lambda: receiver.recv_blocks(pool, 0), lambda: receiver.send_blocks(pool, [0, 1], 0)):
        with pytest.raises(KVTransferFailedError, match=r"the link to rank 0 is unusable after an earlier failure "
                                                        r"\(a damaged frame header from rank 0"):
            call()
    assert time.monotonic() - started < 1.0 and receiver.blocks.is_broken(0)
    time.sleep(0.05)
    assert len(b._inboxes[0]) == 1 and not a._inboxes[1]  # nothing was read off the stream, nor sent on it
    assert pool.num_free_blocks == 4


def test_a_block_transfer_that_breaks_the_stream_makes_tensor_transfers_refuse_it(
        pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    # The block send's header is on the stream with no reply read for it; a tensor sent after it was
    # reported COMPLETED, though the peer reads that header first.
    a, b = pair
    sender = KVTransferEngine(b, transport="backend")
    pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="fp16", block_size=16), 4)
    with pytest.raises(KVTransferTimeoutError):
        sender.send_blocks(pool, [0, 1], 0, timeout=0.2)  # rank 0 never answers
    _wait_for(a._inboxes[1], 1)
    for peer_sends in (False, True):
        with pytest.raises(KVTransferFailedError, match=r"the link to rank 0 is unusable after an earlier failure "
                                                        r"\(timeout during header") as refused:
            sender.transfer_kv_handle(KVHandle.create(4), 0 if peer_sends else 1, 1 if peer_sends else 0,
                                      torch.ones(16))
        assert sender.get_transfer_status(refused.value.transfer_id) == TransferStatus.FAILED
    time.sleep(0.05)
    assert len(a._inboxes[1]) == 1  # the block header alone


def test_block_transfers_on_their_own_tags_keep_their_stream_when_the_tensor_link_breaks(
        pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    # transport="torch": torch.distributed messages on tags of their own, another stream.
    a, b = pair
    receiver = KVTransferEngine(b, enable_checksum=True, transport="torch")
    a.send(torch.tensor([_FRAME_MAGIC ^ 1, _FLAG_CRC32, 64, 64, 0], dtype=torch.int64), 1)
    with pytest.raises(KVMetadataMismatchError, match="'frame_magic'"):
        receiver.transfer_kv_handle(KVHandle.create(4), 0, 1, torch.zeros(16))
    assert not receiver.blocks.is_broken(0)


def test_socket_backend_errors(pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    a, b = pair
    started = time.monotonic()
    with pytest.raises(KVTransferTimeoutError, match="timed out"):
        b.recv(torch.zeros(2), 0)
    assert time.monotonic() - started >= 0.45
    a.send(torch.ones(3), 1)
    out = torch.zeros(8)
    with pytest.raises(KVMetadataMismatchError, match="nbytes"):
        b.recv(out, 0)
    assert torch.equal(out, torch.zeros(8))
    for bad in (5, 0, -1):
        with pytest.raises(ValueError):
            a.send(torch.ones(1), bad)
    with pytest.raises(ValueError, match="endpoints has no"):
        SocketTransferBackend(rank=0, world_size=2, endpoints={0: ("127.0.0.1", 1)})
    with pytest.raises(ValueError, match="rank must be in"):
        SocketTransferBackend(rank=2, world_size=2, endpoints={0: ("h", 1), 1: ("h", 2)})
    idle = SocketTransferBackend(rank=0, world_size=2, endpoints={0: ("127.0.0.1", 1), 1: ("127.0.0.1", 2)})
    with pytest.raises(RuntimeError, match="start"):
        idle.recv(torch.zeros(1), 1)


def test_socket_backend_drops_foreign_traffic(pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    a, b = pair
    with socket.create_connection(b._endpoints[1]) as rogue:
        rogue.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)
    a.send(torch.ones(2), 1)
    out = torch.zeros(2)
    b.recv(out, 0)  # the real message still arrives; the rogue bytes were never filed
    assert torch.equal(out, torch.ones(2))


def test_connections_that_come_and_go_cost_no_descriptor_or_thread(
        pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    a, b = pair
    a.send(np.arange(4, dtype=np.int32), 1)  # one real peer connection stays open throughout
    got = np.zeros(4, dtype=np.int32)
    b.recv(got, 0)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(200):  # a reconnecting peer, a health check, a port scanner
        with socket.create_connection(b._endpoints[1]) as conn:
            if i % 2:
                conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # not our protocol: dropped
    def settled() -> bool:  # the readers of the dropped connections have exited
        return len(b._accepted) == 1 and len(b._threads) == 2 and len(os.listdir("/proc/self/fd")) <= before

    deadline = time.monotonic() + 10.0  # generous for a loaded machine; settles in milliseconds
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The peer's connection and its reader, the accept loop, and no descriptor more than before.
    assert (len(b._accepted), len(b._threads)) == (1, 2)
    assert len(os.listdir("/proc/self/fd")) <= before
    a.send(np.arange(4, dtype=np.int32) + 1, 1)  # the link still works
    b.recv(got, 0)
    assert got.tolist() == [1, 2, 3, 4]


def test_a_restarted_peer_gets_the_next_message(pair: tuple[SocketTransferBackend, SocketTransferBackend]) -> None:
    a, b = pair
    a.send(np.arange(3, dtype=np.int32), 1)
    got = np.zeros(3, dtype=np.int32)
    b.recv(got, 0)
    b.close()  # rank 1 goes away with a's connection to it, and comes back on the same port
    restarted = SocketTransferBackend(rank=1, world_size=2, endpoints=b._endpoints, recv_timeout_s=2.0)
    restarted.start()
    try:
        time.sleep(0.05)  # the old connection's end of stream has reached a
        a.send(np.arange(3, dtype=np.int32) + 7, 1)  # on the closed connection it would be lost
        restarted.recv(got, 0)
        assert got.tolist() == [7, 8, 9]
    finally:
        restarted.close()


_FD_LIMITED_LISTENER = """
import os, resource, sys, threading
from sagellm_kv_cache.transfer import SocketTransferBackend
endpoints = {0: ("127.0.0.1", int(sys.argv[1])), 1: ("127.0.0.1", 9)}
backend = SocketTransferBackend(rank=0, world_size=2, endpoints=endpoints)
backend.start()
# Three more descriptors at most: accept() fails with EMFILE once three connections are held.
resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 4,
                                            resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
for _ in sys.stdin:
    alive = any(t.name.startswith("kv-socket-accept") and t.is_alive() for t in threading.enumerate())
    print(len(backend._accepted), alive, flush=True)
"""


def test_socket_backend_keeps_listening_through_the_descriptor_limit() -> None:
    # At the fd limit accept() fails with EMFILE: the listener must wait for descriptors to come
    # back, not end (it used to return, and the rank never accepted a connection again).
    import subprocess
    import sys
    from pathlib import Path

    import sagellm_kv_cache

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(sagellm_kv_cache.__file__).resolve().parent.parent)}
    with subprocess.Popen([sys.executable, "-c", _FD_LIMITED_LISTENER, str(port)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdin is not None and child.stdout is not None
        stdin, stdout = child.stdin, child.stdout

        def ask() -> tuple[int, bool]:
            stdin.write("?\n")
            stdin.flush()
            count, alive = stdout.readline().split()
            return int(count), alive == "True"

        try:
            assert stdout.readline().strip() == "ready"
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
            deadline = time.monotonic() + 5
            while ask()[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # the listener runs into the limit with the rest
            held, alive = ask()
            assert 0 < held < 8 and alive  # some taken, the rest refused for want of descriptors
            for client in clients[:held]:  # those connections end: their descriptors come back
                client.close()
            deadline = time.monotonic() + 5
            while (state := ask())[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state[0] > 0 and state[1]  # the waiting connections were taken after all
            for client in clients[held:]:
                client.close()
        finally:
            child.kill()
