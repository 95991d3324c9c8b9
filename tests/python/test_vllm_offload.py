"""The vLLM 0.33 OffloadingSpec on our trie + host pool: manager contract, worker bytes, vLLM's real scheduler.

Skipped without vLLM (it is an optional integration; CI installs vllm==0.33.0 without its CUDA deps).
"""

from __future__ import annotations

import os
import random
import re
import warnings

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
if os.environ.get("SAGELLM_KV_REQUIRE_VLLM") == "1":  # scripts/test.sh: a missing vLLM is a failure there
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

with warnings.catch_warnings():  # vLLM's import chain trips deprecation warnings in torch
    warnings.simplefilter("ignore", DeprecationWarning)
    from vllm_harness import Engine, scheduler_connector

import numpy as np
import torch
from sagellm_kv_cache.errors import KVConfigInvalidError, KVRefCountUnderflowError
from sagellm_kv_cache.integrations.vllm_offload import (
    SageLoadStoreSpec,
    SageOffloadingManager,
    SageOffloadingSpec,
    SageOffloadingWorker,
    slot_digest,
)
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
    LookupResult,
    Medium,
    ReqContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)

CTX = ReqContext("r0")


def keys(*ids: int, group: int = 0) -> list[bytes]:
    return [make_offload_key(i.to_bytes(32, "big"), group) for i in ids]


def stored(m: SageOffloadingManager, ks: list[bytes]) -> None:
    out = m.prepare_store(ks, CTX)
    assert out is not None
    m.complete_store(out.keys_to_store, CTX)


# --- manager contract ------------------------------------------------------------------------


def test_keys_differing_in_group_are_distinct_chunks() -> None:
    m = SageOffloadingManager(2)
    a, b = keys(5, group=0)[0], keys(5, group=1)[0]
    stored(m, [a])
    assert m.lookup(b, CTX) is LookupResult.MISS
    stored(m, [b])
    assert m.lookup(a, CTX) is LookupResult.HIT and m.lookup(b, CTX) is LookupResult.HIT
    assert len({slot_digest(s) for s in range(1000)}) == 1000 and len(slot_digest(7)) == 32


def test_lookup_takes_its_arguments_by_name_like_vllms_manager() -> None:
    """OffloadingManager.lookup(key, req_context): the C function standing in for our method took them by
    position only (TypeError for lookup(key=..., req_context=...), which vLLM's manager accepts)."""
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    for m in (SageOffloadingManager(2), CPUOffloadingManager(2)):
        stored(m, keys(1))  # type: ignore[arg-type]
        k, other = keys(1)[0], keys(2)[0]
        assert m.lookup(key=k, req_context=CTX) is LookupResult.HIT
        assert m.lookup(k, req_context=CTX) is LookupResult.HIT
        assert m.lookup(req_context=CTX, key=other) is LookupResult.MISS
    m = SageOffloadingManager(2)
    k = keys(1)[0]
    for call, message in ((lambda: m.lookup(k, CTX, None), "arguments given"),  # type: ignore[call-arg]
                          (lambda: m.lookup(k, context=CTX), "unexpected keyword argument 'context'"),  # type: ignore[call-arg]
                          (lambda: m.lookup(k, key=k), "multiple values for argument 'key'"),  # type: ignore[misc]
                          (lambda: m.lookup(k, CTX, req_context=CTX), "multiple values for argument 'req_context'"),  # type: ignore[misc]
                          (lambda: m.lookup(req_context=CTX), "missing required argument 'key'")):  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=message):
            call()
    assert m.lookup(k) is LookupResult.MISS  # the context is optional here, as before


def test_not_readable_before_complete_store() -> None:
    m = SageOffloadingManager(4)
    k = keys(1)
    assert m.lookup(k[0], CTX) is LookupResult.MISS
    out = m.prepare_store(k, CTX)
    assert out is not None and out.keys_to_store == k and out.evicted_keys == []
    assert m.lookup(k[0], CTX) is LookupResult.HIT_PENDING
    with pytest.raises(KeyError):
        m.prepare_load(k, CTX)
    m.complete_store(k, CTX)
    assert m.lookup(k[0], CTX) is LookupResult.HIT
    # a second store of a resident or pending key stores nothing
    again = m.prepare_store(k, CTX)
    assert again is not None and again.keys_to_store == []


def test_failed_store_frees_the_slot_and_stays_a_miss() -> None:
    m = SageOffloadingManager(1)
    out = m.prepare_store(keys(1), CTX)
    assert out is not None
    m.complete_store(out.keys_to_store, CTX, success=False)
    assert m.lookup(keys(1)[0], CTX) is LookupResult.MISS
    assert m.stats()["free_chunks"] == 1


