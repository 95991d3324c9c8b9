"""Data models of the seed API.

Besides our :class:`KVHandle`, this module re-exports the ecosystem's shared KV types from
``sagellm_protocol.kv`` (the same objects, not look-alikes): the sageLLM engine (``isagellm-core``)
imports ``EvictionPolicy``, ``RequestType`` and ``SchedulerRequest`` from here, as it did from the
original package.
"""

from sagellm_protocol.kv import (
    DType,
    EvictionCandidate,
    EvictionPolicy,
    KVBlock,
    KVBlockState,
    KVPoolStats,
    KVTransferMetadata,
    Layout,
    LifetimePrediction,
    MemoryTier,
    PrefixCacheEntry,
    RequestType,
    SchedulerPlan,
    SchedulerRequest,
)

from sagellm_kv_cache.models.kv_handle import KVBlockRef, KVHandle

__all__ = [
    "DType",
    "EvictionCandidate",
    "EvictionPolicy",
    "KVBlock",
    "KVBlockRef",
    "KVBlockState",
    "KVHandle",
    "KVPoolStats",
    "KVTransferMetadata",
    "Layout",
    "LifetimePrediction",
    "MemoryTier",
    "PrefixCacheEntry",
    "RequestType",
    "SchedulerPlan",
    "SchedulerRequest",
]
