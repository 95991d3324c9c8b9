"""The engine's uses of this package that test_engine.py and test_scheduler.py do not reach.

One test per path of isagellm-core 0.5.4.26 (docs/engine_contract.md lists every use and its test):
switches that change what the engine builds from us (beam search's HF fallback, prefix caching off,
SageAttention given our KVCacheManager), its error paths (it builds our KVBudgetExceededError itself
and catches it), and the engine components' calls no LLMEngine request makes (pins, skipped blocks,
preemption, stats). Every expected value is what the original package (0.5.4.15) gives for the same
calls; where the engine misbehaves with both, the test says so.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sagellm_core")

from sagellm_core.engine_core.kv_cache_manager import KVCacheConfig, KVCacheManager
from sagellm_core.engine_core.scheduler import ContinuousBatchingScheduler
from sagellm_kv_cache.errors import KVBudgetExceededError
from sagellm_kv_cache.models import DType, KVHandle, Layout
from sagellm_kv_cache.pool import KVPool
from sagellm_protocol.sampling import DecodingStrategy, SamplingParams
from sagellm_protocol.types import Request

from .engine_harness import KVTrace, prompt, run_engine

SCHEDULER_LOG = "sagellm_core.engine_core.scheduler.scheduler"
MANAGER_LOG = "sagellm_core.engine_core.kv_cache_manager"


@dataclass
class MinimalRequest:
    """What the engine's own ModelRunner hands its KVCacheManager (its ``_MinimalRequest``)."""

    request_id: str
    input_ids: list[int] = field(default_factory=list)


def manager(num_blocks: int, block_size: int = 16, dtype: str = "fp32") -> KVCacheManager:
    return KVCacheManager(KVCacheConfig(block_size=block_size, num_blocks=num_blocks, dtype=dtype))


def request(request_id: str, kv_tokens: int) -> Request:
    # The engine's scheduler estimates len(prompt) // 4 tokens and reserves one decode token.
    return Request(request_id=request_id, trace_id=request_id, model="tiny", prompt="abcd" * kv_tokens, max_tokens=1)


def pool_tokens(kv: KVCacheManager) -> tuple[int, int]:
    stats = kv.kv_pool.get_stats()
    return stats["allocated_tokens"], stats["num_handles"]


# --- LLMEngine switches ----------------------------------------------------------------------------


async def _beam_twice(engine: Any) -> list[Any]:
    params = SamplingParams(strategy=DecodingStrategy.BEAM_SEARCH, num_beams=2, max_tokens=5)
    out = []
    for _ in range(2):
        response = await engine.generate(prompt(40, 1), sampling_params=params)
        out.append((list(response.output_tokens), response.finish_reason, response.metrics.prefix_hit_rate))
    out.append(engine._get_prefix_hit_rate())  # the engine reads our PrefixCache.get_stats()["hit_rate"]
    return out


def test_beam_search_takes_the_engines_hf_fallback_path_on_our_pool(
        tiny_model: Path, kv_trace: KVTrace, caplog: pytest.LogCaptureFixture) -> None:
    # Beam search is not on the engine's native path: LLMEngine.generate itself calls
    # allocate_slots(tokens=...), cache_blocks(num_tokens_to_cache=prompt) and free(request_id).
    caplog.set_level(logging.WARNING, logger="sagellm_core")
    results = run_engine(tiny_model, _beam_twice, kv_cache_num_blocks=32)
    assert any("HF-generate fallback activated" in r.getMessage() for r in caplog.records)
    # The original (0.5.4.15): 40 + 5 tokens, then 45 - 32 hit tokens; two full blocks cached per
    # request; the second request hits both; hit rate 0.0 then 1.0.
    assert [h.num_tokens for h in kv_trace.allocated.values()] == [45, 13]
    assert kv_trace.lookups == [32]
    assert [len(ids) for ids in kv_trace.inserted] == [2, 2]
    assert [rate for _, _, rate in results[:2]] == [0.0, 1.0] and results[2] == 1.0
    assert kv_trace.live_handles() == []
    assert results[0][:2] == results[1][:2]
    reference = run_engine(tiny_model, _beam_twice, enable_kv_cache=False)
    assert [r[:2] for r in results[:2]] == [r[:2] for r in reference[:2]]