def test_loading_key_is_not_evictable_until_complete_load() -> None:
    """Two loads in flight, each completed with its own keys, as vLLM's connector completes a job (a load
    completed in parts: test_a_load_completed_in_parts_keeps_the_rest_pinned)."""
    m = SageOffloadingManager(2)
    a, b = ReqContext("a"), ReqContext("b")
    for ctx, k in ((a, keys(1)), (b, keys(2))):  # two requests: two roots, neither shields the other
        out = m.prepare_store(k, ctx)
        assert out is not None
        m.complete_store(out.keys_to_store, ctx)
    spec = m.prepare_load(keys(1), a)
    assert isinstance(spec, SageLoadStoreSpec) and len(spec.block_ids) == 1
    m.prepare_load(keys(2), b)
    assert m.prepare_store(keys(3), CTX) is None  # both pinned: nothing can be freed
    m.complete_load(keys(2), b)
    out = m.prepare_store(keys(3), CTX)
    assert out is not None and out.evicted_keys == keys(2)  # 1 is the LRU, but still being loaded
    assert m.lookup(keys(1)[0], CTX) is LookupResult.HIT
    assert m.lookup(keys(2)[0], CTX) is LookupResult.MISS
    assert m.prepare_store(keys(4), CTX) is None  # 1 pinned, 3 pending
    m.complete_load(keys(1), a)
    assert m.stats()["in_use_blocks"] == 0


def test_a_load_completed_in_parts_keeps_the_rest_pinned() -> None:
    """vLLM's own manager counts a load per key, so complete_load may release part of a prepare_load's
    keys. Ours released the whole chain the load had pinned: key 1, still being loaded, was evicted and
    its slot handed to a new store (bytes overwritten under the reader), and completing it then raised
    KeyError. Now a load's pins stay until all its keys are released, so 1 stays (and, more cautious
    than vLLM's, so does 2 until then: the pins are the chain's)."""
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    for m in (SageOffloadingManager(2), CPUOffloadingManager(2)):
        ctx = ReqContext("parts")
        out = m.prepare_store(keys(1, 2), ctx)
        assert out is not None
        m.complete_store(out.keys_to_store, ctx)
        slots = m.prepare_load(keys(1, 2), ctx).block_ids.tolist()  # type: ignore[attr-defined]
        m.complete_load(keys(2), ctx)  # 1 is still loading
        assert m.prepare_store(keys(3, 4), ctx) is None, type(m).__name__  # 1 may not go
        assert m.lookup(keys(1)[0], ctx) is LookupResult.HIT
        m.complete_load(keys(1), ctx)
        out = m.prepare_store(keys(3, 4), ctx)
        assert out is not None and sorted(out.evicted_keys) == keys(1, 2), type(m).__name__
        assert sorted(out.store_spec.block_ids.tolist()) == sorted(slots)  # type: ignore[attr-defined]
        m.complete_store(out.keys_to_store, ctx)
    sage = SageOffloadingManager(2)
    stored(sage, keys(1, 2))
    sage.prepare_load(keys(2), CTX)  # 1 is pinned as 2's ancestor, but not loaded: releasing it is an error
    with pytest.raises(KVRefCountUnderflowError, match="slot 0 has no load in flight"):
        sage.complete_load(keys(1), CTX)
    sage.complete_load(keys(2), CTX)
    assert sage.stats()["in_use_blocks"] == 0
    sage.check_invariants()


def test_prepare_load_reads_its_keys_once() -> None:
    """Keys handed as an iterator: pinned once and released by complete_load (the iterator was read a
    second time for the request's last key: IndexError with the pins kept)."""
    m = SageOffloadingManager(4)
    ctx = ReqContext("iter")
    stored(m, keys(1, 2))
    assert m.prepare_load(iter(keys(1, 2)), ctx).block_ids.tolist() == [0, 1]  # type: ignore[arg-type]
    m.complete_load(keys(1, 2), ctx)
    assert m.stats()["in_use_blocks"] == 0
    out = m.prepare_store(keys(3), ctx)  # chains from the last key loaded
    assert out is not None
    m.complete_store(out.keys_to_store, ctx)
    m.prepare_load(keys(1, 2, 3), ctx)
    assert m.stats()["lookups"] == 2  # one chain: one match


def test_prepare_store_none_when_all_pending() -> None:
    m = SageOffloadingManager(2)
    assert m.prepare_store(keys(1, 2), CTX) is not None
    assert m.prepare_store(keys(3), CTX) is None
    assert m.stats()["pending_chunks"] == 2


def test_store_keeps_key_order_and_skips_resident_keys() -> None:
    m = SageOffloadingManager(8)
    stored(m, keys(4))
    out = m.prepare_store(keys(7, 4, 2, 9), CTX)
    assert out is not None and out.keys_to_store == keys(7, 2, 9)
    slots = out.store_spec.block_ids.tolist()
    assert len(set(slots)) == 3
    m.complete_store(out.keys_to_store, CTX)
    assert m.prepare_load(keys(7, 2, 9), CTX).block_ids.tolist() == slots


def test_eviction_is_lru_by_load_and_store_and_spares_the_call_keys() -> None:
    m = SageOffloadingManager(3)
    stored(m, keys(1))
    stored(m, keys(2))
    stored(m, keys(3))
    m.prepare_load(keys(1), CTX)
    m.complete_load(keys(1), CTX)  # 1 is now the most recent; 2 is the LRU
    out = m.prepare_store(keys(2, 4), CTX)  # 2 is part of this call: not a victim
    assert out is not None and out.keys_to_store == keys(4) and out.evicted_keys == keys(3)
    assert m.lookup(keys(2)[0], CTX) is LookupResult.HIT


def test_events_carry_the_cpu_medium() -> None:
    m = SageOffloadingManager(1, enable_events=True)
    stored(m, keys(1))
    stored(m, keys(2))
    events = list(m.take_events())
    assert [(e.removed, e.keys, e.medium) for e in events] == [
        (False, keys(1), Medium.CPU), (True, keys(1), Medium.CPU), (False, keys(2), Medium.CPU)]
    assert list(m.take_events()) == []


