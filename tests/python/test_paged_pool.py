"""PagedKVPool: real memory, zero-copy views, gather/scatter, budgets, bad input."""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from alloc_failure import fail_each_allocation, failing_at
from sagellm_kv_cache import (
    KVBackendUnavailableError,
    KVCacheSpec,
    KVConfigInvalidError,
    KVDoubleFreeError,
    KVInvalidBlockError,
    KVPoolFullError,
    PagedKVPool,
    _core,
)


@pytest.fixture
def spec() -> KVCacheSpec:
    return KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=64, dtype="fp16", block_size=16)


@pytest.fixture
def pool(spec: KVCacheSpec) -> PagedKVPool:
    return PagedKVPool(spec, num_blocks=1024, device="cpu")


def test_issue_example(pool: PagedKVPool) -> None:
    ids = pool.allocate(8)
    assert ids.dtype == np.int32 and ids.tolist() == list(range(8))
    k0 = pool.key_cache(0)
    assert k0.shape == (1024, 16, 4, 64) and k0.dtype == np.float16
    assert pool.num_free_blocks == 1016
    assert pool.num_blocks == 1024
    assert pool.block_nbytes == 2 * 2 * 16 * 4 * 64 * 2
    pool.free(ids)
    assert pool.num_free_blocks == 1024


def test_views_are_zero_copy_and_writable(pool: PagedKVPool) -> None:
    ids = pool.allocate(2)
    k1 = pool.key_cache(1)
    v1 = pool.value_cache(1)
    k1[ids[0]] = 1.5
    assert pool.key_cache(1)[ids[0]].min() == 1.5  # a second view sees the write
    assert v1[ids[0]].max() == 0  # V is separate memory
    staged = pool.gather(ids[:1]).view(np.float16)
    per_layer = 16 * 4 * 64
    # staging layout [layer][K|V]: layer 1's K follows layer 0's K and V
    assert (staged[2 * per_layer : 3 * per_layer] == 1.5).all()


