"""Data models of the seed API."""

from sagellm_kv_cache.models.kv_handle import KVHandle

__all__ = ["KVHandle"]