def test_failed_store_events_match_vllms_manager() -> None:
    """vLLM's manager announces a failed store's keys as a metadata_only removal (its connector's event
    tracker then drops the payload it recorded for them, publishing nothing) and leaves out a key stored
    again before the events are taken. Ours announced nothing, so the tracker kept those payloads."""
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    def story(m: object) -> list[tuple[bool, bool, list[bytes]]]:
        assert isinstance(m, SageOffloadingManager | CPUOffloadingManager)
        ctx = ReqContext("fail")
        stored(m, keys(1))  # type: ignore[arg-type]
        out = m.prepare_store(keys(2, 3, 4), ctx)
        assert out is not None
        m.complete_store(set(out.keys_to_store) | set(keys(1, 9)), ctx, success=False)  # 1: resident, 9: unknown
        again = m.prepare_store(keys(3), ctx)  # 3 is stored again before the events are taken
        assert again is not None and again.keys_to_store == keys(3)
        m.complete_store(keys(3), ctx)
        return [(e.removed, e.metadata_only, sorted(e.keys)) for e in m.take_events()]

    ours = story(SageOffloadingManager(8, enable_events=True))
    assert ours == story(CPUOffloadingManager(8, enable_events=True))
    assert ours == [(False, False, keys(1)), (True, True, keys(2, 4)), (False, False, keys(3))]


def test_bad_capacity_is_a_value_error() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            SageOffloadingManager(bad)  # type: ignore[arg-type]


def _config(groups: int = 1, extra: dict[str, object] | None = None, bpc: int = 1) -> OffloadingConfig:
    return OffloadingConfig(
        groups=tuple(OffloadingGroupConfig(tokens_per_block=16, layer_names=(f"l{g}",), group_id=g)
                     for g in range(groups)),
        worker_kv_bytes_per_block=1024, enable_kv_cache_events=True,
        extra_config=extra if extra is not None else {"cpu_bytes_to_use": 1024 * 64},
        engine_id="e", model=OffloadingModelConfig(name="m", dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=bpc),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                          data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=True))


def test_spec_sizes_the_tier_and_refuses_hybrid_models() -> None:
    spec = SageOffloadingSpec(_config(bpc=2))
    assert spec.num_chunks == 32
    manager = spec.get_manager()
    assert isinstance(manager, SageOffloadingManager) and manager is spec.get_manager()
    with pytest.raises(ValueError, match="one KV-cache group"):
        SageOffloadingSpec(_config(groups=2))
    with pytest.raises(ValueError, match="cpu_bytes_to_use"):
        SageOffloadingSpec(_config(extra={}))
    with pytest.raises(ValueError, match="copies must be"):
        SageOffloadingSpec(_config(extra={"num_chunks": 4, "copies": "cuda"}))


def test_spec_refuses_an_unknown_eviction_policy_when_it_reads_its_config() -> None:
    """The policy was first parsed by get_manager, after the spec had been built in every process."""
    for bad in ("LRU", "bogus", "", 5):
        with pytest.raises(KVConfigInvalidError, match=f"unknown eviction policy '{bad}'; expected one of lru"):
            SageOffloadingSpec(_config(extra={"num_chunks": 4, "eviction_policy": bad}))
    for policy in ("lru", "fifo", "priority", "ttl"):
        manager = SageOffloadingSpec(_config(extra={"num_chunks": 4, "eviction_policy": policy})).get_manager()
        assert isinstance(manager, SageOffloadingManager) and manager.policy == policy


def test_spec_reads_sizes_as_vllm_does_and_names_a_bad_one() -> None:
    # JSON numbers and strings of digits are read as vLLM's own specs read them
    assert SageOffloadingSpec(_config(extra={"cpu_bytes_to_use": 64e3})).num_chunks == 62
    assert SageOffloadingSpec(_config(extra={"num_chunks": "4"})).num_chunks == 4
    for key, bad in [("num_chunks", 4.7), ("num_chunks", True), ("num_chunks", [4]), ("num_chunks", "four"),
                     ("cpu_bytes_to_use", float("nan")), ("cpu_bytes_to_use", float("inf")),
                     ("cpu_bytes_to_use", "1e9"), ("cpu_bytes_to_use", {})]:
        with pytest.raises(ValueError, match=f"{key}.*{re.escape(repr(bad))}"):
            SageOffloadingSpec(_config(extra={key: bad}))
    # out of range: refused by the spec (in every process), not later by the pool or the index
    with pytest.raises(ValueError, match=r"cpu_bytes_to_use.*-5"):
        SageOffloadingSpec(_config(extra={"cpu_bytes_to_use": -5}))
    with pytest.raises(ValueError, match="cpu_bytes_to_use=1024000000000000"):
        SageOffloadingSpec(_config(extra={"cpu_bytes_to_use": 1024 * 10**12}))
    for bad_count in (0, -3, 2**31, 10**30):
        with pytest.raises(ValueError, match=f"num_chunks.*{bad_count}"):
            SageOffloadingSpec(_config(extra={"num_chunks": bad_count}))