async def _greedy_twice(engine: Any) -> dict[str, Any]:
    outputs = [list((await engine.generate(prompt(40, 1), max_tokens=5)).output_tokens) for _ in range(2)]
    kv = engine._kv_cache_manager
    if kv is None:  # enable_kv_cache=False: the reference outputs
        return {"outputs": outputs}
    return {"outputs": outputs, "prefix_cache": kv.prefix_cache, "stats": kv.get_stats(), "repr": repr(kv),
            "hit_rate": engine._get_prefix_hit_rate()}


def test_prefix_caching_off_never_touches_a_prefix_cache(tiny_model: Path, kv_trace: KVTrace) -> None:
    out = run_engine(tiny_model, _greedy_twice, kv_cache_num_blocks=32, enable_prefix_cache=False)
    assert out["prefix_cache"] is None and "prefix_cache" not in out["stats"]
    assert out["repr"].endswith("prefix_cache=disabled)") and out["hit_rate"] == 0.0
    assert kv_trace.inserted == [] and kv_trace.lookups == []
    # The original: 40 + 5 (+ 5 reserved) tokens, then the engine core's second allocation, per request.
    assert [h.num_tokens for h in kv_trace.allocated.values()] == [50, 95, 50, 95]
    assert kv_trace.live_handles() == [] and out["stats"]["pool"]["num_handles"] == 0
    assert out["outputs"] == run_engine(tiny_model, _greedy_twice, enable_kv_cache=False)["outputs"]


# --- the engine's error paths ----------------------------------------------------------------------


async def _beam_over_budget(engine: Any) -> Any:
    params = SamplingParams(strategy=DecodingStrategy.BEAM_SEARCH, num_beams=2, max_tokens=5)
    with pytest.raises(KVBudgetExceededError) as err:
        await engine.generate(prompt(40, 1), sampling_params=params)
    return err.value


def test_a_request_over_the_budget_gets_our_budget_error_from_the_engine(
        tiny_model: Path, kv_trace: KVTrace, caplog: pytest.LogCaptureFixture) -> None:
    # Beam search allocates without asking can_alloc first; with nothing to evict the engine's
    # _try_evict raises our KVBudgetExceededError (built with requested=, available=, context=),
    # allocate_slots logs and re-raises it, and LLMEngine.generate hands it to its caller.
    caplog.set_level(logging.ERROR, logger=MANAGER_LOG)
    error = run_engine(tiny_model, _beam_over_budget, kv_cache_num_blocks=2)
    assert (error.requested, error.available) == (45, 32)
    assert error.context["reason"] == "No requests to evict"
    assert str(error) == "[KV_BUDGET_EXCEEDED] Budget exceeded: requested 45 tokens, only 32 tokens available"
    assert [r.getMessage().endswith("cannot allocate 45 tokens") for r in caplog.records] == [True]
    assert kv_trace.allocated == {}


@pytest.mark.parametrize(("first", "pin", "second", "available", "cause"), [
    (10, False, 64, 54, "[KV_NO_VICTIM] "),  # every victim together frees too little
    (40, True, 40, 24, "[KV_ALL_PINNED] All 1 eviction candidates are pinned"),
])
def test_eviction_failures_reach_the_engine_as_budget_errors(
        first: int, pin: bool, second: int, available: int, cause: str) -> None:
    # The engine's _try_evict turns any exception of EvictionManager.select_victims into our
    # KVBudgetExceededError (context["eviction_error"] = str(e)); allocate_slots re-raises it.
    kv = manager(num_blocks=4)
    kv.allocate_slots(MinimalRequest("a"), first, 0)
    if pin:
        kv.kv_pool.pin(kv._request_handles["a"])
    with pytest.raises(KVBudgetExceededError) as err:
        kv.allocate_slots(MinimalRequest("b"), second, 0)
    assert (err.value.requested, err.value.available) == (second, available)
    assert err.value.context["eviction_error"].startswith(cause)
    assert sorted(kv._request_handles) == ["a"] and pool_tokens(kv) == (first, 1)  # nothing changed


# --- calls of the engine's components that no LLMEngine request makes ------------------------------


