"""The engine's ContinuousBatchingScheduler on our KVPool and SchedulerBridge.

``LLMEngine`` always builds its scheduler around its own KV cache manager; a scheduler with
``kv_pool=`` or ``use_scheduler_bridge=True`` is built by whoever embeds the engine's core, so it
is driven here directly, with the protocol's ``Request`` objects the engine itself schedules.
Admission numbers are the ones the original package (0.5.4.15) gives for the same calls.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sagellm_core")

from sagellm_core.engine_core.scheduler import ContinuousBatchingScheduler
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.scheduler_bridge import SchedulerBridge
from sagellm_protocol.types import Request


def request(request_id: str, kv_tokens: int) -> Request:
    # The scheduler reserves len(prompt) // 4 prompt tokens plus one decode token (max_tokens > 0).
    return Request(request_id=request_id, trace_id=request_id, model="tiny", prompt="abcd" * (kv_tokens - 1),
                   max_tokens=1)


def schedule(scheduler: ContinuousBatchingScheduler, *requests: Request) -> dict[str, list[Any]]:
    for r in requests:
        scheduler.add_request(r)
    out = scheduler.schedule()
    tables: dict[str, list[Any]] = {}
    for batch in out.scheduled_prefill:
        for r, table in zip(batch.requests, batch.block_tables, strict=True):
            tables[r.request_id] = list(table)
    return tables


def assert_real_tables(tables: dict[str, list[Any]], block_size: int, tokens: dict[str, int]) -> None:
    seen: list[int] = []
    for rid, table in tables.items():
        assert table and all(isinstance(b, int) for b in table), (rid, table)
        assert len(table) == -(-tokens[rid] // block_size)
        seen += table
    assert len(seen) == len(set(seen)), "a block id is in two requests' tables"


def test_scheduler_with_kv_pool_admits_by_the_token_budget() -> None:
    pool = KVPool(max_tokens=192, block_size=16)
    scheduler = ContinuousBatchingScheduler(kv_pool=pool, block_size=16)
    sizes = {"a": 7, "b": 40, "c": 20, "d": 60, "e": 53, "f": 20}

    first = schedule(scheduler, *(request(r, sizes[r]) for r in "abcd"))
    assert list(first) == ["a", "b", "c", "d"] and pool.get_allocated_tokens() == 127
    # 65 tokens are left but only 2 of the 12 full blocks: the original admits 53 tokens (4 blocks).
    second = schedule(scheduler, request("e", sizes["e"]))
    assert list(second) == ["e"] and pool.get_allocated_tokens() == 180
    third = schedule(scheduler, request("f", sizes["f"]))
    assert third == {} and scheduler.get_num_waiting() == 1  # 20 > 12 tokens left: it waits
    tables = {**first, **second}
    assert_real_tables(tables, 16, sizes)
    assert tables == {rid: scheduler.kv_bridge.get_block_table(rid) for rid in tables}

    for rid in tables:
        scheduler.free_request(rid)
    assert pool.get_stats()["num_handles"] == 0 and pool.get_block_stats()["used_blocks"] == 0


@pytest.mark.parametrize("with_pool", [True, False])
def test_use_scheduler_bridge_plans_with_our_bridge(with_pool: bool) -> None:
    pool = KVPool(max_tokens=192, block_size=16) if with_pool else None
    scheduler = ContinuousBatchingScheduler(kv_pool=pool, block_size=16, use_scheduler_bridge=True)
    bridge = scheduler._advanced_scheduler_bridge
    assert isinstance(bridge, SchedulerBridge) and bridge  # the engine tests `if bridge:` while it is empty
    assert bridge.max_tokens == (192 if with_pool else 8192)  # the engine takes the pool's budget

    # The bridge path asks for prompt + 100 new tokens per request (the engine's default).
    sizes = {"a": 7, "b": 40, "c": 20, "d": 60}
    tables = schedule(scheduler, *(request(r, sizes[r]) for r in "abcd"))
    needed = {rid: n - 1 + 100 for rid, n in sizes.items()}
    # The original admits only "a" (106 tokens) into 192 tokens, and all four into 8192.
    assert list(tables) == (["a"] if with_pool else ["a", "b", "c", "d"])
    assert_real_tables(tables, 16, needed)
    # The table is the handle's blocks, read through the private attribute the engine uses.
    handles = bridge._request_handles
    assert {rid: [b.block_id for b in handles[rid]._blocks] for rid in tables} == tables
    assert scheduler.get_num_waiting() == (3 if with_pool else 0)

    # The engine never frees the bridge's reservations (as with the original); its owner does.
    for rid in tables:
        bridge.free_request(rid)
    assert bridge.get_stats()["pool"]["num_handles"] == 0 and len(bridge) == 0
    if pool is not None:
        assert pool.get_stats()["num_handles"] == 0  # the bridge has its own pool, like the original's


def test_engine_block_tables_stay_inside_the_paged_kv_tensor_it_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine's paged-attention path (opt-in, SAGELLM_ENABLE_CUDA_PAGED_ATTENTION=1; its vllm
    # kernel needs a GPU) indexes a KV tensor of KVCacheConfig.num_blocks blocks
    # (SageAttention._ensure_paged_kv_cache) with the block tables its KVCacheManager builds from
    # our handles' block ids. Driven here with the engine's own manager and scheduler; the tensor
    # and the cache write are the engine backend's (PagedAttentionBackend's torch path). Without
    # the switch the same requests get {'a': [0, 1], 'b': [2, 3]}: id 3 of a 3-block tensor.
    monkeypatch.setenv("SAGELLM_ENABLE_CUDA_PAGED_ATTENTION", "1")
    import torch
    from sagellm_backend.attention import PagedAttentionBackend, PagedAttentionMetadataBuilder
    from sagellm_core.engine_core.kv_cache_manager import KVCacheConfig, KVCacheManager

    config = KVCacheConfig(block_size=16, num_blocks=3, dtype="fp32")
    manager = KVCacheManager(config)
    scheduler = ContinuousBatchingScheduler(kv_cache_manager=manager, block_size=16)
    backend = PagedAttentionBackend(block_size=16)
    key_cache = torch.zeros(backend.get_kv_cache_shape(config.num_blocks, 16, 2, 8))
    value_cache = torch.zeros_like(key_cache)
    builder = PagedAttentionMetadataBuilder(block_size=16, device="cpu")

    def write(table: list[Any], mark: float) -> None:  # a prefill filling the table's blocks
        metadata = builder.build_prefill_metadata(seq_lens=[16 * len(table)], block_tables=torch.tensor([table]))
        kv = torch.full((16 * len(table), 2, 8), mark)
        backend._write_to_paged_cache(kv, kv, key_cache, value_cache, metadata)
        assert bool((key_cache[table] == mark).all())

    # 17 + 17 tokens fit the 48-token budget, but each request needs 2 of the 3 blocks. The policy
    # admits both (it asks can_alloc before allocating either); allocating b, the engine's manager
    # finds no room (can_alloc) and evicts a, as it does under token pressure.
    first = schedule(scheduler, request("a", 17), request("b", 17))
    assert first["a"] == [] and len(first["b"]) == 2, first
    assert all(0 <= b < config.num_blocks for b in first["b"])
    write(first["b"], 1.0)
    scheduler.free_request("a")  # (the engine finishes an evicted request; its decode step needs a table)
    # c asks while b holds 2 blocks: can_alloc says no, so it waits, and runs once b is freed.
    assert schedule(scheduler, request("c", 17)) == {} and scheduler.get_num_waiting() == 1
    scheduler.free_request("b")
    second = schedule(scheduler)
    assert list(second) == ["c"] and all(0 <= b < config.num_blocks for b in second["c"])
    write(second["c"], 2.0)
    scheduler.free_request("c")
    assert manager.kv_pool.get_stats()["num_handles"] == 0