def test_reset_cache_drops_everything_in_flight_too() -> None:
    """vLLM never completes a job started before a reset: pins and pending stores must not outlive it."""
    m = SageOffloadingManager(4)
    ctx = ReqContext("reset")
    stored(m, keys(1))
    stored(m, keys(2))
    m.prepare_load(keys(1), ctx)
    assert m.prepare_store(keys(3), ctx) is not None  # in flight
    m.reset_cache()
    assert [m.lookup(k, ctx) for k in keys(1, 2, 3)] == [LookupResult.MISS] * 3
    stats = m.stats()
    assert (stats["free_chunks"], stats["resident_chunks"], stats["pending_chunks"], stats["in_use_blocks"]) == (
        4, 0, 0, 0)
    out = m.prepare_store(keys(5, 6, 7, 8), ctx)  # the whole tier again; the request starts a new chain
    assert out is not None and out.evicted_keys == []
    m.complete_store(set(out.keys_to_store), ctx)
    m.prepare_load(keys(5, 6, 7, 8), ctx)
    m.complete_load(set(keys(5, 6, 7, 8)), ctx)
    assert m.stats()["in_use_blocks"] == 0 and m.stats()["lookups"] == 1


# --- worker: bytes between vLLM's canonical views and our pool ---------------------------------


def _canonical(layer_outer: bool, num_blocks: int = 12, page: int = 64, layers: int = 3
               ) -> tuple[CanonicalKVCaches, torch.Tensor]:
    if layer_outer:  # one (num_blocks, page) view per layer over one buffer
        raw = torch.randint(-128, 127, (layers, num_blocks, page), dtype=torch.int8)
        tensors = [CanonicalKVCacheTensor(raw[i], page) for i in range(layers)]
        refs = [CanonicalKVCacheRef(i, page) for i in range(layers)]
    else:  # block-outer: one packed tensor, every layer refers to it
        raw = torch.randint(-128, 127, (num_blocks, layers * page), dtype=torch.int8)
        tensors = [CanonicalKVCacheTensor(raw, layers * page)]
        refs = [CanonicalKVCacheRef(0, page) for _ in range(layers)]
    return CanonicalKVCaches(tensors=tensors, group_data_refs=[refs]), raw


def _block(raw: torch.Tensor, layer_outer: bool, b: int) -> torch.Tensor:
    return raw[:, b].clone() if layer_outer else raw[b].clone()


@pytest.mark.parametrize("layer_outer", [True, False])
@pytest.mark.parametrize("bpc", [1, 2, 4])
@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_store_then_load_is_byte_exact(layer_outer: bool, bpc: int, copies: str) -> None:
    kv, raw = _canonical(layer_outer)
    worker = SageOffloadingWorker(kv, num_chunks=6, blocks_per_chunk=bpc, copies=copies)
    assert worker.copies == copies
    n_chunks = 2
    n = n_chunks * bpc
    src_blocks = [3, 7, 1, 10, 0, 5, 11, 2][:n]
    before = [_block(raw, layer_outer, b) for b in src_blocks]
    slots = SageLoadStoreSpec(list(range(5, 5 - n_chunks, -1)))
    assert worker.submit_store(1, GPULoadStoreSpec(src_blocks, [n], [0]), slots)
    raw.zero_()
    # load into other blocks, starting from the second block of the first chunk when bpc > 1
    skip = 1 if bpc > 1 else 0
    dst = [0, 2, 4, 5, 6, 8, 9, 11][: n - skip]
    assert worker.submit_load(2, slots, GPULoadStoreSpec(dst, [len(dst)], [skip]))
    for d, want in zip(dst, before[skip:], strict=True):
        assert torch.equal(_block(raw, layer_outer, d), want)
    untouched = set(range(12)) - set(dst)
    assert all(not _block(raw, layer_outer, b).any() for b in untouched)
    done = worker.get_finished()
    assert [(r.job_id, r.success) for r in done] == [(1, True), (2, True)] and worker.get_finished() == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("copies", ["auto", "pool"])
