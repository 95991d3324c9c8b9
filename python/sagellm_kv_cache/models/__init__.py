"""Data models of the seed API.

Besides our :class:`KVHandle`, this module re-exports the ecosystem's shared KV types from
``sagellm_protocol.kv`` (the same objects, not look-alikes): the sageLLM engine (``isagellm-core``)
imports ``EvictionPolicy``, ``RequestType`` and ``SchedulerRequest`` from here, as it did from the
original package.
"""

# kv_handle.py carries the re-exports too (the original's models.kv_handle did): one list, kept there.
from sagellm_kv_cache.models import kv_handle as _kv_handle
from sagellm_kv_cache.models.kv_handle import *  # noqa: F403

__all__ = list(_kv_handle.__all__)
