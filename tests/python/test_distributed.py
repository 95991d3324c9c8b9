"""Distributed pooling: the seed's interfaces, and the global pool over per-node KVPools with remote
fetch over a KVTransferEngine (two ranks joined by an in-memory pipe)."""

from __future__ import annotations

import math
import uuid
from collections import deque
from typing import Any

import numpy as np
import pytest
from sagellm_kv_cache import KVBudgetExceededError, KVHandle, KVHandleNotFoundError, KVNotImplementedError
from sagellm_kv_cache.distributed import (
    GlobalKVPoolManager,
    LocalGlobalKVPoolManager,
    NodeContribution,
    RemoteKVAccessor,
    TransferRemoteKVAccessor,
)
from sagellm_kv_cache.transfer import KVTransferEngine

GIB_TOKENS = (1 << 30) // 32  # tokens per contributed GiB at 32 bytes per token


def nodes(*contributed: float) -> list[NodeContribution]:
    return [NodeContribution(rank, 100.0, gb, 10.0, ["gpu", "cpu"]) for rank, gb in enumerate(contributed)]


def test_node_contribution_checks() -> None:
    node = NodeContribution(0, 80.0, 60.0, 10.0, ["gpu"])
    assert repr(node) == ("NodeContribution(node_rank=0, total_memory_gb=80.0, contributed_memory_gb=60.0, "
                          "reserved_memory_gb=10.0, storage_tiers=['gpu'])")
    assert node == NodeContribution(0, 80.0, 60.0, 10.0, ["gpu"])
    with pytest.raises(ValueError, match=r"Contributed \(20.0GB\) \+ Reserved \(0.0GB\) > Total \(10.0GB\)"):
        NodeContribution(0, 10.0, 20.0, 0.0, [])
    with pytest.raises(ValueError, match="Memory sizes must be non-negative"):
        NodeContribution(0, 10.0, -1.0, 0.0, [])
    # NaN passed every check (a NaN total made a working node reporting nan GB; a NaN or infinite
    # contribution failed later in the manager as an unnamed ValueError / OverflowError); a str was
    # a TypeError from '<'
    for field, args in (("total_memory_gb", (float("nan"), 1.0, 0.0)), ("contributed_memory_gb", (10.0, math.nan, 0.0)),
                        ("reserved_memory_gb", (10.0, 1.0, math.nan)), ("total_memory_gb", (math.inf, math.inf, 0.0)),
                        ("total_memory_gb", (10**400, 1.0, 0.0))):
        with pytest.raises(ValueError, match=f"{field} must be finite"):
            NodeContribution(0, *args, [])
    with pytest.raises(TypeError, match="contributed_memory_gb must be a number of GiB, got str"):
        NodeContribution(0, 10.0, "1", 0.0, [])  # type: ignore[arg-type]
    # storage_tiers=None broke get_global_stats later ('NoneType' object is not iterable), "ssd" was
    # reported as ['s', 's', 'd']; a str rank failed only when the node joined a global pool.
    for tiers in (None, "ssd", ["gpu", 3]):
        with pytest.raises(TypeError, match="storage_tiers must be a list of tier names"):
            NodeContribution(0, 10.0, 1.0, 0.0, tiers)  # type: ignore[arg-type]
    for rank in ("0", None, True):
        with pytest.raises(TypeError, match="node_rank must be an int"):
            NodeContribution(rank, 10.0, 1.0, 0.0, [])  # type: ignore[arg-type]
    assert NodeContribution(1, 10.0, 1.0, 0.0, ("ssd",)).storage_tiers == ("ssd",)


def test_interfaces_are_abstract() -> None:
    for cls in (GlobalKVPoolManager, RemoteKVAccessor):
        with pytest.raises(TypeError, match="abstract"):
            cls() if cls is RemoteKVAccessor else cls(nodes(1.0))  # type: ignore[abstract]


def test_allocation_prefers_the_asked_node_then_the_emptiest() -> None:
    manager = LocalGlobalKVPoolManager(nodes(1.0, 2.0))
    stats = manager.get_global_stats()
    assert stats["total_capacity_tokens"] == 3 * GIB_TOKENS and stats["num_nodes"] == 2
    a = manager.alloc(1000, "fp16", "contiguous", "cpu", preferred_node=0)
    b = manager.alloc(1000, "fp16", "contiguous", "cpu")
    assert (a.node_rank, b.node_rank) == (0, 1)  # node 1 has more room
    big = manager.alloc(GIB_TOKENS, "fp16", "contiguous", "cpu", preferred_node=0)
    assert big.node_rank == 1  # node 0 cannot take it any more
    stats = manager.get_global_stats()
    assert stats["allocated_tokens"] == 2000 + GIB_TOKENS
    assert stats["per_node_stats"][0]["contributed_memory_gb"] == 1.0
    with pytest.raises(KVBudgetExceededError, match="Budget exceeded: requested"):
        manager.alloc(2 * GIB_TOKENS, "fp16", "contiguous", "cpu")
    assert manager.get_global_stats()["allocated_tokens"] == 2000 + GIB_TOKENS
    for handle in (a, b, big):
        manager.free(handle)
    assert manager.get_global_stats()["allocated_tokens"] == 0


