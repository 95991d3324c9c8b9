"""Seed-compatible pool API (``from sagellm_kv_cache.pool import KVPool``)."""

from sagellm_kv_cache.pool.block_manager import Block, BlockManager
from sagellm_kv_cache.pool.kv_pool import KVPool

__all__ = [
    "Block",
    "BlockManager",
    "KVPool",
]
