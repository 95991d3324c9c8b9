"""One allocation for the whole block: ``[2, num_tokens, hidden_dim]``."""

from __future__ import annotations

from typing import Any

from sagellm_kv_cache.layout.base import BaseKVBlock

__all__ = ["ContiguousKVBlock"]


class ContiguousKVBlock(BaseKVBlock):
    """All tokens in one zero-initialised tensor ``kv_data`` (needs torch; default dtype float16).

    A block that cannot be allocated is a :class:`~sagellm_kv_cache.errors.KVMemoryExhaustedError` naming
    its bytes (see :meth:`BaseKVBlock._allocate`)."""

    def __init__(self, num_tokens: int, hidden_dim: int, dtype: Any | None = None) -> None:
        import torch

        super().__init__(num_tokens, hidden_dim, torch.float16 if dtype is None else dtype)
        self.kv_data = self._allocate(torch, lambda: torch.zeros(2, self.num_tokens, self.hidden_dim, dtype=self.dtype))

    def get_kv(self, token_idx: int) -> Any:
        return self.kv_data[:, self._check_index(token_idx)]

    def set_kv(self, token_idx: int, kv_data: Any) -> None:
        index = self._check_index(token_idx)
        self.kv_data[:, index] = self._check_data(kv_data)

    def get_memory_usage(self) -> int:
        return int(self.kv_data.numel() * self.kv_data.element_size())

    def get_num_allocations(self) -> int:
        return 1