def test_view_keeps_pool_memory_alive(spec: KVCacheSpec) -> None:
    pool = PagedKVPool(spec, num_blocks=16)
    view = pool.key_cache(0)
    view[3] = 7.0
    del pool
    gc.collect()
    # Fresh allocations would reuse the freed arena if the view did not own a reference.
    churn = [np.full(view.nbytes // 2, 3, dtype=np.float16) for _ in range(4)]
    assert (view[3] == 7.0).all() and view[2].max() == 0
    view[5] = 2.0
    assert churn[0][0] == 3


def _mapped(address: int) -> bool:
    """Whether ``address`` lies in one of this process's memory mappings (Linux /proc)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            if start <= address < end:
                return True
    return False


# 64 MiB arenas: above glibc's largest mmap threshold, so each is its own mapping, unmapped when freed.
_VIEW_MAKERS = {
    "pool.host_view": (
        lambda: _core.PagedKVPool(1, 8, 128, "fp32", 16, 4096, "cpu", False),
        lambda pool: pool.layer_address(0, False),
        lambda pool: pool.host_view(0, False),
    ),
    "slab.view": (
        lambda: _core.HostSlab(64, 1 << 20),
        lambda slab: slab.address,
        lambda slab: slab.view(),
    ),
}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("maker", sorted(_VIEW_MAKERS))
def test_a_view_that_runs_out_of_memory_does_not_keep_its_owner_alive(maker: str) -> None:
    # Each Python allocation of the call fails in turn: the call raises MemoryError or returns a view,
    # and once the pool (slab) and any view are gone its memory is freed. The view's base capsule used to
    # get a heap-allocated reference to the owner that leaked when the capsule itself could not be made.
    make, address_of, view_of = _VIEW_MAKERS[maker]

    def attempt(n: int) -> bool:
        owner = make()
        address = address_of(owner)
        assert _mapped(address)
        view = failing_at(n, functools.partial(view_of, owner))
        made = view is not None
        del owner, view
        gc.collect()
        assert not _mapped(address), f"memory of a {maker} failed at allocation {n} is still mapped"
        return made

    fail_each_allocation(attempt, min_failures=2)  # the capsule and the array at least (fewer once caches are warm)


def test_dlpack_view_into_numpy(pool: PagedKVPool) -> None:
    view = pool.dlpack_view(0, value=True)
    assert view.__dlpack_device__() == (1, 0)
    arr = np.from_dlpack(view)
    assert arr.shape == (1024, 16, 4, 64) and arr.dtype == np.float16
    pool.value_cache(0)[0, 0, 0, 0] = 4.0
    assert arr[0, 0, 0, 0] == 4.0  # same memory (numpy marks legacy DLPack imports read-only)


def test_torch_from_dlpack_shares_memory(spec: KVCacheSpec) -> None:
    torch = pytest.importorskip("torch")
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        pool = PagedKVPool(KVCacheSpec(2, 4, 64, dtype, 16), num_blocks=8)
        t = torch.from_dlpack(pool.dlpack_view(1))
        assert t.dtype == torch_dtype and tuple(t.shape) == (8, 16, 4, 64)
        t[2].fill_(1.0)
        del pool
        gc.collect()
        assert float(t[2].float().sum()) == 16 * 4 * 64


def _capsule(capsule: object) -> tuple[str, int | None, int]:
    """A DLPack capsule's name, its flags when versioned (DLManagedTensorVersioned: version 8 bytes,
    manager_ctx, deleter, flags, then the DLTensor) and its data address (the DLTensor's first field)."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    name = api.PyCapsule_GetName(capsule)
    managed = api.PyCapsule_GetPointer(capsule, name)
    if name != b"dltensor_versioned":
        return name.decode(), None, ctypes.c_void_p.from_address(managed).value or 0
    assert tuple((ctypes.c_uint32 * 2).from_address(managed)) == (1, 0)
    flags = ctypes.c_uint64.from_address(managed + 24).value
    return name.decode(), flags, ctypes.c_void_p.from_address(managed + 32).value or 0


def test_dlpack_keywords_follow_the_array_api(pool: PagedKVPool) -> None:
    """max_version, dl_device, copy and stream were ignored (copy=True was refused): now a versioned capsule
    on request, a copy when asked, the host device accepted, other devices and CPU streams refused."""
    view = pool.dlpack_view(0)
    cache = pool.key_cache(0)
    cache[1] = 1.0
    here = cache.ctypes.data
    assert _capsule(view.__dlpack__()) == ("dltensor", None, here)
    assert _capsule(view.__dlpack__(max_version=(0, 8))) == ("dltensor", None, here)
    assert _capsule(view.__dlpack__(max_version=(1, 0))) == ("dltensor_versioned", 0, here)
    assert _capsule(view.__dlpack__(dl_device=(1, 0), stream=-1, copy=False)) == ("dltensor", None, here)
    name, flags, data = _capsule(view.__dlpack__(max_version=(2, 3), copy=True))
    assert (name, flags) == ("dltensor_versioned", 2) and data != here  # IS_COPIED, its own memory
    shared = [np.from_dlpack(view), np.from_dlpack(view, copy=False), np.from_dlpack(view, device="cpu")]
    assert all(np.shares_memory(a, cache) for a in shared)
    copied = np.from_dlpack(view, copy=True)
    assert not np.shares_memory(copied, cache) and copied.flags.writeable and (copied == cache).all()
    copied[1] = 9.0
    assert (cache[1] == 1.0).all()  # the copy is its own memory
    for kwargs, error, match in (
        ({"dl_device": (2, 0)}, BufferError, r"cannot be exported to dl_device \(2, 0\)"),
        ({"dl_device": (1, 1)}, BufferError, r"dl_device \(1, 1\)"),
        ({"dl_device": (2, 0), "copy": True}, BufferError, r"dl_device \(2, 0\)"),
        ({"dl_device": "cpu"}, TypeError, "dl_device must be None or a .* got 'cpu'"),
        ({"stream": 7}, ValueError, r"stream must be None \(or -1\) for an export to the host, got 7"),
        ({"stream": 0}, ValueError, "got 0"),
        ({"stream": True}, TypeError, "stream must be None or an int, got bool"),
        ({"max_version": "1.0"}, TypeError, "max_version must be None or a .* got '1.0'"),
        ({"max_version": (1,)}, TypeError, r"got \(1,\)"),
        ({"copy": "yes"}, TypeError, "copy must be True, False or None, got 'yes'"),
    ):
        with pytest.raises(error, match=match):
            view.__dlpack__(**kwargs)
    assert (cache[1] == 1.0).all() and pool.num_free_blocks == 1024


def test_torch_from_dlpack_versioned_and_copied(spec: KVCacheSpec) -> None:
    torch = pytest.importorskip("torch")
    pool = PagedKVPool(KVCacheSpec(2, 4, 64, "bf16", 16), num_blocks=8)
    shared = torch.from_dlpack(pool.dlpack_view(1))  # torch asks for a versioned capsule
    shared[2].fill_(1.0)
    copied = torch.from_dlpack(pool.dlpack_view(1), copy=True)
    assert copied.dtype == torch.bfloat16 and torch.equal(copied, shared)
    copied[2].fill_(3.0)
    assert float(shared[2].float().max()) == 1.0 and float(copied[2].float().min()) == 3.0
    del pool
    gc.collect()
    assert float(copied[2].float().sum()) == 3.0 * 16 * 4 * 64  # a copy owns its memory


def test_gather_scatter_round_trip_is_byte_exact(spec: KVCacheSpec) -> None:
    pool = PagedKVPool(KVCacheSpec(3, 2, 32, "bf16", 16), num_blocks=64)
    src = pool.allocate(10)
    dst = pool.allocate(10)
    rng = np.random.default_rng(0)
    for layer in range(3):
        for cache in (pool.key_cache(layer), pool.value_cache(layer)):
            cache[src] = rng.integers(0, 2**16, size=cache[src].shape, dtype=np.uint16)
    data = pool.gather(src)
    assert data.nbytes == 10 * pool.block_nbytes
    pool.scatter(data, dst)
    for layer in range(3):
        np.testing.assert_array_equal(pool.key_cache(layer)[dst], pool.key_cache(layer)[src])
        np.testing.assert_array_equal(pool.value_cache(layer)[dst], pool.value_cache(layer)[src])
    out = bytearray(10 * pool.block_nbytes)
    pool.gather_into(src, out)
    assert bytes(out) == data.tobytes()


def test_staging_that_is_a_view_of_the_pool_is_refused() -> None:
    """A gather into (or scatter from) the pool's own memory read bytes it had already overwritten:
    the result depended on the copy order. Refused, like order-dependent ids; so are segment sums that
    share memory with the bytes they sum (they were zeroed first) or with the pool."""
    pool = PagedKVPool(KVCacheSpec(1, 1, 4, "fp32", 1), num_blocks=8)  # 32-byte blocks; K plane = 4 blocks
    ids = pool.allocate(8)
    rng = np.random.default_rng(1)
    pool.key_cache(0)[...] = rng.random(pool.key_cache(0).shape, dtype=np.float32)
    pool.value_cache(0)[...] = rng.random(pool.value_cache(0).shape, dtype=np.float32)
    before = pool.gather(ids)
    plane = pool.key_cache(0).view(np.uint8).reshape(-1)
    order = [1, 0, 3, 2]
    with pytest.raises(KVConfigInvalidError, match="gather: the buffer shares memory with the pool"):
        pool.gather_into(order, plane)
    with pytest.raises(KVConfigInvalidError, match="scatter: the buffer shares memory with the pool"):
        pool.scatter(plane, order)
    with pytest.raises(KVConfigInvalidError, match="scatter: the buffer shares memory with the pool"):
        pool.scatter(memoryview(plane[32:96]), [5, 6])  # a part of the plane, through a memoryview
    big = PagedKVPool(KVCacheSpec(1, 1, 1024, "fp32", 1), num_blocks=4)  # 8 KiB blocks: two segments each
    big_ids = big.allocate(4)
    big.key_cache(0)[...] = 1.0
    big_before = big.gather(big_ids)
    staging = np.zeros(2 * big.block_nbytes, dtype=np.uint8)
    sums_in_pool = big.value_cache(0).view(np.uint64).reshape(-1)[:4]
    with pytest.raises(KVConfigInvalidError, match=r"gather_summed \(sums\): the buffer shares memory with the pool"):
        big.gather_summed(big_ids[:2], staging, sums_in_pool)
    with pytest.raises(KVConfigInvalidError, match=r"scatter_summed \(sums\): the buffer shares memory with the pool"):
        big.scatter_summed(staging, big_ids[2:], sums_in_pool)
    sums_in_staging = staging.view(np.uint64)[:4]
    with pytest.raises(KVConfigInvalidError, match="the sums buffer shares memory with the staging buffer"):
        big.gather_summed(big_ids[:2], staging, sums_in_staging)
    staging[:] = 7
    with pytest.raises(KVConfigInvalidError, match="the sums buffer shares memory with the staging buffer"):
        big.scatter_summed(staging, big_ids[2:], sums_in_staging)
    with pytest.raises(KVConfigInvalidError, match="segment_sums: the sums buffer shares memory with the data"):
        _core.segment_sums(staging, sums_in_staging)
    assert (staging == 7).all()  # not zeroed by the refused calls
    np.testing.assert_array_equal(pool.gather(ids), before)
    np.testing.assert_array_equal(big.gather(big_ids), big_before)
    pool.gather_into(order, np.empty(4 * pool.block_nbytes, dtype=np.uint8))  # own memory: fine


def test_copy_blocks(pool: PagedKVPool) -> None:
    a, b = pool.allocate(2)
    pool.key_cache(0)[a] = 3.0
    pool.value_cache(1)[a] = -1.0
    pool.copy_blocks([a], [b])
    assert (pool.key_cache(0)[b] == 3.0).all() and (pool.value_cache(1)[b] == -1.0).all()


def test_refcount_sharing(pool: PagedKVPool) -> None:
    ids = pool.allocate(3)
    pool.incref(ids[:1])
    assert pool.ref_count(int(ids[0])) == 2
    pool.free(ids)
    assert pool.is_allocated(int(ids[0])) and not pool.is_allocated(int(ids[1]))
    assert pool.num_free_blocks == 1023
    pool.free(ids[:1])
    assert pool.num_free_blocks == 1024


def test_budget(pool: PagedKVPool) -> None:
    pool.set_budget_blocks(10)
    assert pool.can_admit(160) and not pool.can_admit(161)
    with pytest.raises(KVPoolFullError):
        pool.allocate(11)
    assert pool.num_free_blocks == 10
    pool.set_budget_bytes(pool.block_nbytes * 4)
    assert pool.budget_blocks == 4
    with pytest.raises(KVConfigInvalidError, match="exceeds"):
        pool.set_budget_bytes(pool.block_nbytes * 2000)
    assert pool.budget_blocks == 4


# --- bad input: typed error, message names the value, state unchanged ---------------------------


def test_pool_full_takes_nothing(pool: PagedKVPool) -> None:
    held = pool.allocate(1000)
    with pytest.raises(KVPoolFullError, match="cannot allocate 25 blocks: 24 of 1024"):
        pool.allocate(25)
    assert pool.num_free_blocks == 24
    assert isinstance(KVPoolFullError._from_core("x"), MemoryError)
    pool.free(held)


@pytest.mark.parametrize("n", [-1, 2**40])
def test_bad_counts(pool: PagedKVPool, n: int) -> None:
    with pytest.raises(ValueError, match=str(n)):
        pool.allocate(n)
    assert pool.num_free_blocks == 1024


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, float("nan"), "2", None])
def test_counts_and_layers_that_are_not_ints_are_type_errors(pool: PagedKVPool, bad: object) -> None:
    # True used to allocate one block, set a budget of one block and give layer 1's view.
    pool.allocate(3)
    before = pool.stats()
    for call in (pool.allocate, pool.set_budget_blocks, pool.set_budget_bytes, pool.can_admit, pool.key_cache,
                 pool.value_cache, pool.dlpack_view, pool.ref_count, pool.is_allocated):
        with pytest.raises(TypeError, match=f"must be an int, got {type(bad).__name__}"):
            call(bad)  # type: ignore[operator]
    assert pool.stats() == before