def test_engine_manager_free_unpins_a_pinned_handle_first() -> None:
    kv = manager(num_blocks=4)
    kv.allocate_slots(MinimalRequest("a"), 20, 0)
    handle = kv._request_handles["a"]
    kv.kv_pool.pin(handle)
    kv.kv_pool.pin(handle)
    assert handle.pin_count == 2 and kv.kv_pool.get_stats()["pinned_tokens"] == 20
    kv.free("a")  # while handle.pin_count > 0: kv_pool.unpin(handle); then kv_pool.free(handle)
    assert handle.pin_count == 0 and pool_tokens(kv) == (0, 0)


def test_remove_skipped_blocks_reallocates_the_kept_blocks() -> None:
    kv = manager(num_blocks=8)
    kv.allocate_slots(MinimalRequest("a"), 70, 0, device="cpu")
    assert kv.get_block_table("a") == [0, 1, 2, 3, 4]
    kv.remove_skipped_blocks("a", 20)  # frees the handle and allocates 2 blocks on its device
    handle = kv._request_handles["a"]
    table = kv.get_block_table("a")
    assert (handle.num_tokens, handle.device, pool_tokens(kv)) == (32, "cpu", (32, 1))
    assert table == [b.block_id for b in handle._blocks] and len(set(table)) == 2
    kv.remove_skipped_blocks("a", 40)  # needs more than it holds: the engine leaves it alone
    kv.remove_skipped_blocks("unknown", 4)
    assert kv.get_block_table("a") == table
    kv.free("a")
    assert pool_tokens(kv) == (0, 0)


def test_allocate_slots_when_the_prefix_cache_covers_the_request() -> None:
    # Every token cached: the engine allocates one block of ours behind the cached block ids; a call
    # with no new tokens also gets one block; a second call for a request frees its handle and
    # allocates the old size plus the new tokens (the table then holds only that handle's blocks).
    kv = manager(num_blocks=16)
    ids = list(range(1, 33))
    kv.allocate_slots(MinimalRequest("a", ids), 33, 0, tokens=ids)
    kv.cache_blocks(MinimalRequest("a", ids), 32)
    assert kv.allocate_slots(MinimalRequest("b", ids), 32, 0, tokens=ids) == 48
    assert kv._request_handles["b"].num_tokens == 16 and kv.get_num_computed_tokens("b") == 32
    assert kv.get_block_table("b")[:2] == kv.get_block_table("a")[:2]
    assert kv.allocate_slots(MinimalRequest("c"), 0, 0) == 16 and kv._request_handles["c"].num_tokens == 16
    assert kv.allocate_slots(MinimalRequest("b", ids), 5, 5) == 32
    assert kv._request_handles["b"].num_tokens == 21 and kv.get_num_computed_tokens("b") == 37
    assert kv.get_block_table("b") == [b.block_id for b in kv._request_handles["b"]._blocks]
    assert pool_tokens(kv) == (70, 3)
    for rid in "abc":
        kv.free(rid)
    assert pool_tokens(kv) == (0, 0)


@pytest.mark.parametrize(("dtype", "expected"), [
    ("fp16", DType.FP16), ("float16", DType.FP16), ("bf16", DType.BF16), ("bfloat16", DType.BF16),
    ("fp32", DType.FP32), ("float32", DType.FP32),
])
def test_kv_cache_config_dtypes_reach_our_pool(dtype: str, expected: DType) -> None:
    # KVCacheConfig normalises the dtype to fp16/bf16/fp32 and allocate_slots passes the string on,
    # with layout "contiguous" and device "cuda:0" unless the caller names one.
    kv = manager(num_blocks=8, dtype=dtype)
    kv.allocate_slots(MinimalRequest("a"), 20, 0)
    handle = kv._request_handles["a"]
    assert (handle.dtype, handle.layout, handle.device) == (expected, Layout.CONTIGUOUS, "cuda:0")
    assert handle.num_tokens == 20


