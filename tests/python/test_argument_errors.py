"""Arguments of the wrong type or past the native integer range, at the public entry points that hand
user values to ``_core``: each is a typed error (TypeError / ValueError / IndexError) whose message
names the parameter and the bad value (or its type), never pybind's generic "incompatible function
arguments" list nor an OverflowError, and the call changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sagellm_kv_cache import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.manager import RequestManager
from sagellm_kv_cache.offload import OffloadStorage
from sagellm_kv_cache.prefix_cache import PrefixCache, RadixPrefixCache
from sagellm_kv_cache.tiers import DiskTier, HostTier, TieredPrefixCache

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4)
HUGE = 2**70  # past every native integer
DIGEST = bytes(32)


def _pool() -> PagedKVPool:
    return PagedKVPool(SPEC, 32)


def _manager() -> RequestManager:
    rm = RequestManager(_pool())
    rm.admit(1, list(range(9)))
    return rm


def _radix() -> RadixPrefixCache:
    return RadixPrefixCache(4, pool=_pool())


def _tiered() -> TieredPrefixCache:
    return TieredPrefixCache(_pool(), host_blocks=4, background=False)


def _state(obj: Any) -> Any:
    """What a refused call must leave as it was."""
    if isinstance(obj, RequestManager):
        return len(obj), obj.num_free_blocks, obj.running(), obj.stats()
    if isinstance(obj, PagedKVPool):
        return obj.num_free_blocks, obj.budget_blocks, obj.key_cache(0).copy()
    if isinstance(obj, RadixPrefixCache):
        return len(obj), obj.stats(), obj.pool.num_free_blocks if obj.pool is not None else None
    if isinstance(obj, TieredPrefixCache):
        return obj.pool.num_free_blocks, obj.stats()
    return None


# (id, factory (None: the call builds), call, error, regex naming the parameter and the bad value)
Case = tuple[str, Callable[[], Any] | None, Callable[[Any], Any], type[Exception], str]

CASES: list[Case] = [
    # RequestManager: salt / extra reached pybind's std::string, width its int64
    ("admit salt int", _manager, lambda rm: rm.admit(2, [1, 2, 3, 4, 5], salt=5),
     TypeError, "salt must be bytes, str or None, got int"),
    ("admit extra float", _manager, lambda rm: rm.admit(2, [1, 2, 3, 4, 5], extra=1.5),
     TypeError, "extra must be bytes, str or None, got float"),
    ("admit salt memoryview", _manager, lambda rm: rm.admit(2, [1, 2, 3, 4, 5], salt=memoryview(b"s")),
     TypeError, "salt must be bytes, str or None, got memoryview"),
    ("admit salt surrogate", _manager, lambda rm: rm.admit(2, [1, 2, 3, 4, 5], salt="\ud800"),
     ValueError, r"salt must be encodable as UTF-8, got '\\ud800'"),
    ("admit_batch salt list", _manager, lambda rm: rm.admit_batch([2], [[1, 2, 3, 4, 5]], salt=[1]),
     TypeError, "salt must be bytes, str or None, got list"),
    ("admit_batch extra huge", _manager, lambda rm: rm.admit_batch([2], [[1, 2, 3, 4, 5]], extra=HUGE),
     TypeError, "extra must be bytes, str or None, got int"),
    ("block_tables width str", _manager, lambda rm: rm.block_tables([1], width="4"),
     TypeError, "width must be an int, got str"),
    ("block_tables width huge", _manager, lambda rm: rm.block_tables([1], width=HUGE),
     ValueError, f"width must fit in 64 bits, got {HUGE}"),
    ("manager policy", None, lambda _: RequestManager(num_blocks=8, policy=None),  # type: ignore[arg-type]
     TypeError, "policy must be a str, got NoneType"),
    ("manager hash_algorithm", None, lambda _: RequestManager(num_blocks=8, hash_algorithm=b"sha256"),  # type: ignore[arg-type]
     TypeError, "hash_algorithm must be a str, got bytes"),
    # PagedKVPool
    ("pool num_blocks huge", None, lambda _: PagedKVPool(SPEC, HUGE),
     ValueError, f"num_blocks must fit in 64 bits, got {HUGE}"),
    ("pool zero_fill", None, lambda _: PagedKVPool(SPEC, 8, zero_fill="yes"),  # type: ignore[arg-type]
     TypeError, "zero_fill must be a bool, got str"),
    ("pool huge_pages", None, lambda _: PagedKVPool(SPEC, 8, huge_pages=1),  # type: ignore[arg-type]
     TypeError, "huge_pages must be a bool, got int"),
    ("pool lock_memory", None, lambda _: PagedKVPool(SPEC, 8, lock_memory=None),  # type: ignore[arg-type]
     TypeError, "lock_memory must be a bool, got NoneType"),
    ("dlpack_view value", _pool, lambda p: p.dlpack_view(0, value="v"),  # type: ignore[arg-type]
     TypeError, "value must be a bool, got str"),
    ("gather_into out", _pool, lambda p: p.gather_into([0], object()),
     TypeError, "out must be a C-contiguous buffer .* got object"),
    ("gather_into read-only out", _pool, lambda p: p.gather_into([0], bytes(p.block_nbytes)),
     ValueError, "out must be writable, got a read-only bytes"),
    ("scatter data", _pool, lambda p: p.scatter(3.5, [0]),
     TypeError, "data must be a C-contiguous buffer .* got float"),
    ("gather_summed sums", _pool, lambda p: p.gather_summed([0], np.zeros(p.block_nbytes, np.uint8), [0]),
     TypeError, "sums must be a uint64 numpy array, got list"),
    ("scatter_summed data", _pool, lambda p: p.scatter_summed(None, [0], np.zeros(0, np.uint64)),
     TypeError, "data must be a C-contiguous buffer .* got NoneType"),
    ("set_budget_bytes -huge", _pool, lambda p: p.set_budget_bytes(-HUGE),
     ValueError, f"budget_bytes must be >= 0, got -{HUGE}"),
    ("can_admit -huge", _pool, lambda p: p.can_admit(-HUGE),
     ValueError, f"num_tokens must be >= 0, got -{HUGE}"),
    # RadixPrefixCache (and the tiered cache on it)
    ("radix salt", _radix, lambda c: c.match_tokens([1, 2, 3, 4], salt=7),  # type: ignore[arg-type]
     TypeError, "salt must be bytes, str or None, got int"),
    ("radix hash_tokens extra", _radix, lambda c: c.hash_tokens([1, 2, 3, 4], extra=[1]),  # type: ignore[arg-type]
     TypeError, "extra must be bytes, str or None, got list"),
    ("radix insert_tokens salt", _radix, lambda c: c.insert_tokens([1, 2, 3, 4], [0], salt=1.5),  # type: ignore[arg-type]
     TypeError, "salt must be bytes, str or None, got float"),
    ("radix insert extra_key", _radix, lambda c: c.insert(DIGEST, [0], extra_key=True),  # type: ignore[arg-type]
     TypeError, "extra_key must be bytes, str or None, got bool"),
    ("radix insert cache_salt", _radix, lambda c: c.insert(DIGEST, [0], cache_salt=HUGE),  # type: ignore[arg-type]
     TypeError, "cache_salt must be bytes, str or None, got int"),
    ("radix evict -huge", _radix, lambda c: c.evict(-HUGE),
     ValueError, f"num_blocks must be >= 0, got -{HUGE}"),
    ("radix policy", None, lambda _: RadixPrefixCache(policy=1),  # type: ignore[arg-type]
     TypeError, "policy must be a str, got int"),
    ("radix hash_algorithm", None, lambda _: RadixPrefixCache(hash_algorithm=None),  # type: ignore[arg-type]
     TypeError, "hash_algorithm must be a str, got NoneType"),
    ("radix ttl_seconds", None, lambda _: RadixPrefixCache(ttl_seconds="5"),  # type: ignore[arg-type]
     TypeError, "ttl_seconds must be a number, got str"),
    ("radix ttl_seconds 10**400", None, lambda _: RadixPrefixCache(ttl_seconds=10**400),
     ValueError, "ttl_seconds must be a finite number, got an int of 1329 bits"),
    # the seed PrefixCache
    ("seed block_size huge", None, lambda _: PrefixCache(block_size=HUGE),
     ValueError, f"block_size must be at most 2147483647, got {HUGE}"),
    ("seed compute_block_hashes block_size huge", PrefixCache, lambda c: c.compute_block_hashes([1, 2], HUGE),
     ValueError, f"block_size must be at most 2147483647, got {HUGE}"),
    # tiers
    ("host num_blocks huge", None, lambda _: HostTier(HUGE, 64),
     ValueError, f"host_blocks must be at most 2147483647, got {HUGE}"),
    ("host block_nbytes huge", None, lambda _: HostTier(4, HUGE),
     ValueError, f"block_nbytes must be at most {2**62}, got {HUGE}"),
    ("host device", None, lambda _: HostTier(4, 64, device=0),  # type: ignore[arg-type]
     TypeError, "device must be a str, got int"),
    ("tiered host_blocks huge", None, lambda _: TieredPrefixCache(_pool(), host_blocks=HUGE),
     ValueError, f"host_blocks must be at most 2147483647, got {HUGE}"),
    ("tiered policy", None, lambda _: TieredPrefixCache(_pool(), policy=None),  # type: ignore[arg-type]
     TypeError, "policy must be a str, got NoneType"),
    ("tiered make_room str", _tiered, lambda t: t.make_room("2"),  # type: ignore[arg-type]
     TypeError, "num_blocks must be an int, got str"),
    ("tiered location int", _tiered, lambda t: t.location(5),  # type: ignore[arg-type]
     TypeError, "digest must be bytes .* got int"),
    ("offload host_blocks huge", None, lambda _: OffloadStorage(_pool(), host_blocks=HUGE),
     ValueError, f"host_blocks must be at most 2147483647, got {HUGE}"),
]


@pytest.mark.parametrize(("factory", "call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_a_typed_error_naming_it(factory: Callable[[], Any] | None, call: Callable[[Any], Any],
                                                  error: type[Exception], match: str) -> None:
    obj = factory() if factory is not None else None
    before = _state(obj)
    with pytest.raises(error, match=match) as info:
        call(obj)
    assert "incompatible" not in str(info.value) and not isinstance(info.value, OverflowError)
    after = _state(obj)
    if isinstance(before, tuple) and before and isinstance(before[-1], np.ndarray):
        assert before[:-1] == after[:-1] and np.array_equal(before[-1], after[-1])
    else:
        assert before == after


def test_tiered_demote_and_allocate_past_the_native_range() -> None:
    """"Up to" counts: demote(2**70) demotes every cached block (it reached a native int64 and got
    pybind's refusal); allocate(2**70) makes room, then names the count it cannot allocate."""
    t = _tiered()
    digests = t.hash_tokens(list(range(8)))
    ids = t.pool.allocate(2)
    t.insert(digests, ids)
    t.pool.free(ids)  # the cache holds them now
    assert [t.location(bytes(d)) for d in digests] == ["device", "device"]
    for fut in t.demote(HUGE):
        fut.result()
    assert [t.location(bytes(d)) for d in digests] == ["host", "host"]
    free = t.pool.num_free_blocks
    with pytest.raises(ValueError, match=f"num_blocks must be in \\[0, 2147483647\\], got {HUGE}"):
        t.allocate(HUGE)
    assert t.pool.num_free_blocks == free
    t.close()


def test_disk_tier_slot_io_names_its_arguments(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 4, 4096, direct_io=False)
    buf = disk.bounce_buffer()
    for call, error, match in (
        (lambda: disk.write(HUGE, DIGEST, buf, 1), IndexError, f"slot {HUGE} out of range \\[0, 4\\)"),
        (lambda: disk.write(4, DIGEST, buf, 1), IndexError, "slot 4 out of range"),
        (lambda: disk.write(0, "d" * 32, buf, 1), TypeError, "digest must be 32 bytes, got str"),
        (lambda: disk.write(0, b"d", buf, 1), TypeError, "digest must be 32 bytes, got 1 bytes"),
        (lambda: disk.write(0, DIGEST, [0] * 8, 1), TypeError, "buf must be a 1-D C-contiguous uint8 array, got list"),
        (lambda: disk.write(0, DIGEST, buf, -1), ValueError, r"generation must be in \[0, 2\*\*64\), got -1"),
        (lambda: disk.write(0, DIGEST, buf, 2**64), ValueError, "generation must be in"),
        (lambda: disk.write(0, DIGEST, buf, 1.0), TypeError, "generation must be an int, got float"),
        (lambda: disk.read(-HUGE, DIGEST, buf), IndexError, f"slot -{HUGE} out of range"),
        (lambda: disk.read(0, DIGEST, None), TypeError, "out must be a 1-D C-contiguous uint8 array, got NoneType"),
    ):
        with pytest.raises(error, match=match):
            call()
    disk.write(0, DIGEST, buf, 1)  # the well-formed call still works
    assert disk.read(0, DIGEST, buf)
    disk.close()
    with pytest.raises(ValueError, match=f"disk_blocks must be at most 2147483647, got {HUGE}"):
        DiskTier(tmp_path / "x", HUGE, 4096)
    assert not (tmp_path / "x").exists()  # refused before anything was created
