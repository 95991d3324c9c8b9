"""Core hardening seen from Python: nothing a Python program does can crash the interpreter.

* Threads that change (or resize) an id, token or digest array while another thread passes it to a
  call: the call works on a snapshot taken with the GIL held, or raises a typed error. These run in
  a subprocess, so a crash shows up as a failed test with the signal, not as a dead test run.
* Arrays that went through pickle (multiprocessing, Ray) and byte-swapped arrays are accepted:
  dtypes are compared by value.
* copy_blocks and scatter refuse order-dependent id lists; a double free changes nothing.
* A SAGELLM_KV_CUDART path that does not load is an error naming it.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import KVCacheError, KVDoubleFreeError


def run_isolated(body: str, timeout: float = 60.0) -> str:
    """Runs ``body`` in a fresh interpreter; fails the test on a non-zero exit (a crash included)."""
    code = textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"subprocess exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


# A mutator thread flips the last element of a shared array between a valid and an invalid value
# (and, for the resize variant, reallocates the array under the reader) while the main thread calls
# into the core with it for a fixed time. Typed errors are fine; anything else fails.
RACE_PRELUDE = """
import threading, time
import numpy as np
from sagellm_kv_cache import _core

def hammer(call, mutate, seconds=0.6):
    stop = threading.Event()
    def mutator():
        i = 0
        while not stop.is_set():
            mutate(i)
            i += 1
    t = threading.Thread(target=mutator, daemon=True)
    t.start()
    calls = errors = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            calls += 1
            try:
                call()
            except (ValueError, TypeError, MemoryError, IndexError, KeyError) as e:
                errors += 1
            except Exception as e:  # KV*Error subclasses of plain Exception
                if type(e).__module__ != "sagellm_kv_cache.errors":
                    raise
                errors += 1
    finally:
        stop.set()
        t.join()
    return calls, errors
"""


def test_scatter_with_ids_flipped_by_another_thread() -> None:
    out = run_isolated(
        RACE_PRELUDE
        + """
pool = _core.PagedKVPool(1, 1, 16, "fp16", 16, 4096)
ids = pool.allocate(64)
data = np.zeros(64 * pool.block_nbytes, np.uint8)
def flip(i):
    ids[-1] = 2_000_000_000 if i % 2 else 4095
print(hammer(lambda: pool.scatter(data, ids), flip))
print(hammer(lambda: pool.gather(ids), flip))
print(hammer(lambda: pool.copy_blocks(ids[:1], ids[-1:]), flip))
"""
    )
    assert out.count("(") == 3


def test_free_and_incref_with_ids_flipped_by_another_thread() -> None:
    run_isolated(
        RACE_PRELUDE
        + """
pool = _core.PagedKVPool(1, 1, 16, "fp16", 16, 64)
held = pool.allocate(8)
ids = held.copy()
def flip(i):
    ids[-1] = -5 if i % 2 else 10**9
# Every call must be refused (an invalid id at the end, whatever the thread does), changing nothing.
for call in (lambda: pool.incref(ids), lambda: pool.free(ids)):
    calls, errors = hammer(call, flip, 0.3)
    assert calls == errors, (calls, errors)
    assert all(pool.ref_count(int(b)) == 1 for b in held)
alloc = _core.BlockAllocator(1024)
mine = alloc.allocate(600)  # above the GIL-release threshold
bad = np.concatenate([mine, np.array([5000], np.int32)])
def flip2(i):
    bad[-1] = -1 if i % 2 else 5000
calls, errors = hammer(lambda: alloc.free(bad), flip2, 0.3)
assert calls == errors and alloc.num_allocated == 600
"""
    )


def test_arrays_resized_under_the_reader() -> None:
    # ndarray.resize(refcheck=False) frees the old buffer: a borrowed pointer would dangle.
    run_isolated(
        RACE_PRELUDE
        + """
pool = _core.PagedKVPool(1, 1, 16, "fp16", 16, 4096)
ids = pool.allocate(256)
base = ids.copy()
def resize(i):
    ids.resize(256 if i % 2 else 4096, refcheck=False)
    ids[:256] = base
print(hammer(lambda: pool.gather(ids), resize))
cache = _core.PrefixCache(block_size=16, allocator=pool)
toks = np.arange(16 * 64, dtype=np.int64)
def resize_tokens(i):
    toks.resize(16 * (64 if i % 2 else 4096), refcheck=False)
print(hammer(lambda: cache.match_tokens(toks), resize_tokens))
"""
    )


def test_prefix_calls_with_tokens_and_digests_mutated() -> None:
    run_isolated(
        RACE_PRELUDE
        + """