def test_engine_stats_read_our_stat_keys() -> None:
    from sagellm_core.runtime_optimizer import RuntimeStats

    kv = manager(num_blocks=64, block_size=4)
    # An empty PrefixCache is falsy (the original's __len__), so the engine neither looks it up nor
    # reports it until something is cached.
    assert not kv.prefix_cache and "prefix_cache" not in kv.get_stats()
    ids = list(range(100, 118))
    kv.allocate_slots(MinimalRequest("a", ids), 19, 0, tokens=ids)
    kv.cache_blocks(MinimalRequest("a", ids), 18)
    kv.free("a")
    assert kv.allocate_slots(MinimalRequest("b", ids), 19, 0, tokens=ids) == 20
    assert kv.get_num_computed_tokens("b") == 16 and len(kv.get_block_table("b")) == 5
    hit, tokens = kv.find_longest_cache_hit(kv.compute_block_hashes(ids[:10]))
    assert tokens == 8 and [b["block_id"] for b in hit] == kv.get_block_table("b")[:2]
    assert kv.find_longest_cache_hit(kv.compute_block_hashes([1, 2, 3, 4])) == ([], 0)

    # ContinuousBatchingScheduler.get_metrics reads the pool's allocated/available tokens and the
    # prefix cache's hit_count/miss_count; the same numbers as the original.
    metrics = ContinuousBatchingScheduler(kv_cache_manager=kv, block_size=4).get_metrics()
    assert (metrics.kv_allocated_tokens, metrics.kv_available_tokens) == (3, 253)
    assert metrics.prefix_hit_rate == pytest.approx(2 / 3) and metrics.kv_pool_utilization == 3 / 256
    assert kv.get_stats()["prefix_cache"]["hit_rate"] == pytest.approx(2 / 3)
    # RuntimeStats divides hit_count by query_count, a key the original's get_stats lacks (it read 0.0).
    assert RuntimeStats._extract_kv_cache_hit_rate(kv) == pytest.approx(2 / 3)
    assert repr(kv) == "KVCacheManager(requests=1, allocated=3/256 tokens, prefix_cache=enabled)"
    kv.free("b")


def test_scheduler_kv_bridge_pins_through_our_pool() -> None:
    pool = KVPool(max_tokens=64, block_size=16)
    scheduler = ContinuousBatchingScheduler(kv_pool=pool, block_size=16)
    scheduler.add_request(request("a", 20))
    scheduler.schedule()
    bridge = scheduler.kv_bridge
    bridge.pin_request("a")
    bridge.pin_request("a")
    handle: KVHandle = bridge.request_handles["a"]
    assert handle.pin_count == 2 and pool.get_stats()["pinned_tokens"] == 21
    bridge.unpin_request("a")
    assert handle.pin_count == 1
    assert repr(bridge) == "SchedulerKVBridge(num_requests=1, allocated=21/64 tokens)"
    metrics = scheduler.get_metrics()
    assert (metrics.kv_allocated_tokens, metrics.kv_available_tokens, metrics.kv_pool_utilization) == (21, 43, 21 / 64)
    # Freeing a pinned request: the original's pool raised a ValueError; the engine has already
    # dropped the request from its bridge, and the pool keeps the handle (as with the original).
    with pytest.raises(ValueError, match="pinned"):
        scheduler.free_request("a")
    assert not bridge.has_request("a") and pool.get_stats()["num_handles"] == 1
    pool.unpin(handle)
    pool.free(handle)
    assert pool.get_stats()["num_handles"] == 0


def test_use_scheduler_bridge_beside_the_engines_manager() -> None:
    kv = manager(num_blocks=12)
    scheduler = ContinuousBatchingScheduler(kv_cache_manager=kv, block_size=16, use_scheduler_bridge=True)
    bridge = scheduler._advanced_scheduler_bridge
    assert bridge.max_tokens == 192  # kv_cache_manager.config.max_tokens
    for rid, n in (("a", 6), ("b", 39), ("c", 19)):
        scheduler.add_request(request(rid, n))
    out = scheduler.schedule()
    # The original: only "a" (6 + 100 tokens, 7 blocks) fits the bridge's 192 tokens.
    assert [[r.request_id for r in b.requests] for b in out.scheduled_prefill] == [["a"]]
    assert out.scheduled_prefill[0].block_tables == [list(range(7))]
    assert pool_tokens(kv) == (0, 0)  # the engine's manager allocated nothing
    # Next step "a" decodes: the engine asks its manager, which never allocated it, for a slot
    # (KeyError with the original too). Its owner frees the bridge's reservation.
    with pytest.raises(KeyError, match="Request a has no block table"):
        scheduler.schedule()
    bridge.free_request("a")
    assert bridge.get_stats()["pool"]["num_handles"] == 0


