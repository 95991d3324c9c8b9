"""Prefix tooling from the seed's 0.5.4 line: a token trie (:class:`PrefixIndex`), prefix
fingerprints and request grouping by fingerprint. The block-hash prefix cache itself is
:mod:`sagellm_kv_cache.prefix_cache`."""

from sagellm_kv_cache.prefix.fingerprint import (
    AdaptiveHashComputer,
    BaseFingerprintComputer,
    FingerprintComputer,
    FingerprintConfig,
    FingerprintStrategy,
    SegmentedHashComputer,
    SimpleHashComputer,
    WeightedHashComputer,
)
from sagellm_kv_cache.prefix.grouping import CIPrefixGrouper, GroupingConfig, PrefixGrouper, Request, RequestGroup
from sagellm_kv_cache.prefix.index import PrefixIndex

__all__ = [
    "AdaptiveHashComputer",
    "BaseFingerprintComputer",
    "CIPrefixGrouper",
    "FingerprintComputer",
    "FingerprintConfig",
    "FingerprintStrategy",
    "GroupingConfig",
    "PrefixGrouper",
    "PrefixIndex",
    "Request",
    "RequestGroup",
    "SegmentedHashComputer",
    "SimpleHashComputer",
    "WeightedHashComputer",
]