pool = _core.PagedKVPool(1, 1, 16, "fp16", 4, 4096)
cache = _core.PrefixCache(block_size=4, allocator=pool, event_queue_capacity=8)
tokens = np.arange(4 * 32, dtype=np.int32)
def flip_tokens(i):
    tokens[::7] = i
def match_release():
    n, ids, digests = cache.match_tokens(tokens)
    cache.release(digests[:n])
print(hammer(match_release, flip_tokens))
digests = _core.hash_blocks(tokens, 4)
ids = pool.allocate(len(digests))
def flip_digests(i):
    digests[i % len(digests), :4] = i & 255
def insert_and_clear():
    cache.insert(digests, ids)
    cache.clear()
print(hammer(insert_and_clear, flip_digests))
block_ids = pool.allocate(len(digests))
def flip_ids(i):
    block_ids[-1] = 10**9 if i % 2 else int(ids[-1])
def insert_ids():
    cache.insert(_core.hash_blocks(np.arange(4 * 32, dtype=np.int32) + 10**6, 4), block_ids)
    cache.clear()
print(hammer(insert_ids, flip_ids))
cache.check_invariants()
assert cache.clear() >= 0
"""
    )


def test_unpickled_arrays_are_accepted() -> None:
    pool = _core.PagedKVPool(1, 1, 16, "fp16", 4, 64)
    cache = _core.PrefixCache(block_size=4, allocator=pool)
    for dtype in (np.int64, np.int32):
        tokens = np.arange(32, dtype=dtype)
        unpickled = pickle.loads(pickle.dumps(tokens))
        assert unpickled.dtype is not np.dtype(dtype) or unpickled.dtype == np.dtype(dtype)
        digests = _core.hash_blocks(unpickled, 4)
        assert (digests == _core.hash_blocks(tokens, 4)).all()
        ids = pickle.loads(pickle.dumps(pool.allocate(8)))
        n_inserted, _redundant, _digests = cache.insert_tokens(unpickled, ids)
        assert n_inserted in (0, 8)
        matched, _got, _ = cache.match_tokens(pickle.loads(pickle.dumps(tokens)))
        assert matched == 8
        cache.release(pickle.loads(pickle.dumps(digests)))
        pool.free(ids)
    cache.clear()
    assert pool.num_used_blocks == 0


def test_byte_swapped_and_strided_arrays_are_read_by_value() -> None:
    tokens = np.arange(64, dtype=np.int64)
    swapped = tokens.astype(">i8")
    assert (_core.hash_blocks(swapped, 16) == _core.hash_blocks(tokens, 16)).all()
    assert (_core.hash_blocks(tokens.astype(np.int32)[::1], 16) == _core.hash_blocks(tokens.astype(np.int32), 16)).all()
    pool = _core.PagedKVPool(1, 1, 16, "fp16", 16, 64)
    ids = pool.allocate(4)
    pool.incref(ids.astype(">i4"))
    pool.free(ids.astype(np.uint16)[::-1])
    assert all(pool.ref_count(int(b)) == 1 for b in ids)
    with pytest.raises(ValueError, match="int32 range"):
        pool.free(np.array([2**63], dtype=np.uint64))
    with pytest.raises(TypeError, match="int32 or int64"):
        _core.hash_blocks(np.arange(16, dtype=np.float32), 16)


def test_lists_of_ids_and_digests_read_like_arrays() -> None:
    """Lists and tuples of ints / 32-byte bytes take a direct path; anything else in them, the general
    one, with the same answers and the same errors naming the item."""
    alloc = _core.BlockAllocator(8)
    alloc.free(tuple(int(b) for b in alloc.allocate(4)))
    ids = alloc.allocate(4)
    alloc.free([np.int32(ids[0]), int(ids[1]), np.int64(ids[2]), int(ids[3])])  # numpy scalars: general path
    assert alloc.num_available == 8
    with pytest.raises(TypeError, match="dtype bool"):
        alloc.free([True])
    with pytest.raises(ValueError, match="int32 range"):
        alloc.free([1, 2**40])
    cache = _core.PrefixCache(block_size=1)
    digests = [bytes([i]) * 32 for i in range(3)]
    cache.insert(digests, [0, 1, 2])

    class Digest(bytes):
        pass

    as_array = np.frombuffer(b"".join(digests), np.uint8).reshape(3, 32)
    for form in (digests, tuple(digests), [digests[0], bytearray(digests[1]), Digest(digests[2])], as_array):
        n, got = cache.peek(form)
        assert n == 3 and got.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"digests\[1\] must be 32 bytes, got 31"):
        cache.peek([digests[0], digests[1][:31]])
    with pytest.raises(TypeError, match=r"digests\[0\]"):
        cache.peek([3])


def test_copy_blocks_and_scatter_refuse_order_dependent_ids() -> None:
    pool = _core.PagedKVPool(1, 1, 4, "fp32", 2, 8)
    ids = pool.allocate(3)
    data = np.arange(3 * pool.block_nbytes, dtype=np.uint8)
    pool.scatter(data, ids)
    with pytest.raises(ValueError, match="also a source"):
        pool.copy_blocks(ids[:2], ids[1:])  # block 1 would be written and read
    with pytest.raises(ValueError, match="appears at positions"):
        pool.copy_blocks(ids[:2], [ids[2], ids[2]])
    with pytest.raises(ValueError, match="appears at positions 0 and 1"):
        pool.scatter(np.zeros(2 * pool.block_nbytes, np.uint8), [ids[0], ids[0]])
    assert bytes(pool.gather(ids)) == data.tobytes()  # nothing was written
    pool.copy_blocks([ids[0], ids[0]], [ids[1], ids[2]])  # one source, two destinations
    got = pool.gather(ids).reshape(3, -1)
    assert (got[1] == got[0]).all() and (got[2] == got[0]).all()


def test_double_free_changes_nothing() -> None:
    pool = _core.PagedKVPool(1, 1, 16, "fp16", 16, 8)
    ids = pool.allocate(3)
    with pytest.raises(KVDoubleFreeError, match="nothing was freed"):
        pool.free([int(ids[0]), int(ids[1]), int(ids[1])])
    assert all(pool.ref_count(int(b)) == 1 for b in ids)
    with pytest.raises(KVCacheError):
        pool.free([int(ids[0]), 7])
    pool.free(ids)
    assert pool.num_used_blocks == 0


def test_bad_cudart_path_is_named() -> None:
    env = dict(os.environ, SAGELLM_KV_CUDART="/nonexistent/libcudart-missing.so")
    code = (
        "from sagellm_kv_cache import _core\n"
        "try:\n    _core.check_device('cuda:0')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "SAGELLM_KV_CUDART=/nonexistent/libcudart-missing.so" in out.stdout


@pytest.mark.cuda
def test_cuda_pool_with_a_layer_plane_above_2_gib() -> None:
    # 1 layer, 8 heads x 128 dims x 16 tokens fp16 = 32 KiB per block; 65,600 blocks: 2 GiB + 3 MiB
    # per K/V plane, above cudaMemcpy2D's max pitch.
    pool = _core.PagedKVPool(1, 8, 128, "fp16", 16, 65_600, device="cuda:0", zero_fill=False)
    assert pool.layer_block_nbytes * pool.num_blocks > 2**31 - 1
    ids = pool.allocate(pool.num_blocks)
    pick = np.array([0, 1, pool.num_blocks - 2, pool.num_blocks - 1], dtype=np.int32)
    data = np.random.default_rng(3).integers(0, 255, size=len(pick) * pool.block_nbytes, dtype=np.uint8)
    pool.scatter(data, pick)
    assert bytes(pool.gather(pick)) == data.tobytes()
    pool.copy_blocks(pick[[0, 3]], np.array([5, 6], dtype=np.int32))
    got = pool.gather(np.array([5, 6], dtype=np.int32)).reshape(2, -1)
    rows = data.reshape(4, -1)
    assert (got[0] == rows[0]).all() and (got[1] == rows[3]).all()
    pool.free(ids)



HUGE_BLOCK_PRELUDE = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from sagellm_kv_cache import _core
alloc = _core.BlockAllocator(8)
cache = _core.PrefixCache(block_size=2**31 - 1, allocator=alloc)
rm = _core.RequestManager(alloc, cache)
"""


def test_admit_under_a_huge_block_size_reserves_for_the_tokens_only() -> None:
    # A request's partial-block tail was reserved for a whole block at admit (8 GiB for block_size
    # 2**31-1, for a three-token prompt), inside admit's commit phase. Under a 3 GiB address-space
    # limit that reservation cannot be made.
    out = run_isolated(HUGE_BLOCK_PRELUDE + """
print(rm.admit(1, [1, 2, 3])[0], rm.admit_batch([2, 3], [[1], [2, 3]])[0].tolist(), alloc.num_available)
""")
    assert out.split() == ["0", "[0,", "0]", "5"]


def test_keyed_chains_under_a_huge_block_size_allocate_for_the_tokens_only() -> None:
    # A salted or keyed chain hashes full messages; the message buffer was sized for a whole block
    # when the chain started (8 GiB for block_size 2**31-1), before any block was read.
    out = run_isolated(HUGE_BLOCK_PRELUDE + """
print(rm.admit(1, [1, 2, 3], extra="lora-7")[0], rm.admit(2, [4, 5], salt="tenant")[0],
      rm.admit_batch([3, 4], [[1], [2, 3]], extra="lora-7")[0].tolist())
""")
    assert out.split() == ["0", "0", "[0,", "0]"]