def test_worker_round_trip_with_cuda_kv(copies: str) -> None:
    kv, raw = _canonical(True)
    raw_gpu = raw.cuda()
    kv = CanonicalKVCaches(tensors=[CanonicalKVCacheTensor(raw_gpu[i], 64) for i in range(raw.shape[0])],
                           group_data_refs=kv.group_data_refs)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    assert worker.copies == ("stream" if copies == "auto" else "pool")
    slots = SageLoadStoreSpec([3, 1])
    worker.submit_store(1, GPULoadStoreSpec([0, 1, 2, 3], [4], [0]), slots)
    raw_gpu[:, 4:8].zero_()
    worker.submit_load(2, slots, GPULoadStoreSpec([4, 5, 6, 7], [4], [0]))
    worker.wait({1, 2})  # as vLLM does before it reads loaded blocks
    assert sorted(r.job_id for r in worker.get_finished()) == [1, 2]
    assert torch.equal(raw_gpu[:, 4:8].cpu(), raw[:, 0:4])
    worker.shutdown()


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_rejects_a_mismatched_chunk_count(copies: str) -> None:
    kv, _ = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    with pytest.raises(ValueError, match="chunks"):
        worker.submit_store(1, GPULoadStoreSpec([1, 2, 3, 4], [4], [0]), SageLoadStoreSpec([0]))
    assert worker.get_finished() == []
    with pytest.raises(ValueError, match="copies"):
        SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies="gpu")


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_takes_an_empty_job_at_any_block_index(copies: str) -> None:
    """A group of 0 blocks needs no chunk: vLLM's own handler skips it whatever its block index. Ours
    counted the index's offset into a chunk and refused it (ValueError: 0 blocks from offset 1 need 1
    chunks), which vLLM's worker connector does not catch."""
    kv, raw = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    before = raw.clone()
    assert worker.submit_store(1, GPULoadStoreSpec([], [0], [3]), SageLoadStoreSpec([]))
    assert worker.submit_load(2, SageLoadStoreSpec([]), GPULoadStoreSpec([], [0], [5]), expedited=True)
    worker.wait({1, 2})
    assert sorted(r.job_id for r in worker.get_finished()) == [1, 2]
    assert torch.equal(raw, before) and worker.stored_blocks == worker.loaded_blocks == 0
    with pytest.raises(ValueError, match="need 0 chunks, got 1"):
        worker.submit_load(3, SageLoadStoreSpec([0]), GPULoadStoreSpec([], [0], [1]))


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_names_a_block_id_out_of_range_and_moves_nothing(copies: str) -> None:
    """Both paths check vLLM's block ids before copying (the pool path gave torch's unnamed IndexError, and
    on CUDA KV an out-of-range index_select is a device-side assert that ends the process)."""
    kv, raw = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    before = raw.clone()
    for bad in (12, -1):
        with pytest.raises(ValueError, match=f"block id {bad} out of range"):
            worker.submit_store(1, GPULoadStoreSpec([0, bad], [2], [0]), SageLoadStoreSpec([1]))
        with pytest.raises(ValueError, match=f"block id {bad} out of range"):
            worker.submit_load(2, SageLoadStoreSpec([1]), GPULoadStoreSpec([bad, 3], [2], [0]))
    assert torch.equal(raw, before) and worker.get_finished() == []
    assert worker.stored_blocks == worker.loaded_blocks == 0


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_refuses_a_store_naming_a_slot_twice(copies: str) -> None:
    """Two chunks written into one slot: the later one's blocks would overwrite the earlier's, which the
    manager then believes stored. The stream path let that happen; the pool path's scatter refused it, but
    only after staging every block, and named the slot as a pool "block id". Both now refuse it first,
    in the same words, with the slots as they were."""
    kv, raw = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    assert worker.submit_store(1, GPULoadStoreSpec([4, 5, 6, 7], [4], [0]), SageLoadStoreSpec([1, 2]))
    stored = raw[:, 4:8].clone()
    worker.get_finished()
    for slots, first, second, skip in (([1, 1], 0, 1, 0), ([0, 2, 1, 2], 1, 3, 1)):
        n = 2 * len(slots) - skip
        with pytest.raises(ValueError, match=f"^store: slot {slots[first]} appears at positions {first} and "
                                             f"{second}; each slot may be written once per job$"):
            worker.submit_store(2, GPULoadStoreSpec(list(range(n)), [n], [skip]), SageLoadStoreSpec(slots))
    assert worker.get_finished() == [] and worker.stored_blocks == 4
    assert worker.submit_load(3, SageLoadStoreSpec([1, 2]), GPULoadStoreSpec([8, 9, 10, 11], [4], [0]))
    assert torch.equal(raw[:, 8:12], stored)  # slots 1 and 2 still hold what job 1 stored


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_names_a_slot_out_of_range_as_a_slot_and_moves_nothing(copies: str) -> None:
    """The pool path left it to the pool, whose error named a "block id" (its own word for a slot)."""
    kv, raw = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    before = raw.clone()
    for bad in (4, -1):
        with pytest.raises(ValueError, match=rf"^slot {bad} out of range \[0, 4\)$"):
            worker.submit_store(1, GPULoadStoreSpec([0, 1, 2], [3], [1]), SageLoadStoreSpec([0, bad]))
        with pytest.raises(ValueError, match=rf"^slot {bad} out of range \[0, 4\)$"):
            worker.submit_load(2, SageLoadStoreSpec([bad, 1]), GPULoadStoreSpec([5, 6, 7], [3], [1]))
    assert torch.equal(raw, before) and worker.get_finished() == []
    assert worker.stored_blocks == worker.loaded_blocks == 0


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_loads_one_slot_into_two_places(copies: str) -> None:
    """A load naming a slot twice only reads it twice, into different device blocks (those may not
    repeat): nothing is ambiguous, so both paths take it."""
    kv, raw = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    assert worker.submit_store(1, GPULoadStoreSpec([0, 1], [2], [0]), SageLoadStoreSpec([3]))
    want = raw[:, 0:2].clone()
    assert worker.submit_load(2, SageLoadStoreSpec([3, 3]), GPULoadStoreSpec([9, 4, 7, 11], [4], [0]))
    assert torch.equal(raw[:, [9, 4]], want) and torch.equal(raw[:, [7, 11]], want)
    assert [r.job_id for r in worker.get_finished()] == [1, 2] and worker.loaded_blocks == 4


