"""KV-block memory layouts (the seed's 0.5.4 ``layout`` package): one contiguous allocation per
block, or one per chunk of tokens. The classes need torch when instantiated."""

from sagellm_kv_cache.layout.base import BaseKVBlock
from sagellm_kv_cache.layout.chunked import ChunkedKVBlock
from sagellm_kv_cache.layout.contiguous import ContiguousKVBlock

__all__ = ["BaseKVBlock", "ChunkedKVBlock", "ContiguousKVBlock"]
