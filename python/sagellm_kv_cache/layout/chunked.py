"""One allocation per ``chunk_size`` tokens: cheaper to grow and to free piecewise, one more index step."""

from __future__ import annotations

from typing import Any

from sagellm_kv_cache.layout.base import BaseKVBlock, _positive

__all__ = ["ChunkedKVBlock"]


class ChunkedKVBlock(BaseKVBlock):
    """Tokens in ``ceil(num_tokens / chunk_size)`` tensors ``[2, chunk, hidden_dim]`` (the last may be shorter).

    A block that cannot be allocated is a :class:`~sagellm_kv_cache.errors.KVMemoryExhaustedError` naming
    its bytes, checked before the first chunk (see :meth:`BaseKVBlock._allocate`)."""

    def __init__(self, num_tokens: int, hidden_dim: int, dtype: Any | None = None, chunk_size: int = 64) -> None:
        import torch

        super().__init__(num_tokens, hidden_dim, torch.float16 if dtype is None else dtype)
        self.chunk_size = _positive("chunk_size", chunk_size)
        self.chunks = self._allocate(torch, lambda: [
            torch.zeros(2, min(self.chunk_size, self.num_tokens - start), self.hidden_dim, dtype=self.dtype)
            for start in range(0, self.num_tokens, self.chunk_size)
        ], allocations=-(-self.num_tokens // self.chunk_size))

    def get_kv(self, token_idx: int) -> Any:
        chunk, offset = divmod(self._check_index(token_idx), self.chunk_size)
        return self.chunks[chunk][:, offset]

    def set_kv(self, token_idx: int, kv_data: Any) -> None:
        chunk, offset = divmod(self._check_index(token_idx), self.chunk_size)
        self.chunks[chunk][:, offset] = self._check_data(kv_data)

    def get_memory_usage(self) -> int:
        return sum(int(c.numel() * c.element_size()) for c in self.chunks)

    def get_num_allocations(self) -> int:
        return len(self.chunks)