class _PipeBackend:
    """A two-rank comm backend in one process; only stored here (the engine never transfers)."""

    def __init__(self) -> None:
        self.frames: deque[Any] = deque()

    def get_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 2

    def send(self, tensor: Any, dst: int) -> None:
        self.frames.append(tensor.clone())

    def recv(self, tensor: Any, src: int) -> None:
        tensor.copy_(self.frames.popleft())


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_on_our_pool_and_transfer_engine(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    # ContinuousBatchingScheduler._preempt_if_needed has no caller in the engine; an embedder that
    # calls it frees victims through our pool (recompute) or hands them to transfer_engine.transfer
    # (swap), a method neither our KVTransferEngine nor the original's has: the engine logs the
    # AttributeError and keeps the blocks, as with the original.
    from sagellm_kv_cache.transfer import KVTransferEngine

    caplog.set_level(logging.ERROR, logger=SCHEDULER_LOG)
    pool = KVPool(max_tokens=64, block_size=16)
    scheduler = ContinuousBatchingScheduler(kv_pool=pool, block_size=16, enable_preemption=True, enable_swap=True,
                                            preemption_mode=mode, transfer_engine=KVTransferEngine(_PipeBackend()))
    for rid in "ab":
        scheduler.add_request(request(rid, 19))
    scheduler.schedule()
    assert pool.get_allocated_tokens() == 40

    @dataclass
    class Urgent:
        request_id: str = "urgent"
        priority: int = 5

    preempted = [r.request_id for r in scheduler._preempt_if_needed([Urgent()], 40)]
    if mode == "recompute":
        assert preempted == ["a"] and pool.get_allocated_tokens() == 20
        assert sorted(scheduler.kv_bridge.request_handles) == ["b"]
    else:
        assert preempted == ["a", "b"] and pool.get_allocated_tokens() == 40 and scheduler.get_num_swapped() == 2
        assert [r.getMessage() for r in caplog.records] == [
            f"Failed to swap out {rid}: 'KVTransferEngine' object has no attribute 'transfer'" for rid in "ab"]
    for rid in list(scheduler.kv_bridge.request_handles):
        scheduler.free_request(rid)
    assert pool.get_stats()["num_handles"] == 0


# --- SageAttention given our KVCacheManager --------------------------------------------------------


def test_sage_attention_allocates_from_our_kv_cache_manager() -> None:
    # sagellm_core.attention's documented use: replace_attention_layers(model, attention_backend=...,
    # kv_cache_manager=sagellm_kv_cache.KVCacheManager(...)). A forward with attention metadata but
    # no block tables allocates a handle for its tokens with DType.FP16 / Layout.CONTIGUOUS.
    import torch
    from sagellm_backend.attention import AttentionMetadata, TorchSDPAAttentionBackend
    from sagellm_core.attention import SageAttention, replace_attention_layers
    from sagellm_kv_cache import KVCacheManager as OurKVCacheManager
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    kv = OurKVCacheManager(max_tokens=4096, block_size=16)
    model = replace_attention_layers(model, attention_backend=TorchSDPAAttentionBackend(), kv_cache_manager=kv)
    (layer,) = [m for m in model.modules() if isinstance(m, SageAttention)]
    assert layer.kv_cache_manager is kv
    metadata = AttentionMetadata(seq_lens=[5], is_prefill=True, max_seq_len=5, num_tokens=5, num_prefill_tokens=5,
                                 device="cpu")
    out = layer(torch.randn(1, 5, 32), attention_metadata=metadata)
    assert tuple((out[0] if isinstance(out, tuple) else out).shape) == (1, 5, 32)
    (handle,) = kv.handles()
    assert (handle.num_tokens, handle.dtype, handle.layout, handle.device) == (5, DType.FP16, Layout.CONTIGUOUS, "cpu")
    assert handle.metadata["attention_metadata"] is metadata
    kv.free(handle)
    assert kv.kv_pool.get_stats()["num_handles"] == 0
