"""W1: alloc/free churn of 1..64-block requests on a 65,536-block pool.

Ours: ``PagedKVPool.allocate(n)`` / ``free(ids)`` (one C++ call each, numpy arrays), and the seed API's
``KVPool.alloc(n * 16 tokens)`` / ``free(handle)`` (a ``KVHandle`` per request). Reference: a pure-Python
pool built like vLLM's BlockPool (block objects with ref counts in a doubly linked free queue), driven
by the same request sequence.
"""

from __future__ import annotations

import random

from common import Row, best_of
from sagellm_kv_cache import _core
from sagellm_kv_cache.pool import KVPool

NUM_BLOCKS = 65_536
SEED_BLOCK_TOKENS = 16


class _PyBlock:
    __slots__ = ("block_id", "next", "prev", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.prev: _PyBlock | None = None
        self.next: _PyBlock | None = None


class PyBlockPool:
    """vLLM-style reference: a doubly linked free queue of block objects with ref counts."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [_PyBlock(i) for i in range(num_blocks)]
        self.head = _PyBlock(-1)
        self.tail = _PyBlock(-1)
        prev = self.head
        for b in self.blocks:
            prev.next, b.prev = b, prev
            prev = b
        prev.next, self.tail.prev = self.tail, prev
        self.num_free = num_blocks

    def allocate(self, n: int) -> list[_PyBlock]:
        if n > self.num_free:
            raise MemoryError("pool full")
        out = []
        for _ in range(n):
            b = self.head.next
            assert b is not None and b.next is not None
            self.head.next, b.next.prev = b.next, self.head
            b.prev = b.next = None
            b.ref_cnt = 1
            out.append(b)
        self.num_free -= n
        return out

    def free(self, blocks: list[_PyBlock]) -> None:
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                last = self.tail.prev
                assert last is not None
                last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
                self.num_free += 1


def _requests(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 64) for _ in range(n)]


def _churn(allocate, free, sizes: list[int], live_limit: int) -> int:
    """Allocates each request, keeping at most ``live_limit`` requests alive (oldest freed first)."""
    live: list = []
    blocks = 0
    for n in sizes:
        if len(live) >= live_limit:
            free(live.pop(0))
        live.append(allocate(n))
        blocks += n
    for ids in live:
        free(ids)
    return blocks


def run(quick: bool = False) -> list[Row]:
    sizes = _requests(20_000 if quick else 100_000)
    live_limit = 1_000  # ~32k blocks alive on average: half the pool
    repeats = 3 if quick else 5

    spec = _core.PagedKVPool(1, 1, 8, "fp16", 16, NUM_BLOCKS)  # metadata-dominated: 512 B blocks
    blocks = _churn(spec.allocate, spec.free, sizes, live_limit)
    ours = best_of(repeats, lambda: _churn(spec.allocate, spec.free, sizes, live_limit))
    ref_pool = PyBlockPool(NUM_BLOCKS)
    ref = best_of(repeats, lambda: _churn(ref_pool.allocate, ref_pool.free, sizes, live_limit))
    loop = best_of(repeats, lambda: _churn(lambda n: n, lambda x: None, sizes, live_limit))
    per_block = lambda t: t / blocks * 1e9  # noqa: E731
    extra = {
        "blocks": blocks,
        "loop_ns_per_block": per_block(loop),
        "metadata_bytes_per_block": _core.BlockAllocator.metadata_bytes_per_block,
    }
    return [Row("W1 alloc/free churn (PagedKVPool)", "ns/block", per_block(ours), per_block(ref),
                "vLLM-style Python pool", extra=extra),
            _seed_row(sizes[: len(sizes) // 5], live_limit, repeats)]


def _seed_row(sizes: list[int], live_limit: int, repeats: int) -> Row:
    """The seed API: one ``KVHandle`` per request, in microseconds per alloc + free pair."""
    pool = KVPool(NUM_BLOCKS * SEED_BLOCK_TOKENS, block_size=SEED_BLOCK_TOKENS)
    alloc, free = pool.alloc, pool.free

    def allocate(n: int) -> object:
        return alloc(n * SEED_BLOCK_TOKENS)

    _churn(allocate, free, sizes, live_limit)
    ours = best_of(repeats, lambda: _churn(allocate, free, sizes, live_limit))
    ref_pool = PyBlockPool(NUM_BLOCKS)
    ref = best_of(repeats, lambda: _churn(ref_pool.allocate, ref_pool.free, sizes, live_limit))
    per_op = lambda t: t / len(sizes) * 1e6  # noqa: E731
    return Row("W1 alloc/free churn (seed KVPool)", "us/op", per_op(ours), per_op(ref), "vLLM-style Python pool",
               extra={"ops": len(sizes)})
