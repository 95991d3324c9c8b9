"""sagellm-kv-cache: KV-cache management for LLM inference engines.

A C++ core (lock-free block allocator, hash-trie prefix cache, device allocators) behind the seed's
Python API. Names are loaded on first use so that optional parts (transfer, plots, metrics) cost
nothing until touched.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from sagellm_protocol.kv import (
    DType,
    EvictionPolicy,
    KVBlockState,
    Layout,
    MemoryTier,
)

from sagellm_kv_cache._version import __version__
from sagellm_kv_cache.errors import (
    KVAllPinnedError,
    KVBackendUnavailableError,
    KVBudgetExceededError,
    KVCacheError,
    KVCacheMissError,
    KVChecksumMismatchError,
    KVConfigInvalidError,
    KVConfigMissingError,
    KVDoubleFreeError,
    KVEvictionFailedError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVInvalidBlockError,
    KVInvalidHandleError,
    KVMemoryExhaustedError,
    KVMetadataMismatchError,
    KVNotImplementedError,
    KVNoVictimError,
    KVPoolFullError,
    KVPrefixTooLongError,
    KVRefCountUnderflowError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.models.kv_handle import KVHandle

# Public name -> module that defines it (imported on first attribute access).
_LAZY: dict[str, str] = {
    "KVCacheSpec": "paged",
    "PagedKVPool": "paged",
    "LayerView": "paged",
    "KVPool": "pool.kv_pool",
    "PrefixCache": "prefix_cache",
    "RadixPrefixCache": "prefix_cache",
    "KVCacheManager": "kv_cache_manager",
    "EvictionManager": "eviction",
    "EvictionStrategy": "eviction",
    "LRUEviction": "eviction",
    "LFUEviction": "eviction",
    "FIFOEviction": "eviction",
    "TTLEviction": "eviction",
    "PriorityEviction": "eviction",
    "SchedulerBridge": "scheduler_bridge",
    "LoadAwareScheduler": "load_aware_scheduler",
    "PlacementStrategy": "load_aware_scheduler",
    "DeviceLoadMetrics": "load_metrics",
    "LoadMetricsCollector": "load_metrics",
    "KVTransferEngine": "transfer",
    "MetricsCollector": "observability.metrics",
    "MetricsHook": "observability.hooks",
    "PrometheusExporter": "observability.prometheus",
    "KVEventPublisher": "observability.events",
    "KVEventSubscriber": "observability.events",
    "AccessStatsCollector": "profiling.access_stats",
    # The seed's 0.5.4 additions (prefix index, lifetime predictors, distributed pooling).
    "PrefixIndex": "prefix.index",
    "LifetimePredictor": "predictor.base",
    "PredictorFeatures": "predictor.features",
    "FeatureExtractor": "predictor.features",
    "HistoricalPredictor": "predictor.historical",
    "GlobalKVPoolManager": "distributed",
    "NodeContribution": "distributed",
    "RemoteKVAccessor": "distributed",
    "KVTransferPipeline": "transfer",
    "CommTransferBackendAdapter": "transfer",
    "SocketTransferBackend": "transfer",
    "KVOffloadManager": "offload",
    "OffloadStorage": "offload",
    # Device -> host -> disk tiers under the prefix cache.
    "TieredPrefixCache": "tiers",
    # The native per-request manager (one C++ call per scheduler step).
    "RequestManager": "manager",
}

_PROTOCOL = {
    "KVTransferMetadata",
    "SchedulerRequest",
    "SchedulerPlan",
    "PrefixCacheEntry",
    "EvictionCandidate",
    "KVBlock",
    "LifetimePrediction",
    "KVPoolStats",
    "RequestType",
    "TransferStatus",
}

_HERE = Path(__file__).resolve().parent


def _module_exists(dotted: str) -> bool:
    base = _HERE.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None and _module_exists(module):
        value = getattr(importlib.import_module(f"sagellm_kv_cache.{module}"), name)
        globals()[name] = value
        return value
    if name in _PROTOCOL:
        value = getattr(importlib.import_module("sagellm_protocol.kv"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sagellm_kv_cache' has no attribute {name!r}")


__all__ = sorted(
    {
        "__version__",
        "DType",
        "EvictionPolicy",
        "KVBlockState",
        "Layout",
        "MemoryTier",
        "KVHandle",
        *(name for name, module in _LAZY.items() if _module_exists(module)),
        *_PROTOCOL,
        *(name for name in dir() if name.startswith("KV") and name.endswith("Error")),
    }
)