@pytest.mark.parametrize("copies", ["pool", "stream"])
def test_worker_refuses_a_load_naming_a_device_block_twice(copies: str) -> None:
    """Both paths wrote such a block twice (index_copy_ with a repeated index: the winner is undefined on
    CUDA); refused before any copy, as a store naming a slot twice is."""
    kv, raw = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2, copies=copies)
    assert worker.submit_store(1, GPULoadStoreSpec([0, 1, 2, 3], [4], [0]), SageLoadStoreSpec([1, 2]))
    assert [r.job_id for r in worker.get_finished()] == [1]
    before = raw.clone()
    with pytest.raises(ValueError, match="load: block id 7 appears at positions 1 and 3"):
        worker.submit_load(2, SageLoadStoreSpec([1, 2]), GPULoadStoreSpec([5, 7, 6, 7], [4], [0]))
    assert torch.equal(raw, before) and worker.get_finished() == [] and worker.loaded_blocks == 0


def test_worker_with_manager_slots_round_trip() -> None:
    kv, raw = _canonical(True, num_blocks=8)
    m = SageOffloadingManager(2)
    worker = SageOffloadingWorker(kv, num_chunks=2, blocks_per_chunk=1)
    want = {b: _block(raw, True, b) for b in range(8)}
    for b in range(4):  # store block b under key b; capacity 2 evicts as it goes
        out = m.prepare_store(keys(b), CTX)
        assert out is not None
        worker.submit_store(b, GPULoadStoreSpec([b], [1], [0]), out.store_spec)
        m.complete_store(out.keys_to_store, CTX)
    raw.zero_()
    resident = [b for b in range(4) if m.lookup(keys(b)[0], CTX) is LookupResult.HIT]
    assert resident == [2, 3]
    spec = m.prepare_load(keys(*resident), CTX)
    worker.submit_load(9, spec, GPULoadStoreSpec([6, 7], [2], [0]))
    m.complete_load(keys(*resident), CTX)
    assert torch.equal(_block(raw, True, 6), want[2]) and torch.equal(_block(raw, True, 7), want[3])
    assert np.array_equal(np.sort(spec.block_ids), np.array([0, 1], dtype=np.int32))





@pytest.mark.parametrize(("layout", "bpc", "async_scheduling", "copies"), [
    ("LBNHC", 1, False, "auto"), ("BLNHC", 1, False, "auto"), ("LBHNC", 1, False, "auto"), ("LBNHC", 2, False, "auto"),
    ("LBNHC", 4, False, "auto"), ("LBNHC", 1, True, "auto"), ("BLNHC", 2, True, "auto"),
    ("LBNHC", 2, False, "stream"), ("BLNHC", 4, True, "stream")])
def test_vllm_scheduler_stores_evicts_and_reloads_byte_exact(layout: str, bpc: int, async_scheduling: bool,
                                                             copies: str) -> None:
    """Real scheduler + connector: every reused block holds its own bytes; preemption included. ``stream``:
    the worker's GPU path (``ChunkCopier``), run on the CPU KV buffer."""
    # sized so that the GPU cache preempts and the host tier both evicts and serves reloads
    e = Engine(num_gpu_blocks=20, num_chunks={1: 36, 2: 18, 4: 7}[bpc], blocks_per_chunk=bpc, max_tokens_per_step=32,
               max_seqs=4, layout=layout, async_scheduling=async_scheduling, extra_config={"copies": copies})
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(30)] for _ in range(4)]
    for _ in range(3):
        for p in prompts:
            e.add(p, max_tokens=12)
        e.drain()
    manager = scheduler_connector(e).manager
    assert isinstance(manager, SageOffloadingManager)
    stats = manager.stats()
    w = e.sage_worker
    assert w.copies == ("pool" if copies == "auto" else copies)
    assert e.preemptions > 0, "the GPU cache is small enough to force preemption"
    assert w.stored_blocks > 0 and w.loaded_blocks > 0 and stats["hit_blocks"] > 0
    assert stats["evictions"] > 0, "the host tier is small enough to evict"
    assert e.checked_blocks > 100
    assert stats["pending_chunks"] == 0 and stats["in_use_blocks"] == 0  # every store / load completed
    assert stats["free_chunks"] == stats["num_chunks"] - stats["resident_chunks"]


def test_harness_samples_no_token_for_a_prefill_chunk() -> None:
    """vLLM's model runner discards the token sampled for a request whose prompt is still being prefilled
    in chunks. The harness gave every scheduled request a token, so a request with max_tokens=1 finished
    after its first chunk; vLLM's connector then stored its whole prompt (it stores a finished request up to
    its prompt length), most of it never computed, and a later request loaded those bytes as its prefix."""
    # 15 tokens a step: the first chunk ends inside block 3 (tokens 12-14 computed, 15 not)
    e = Engine(num_gpu_blocks=32, num_chunks=16, max_tokens_per_step=15, max_seqs=1, prefix_caching=False)
    prompt = list(range(100, 124))  # 6 blocks of 4 tokens
    e.add(prompt, max_tokens=1)
    e.drain()
    e.add([*prompt, 5], max_tokens=1)  # reuses all 6 blocks from the tier, each byte-checked
    e.drain()
    assert e.hit_tokens == len(prompt) and e.checked_blocks >= 6


@pytest.mark.parametrize(("async_scheduling", "copies", "policy"), [
    (False, "pool", "lru"), (False, "stream", "ttl"), (True, "stream", "fifo"), (True, "pool", "priority")])