def test_ints_past_64_bits_are_named(pool: PagedKVPool) -> None:
    huge = 2**70
    with pytest.raises(ValueError, match=f"num_blocks must be in .*got {huge}"):
        pool.allocate(huge)
    with pytest.raises(ValueError, match=f"budget_blocks must be in .*got {huge}"):
        pool.set_budget_blocks(huge)
    with pytest.raises(KVConfigInvalidError, match=f"budget_bytes.*{huge}.*exceeds"):
        pool.set_budget_bytes(huge)
    with pytest.raises(IndexError, match=f"layer {huge} out of range"):
        pool.key_cache(huge)
    with pytest.raises(ValueError, match=f"block id {huge}"):
        pool.ref_count(huge)
    assert not pool.can_admit(huge) and not pool.is_allocated(huge)
    assert pool.num_free_blocks == 1024 and pool.budget_blocks == 1024


def test_zero_blocks_is_empty(pool: PagedKVPool) -> None:
    assert pool.allocate(0).size == 0


def test_double_free_and_foreign_ids(pool: PagedKVPool) -> None:
    ids = pool.allocate(4)
    pool.free(ids[:2])
    with pytest.raises(KVDoubleFreeError, match="block id 0"):
        pool.free(ids)  # 2 and 3 must not be freed either
    assert pool.num_free_blocks == 1022 and pool.is_allocated(int(ids[3]))
    with pytest.raises(KVInvalidBlockError, match="5000"):
        pool.free([int(ids[2]), 5000])
    assert pool.is_allocated(int(ids[2]))
    with pytest.raises(ValueError, match="int32"):
        pool.free(np.array([2**40], dtype=np.int64))
    with pytest.raises(KVInvalidBlockError, match="not allocated"):
        pool.incref([int(ids[2]), 999])
    assert pool.ref_count(int(ids[2])) == 1


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        (np.array([1.0, 2.0]), TypeError, "float64"),
        (np.array([[1, 2]], dtype=np.int32), ValueError, "1-D"),
        ("abc", TypeError, "integers"),
    ],
)
def test_bad_id_arrays(pool: PagedKVPool, ids: object, error: type[Exception], match: str) -> None:
    pool.allocate(3)
    with pytest.raises(error, match=match):
        pool.free(ids)
    assert pool.num_free_blocks == 1021


