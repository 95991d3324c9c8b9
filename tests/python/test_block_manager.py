"""The seed's pool.BlockManager / pool.Block: reuse, reference counts, statistics, errors."""

from __future__ import annotations

import sys
import threading
import uuid

import pytest
from sagellm_kv_cache.pool import Block, BlockManager, KVPool


def test_block_basics() -> None:
    block = Block(uuid.UUID(int=1), 64)
    assert repr(block) == "Block(id=00000000-0000-0000-0000-000000000001, size=64, ref_count=0)"
    assert (block.ref_count, block.data) == (0, None) and block.allocated_at == block.last_access
    before = block.last_access
    block.touch()
    assert block.last_access >= before


def test_alloc_free_reuse_and_stats() -> None:
    manager = BlockManager(128)
    assert repr(manager) == "BlockManager(block_size=128, total_blocks=0, used_blocks=0, free_blocks=0)"
    a, b = manager.alloc_block(), manager.alloc_block()
    assert a.block_id != b.block_id and a.size_bytes == 128
    assert manager.get_stats() == {"total_blocks": 2, "free_blocks": 0, "used_blocks": 2,
                                   "total_allocated_bytes": 256, "used_bytes": 256, "free_bytes": 0}
    b.data = "payload"
    manager.free_block(b)
    manager.free_block(b)  # freeing a free block is a no-op, as in the seed
    assert (manager.get_used_bytes(), manager.get_allocated_bytes()) == (128, 256)
    c = manager.alloc_block()
    assert c is b and c.data is None and c.ref_count == 0  # reused, reset
    assert manager.get_stats()["total_blocks"] == 2
    assert repr(manager) == "BlockManager(block_size=128, total_blocks=2, used_blocks=2, free_blocks=0)"
    manager.reset()
    assert manager.get_stats()["total_allocated_bytes"] == 0
    with pytest.raises(KeyError, match="not found"):
        manager.free_block(a)


def test_reference_counts() -> None:
    manager = BlockManager()
    block = manager.alloc_block()
    manager.incr_ref(block)
    manager.incr_ref(block)
    with pytest.raises(ValueError, match=r"Cannot free block .* with ref_count=2"):
        manager.free_block(block)
    manager.decr_ref(block)
    manager.decr_ref(block)
    with pytest.raises(ValueError, match="ref_count is already 0"):
        manager.decr_ref(block)
    assert block.ref_count == 0
    manager.free_block(block)
    assert manager.get_stats()["free_blocks"] == 1


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        BlockManager(0)
    with pytest.raises(TypeError):
        BlockManager("4096")  # type: ignore[arg-type]
    manager = BlockManager()
    foreign = Block(uuid.uuid4(), 4096)
    for method in (manager.free_block, manager.incr_ref, manager.decr_ref):
        with pytest.raises(KeyError, match=str(foreign.block_id)):
            method(foreign)
    with pytest.raises(TypeError):
        manager.free_block("block")  # type: ignore[arg-type]
    assert manager.get_stats()["total_blocks"] == 0


def test_threads_never_share_a_block() -> None:
    manager = BlockManager(16)
    held: list[list[Block]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        for step in range(300):
            block = manager.alloc_block()
            manager.incr_ref(block)
            held[i].append(block)
            if step % 3 == 0:  # give some back so others reuse them
                old = held[i].pop(0)
                manager.decr_ref(old)
                manager.free_block(old)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [block.block_id for blocks in held for block in blocks]
    assert len(ids) == len(set(ids)) == 4 * 200
    assert all(block.ref_count == 1 for blocks in held for block in blocks)
    assert manager.get_stats()["used_blocks"] == 800


def test_pool_block_manager_counts_every_own_block_while_the_pool_grows() -> None:
    # KVPool.block_manager adds the pool's peak to its own bytes; a pool allocation between the
    # read and the write of `total_allocated_bytes += block_size` lost the new block's bytes.
    pool = KVPool(10**6, block_size=1, bytes_per_token=32)
    manager = pool.block_manager
    stop = threading.Event()

    def grow() -> None:
        while not stop.is_set():
            pool.alloc(1)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=grow)
    thread.start()
    try:
        for _ in range(50_000):
            manager.alloc_block()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    peak = pool.get_block_stats()["used_blocks"]  # nothing was freed: the peak is what is in use
    assert manager.get_allocated_bytes() == (50_000 + peak) * 32 == manager.get_stats()["total_allocated_bytes"]
