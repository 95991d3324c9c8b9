"""The seed's ``BlockManager``: fixed-size, metadata-only blocks with reference counts and reuse.

It is the seed's simple bookkeeping layer (no KV memory behind a block; ``Block.data`` is a slot for
the caller). The pool grows on demand: ``alloc_block`` hands out a freed block first and creates a
new one only when none is free, so ``total_allocated_bytes`` is the high-water mark. Real KV memory
with a fixed capacity lives in :class:`~sagellm_kv_cache.paged.PagedKVPool` (C++ allocator).

Reference counts follow the seed: a fresh block has ``ref_count == 0``; ``free_block`` refuses a
referenced block; ``decr_ref`` refuses to go below zero; freeing a free block is a no-op.
All methods are thread-safe.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any
from uuid import UUID

__all__ = ["Block", "BlockManager"]


class Block:
    """One block: id, size, reference count, timestamps and an optional ``data`` payload."""

    def __init__(self, block_id: UUID, size_bytes: int) -> None:
        self.block_id = block_id
        self.size_bytes = size_bytes
        self.ref_count = 0
        now = time.time()
        self.allocated_at = now
        self.last_access = now
        self.data: Any = None

    def touch(self) -> None:
        """Marks the block as used now."""
        self.last_access = time.time()

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, size={self.size_bytes}, ref_count={self.ref_count})"


class BlockManager:
    """Hands out ``block_size``-byte blocks, reusing freed ones (see the module docstring)."""

    def __init__(self, block_size: int = 4096) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.blocks: dict[UUID, Block] = {}
        self.free_blocks: set[UUID] = set()
        self.total_allocated_bytes = 0
        self._free_order: list[UUID] = []  # LIFO reuse: the most recently freed block is warmest
        self._lock = threading.Lock()

    def alloc_block(self) -> Block:
        """A freed block (reset to ``ref_count == 0``) if there is one, else a new block."""
        with self._lock:
            while self._free_order:
                block_id = self._free_order.pop()
                if block_id in self.free_blocks:
                    self.free_blocks.discard(block_id)
                    block = self.blocks[block_id]
                    block.ref_count = 0
                    block.allocated_at = block.last_access = time.time()
                    block.data = None
                    return block
            block = Block(uuid.uuid4(), self.block_size)
            self.blocks[block.block_id] = block
            self._count_new_block()
            return block

    def _count_new_block(self) -> None:
        """Adds a new block's bytes to ``total_allocated_bytes`` (the lock is held)."""
        self.total_allocated_bytes += self.block_size

    def free_block(self, block: Block) -> None:
        """Returns ``block`` for reuse. ``KeyError`` for a foreign block, ``ValueError`` while referenced."""
        with self._lock:
            own = self._own(block)
            if own.block_id in self.free_blocks:
                return
            if own.ref_count > 0:
                raise ValueError(f"Cannot free block {own.block_id} with ref_count={own.ref_count}")
            self.free_blocks.add(own.block_id)
            self._free_order.append(own.block_id)

    def incr_ref(self, block: Block) -> None:
        with self._lock:
            own = self._own(block)
            own.ref_count += 1
            own.touch()

    def decr_ref(self, block: Block) -> None:
        """Drops one reference; ``ValueError`` (nothing changes) when the count is already 0."""
        with self._lock:
            own = self._own(block)
            if own.ref_count <= 0:
                raise ValueError(f"Block {own.block_id} ref_count is already 0")
            own.ref_count -= 1
            own.touch()

    def get_allocated_bytes(self) -> int:
        """Bytes of every block ever created (used and free)."""
        return self.total_allocated_bytes

    def get_used_bytes(self) -> int:
        with self._lock:
            return (len(self.blocks) - len(self.free_blocks)) * self.block_size

    def get_stats(self) -> dict[str, int]:
        with self._lock:
            total, free = len(self.blocks), len(self.free_blocks)
            return {
                "total_blocks": total,
                "free_blocks": free,
                "used_blocks": total - free,
                "total_allocated_bytes": self.total_allocated_bytes,
                "used_bytes": (total - free) * self.block_size,
                "free_bytes": free * self.block_size,
            }

    def reset(self) -> None:
        """Forgets every block."""
        with self._lock:
            self.blocks.clear()
            self.free_blocks.clear()
            self._free_order.clear()
            self.total_allocated_bytes = 0

    def __repr__(self) -> str:
        s = self.get_stats()
        return (f"BlockManager(block_size={self.block_size}, total_blocks={s['total_blocks']}, "
                f"used_blocks={s['used_blocks']}, free_blocks={s['free_blocks']})")

    def _own(self, block: Any) -> Block:
        if not isinstance(block, Block):
            raise TypeError(f"block must be a Block, got {type(block).__name__}")
        own = self.blocks.get(block.block_id)
        if own is None:
            raise KeyError(f"Block {block.block_id} not found")
        return own