def test_int64_and_list_ids_are_accepted(pool: PagedKVPool) -> None:
    ids = pool.allocate(3)
    pool.free(ids.astype(np.int64)[:1])
    pool.free([int(i) for i in ids[1:]])
    assert pool.num_free_blocks == 1024


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_layers": 0}, ValueError, "num_layers"),
        ({"head_dim": -3}, ValueError, "head_dim"),
        ({"dtype": "fp64"}, KVConfigInvalidError, "fp64"),
        ({"block_size": 1.5}, TypeError, "block_size"),
    ],
)
def test_bad_specs(kwargs: dict, error: type[Exception], match: str) -> None:
    base = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "fp16", "block_size": 16}
    with pytest.raises(error, match=match):
        KVCacheSpec(**{**base, **kwargs})


POOL_TOO_BIG = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from sagellm_kv_cache import KVCacheSpec, KVConfigInvalidError, KVMemoryExhaustedError, PagedKVPool
try:
    PagedKVPool(KVCacheSpec(1, 1, 1, "fp32", 2**31 - 1), 2**31 - 1)  # 2^31 blocks of 16 GiB
except KVConfigInvalidError as e:
    assert "2147483647 blocks does not fit in the address space" in str(e), e
try:
    PagedKVPool(KVCacheSpec(1, 1, 1024, "fp32", 256), 2**30)  # 2 PiB
