"""KV transfer between processes over ``isagellm-comm``.

:class:`KVTransferEngine` is the seed's engine (tensor transfers of a ``KVHandle``, status records)
and also moves pool blocks; :class:`~.blocks.BlockTransfer` is the block transfer itself (needs
torch, imported on first use); :mod:`.wire` documents the bytes on the wire.
"""

from __future__ import annotations

from typing import Any

from sagellm_kv_cache.errors import KVTransferFailedError as KVTransferError  # the seed's name here
from sagellm_kv_cache.transfer.engine import KVTransferEngine
from sagellm_kv_cache.transfer.pipeline import CommTransferBackendAdapter, KVTransferPipeline
from sagellm_kv_cache.transfer.socket_backend import SocketTransferBackend

__all__ = [
    "BlockTransfer",
    "CommTransferBackendAdapter",
    "KVTransferEngine",
    "KVTransferError",
    "KVTransferPipeline",
    "ReceivedBlocks",
    "SocketTransferBackend",
]


def __getattr__(name: str) -> Any:
    if name in ("BlockTransfer", "ReceivedBlocks", "DigestSink", "Publisher"):
        from sagellm_kv_cache.transfer import blocks

        return getattr(blocks, name)
    raise AttributeError(f"module 'sagellm_kv_cache.transfer' has no attribute {name!r}")
