"""KV-block layouts: contiguous and chunked storage behave the same through the interface."""

from __future__ import annotations

from typing import Any

import pytest
from sagellm_kv_cache.layout import BaseKVBlock, ChunkedKVBlock, ContiguousKVBlock

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("make", "allocations"), [(lambda: ContiguousKVBlock(10, 8), 1),
                                                   (lambda: ChunkedKVBlock(10, 8, chunk_size=4), 3),
                                                   (lambda: ChunkedKVBlock(10, 8, chunk_size=3), 4)])
def test_round_trip_memory_and_allocations(make: Any, allocations: int) -> None:
    block: BaseKVBlock = make()
    assert block.dtype == torch.float16 and block.get_memory_usage() == 2 * 10 * 8 * 2
    assert block.get_num_allocations() == allocations
    for i in range(10):
        block.set_kv(i, torch.full((2, 8), float(i)))
    for i in range(10):
        assert torch.equal(block.get_kv(i), torch.full((2, 8), float(i), dtype=torch.float16))
    view = block.get_kv(5)
    view[0, 0] = 99.0  # a view into the block
    assert block.get_kv(5)[0, 0] == 99.0
    assert repr(block).endswith("(num_tokens=10, hidden_dim=8, dtype=torch.float16)")


def test_bad_input_changes_nothing() -> None:
    block = ChunkedKVBlock(4, 2, dtype=torch.float32, chunk_size=2)
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=f"token_idx {bad} out of range"):
            block.get_kv(bad)
    with pytest.raises(ValueError, match=r"Expected kv_data shape \(2, 2\)"):
        block.set_kv(0, torch.ones(2, 3))
    with pytest.raises(TypeError, match="torch tensor"):
        block.set_kv(0, [[1.0, 1.0], [1.0, 1.0]])
    assert all(torch.count_nonzero(c) == 0 for c in block.chunks)
    for args, message in [((0, 8), "num_tokens must be positive, got 0"), ((10, 0), "hidden_dim must be positive")]:
        with pytest.raises(ValueError, match=message):
            ContiguousKVBlock(*args)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        ChunkedKVBlock(10, 8, chunk_size=0)
    with pytest.raises(TypeError):
        BaseKVBlock(1, 1, None)  # type: ignore[abstract]
