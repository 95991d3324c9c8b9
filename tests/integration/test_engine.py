"""LLMEngine (isagellm-core) end to end on the CPU with this package as its KV cache."""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sagellm_core")

from packaging.requirements import Requirement
from packaging.version import Version
from sagellm_protocol.sampling import DecodingStrategy, SamplingParams

from .engine_harness import KVTrace, prompt, run_engine

NEWEST_ORIGINAL = "0.5.4.15"
# Measured with the original package (isagellm-kv-cache 0.5.4.15) on this workload: the engine's
# memory-pressure path evicts six running requests, and every request still finishes.
ORIGINAL_EVICTIONS_UNDER_PRESSURE = 6


def test_our_build_satisfies_the_engine_pin() -> None:
    import sagellm_kv_cache
    from sagellm_kv_cache import _core

    ours = metadata.version("isagellm-kv-cache")
    pins = [Requirement(r) for r in metadata.requires("isagellm-core") or []]
    pin = next(r for r in pins if r.name == "isagellm-kv-cache")
    assert pin.specifier.contains(ours), f"{ours} is outside isagellm-core's pin {pin.specifier}"
    assert Version(ours) > Version(NEWEST_ORIGINAL)  # so pip prefers it to the original's releases
    assert sagellm_kv_cache.__version__ == ours
    assert _core.__version__ == ours  # the C++ build, not the pure-Python original


async def _workload(engine: Any) -> dict[str, Any]:
    greedy = await engine.generate(prompt(9), sampling_params=SamplingParams(
        strategy=DecodingStrategy.GREEDY, max_tokens=10))
    sampled = await engine.generate(prompt(9), sampling_params=SamplingParams(
        strategy=DecodingStrategy.SAMPLING, temperature=0.8, top_p=0.9, max_tokens=10, seed=1234))
    streamed: list[int] = []
    deltas = 0
    async for event in engine.stream(prompt(6, 3), max_tokens=8):
        if event.event == "delta":
            deltas += 1
        elif event.event == "end":
            streamed = list(event.output_tokens)
    concurrent = await asyncio.gather(*(engine.generate(prompt(5 + i, i), max_tokens=6 + i) for i in range(8)))
    return {
        "greedy": list(greedy.output_tokens),
        "sampled": list(sampled.output_tokens),
        "streamed": streamed,
        "stream_deltas": deltas,
        "concurrent": [list(r.output_tokens) for r in concurrent],
        "errors": [r.error for r in (greedy, sampled, *concurrent) if getattr(r, "error", None)],
    }


def _assert_everything_freed(trace: KVTrace) -> None:
    assert trace.allocated, "the engine never allocated from our pool"
    assert trace.live_handles() == []
    for pool in trace.pools.values():
        stats = pool.get_stats()
        assert stats["num_handles"] == 0 and stats["allocated_tokens"] == 0, stats
        assert pool.get_block_stats()["used_blocks"] == 0


def _assert_real_block_tables(trace: KVTrace) -> None:
    tables = [t for t in trace.block_tables]
    assert tables and all(tables), "the engine built an empty block table"
    for table in tables:
        assert all(isinstance(b, int) and b >= 0 for b in table), table
        assert len(set(table)) == len(table)


