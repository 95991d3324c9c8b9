"""Seed-compatible KVPool, KVHandle and the KV*Error hierarchy."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import sagellm_kv_cache
from sagellm_kv_cache import (
    KVBudgetExceededError,
    KVCacheError,
    KVCacheManager,
    KVConfigInvalidError,
    KVDoubleFreeError,
    KVHandle,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVInvalidBlockError,
    KVPoolFullError,
    KVRefCountUnderflowError,
)
from sagellm_kv_cache.pool import BlockManager, KVPool
from sagellm_protocol.kv import DType, KVBlockState, KVErrorCode, Layout, MemoryTier

SEED_STATS_KEYS = ["allocated_tokens", "available_tokens", "max_tokens", "num_handles", "pinned_tokens",
                   "unpinned_tokens", "used_tokens"]
SEED_HANDLE_KEYS = ["access_count", "compression_type", "created_at", "device", "dtype", "handle_id",
                    "is_compressed", "is_transferring", "last_access", "layout", "memory_tier", "metadata",
                    "num_tokens", "pin_count", "placement", "prefix_hash", "rank", "ref_count", "request_id",
                    "session_id", "source_rank", "state", "token_end", "token_start", "transfer_id"]


def test_seed_readme_pool_example(capsys: pytest.CaptureFixture[str]) -> None:
    pool = KVPool(max_tokens=1024)
    handle = pool.alloc(num_tokens=128, device="cpu")
    print(f"Allocated handle: {handle.handle_id}, Tokens: {handle.num_tokens}")
    pool.free(handle)
    assert "Tokens: 128" in capsys.readouterr().out
    assert pool.get_allocated_tokens() == 0


def test_handle_knows_its_blocks() -> None:
    pool = KVPool(max_tokens=1024, block_size=128)
    a = pool.alloc(300, DType.FP16, Layout.CONTIGUOUS, "cpu")
    b = pool.alloc(1, "bf16", "paged", "cuda:0")  # a label: the seed pool is metadata-only
    assert a.block_ids.tolist() == [0, 1, 2] and b.block_ids.tolist() == [3]
    assert b.dtype == DType.BF16 and b.device == "cuda:0"
    assert pool.get_block_stats()["used_blocks"] == 4
    pool.free(a)
    assert pool.get_block_stats()["free_blocks"] == 7


def test_budget_accounting_and_callback() -> None:
    calls: list[tuple[int, int, int]] = []
    pool = KVPool(max_tokens=256, block_size=16, on_budget_exceeded=lambda *a: calls.append(a))
    h = pool.alloc(192)
    # 64 tokens (4 full blocks) remain: with full blocks the token budget decides, as in the seed
    assert pool.can_admit(64) and not pool.can_admit(65)
    with pytest.raises(KVBudgetExceededError) as info:
        pool.alloc(100)
    assert calls == [(100, 64, 256)]
    assert info.value.requested == 100 and info.value.available == 64
    assert pool.get_stats() == {
        "allocated_tokens": 192, "available_tokens": 64, "max_tokens": 256, "num_handles": 1,
        "pinned_tokens": 0, "unpinned_tokens": 192, "used_tokens": 192,
    }
    assert sorted(pool.get_stats()) == SEED_STATS_KEYS
    pool.free(h)


def test_block_ids_stay_below_num_blocks_and_admission_counts_the_blocks() -> None:
    # The engine's paged attention indexes a tensor of exactly num_blocks blocks with these ids
    # (kv_pool.py's module docstring), so partly filled blocks cannot take ids past it: they are
    # refused as the budget is, and can_admit / get_available_tokens say so beforehand.
    calls: list[tuple[int, int, int]] = []
    pool = KVPool(max_tokens=48, block_size=16, on_budget_exceeded=lambda *a: calls.append(a), overcommit_blocks=False)
    assert pool.num_blocks == 3
    a = pool.alloc(17)  # 2 blocks for 17 tokens: 31 tokens of budget left, 1 free id
    assert pool.get_available_tokens() == 16 and pool.get_stats()["available_tokens"] == 16
    assert pool.can_admit(16) and not pool.can_admit(17)
    before = (pool.get_stats(), pool.get_block_stats())
    with pytest.raises(KVBudgetExceededError) as info:
        pool.alloc(17)
    assert calls == [(17, 16, 48)] and info.value.available == 16
    assert (pool.get_stats(), pool.get_block_stats()) == before
    b = pool.alloc(16)
    ids = [blk.block_id for h in (a, b) for blk in h._blocks]
    assert sorted(ids) == [0, 1, 2] and pool.max_block_ids == 3
    assert pool.get_available_tokens() == 0 and not pool.can_admit(1)
    pool.free(a)
    assert pool.can_admit(32) and sorted(pool.alloc(32).block_ids.tolist()) == [0, 1]
    # One-token handles: as many as there are blocks, not as many as there are tokens.
    small = KVPool(max_tokens=256, block_size=128, overcommit_blocks=False)
    ones = [small.alloc(1) for _ in range(2)]
    assert sorted(int(h.block_ids[0]) for h in ones) == [0, 1] and not small.can_admit(1)
    with pytest.raises(KVBudgetExceededError):
        small.alloc(1)
    with pytest.raises(TypeError, match="overcommit_blocks must be a bool or None"):
        KVPool(max_tokens=48, block_size=16, overcommit_blocks=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("env", "bounded"), [(None, False), ("0", False), ("1", True)])
def test_ids_are_bounded_by_default_where_the_engine_indexes_a_kv_tensor_with_them(
        monkeypatch: pytest.MonkeyPatch, env: str | None, bounded: bool) -> None:
    # The engine's paged attention (SAGELLM_ENABLE_CUDA_PAGED_ATTENTION=1) indexes num_blocks blocks
    # with these ids; elsewhere the original's token-only admission is kept (kv_pool.py's docstring).
    if env is None:
        monkeypatch.delenv("SAGELLM_ENABLE_CUDA_PAGED_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("SAGELLM_ENABLE_CUDA_PAGED_ATTENTION", env)
    pool = KVPool(max_tokens=48, block_size=16)
    assert pool.overcommit_blocks is not bounded
    pool.alloc(17)
    assert pool.can_admit(17) is not bounded and pool.get_available_tokens() == (16 if bounded else 31)
    monkeypatch.setenv("SAGELLM_ENABLE_CUDA_PAGED_ATTENTION", "0" if bounded else "1")
    assert pool.can_admit(17) is not bounded  # read at construction: a pool keeps its mode


def test_overcommit_block_rounding_never_refuses_what_the_budget_admits() -> None:
    pool = KVPool(max_tokens=256, block_size=128, overcommit_blocks=True)  # 2 full blocks
    handles = [pool.alloc(1) for _ in range(256)]  # 256 partly filled blocks
    ids = [int(h.block_ids[0]) for h in handles]
    assert len(set(ids)) == 256 and max(ids) < pool.max_block_ids
    assert [b.block_id for b in handles[-1]._blocks] == handles[-1].block_ids.tolist()
    assert pool.get_block_stats()["used_blocks"] == 256 and pool.get_block_stats()["free_blocks"] == 0
    with pytest.raises(KVBudgetExceededError):
        pool.alloc(1)
    for h in handles:
        pool.free(h)
    assert pool.get_block_stats()["block_id_capacity"] == 2 and pool.get_block_stats()["free_blocks"] == 2
    assert sorted(pool.alloc(256).block_ids.tolist()) == [0, 1]


def test_seed_admission_example_from_the_engine() -> None:
    # A bounded 192-token pool holding 7 + 40 + 20 + 60 tokens (10 of its 12 blocks): 65 tokens of budget
    # are left but 2 blocks, so it admits 32 tokens, not the 53 the original's budget would.
    bounded = KVPool(max_tokens=192, block_size=16, overcommit_blocks=False)
    for n in (7, 40, 20, 60):
        bounded.alloc(n)
    assert bounded.can_admit(32) and not bounded.can_admit(33) and bounded.get_available_tokens() == 32
    # With overcommit_blocks (the default off the engine's paged path) it admits 53 more (4 blocks):
    # ids 12 and 13, past its 12 blocks.
    pool = KVPool(max_tokens=192, block_size=16, overcommit_blocks=True)
    for n in (7, 40, 20, 60):
        pool.alloc(n)
    assert pool.can_admit(65) and not pool.can_admit(66)
    handle = pool.alloc(53)
    assert len(handle._blocks) == 4 and pool.get_available_tokens() == 12
    all_ids = [b.block_id for h in pool.handles.values() for b in h._blocks]
    assert len(all_ids) == len(set(all_ids)) == 14


def test_pin_unpin_and_free_rules() -> None:
    pool = KVPool(max_tokens=1024)
    h = pool.alloc(64)
    pool.pin(h)
    assert h.is_pinned and pool.get_stats()["pinned_tokens"] == 64
    with pytest.raises(KVHandlePinnedError):
        pool.free(h)
    assert pool.get_allocated_tokens() == 64
    pool.unpin(h)
    pool.unpin(h)  # not pinned: nothing happens, as in the original
    assert h.pin_count == 0 and pool.get_stats()["pinned_tokens"] == 0
    pool.free(h)
    assert h.state == KVBlockState.FREE
    with pytest.raises(KVDoubleFreeError):
        pool.free(h)
    with pytest.raises(KVHandleNotFoundError):
        pool.free(KVHandle.create(4))
    with pytest.raises(TypeError, match="KVHandle"):
        pool.free("not a handle")  # type: ignore[arg-type]
    assert pool.get_stats()["num_handles"] == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"num_tokens": 0}, ValueError, "num_tokens"), ({"num_tokens": -5}, ValueError, "-5"),
     ({"num_tokens": 8, "device": "cuda:x"}, KVConfigInvalidError, "cuda:x"),
     ({"num_tokens": 8, "dtype": "fp64"}, ValueError, "fp64"),
     # Non-ASCII digits: '\u00b2' was int()'s bare ValueError, '\u0663' (Arabic-Indic 3) taken as cuda:3.
     ({"num_tokens": 8, "device": "cuda:\u00b2"}, KVConfigInvalidError, "cuda:\u00b2.*index"),
     ({"num_tokens": 8, "device": "cuda:\u0663"}, KVConfigInvalidError, "cuda:\u0663.*index")],
)
def test_bad_alloc_changes_nothing(kwargs: dict, error: type[Exception], match: str) -> None:
    pool = KVPool(max_tokens=512)
    with pytest.raises(error, match=match):
        pool.alloc(**kwargs)
    assert pool.get_stats()["num_handles"] == 0 and pool.get_block_stats()["used_blocks"] == 0


# (label, canonical label, memory tier as the original package infers it from the label)
OTHER_BACKENDS = [("npu", "npu:0", MemoryTier.GPU), ("npu:0", "npu:0", MemoryTier.GPU),
                  ("npu:3", "npu:3", MemoryTier.GPU), ("xpu:1", "xpu:1", MemoryTier.CPU),
                  ("mps", "mps:0", MemoryTier.CPU), ("hpu:2", "hpu:2", MemoryTier.CPU),
                  ("gpu:1", "gpu:1", MemoryTier.GPU), ("cxl:0", "cxl:0", MemoryTier.CXL),
                  ("nvme:1", "nvme:1", MemoryTier.NVME), ("privateuseone:0", "privateuseone:0", MemoryTier.CPU)]


@pytest.mark.parametrize(("label", "canonical", "tier"), OTHER_BACKENDS)
def test_a_label_of_any_backend_is_taken_with_the_originals_tier(label: str, canonical: str,
                                                                  tier: MemoryTier) -> None:
    """Labels of backends other than cpu/cuda (SageAttention passes str(param.device), 'npu:0' on
    Ascend) were KVConfigInvalidError 'unknown device type'; the original stores them."""
    pool = KVPool(max_tokens=512)
    for _ in range(2):  # the second allocation takes the native fast path's cached label
        h = pool.alloc(8, device=label)
        assert (h.device, h.memory_tier) == (canonical, tier)
    manager = KVCacheManager(512, 16)
    h = manager.alloc(8, device=label)
    assert (h.device, h.memory_tier) == (canonical, tier) and manager.tokens_by_device() == {canonical: 8}
    assert KVHandle.create(4, device=canonical).memory_tier == tier


@pytest.mark.parametrize("label", ["", " cpu", "cpu ", "CPU", "NPU:0", "gpu0", "cuda:x", "npu:", "npu:01",
                                   "npu:-1", ":0", "cuda:1:2", "a b", "\u00e9pu:0", "cpu:1"])
def test_a_malformed_label_is_refused_naming_it(label: str) -> None:
    pool, manager = KVPool(max_tokens=512), KVCacheManager(512, 16)
    for alloc in (pool.alloc, manager.alloc):
        with pytest.raises(KVConfigInvalidError) as info:
            alloc(8, device=label)
        assert info.value.value == label and repr(label) in str(info.value)
    assert pool.get_stats()["num_handles"] == 0 and manager.get_stats()["num_handles"] == 0


@pytest.mark.parametrize("label", ["cuad:0", "garbage", "tpu", "gpus:1"])
def test_an_unknown_device_type_is_refused_naming_it(label: str) -> None:
    with pytest.raises(KVConfigInvalidError, match=f"'{label}'.*unknown device type '{label.split(':')[0]}'; known: "):
        KVPool(max_tokens=64).alloc(8, device=label)


def test_the_privateuse1_name_a_loaded_torch_plugin_registered_is_a_known_device_type() -> None:
    # torch's rename is once per process and for good: a child process does it.
    code = ("import torch; torch.utils.rename_privateuse1_backend('sagetest')\n"
            "from sagellm_kv_cache.pool import KVPool\n"
            "print(KVPool(max_tokens=64).alloc(8, device='sagetest:1').device)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["sagetest:1"]


@pytest.mark.parametrize("label", [None, 0, 1, 3.5, True, b"npu:0"])
def test_a_label_that_is_not_a_str_is_a_type_error(label: object) -> None:
    with pytest.raises(TypeError, match=f"device must be a string .*got {type(label).__name__}"):
        KVPool(max_tokens=64).alloc(8, device=label)  # type: ignore[arg-type]


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        KVPool(max_tokens=0)
    with pytest.raises(ValueError, match="block_size"):
        KVPool(max_tokens=10, block_size=-1)


def test_reset() -> None:
    pool = KVPool(max_tokens=512)
    h = pool.alloc(100)
    pool.pin(h)
    pool.reset()
    assert pool.get_allocated_tokens() == 0 and pool.get_block_stats()["free_blocks"] == 4


def test_kvhandle_seed_behaviour() -> None:
    h = KVHandle.create(16, request_id="r1", node_rank=2, metadata={"a": 1})
    assert sorted(h.to_dict()) == SEED_HANDLE_KEYS
    assert KVHandle.from_dict(h.to_dict()) == h
    assert h.node_rank == 2 and not h.is_local(0) and h.is_local(2)
    before = h.access_count
    h.touch()
    assert h.access_count == before + 1
    assert h.incr_ref() == 2 and h.decr_ref() == 1 and h.decr_ref() == 0
    with pytest.raises(KVRefCountUnderflowError):
        h.decr_ref()
    assert h.is_evictable()
    h.pin()
    assert not h.is_evictable() and h.is_pinned and h.state == KVBlockState.ALLOCATED  # as the original
    assert h.unpin() == 0 and h.state == KVBlockState.ALLOCATED and h.is_evictable()
    assert h.estimate_size_bytes(head_dim=128, num_heads=32) == 16 * 32 * 128 * 2 * 2
    with pytest.raises(ValueError):
        h.num_tokens = -1


def test_error_hierarchy_and_codes() -> None:
    names = [n for n in sagellm_kv_cache.__all__ if n.startswith("KV") and n.endswith("Error")]
    assert len(names) >= 21
    for name in names:
        assert issubclass(getattr(sagellm_kv_cache, name), KVCacheError)
    err = KVPoolFullError(10)
    assert err.code == KVErrorCode.POOL_FULL and isinstance(err, MemoryError)
    assert err.to_dict()["code"] == "KV_POOL_FULL"
    assert KVBudgetExceededError(5, 3).is_retryable() in (True, False)
    assert KVCacheError(KVErrorCode.NOT_FOUND, "m", cause=ValueError("x")).__cause__ is not None


def test_core_errors_translate_to_typed_classes() -> None:
    from sagellm_kv_cache import _core

    expected = {2: "KVPoolFullError", 5: "KVDoubleFreeError", 6: "KVInvalidBlockError", 7: "KVConfigInvalidError",
                8: "KVBackendUnavailableError", 11: "KVChecksumMismatchError", 14: "KVNotImplementedError"}
    for code, name in expected.items():
        with pytest.raises(getattr(sagellm_kv_cache, name), match="boom"):
            _core._raise_core_error(code, "boom")
    with pytest.raises(KVPoolFullError) as info:
        _core._raise_core_error(2, "no free block")
    err = info.value
    assert str(err) == "[KV_POOL_FULL] no free block" and isinstance(err, MemoryError)
    assert repr(err) == "KVPoolFullError(code='KV_POOL_FULL', message='no free block')"
    assert err.total_blocks is None and err.to_dict()["context"] == {"core_code": 2}


def test_version_matches_cmake() -> None:
    import re
    from pathlib import Path

    cmake = Path(__file__).resolve().parents[2] / "CMakeLists.txt"
    if not cmake.exists():
        pytest.skip("not running from a source checkout")
    found = re.search(r"project\(sagellm_kv VERSION ([0-9.]+)", cmake.read_text())
    assert found and found.group(1) == sagellm_kv_cache.__version__
    assert sagellm_kv_cache._core.__version__ == sagellm_kv_cache.__version__


@pytest.mark.parametrize("device", [None, 0, b"cpu"])
def test_kvhandle_create_with_a_device_that_is_not_a_str_is_a_type_error(device: object) -> None:
    with pytest.raises(TypeError, match=f"device must be a str .*got {type(device).__name__}"):  # was AttributeError
        KVHandle.create(4, device=device)  # type: ignore[arg-type]


def test_handle_ids_are_unique() -> None:
    pool = KVPool(max_tokens=4096, block_size=16)
    ids = {pool.alloc(16).handle_id for _ in range(100)}
    assert len(ids) == 100 and all(isinstance(i, uuid.UUID) for i in ids)


def test_models_reexport_the_protocol_types() -> None:
    import sagellm_kv_cache.models as models
    import sagellm_protocol.kv as protocol

    shared = ["DType", "Layout", "EvictionPolicy", "RequestType", "MemoryTier", "KVBlockState", "KVBlock",
              "KVPoolStats", "KVTransferMetadata", "PrefixCacheEntry", "EvictionCandidate", "SchedulerRequest",
              "SchedulerPlan", "LifetimePrediction"]
    assert all(getattr(models, name) is getattr(protocol, name) for name in shared)
    assert set(shared) | {"KVHandle", "KVBlockRef"} == set(models.__all__)


def test_original_reprs_and_public_attributes() -> None:
    pool = KVPool(max_tokens=1024)
    assert repr(pool) == "KVPool(max_tokens=1024, allocated=0, num_handles=0, num_pinned=0)"
    h = pool.alloc(16)
    assert repr(h) == f"KVHandle(id={str(h.handle_id)[:8]}..., tokens=16, device=cpu, state=allocated, pin=0, ref=1)"
    pool.pin(h)
    assert repr(h).endswith("state=allocated, pin=1, ref=1)")
    g = pool.alloc(300, device="cuda:1")
    assert repr(pool) == "KVPool(max_tokens=1024, allocated=316, num_handles=2, num_pinned=1)"
    assert pool.handles == {h.handle_id: h, g.handle_id: g} and pool.pinned_handles == {h.handle_id}
    # block_manager: blocks of block_size tokens x bytes_per_token bytes, ceil(tokens / block_size) per handle.
    manager = pool.block_manager
    assert isinstance(manager, BlockManager) and manager.block_size == 128 * 32
    assert manager.get_stats()["used_blocks"] == 1 + 3 and manager.get_used_bytes() == 4 * 4096
    pool.unpin(h)
    pool.free(h)
    assert pool.pinned_handles == set() and list(pool.handles) == [g.handle_id]
    stats = manager.get_stats()
    assert (stats["total_blocks"], stats["used_blocks"], stats["free_blocks"]) == (4, 3, 1)
    assert stats["total_allocated_bytes"] == manager.total_allocated_bytes == manager.get_allocated_bytes() == 4 * 4096
    assert repr(manager) == "BlockManager(block_size=4096, total_blocks=4, used_blocks=3, free_blocks=1)"
    own = manager.alloc_block()  # a caller's own block counts on top of the pool's
    assert manager.get_stats()["used_blocks"] == 4 and manager.total_allocated_bytes == 5 * 4096
    manager.free_block(own)
    pool.reset()
    assert manager.get_stats() == {"total_blocks": 0, "free_blocks": 0, "used_blocks": 0, "total_allocated_bytes": 0,
                                   "used_bytes": 0, "free_bytes": 0}
    assert pool.handles == {} and repr(pool).endswith("allocated=0, num_handles=0, num_pinned=0)")


def test_pool_handles_equal_validated_ones() -> None:
    # The pool builds handles without re-validating them; they must be indistinguishable from
    # KVHandle.create's (fields, their order, model_fields_set, serialisation).
    pool = KVPool(max_tokens=4096, block_size=16, node_rank=3)
    h = pool.alloc(40, dtype="bf16", layout=Layout.PAGED, device="cuda:2", metadata={"k": "v"})
    ref = KVHandle.create(40, dtype=DType.BF16, layout=Layout.PAGED, device="cuda:2", node_rank=3,
                          metadata={"k": "v"})
    ours, theirs = h.model_dump(), ref.model_dump()
    for key in ("handle_id", "created_at", "last_access"):
        ours.pop(key), theirs.pop(key)
    assert ours == theirs and list(h.__dict__) == list(ref.__dict__)
    assert h.model_fields_set == ref.model_fields_set
    assert h.handle_id.version == 4 and h.created_at == h.last_access
    assert KVHandle.from_dict(h.to_dict()) == h
    assert len(h.block_ids) == 3 and [b.block_id for b in h._blocks] == h.block_ids.tolist()
    with pytest.raises(ValueError):
        h.num_tokens = -1  # still validated on assignment
    with pytest.raises(TypeError, match="metadata keys must be str"):
        pool.alloc(8, metadata={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metadata must be a dict"):
        pool.alloc(8, metadata=["x"])  # type: ignore[arg-type]
    assert len(pool) == 1


def test_handle_blocks_are_the_dataclass_refs_of_its_ids() -> None:
    # The engine builds block tables from handle._blocks; the refs are made natively (no __init__
    # per block) and must be what KVBlockRef(i) makes: same class, equal, hashable, frozen.
    import dataclasses

    from sagellm_kv_cache import _core
    from sagellm_kv_cache.models import KVBlockRef

    pool = KVPool(max_tokens=4096, block_size=16)
    handle = pool.alloc(16 * 40 + 1)
    refs = handle._blocks
    assert [type(r) for r in refs] == [KVBlockRef] * 41
    assert refs == [KVBlockRef(block_id=i) for i in handle.block_ids.tolist()]
    assert {hash(r) for r in refs} == {hash(KVBlockRef(i)) for i in handle.block_ids.tolist()}
    assert type(refs[0].block_id) is int and dataclasses.asdict(refs[3]) == {"block_id": refs[3].block_id}
    with pytest.raises(dataclasses.FrozenInstanceError):
        refs[0].block_id = 7  # type: ignore[misc]
    assert handle._blocks is not refs and KVHandle.create(16)._blocks == []
    # Any plain class: the attribute goes where object.__setattr__ puts it.
    class Plain:
        pass

    assert [vars(r) for r in _core.block_refs(Plain, [5, -1])] == [{"block_id": 5}, {"block_id": -1}]

    class NoRoom:
        __slots__ = ()

    with pytest.raises(AttributeError):
        _core.block_refs(NoRoom, [1])
    for cls in (int, type, np.ndarray, ValueError):
        with pytest.raises(TypeError, match=r"object\.__new__"):
            _core.block_refs(cls, [1])
    with pytest.raises(TypeError):
        _core.block_refs(KVBlockRef, ["1"])


def test_handles_get_fresh_version4_ids_in_forked_children_too() -> None:
    import os

    pool = KVPool(16 * 1024, block_size=16)
    ids = {pool.alloc(16).handle_id for _ in range(200)}
    assert len(ids) == 200 and {(u.version, u.variant) for u in ids} == {(4, uuid.RFC_4122)}
    handle = pool.alloc(16)
    fresh = KVHandle.create(16)
    assert handle.model_fields_set == fresh.model_fields_set  # as a validated handle reports them
    handle.model_fields_set.add("marker")
    assert "marker" not in pool.alloc(16).model_fields_set  # each handle has its own set
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws from a re-seeded generator
        os.write(write, pool.alloc(16).handle_id.bytes)
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 16)
    os.close(read)
    os.close(write)
    assert child != pool.alloc(16).handle_id.bytes


def test_budget_callback_may_use_the_pool() -> None:
    # The callback runs without the pool's lock held (the seed held its lock): it can read the pool.
    seen: list[tuple[int, int, bool]] = []
    pool = KVPool(max_tokens=64, block_size=16)
    pool.on_budget_exceeded = lambda req, avail, top: seen.append((req, pool.get_available_tokens(),
                                                                    pool.can_admit(avail)))
    pool.alloc(48)
    with pytest.raises(KVBudgetExceededError) as info:
        pool.alloc(17)
    assert seen == [(17, 16, True)] and info.value.context["max_tokens"] == 64
    with pytest.raises(KVBudgetExceededError):
        pool.alloc(2**70)  # beyond any budget: refused, the value named as given
    assert seen[-1][0] == 2**70 and pool.get_stats()["num_handles"] == 1


def test_reentering_the_pool_while_it_is_locked_raises_instead_of_deadlocking() -> None:
    pool = KVPool(max_tokens=64, block_size=16)
    h = pool.alloc(16)
    with pool._lock:
        with pytest.raises(RuntimeError, match="re-entered"):
            pool.alloc(16)
        with pytest.raises(RuntimeError, match="re-entered"):
            pool.free(h)
    assert pool.get_stats()["num_handles"] == 1
    pool.free(h)
    with pytest.raises(RuntimeError, match="does not hold"):
        pool._lock.__exit__(None, None, None)
    other = KVPool(max_tokens=64, block_size=16)
    other._lock.__enter__()
    del other  # dropped while entered: the pool unlocks before it goes


def test_a_tampered_handle_is_refused_without_change() -> None:
    pool = KVPool(max_tokens=256, block_size=16)
    h = pool.alloc(40)  # 3 blocks
    ids = h.__pydantic_private__["_block_ids"]
    with pytest.raises(ValueError, match="read-only"):
        ids[0] = 99  # the pool's own copy of the ids cannot be rewritten in place
    h.num_tokens = 1  # one block's worth: does not match the three ids it holds
    with pytest.raises(KVInvalidBlockError, match="does not match"):
        pool.free(h)
    h.num_tokens = 40
    h.__pydantic_private__["_block_ids"] = np.array([0, 1, 7], dtype=np.int32)  # 7 was never allocated
    with pytest.raises(KVDoubleFreeError, match="block id 7"):
        pool.free(h)
    assert pool.get_allocated_tokens() == 40 and len(pool) == 1 and h.state != KVBlockState.FREE
    h.__pydantic_private__["_block_ids"] = ids
    pool.free(h)
    assert pool.get_allocated_tokens() == 0 and pool.get_block_stats()["used_blocks"] == 0


def test_node_rank_follows_the_attribute() -> None:
    pool = KVPool(max_tokens=64, block_size=16, node_rank=2)
    assert pool.alloc(1).rank == 2
    pool.node_rank = 5
    assert pool.alloc(1).rank == 5 and pool.node_rank == 5
    with pytest.raises(ValueError, match="node_rank"):
        pool.node_rank = -1
    pool.node_rank = None
    assert pool.alloc(1).rank is None


def test_threads_allocate_free_pin_and_read_at_once() -> None:
    pool = KVPool(max_tokens=4096, block_size=16)  # small enough that allocations are refused
    errors: list[BaseException] = []
    refused = [0]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[KVHandle] = []
        try:
            for _ in range(1500):
                action = rng.random()
                if action < 0.45 or not held:
                    try:
                        held.append(pool.alloc(rng.randint(1, 70)))
                    except KVBudgetExceededError:
                        refused[0] += 1
                elif action < 0.8:
                    h = held.pop(rng.randrange(len(held)))
                    pool.free(h)
                    with pytest.raises(KVDoubleFreeError):
                        pool.free(h)
                elif action < 0.9:
                    h = held[rng.randrange(len(held))]
                    pool.pin(h)
                    with pytest.raises(KVHandlePinnedError):
                        pool.free(h)
                    pool.unpin(h)
                else:
                    stats = pool.get_stats()
                    assert 0 <= stats["allocated_tokens"] <= 4096 and stats["pinned_tokens"] >= 0
                    live = pool.handles
                    ids = [int(i) for h in live.values() for i in h.block_ids]
                    assert len(ids) == len(set(ids))  # no block id held twice
            for h in held:
                pool.free(h)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: inside pin, stats and the handle snapshot
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert refused[0] > 0  # the budget was reached: the refusal path ran under contention too
    assert pool.get_stats() == {"allocated_tokens": 0, "available_tokens": 4096, "max_tokens": 4096,
                                "num_handles": 0, "pinned_tokens": 0, "unpinned_tokens": 0, "used_tokens": 0}
    assert pool.get_block_stats()["used_blocks"] == 0 and pool.get_block_stats()["block_id_capacity"] == 256
    assert pool.pinned_handles == set()


def test_pool_builds_validated_handles_when_the_template_cannot_be_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    # A protocol version with mutable field defaults: the pool builds each handle through create().
    from sagellm_kv_cache.models import kv_handle

    monkeypatch.setattr(kv_handle, "_TEMPLATE_IS_SHAREABLE", False)
    pool = KVPool(max_tokens=256, block_size=16, node_rank=1)
    h = pool.alloc(40, metadata={"a": 1})
    assert h.block_ids.tolist() == [0, 1, 2] and h.rank == 1 and h.metadata == {"a": 1}
    assert pool.handles == {h.handle_id: h}
    pool.free(h)
    assert h.state == KVBlockState.FREE and pool.get_allocated_tokens() == 0


@pytest.mark.parametrize("block_size", [2**31, 2**64, 2**70])
def test_block_size_past_the_native_range_is_named(block_size: int) -> None:
    # Past 64 bits it was pybind's "incompatible constructor arguments", naming neither.
    with pytest.raises(ValueError, match=f"block_size must be in .*got {block_size}"):
        KVPool(max_tokens=10, block_size=block_size)
    with pytest.raises(ValueError, match=f"block_size must be in .*got {block_size}"):
        KVCacheManager(max_tokens=10, block_size=block_size)


def test_pins_on_the_handle_itself_do_not_unbalance_the_pool() -> None:
    # The pool counts what was pinned through it (as the original does): a KVHandle.pin() followed by
    # KVPool.unpin() used to leave pinned_tokens at -10.
    pool = KVPool(max_tokens=100)
    h = pool.alloc(10)
    h.pin()
    pool.unpin(h)
    stats = pool.get_stats()
    assert (stats["pinned_tokens"], stats["unpinned_tokens"], pool.pinned_handles) == (0, 10, set())
    # Pinned through the pool, unpinned on the handle, then freed: nothing stale stays counted.
    pool.pin(h)
    pool.pin(h)
    h.unpin()
    h.unpin()
    assert pool.get_stats()["pinned_tokens"] == 10 and pool.pinned_handles == {h.handle_id}
    pool.free(h)
    stats = pool.get_stats()
    assert (stats["pinned_tokens"], stats["num_handles"], pool.pinned_handles) == (0, 0, set())