def test_vllm_scheduler_with_aborts_and_connector_resets_stays_byte_exact(async_scheduling: bool, copies: str,
                                                                          policy: str) -> None:
    """Requests arriving over time (shared prefixes of three bases, chunked prefill: 16 tokens a step),
    some aborted while they prefill, load or decode, and (sync scheduler) vLLM's connector reset between
    steps, which drops the tier with stores and loads in flight: every reused block keeps its bytes and
    the tier's books close with nothing pending or pinned. (A longer randomized run of this kind found
    the harness defect that test_harness_samples_no_token_for_a_prefill_chunk pins down.)"""
    from vllm.v1.request import RequestStatus

    e = Engine(num_gpu_blocks=40, num_chunks=8, blocks_per_chunk=2, max_tokens_per_step=16, max_seqs=2,
               prefix_caching=False, async_scheduling=async_scheduling,
               extra_config={"copies": copies, "eviction_policy": policy})
    rng = random.Random(11)
    bases = [[rng.randrange(1000) for _ in range(rng.randrange(4, 30))] for _ in range(3)]
    aborts = resets = 0
    for _ in range(300):
        if rng.random() < 0.3:
            base = rng.choice(bases)
            e.add(base[:rng.randrange(1, len(base) + 1)] + [rng.randrange(1000) for _ in range(rng.randrange(8))],
                  max_tokens=rng.randrange(1, 10))
        r = rng.random()
        if r < 0.05 and e.scheduler.requests:
            e.scheduler.finish_requests(rng.choice(sorted(e.scheduler.requests)), RequestStatus.FINISHED_ABORTED)
            aborts += 1
        elif r < 0.08 and not async_scheduling:  # vLLM resets between steps, never inside one
            e.scheduler.reset_prefix_cache(reset_connector=True)  # the tier resets even when the GPU cache cannot
            resets += 1
        e.step()
    e.drain()
    manager = scheduler_connector(e).manager
    assert isinstance(manager, SageOffloadingManager)
    manager.check_invariants()
    stats = manager.stats()
    assert stats["pending_chunks"] == 0 and stats["in_use_blocks"] == 0
    assert aborts >= 5 and (resets >= 5 or async_scheduling)
    assert e.hit_tokens > 0 and e.checked_blocks > 300 and e.sage_worker.loaded_blocks > 0


def test_complete_load_accepts_reordered_keys_and_tails_evict_first() -> None:
    m = SageOffloadingManager(3)
    ctx = ReqContext("chain")
    out = m.prepare_store(keys(1, 2, 3), ctx)  # one request's blocks in prefix order: a chain 1 <- 2 <- 3
    assert out is not None
    m.complete_store(out.keys_to_store, ctx)
    m.prepare_load(keys(1, 2, 3), ctx)
    m.complete_load(keys(3, 1, 2), ctx)  # same keys, another order: every pin released exactly once
    assert m.stats()["in_use_blocks"] == 0
    out = m.prepare_store(keys(10), CTX)
    # only the chain's tail is a leaf: it goes first, the prefix 1 <- 2 stays loadable
    assert out is not None and out.evicted_keys == keys(3)
    assert [m.lookup(k, CTX) for k in keys(1, 2, 3)] == [LookupResult.HIT, LookupResult.HIT, LookupResult.MISS]


def test_store_completed_as_a_set_chains_in_store_order_and_evicts_through_the_chain() -> None:
    m = SageOffloadingManager(4)
    ctx = ReqContext("set")
    out = m.prepare_store(keys(1, 2, 3, 4), ctx)
    assert out is not None
    m.complete_store(set(reversed(out.keys_to_store)), ctx)  # vLLM hands the job's keys as a set
    spec = m.prepare_load(keys(1, 2, 3, 4), ctx)  # one chain from the root: pinned by one match
    assert spec.block_ids.tolist() == out.store_spec.block_ids.tolist()
    assert m.stats()["lookups"] == 1
    m.complete_load(set(keys(1, 2, 3, 4)), ctx)
    assert m.stats()["in_use_blocks"] == 0
    # a chain has one leaf, yet all of it can go: eviction cascades from the tail to the head
    out = m.prepare_store(keys(7, 8, 9), CTX)
    assert out is not None and sorted(out.evicted_keys) == keys(2, 3, 4)
    assert [m.lookup(k, CTX) for k in keys(1, 2)] == [LookupResult.HIT, LookupResult.MISS]


def test_partial_store_completion_keeps_the_rest_pending() -> None:
    m = SageOffloadingManager(4)
    ctx = ReqContext("part")
    out = m.prepare_store(keys(1, 2, 3), ctx)
    assert out is not None
    m.complete_store({keys(1)[0], keys(3)[0]}, ctx)
    assert [m.lookup(k, CTX) for k in keys(1, 2, 3)] == [LookupResult.HIT, LookupResult.HIT_PENDING,
                                                         LookupResult.HIT]
    m.complete_store(keys(2), ctx, success=False)
    assert m.lookup(keys(2)[0], CTX) is LookupResult.MISS
    assert m.stats()["free_chunks"] == 2 and m.stats()["resident_chunks"] == 2
    m.prepare_load(keys(3), ctx)  # 3 was stored after 2 failed: a root of its own, loadable alone
    m.complete_load(keys(3), ctx)
    assert m.stats()["in_use_blocks"] == 0