def test_bad_input_and_foreign_handles() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        LocalGlobalKVPoolManager([])
    with pytest.raises(ValueError, match="distinct"):
        LocalGlobalKVPoolManager([*nodes(1.0), *nodes(1.0)])
    with pytest.raises(ValueError, match="no usable memory"):
        LocalGlobalKVPoolManager(nodes(0.0))
    manager = LocalGlobalKVPoolManager(nodes(1.0))
    with pytest.raises(ValueError, match="unknown node rank 5"):
        manager.alloc(10, "fp16", "contiguous", "cpu", preferred_node=5)
    with pytest.raises(KVHandleNotFoundError):
        manager.free(KVHandle.create(10, node_rank=3))
    with pytest.raises(KVHandleNotFoundError):
        manager.free(KVHandle.create(10))
    with pytest.raises(KVNotImplementedError, match="rebalance"):
        manager.rebalance()
    handle = manager.alloc(10, "fp16", "contiguous", "cpu")
    assert manager.get(handle, current_rank=0).handle_id == handle.handle_id
    with pytest.raises(KVNotImplementedError, match="RemoteKVAccessor"):
        manager.get(handle, current_rank=1)
    with pytest.raises(TypeError, match="current_rank must be an int, got str"):  # was taken for a remote rank
        manager.get(handle, current_rank="0")  # type: ignore[arg-type]


# --- remote fetch ---------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


class PipeBackend:
    def __init__(self, rank: int, frames: deque[Any]) -> None:
        self.rank, self.frames = rank, frames

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return 2

    def send(self, tensor: Any, dst: int) -> None:
        self.frames.append(tensor.clone())

    def recv(self, tensor: Any, src: int) -> None:
        tensor.copy_(self.frames.popleft())


def test_remote_get_and_prefetch_over_a_transfer_engine() -> None:
    frames: deque[Any] = deque()

    def buffer(handle: KVHandle) -> Any:
        return torch.zeros(handle.num_tokens, 4)

    owner = TransferRemoteKVAccessor(KVTransferEngine(PipeBackend(0, frames)), buffer)
    reader = TransferRemoteKVAccessor(KVTransferEngine(PipeBackend(1, frames), enable_checksum=True), buffer)
    owner.engine.enable_checksum = True
    manager = LocalGlobalKVPoolManager(nodes(1.0, 1.0), accessor=reader)
    handle = manager.alloc(8, "fp16", "contiguous", "cpu", preferred_node=0)
    data = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    assert reader.is_remote(handle, 1) and not reader.is_remote(handle, 0)

    owner.serve(handle, 1, data)
    assert torch.equal(manager.get(handle, current_rank=1), data)

    owner.serve(handle, 1, data * 2)
    reader.prefetch(handle, 1)
    assert torch.equal(reader.fetch(handle, 1), data * 2)
    with pytest.raises(ValueError, match="local"):
        reader.fetch(handle, 0)
    reader.close()
    owner.close()
    assert uuid.UUID(str(handle.handle_id))


def test_accessor_checks_handle_and_rank_before_any_transfer() -> None:
    # A str rank never equals a node rank, so every handle read as remote and prefetch started a
    # receive from rank 0 into rank '1' in the background; a non-handle was an AttributeError.
    frames: deque[Any] = deque()
    reader = TransferRemoteKVAccessor(KVTransferEngine(PipeBackend(1, frames)), lambda h: torch.zeros(4))
    handle = KVHandle.create(4, node_rank=0)
    for call in (reader.is_remote, reader.fetch, reader.prefetch):
        with pytest.raises(TypeError, match="current_rank must be an int, got str"):
            call(handle, "1")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="current_rank must be an int, got bool"):
            call(handle, True)
        with pytest.raises(TypeError, match="expected a KVHandle, got str"):
            call("h", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dst_rank must be an int, got NoneType"):
        reader.serve(handle, None, torch.zeros(4))  # type: ignore[arg-type]
    assert reader._pending == {} and not frames
    assert reader.is_remote(handle, np.int64(1)) and not reader.is_remote(handle, np.int32(0))
    reader.close()


def test_abandoned_prefetches_stay_bounded() -> None:
    # Requests aborted after their prefetch never fetch: their buffers must not pile up.
    frames: deque[Any] = deque()
    owner = TransferRemoteKVAccessor(KVTransferEngine(PipeBackend(0, frames)), lambda h: torch.zeros(4))
    reader = TransferRemoteKVAccessor(KVTransferEngine(PipeBackend(1, frames)), lambda h: torch.zeros(4),
                                      max_pending=8)
    handles = [KVHandle.create(4, node_rank=0) for _ in range(100)]
    for i, handle in enumerate(handles):
        owner.serve(handle, 1, torch.full((4,), float(i)))
        reader.prefetch(handle, 1)
        reader._pending[handle.handle_id].result()  # landed, and never fetched
    assert len(reader._pending) == 8 and not frames
    assert torch.equal(reader.fetch(handles[-1], 1), torch.full((4,), 99.0))  # the newest still waits
    with pytest.raises(ValueError, match="max_pending"):
        TransferRemoteKVAccessor(reader.engine, lambda h: torch.zeros(4), max_pending=0)
    # max_prefetch went to the thread pool unchecked: 0 was its 'max_workers must be greater than 0',
    # '2' a TypeError from '<=', 1.5 and True were taken
    for bad in (0, "2", 1.5, True):
        with pytest.raises(ValueError, match=f"max_prefetch must be a positive int, got {bad!r}"):
            TransferRemoteKVAccessor(reader.engine, lambda h: torch.zeros(4), max_prefetch=bad)
    reader.close()
    owner.close()