def test_generate_stream_and_concurrency_match_the_engine_without_kv_cache(
        tiny_model: Path, kv_trace: KVTrace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sagellm_core")
    with_cache = run_engine(tiny_model, _workload)
    # No "did not provide a block table", no decode-slot KeyError, no leaked handle on the way.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    _assert_real_block_tables(kv_trace)
    _assert_everything_freed(kv_trace)
    assert with_cache["errors"] == [] and with_cache["stream_deltas"] > 0
    assert all(with_cache["concurrent"]) and len(with_cache["concurrent"]) == 8

    without_cache = run_engine(tiny_model, _workload, enable_kv_cache=False)
    assert with_cache == without_cache


async def _pressure(engine: Any) -> list[tuple[list[int], str]]:
    results = await asyncio.gather(*(engine.generate(prompt(20 + 5 * i, i), max_tokens=24) for i in range(8)))
    return [(list(r.output_tokens), r.finish_reason) for r in results]


def test_memory_pressure_evicts_like_the_original(tiny_model: Path, kv_trace: KVTrace,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sagellm_core.engine_core.kv_cache_manager")
    squeezed = run_engine(tiny_model, _pressure, kv_cache_num_blocks=12)  # 192 tokens for 8 requests
    evictions = [r for r in caplog.records if r.getMessage().startswith("Evicting request ")]
    assert len(evictions) == ORIGINAL_EVICTIONS_UNDER_PRESSURE
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    _assert_everything_freed(kv_trace)
    assert max(len(t) for t in kv_trace.block_tables) <= 12 + 8  # budget blocks + one partial block each

    reference = run_engine(tiny_model, _pressure, enable_kv_cache=False)
    assert squeezed == reference


async def _same_prompt_three_times(engine: Any) -> list[tuple[list[int], float]]:
    long_prompt = prompt(70, 1)  # 70 tokens: four full blocks of 16
    out = []
    for text in (long_prompt, long_prompt, long_prompt + " hello world"):
        response = await engine.generate(text, max_tokens=5)
        out.append((list(response.output_tokens), response.metrics.prefix_hit_rate))
    return out


def test_prefix_cache_gets_the_request_blocks(tiny_model: Path, kv_trace: KVTrace) -> None:
    results = run_engine(tiny_model, _same_prompt_three_times)
    assert results[0][0] == results[1][0]
    # Each finished prompt publishes its four full blocks: the first four blocks of its handle.
    assert len(kv_trace.inserted) == 3 and all(len(ids) == 4 for ids in kv_trace.inserted)
    assert all(isinstance(b, int) for ids in kv_trace.inserted for b in ids)
    tables = [[b.block_id for b in handle._blocks] for handle in kv_trace.allocated.values()]
    assert all(any(table[:4] == ids for table in tables) for ids in kv_trace.inserted)
    assert len(kv_trace.lookups) >= 2  # the engine asked the cache for the later prompts
    _assert_everything_freed(kv_trace)


def test_repeated_long_prompt_hits_the_prefix_cache(tiny_model: Path, kv_trace: KVTrace) -> None:
    results = run_engine(tiny_model, _same_prompt_three_times)
    # The original: no hit for the first prompt, then all four full blocks (64 of 64 cacheable tokens).
    assert [rate for _, rate in results] == [0.0, 1.0, 1.0]
    assert 64 in kv_trace.lookups
    reference = run_engine(tiny_model, _same_prompt_three_times, enable_kv_cache=False)
    assert [tokens for tokens, _ in results] == [tokens for tokens, _ in reference]


async def _shared_prefix_waves(engine: Any) -> list[list[tuple[list[int], str]]]:
    base = prompt(40, 1)  # one shared prefix, then a short distinct tail per request
    waves = []
    for _ in range(2):  # the second wave reuses the ids the first wave's evictions and frees returned
        results = await asyncio.gather(*(engine.generate(f"{base} {prompt(3 + i, i)}", max_tokens=6) for i in range(6)))
        waves.append([(list(r.output_tokens), r.finish_reason) for r in results])
    return waves


# Block sizes that do not divide the prompts (7) and one token per block (1), each with a budget
# that forces the engine's eviction path (and its model runner's refusals, so nothing is published
# to the prefix cache here, as with the original) while the requests share a prefix.
@pytest.mark.parametrize(("block_size", "num_blocks"), [(7, 30), (1, 150)])
def test_odd_block_sizes_under_pressure_evict_and_free_like_the_original(
        tiny_model: Path, kv_trace: KVTrace, caplog: pytest.LogCaptureFixture, block_size: int,
        num_blocks: int) -> None:
    caplog.set_level(logging.INFO, logger="sagellm_core.engine_core.kv_cache_manager")
    waves = run_engine(tiny_model, _shared_prefix_waves, kv_cache_block_size=block_size, kv_cache_num_blocks=num_blocks)
    # Measured with the original package (0.5.4.15) on this workload: eight running requests are
    # evicted, and the engine's block-table lookups for those eight come back empty.
    assert len([r for r in caplog.records if r.getMessage().startswith("Evicting request ")]) == 8
    assert sum(not table for table in kv_trace.block_tables) == 8
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    _assert_everything_freed(kv_trace)
    assert kv_trace.inserted == [] and kv_trace.lookups == []
    assert waves == run_engine(tiny_model, _shared_prefix_waves, enable_kv_cache=False)


async def _two_requests(engine: Any) -> list[list[int]]:
    # Bounded: a stall shows as a TimeoutError here rather than a hung test run.
    results = await asyncio.wait_for(
        asyncio.gather(*(engine.generate(prompt(16, i), max_tokens=4) for i in range(2))), timeout=120)
    return [list(r.output_tokens) for r in results]


def test_partly_filled_blocks_do_not_stall_the_cpu_path(tiny_model: Path, kv_trace: KVTrace,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # About 20 + 20 tokens on a 48-token budget of 3 blocks of 16: 4 blocks. Off the paged path the
    # pool admits by tokens, as the original did, so both run. Bounded ids (the paged path's mode)
    # refuse the second after the engine's scheduler admitted both, and the engine never schedules
    # it again (kv_pool.py's docstring).
    monkeypatch.delenv("SAGELLM_ENABLE_CUDA_PAGED_ATTENTION", raising=False)
    out = run_engine(tiny_model, _two_requests, kv_cache_num_blocks=3)
    assert max(b for table in kv_trace.block_tables for b in table) >= 3  # 4 blocks held at once
    _assert_everything_freed(kv_trace)
    assert out == run_engine(tiny_model, _two_requests, enable_kv_cache=False)