except KVMemoryExhaustedError as e:
    assert "cannot allocate 2251799813685248 bytes" in str(e), e
print("ok")
"""


def test_a_pool_too_big_is_refused_before_its_allocator_metadata_is_built() -> None:
    """The allocator's metadata (8 bytes a block, written up front) was built before the pool's size
    was checked or its memory allocated: 2^31 blocks cost 16 GiB and half a minute before the
    refusal, or a bare MemoryError when that much memory was not there (here: a 3 GiB limit)."""
    proc = subprocess.run([sys.executable, "-c", POOL_TOO_BIG], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_spec_of_numpy_ints_holds_python_ints() -> None:
    # An int32 spec used to compute block_nbytes in int32: 4 GiB wrapped to 0 (with an overflow warning).
    spec = KVCacheSpec(np.int32(1024), np.int32(64), np.int32(256), block_size=np.int32(64))
    assert spec.block_nbytes == 2**32
    assert spec == KVCacheSpec(1024, 64, 256, block_size=64)
    assert json.loads(json.dumps(spec.to_dict()))["num_layers"] == 1024
    assert all(type(v) is int for k, v in spec.to_dict().items() if k != "dtype")


def test_unknown_and_unavailable_devices(spec: KVCacheSpec) -> None:
    with pytest.raises(KVConfigInvalidError, match=r"tpu:0.*known device types: cpu, cuda"):
        PagedKVPool(spec, 4, device="tpu:0")
    with pytest.raises(KVConfigInvalidError, match="cpu:3"):
        PagedKVPool(spec, 4, device="cpu:3")


MALFORMED_DEVICES = ["cuda:", "cpu:", "cuda:-1", "cuda:01", "cuda:00", "cuda:0x", "cuda:+1", " cuda:0", "cuda:0 ",
                     "cuda: 1", "cuda:0:1", "CPU", "Cuda:0", "cuda:2147483648", "cuda:" + "9" * 30, ":0", ""]


@pytest.mark.parametrize("device", MALFORMED_DEVICES)
def test_malformed_device_strings_are_refused_by_both_parsers(spec: KVCacheSpec, device: str) -> None:
    """One grammar (torch's): ``type[:N]``, N without sign, spaces or leading zeros. ``cuda:`` read as
    ``cuda:0`` and ``cuda:01`` as ``cuda:1`` in the Python parser; the native one took ``cuda:01``."""
    from sagellm_kv_cache import _core
    from sagellm_kv_cache.pool.kv_pool import parse_device

    quoted = re.escape(f"'{device}'")
    with pytest.raises(KVConfigInvalidError, match=quoted):
        parse_device(device)
    with pytest.raises(ValueError, match=quoted):  # the native parser, before any backend
        _core.check_device(device)
    with pytest.raises(ValueError, match=quoted):
        PagedKVPool(spec, 4, device=device)


def test_well_formed_device_strings_are_canonical() -> None:
    from sagellm_kv_cache.pool.kv_pool import parse_device

    for device, canonical in (("cpu", "cpu"), ("cpu:0", "cpu"), ("cuda", "cuda:0"), ("cuda:0", "cuda:0"),
                              ("cuda:10", "cuda:10"), ("cuda:2147483647", "cuda:2147483647")):
        assert parse_device(device) == canonical


def test_cuda_without_gpu_is_a_clear_error(spec: KVCacheSpec) -> None:
    from conftest import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(KVBackendUnavailableError, match="cuda:0"):
        PagedKVPool(spec, 4, device="cuda:0")


def test_bad_layer_and_buffers(pool: PagedKVPool) -> None:
    with pytest.raises(IndexError, match="layer 2"):
        pool.key_cache(2)
    ids = pool.allocate(2)
    with pytest.raises(ValueError, match="expected"):
        pool.scatter(bytearray(10), ids)
    with pytest.raises(ValueError, match="C-contiguous"):
        pool.gather_into(ids, np.zeros((pool.block_nbytes, 4), dtype=np.uint8)[:, ::2])
    with pytest.raises(KVConfigInvalidError, match="2 source ids but 1"):
        pool.copy_blocks(ids, ids[:1])


@pytest.mark.cuda
def test_cuda_pool_round_trip(spec: KVCacheSpec) -> None:
    pool = PagedKVPool(spec, num_blocks=64, device="cuda:0")
    ids = pool.allocate(4)
    data = np.random.default_rng(1).integers(0, 255, size=4 * pool.block_nbytes, dtype=np.uint8)
    pool.scatter(data, ids)
    np.testing.assert_array_equal(pool.gather(ids), data)
    assert pool.dlpack_view(0).__dlpack_device__() == (2, 0)
    assert isinstance(pool.key_cache(0), type(pool.dlpack_view(0)))  # no numpy view of device memory
    pool.free(ids)
    assert pool.num_free_blocks == 64


@pytest.mark.cuda
def test_cuda_pool_is_a_torch_cuda_tensor(spec: KVCacheSpec) -> None:
    torch = pytest.importorskip("torch")
    pool = PagedKVPool(KVCacheSpec(2, 4, 64, "bf16", 16), num_blocks=32, device="cuda:0")
    t = torch.from_dlpack(pool.dlpack_view(1, value=True))
    assert t.is_cuda and t.dtype == torch.bfloat16 and tuple(t.shape) == (32, 16, 4, 64)
    ids = pool.allocate(2)
    t[int(ids[1])].fill_(2.0)
    torch.cuda.synchronize()
    staged = pool.gather(ids).view(np.uint16)  # bf16 bits, staging layout [block][layer][K|V]
    per = 16 * 4 * 64
    block1_layer1_v = staged[staged.size // 2 + 3 * per : staged.size // 2 + 4 * per]
    assert (block1_layer1_v == 0x4000).all()  # 2.0 in bf16
    del pool
    t.add_(1.0)  # the view keeps the device memory alive
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_dlpack_to_the_host_is_a_copy() -> None:
    torch = pytest.importorskip("torch")
    pool = PagedKVPool(KVCacheSpec(2, 4, 64, "fp16", 16), num_blocks=8, device="cuda:0")
    view = pool.dlpack_view(0)
    t = torch.from_dlpack(view)
    t[3].fill_(5.0)
    torch.cuda.synchronize()
    host = np.from_dlpack(view, device="cpu")  # dl_device=(kDLCPU, 0): a copy to host memory
    assert host.shape == (8, 16, 4, 64) and (host[3] == 5.0).all() and (host[2] == 0).all()
    with pytest.raises(ValueError, match="copy=False forbids"):
        view.__dlpack__(dl_device=(1, 0), copy=False)
    with pytest.raises(BufferError, match="dl_device"):
        view.__dlpack__(dl_device=(2, 1))
    with pytest.raises(ValueError, match="0 is ambiguous"):
        view.__dlpack__(stream=0)
    on_device = torch.from_dlpack(view, copy=True)
    assert on_device.is_cuda and on_device.data_ptr() != t.data_ptr() and torch.equal(on_device, t)
    assert _capsule(view.__dlpack__(stream=torch.cuda.current_stream().cuda_stream or 1))[:2] == ("dltensor", None)


def test_threads_never_share_a_block(spec: KVCacheSpec) -> None:
    pool = PagedKVPool(spec, num_blocks=512)
    seen: list[np.ndarray] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            try:
                ids = pool.allocate(int(rng.integers(1, 16)))
            except MemoryError:
                continue
            with lock:
                seen.append(ids)
            pool.free(ids)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.num_free_blocks == 512 and len(seen) > 0