def test_random_call_sequences_keep_the_books_consistent() -> None:
    """Random requests (shared prefixes, loads completed whole or in parts, stores completed whole, in
    parts or failed, resets)
    against a plain model of what must hold: resident / pending keys answer HIT / HIT_PENDING, no two
    live keys share a slot, evicted keys were resident and unpinned, the free count matches."""
    rng = random.Random(7)
    for _ in range(3):
        m = SageOffloadingManager(24)
        resident: dict[bytes, int] = {}
        pending: dict[bytes, int] = {}
        loads: list[tuple[ReqContext, list[bytes]]] = []
        stores: list[tuple[ReqContext, list[bytes]]] = []
        stored_total = evicted_total = evicted_since_reset = 0
        for step in range(400):
            ctx = ReqContext(f"q{step}")
            chain = keys(*[rng.randrange(6) * 100 + i for i in range(rng.randrange(1, 9))])
            n = 0
            while n < len(chain) and m.lookup(chain[n], ctx) is LookupResult.HIT:
                n += 1
            if n and rng.random() < 0.7:
                spec = m.prepare_load(chain[:n], ctx)
                assert spec.block_ids.tolist() == [resident[k] for k in chain[:n]]
                loads.append((ctx, chain[:n]))
            if loads and rng.random() < 0.6:  # a load completes whole, or a part of it does
                at = rng.randrange(len(loads))
                done_ctx, done = loads[at]
                cut = len(done) if rng.random() < 0.5 else rng.randrange(1, len(done) + 1)
                m.complete_load(set(done[:cut]), done_ctx)
                if cut < len(done):
                    loads[at] = (done_ctx, done[cut:])
                else:
                    loads.pop(at)
            pinned = {k for _, ks in loads for k in ks}
            out = m.prepare_store(chain[n:], ctx)
            if out is not None:
                assert not set(out.evicted_keys) & pinned and set(out.evicted_keys) <= set(resident)
                for k in out.evicted_keys:
                    del resident[k]
                pending.update(zip(out.keys_to_store, out.store_spec.block_ids.tolist(), strict=True))
                stored_total += len(out.keys_to_store)
                evicted_total += len(out.evicted_keys)
                evicted_since_reset += len(out.evicted_keys)
                if out.keys_to_store:
                    part = [k for k in out.keys_to_store if rng.random() < 0.8]
                    stores.extend((ctx, [k]) for k in out.keys_to_store if k not in part)  # completed later
                    stores.append((ctx, part))
            while stores and rng.random() < 0.7:
                store_ctx, part = stores.pop(rng.randrange(len(stores)))
                ok = rng.random() < 0.9
                m.complete_store(set(part), store_ctx, success=ok)
                for k in part:
                    slot = pending.pop(k)
                    if ok:
                        resident[k] = slot
            if rng.random() < 0.01:
                m.reset_cache()
                resident.clear(), pending.clear(), loads.clear(), stores.clear()
                evicted_since_reset = 0
            live = list(resident.values()) + list(pending.values())
            assert len(set(live)) == len(live) <= 24
            for k in chain:
                want = (LookupResult.HIT if k in resident else
                        LookupResult.HIT_PENDING if k in pending else LookupResult.MISS)
                assert m.lookup(k, ctx) is want
            stats = m.stats()
            assert (stats["resident_chunks"], stats["pending_chunks"]) == (len(resident), len(pending))
            assert stats["free_chunks"] == 24 - len(live)
            assert stats["evictions"] == evicted_since_reset  # the counter restarts with a reset
        for done_ctx, done in loads:
            m.complete_load(set(done), done_ctx)
        stats = m.stats()
        assert stats["in_use_blocks"] == 0 and evicted_total > 50 and stored_total > 300
        m.check_invariants()


def test_mooncake_trace_through_vllm_scheduler_matches_our_replay() -> None:
    """The sample Mooncake trace through vLLM's scheduler (GPU prefix cache off, so every reused block
    comes from our tier) hits like our own replay of the trace at the same capacity."""
    from sagellm_kv_cache.replay import load_trace, replay, sample_trace_path

    requests = load_trace(sample_trace_path())
    distinct = len(np.unique(np.concatenate(requests)))
    longest = max(len(r) for r in requests)
    blocks = sum(len(r) for r in requests)
    capacity = distinct // 4
    ours = replay(requests, capacity)
    e = Engine(num_gpu_blocks=longest + 8, num_chunks=capacity, max_tokens_per_step=4 * longest + 64, max_seqs=1,
               prefix_caching=False)
    for ids in requests:  # one trace block = one vLLM block of 4 tokens named by its hash id
        e.add([int(i) % 30_000 for i in ids for _ in range(4)] + [1], max_tokens=1)
        e.drain()
    stats = scheduler_connector(e).manager.stats()
    assert ours.evictions > 0 and stats["evictions"] > 0
    # the manager's own free count (num_chunks - resident - pending) is the allocator's
    assert stats["free_chunks"] == stats["num_chunks"] - stats["resident_chunks"] - stats["pending_chunks"]
    vllm_ratio = e.sage_worker.loaded_blocks / blocks
    assert ours.hit_ratio > 0.02
    assert abs(vllm_ratio - ours.hit_ratio) <= 0.005, (vllm_ratio, ours.hit_ratio)
