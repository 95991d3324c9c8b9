"""Prefix caching: the seed PrefixCache and the native fast path (RadixPrefixCache over a PagedKVPool)."""

from __future__ import annotations

import dis
import hashlib
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sagellm_kv_cache import (
    KVCacheMissError,
    KVCacheSpec,
    KVConfigInvalidError,
    KVInvalidBlockError,
    KVMetadataMismatchError,
    KVRefCountUnderflowError,
    PagedKVPool,
    PrefixCache,
    RadixPrefixCache,
    _core,
)
from sagellm_kv_cache.prefix_cache import hash_algorithms

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prefix_cache_example.py"
# In the seed's order, plus query_count (ours: the engine reads it).
SEED_STATS_KEYS = ["num_entries", "num_blocks", "hit_count", "miss_count", "hit_rate", "query_count", "insert_count",
                   "evict_count", "block_size", "max_cached_blocks", "enable_lru"]


def make_pool(num_blocks: int = 64, block_size: int = 4) -> PagedKVPool:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, dtype="fp16", block_size=block_size)
    return PagedKVPool(spec, num_blocks)


def prompt(*values: int, block_size: int = 4) -> np.ndarray:
    """One block per value: block j holds [v, v + 1000, ...] (so equal leading values share blocks)."""
    return np.array([v + 1000 * k for v in values for k in range(block_size)], dtype=np.int64)


# --- the seed PrefixCache --------------------------------------------------------------------------


def test_seed_readme_example(capsys: pytest.CaptureFixture[str]) -> None:
    # The seed README's "Prefix Cache (Task 2.1)" example, exactly as written.
    cache = PrefixCache(block_size=16, max_cached_blocks=100, enable_lru=True)

    # Insert prefix blocks
    tokens = list(range(48))  # 3 blocks
    hashes = cache.compute_block_hashes(tokens)
    blocks = [{"block_id": i} for i in range(len(hashes))]
    cache.insert(hashes, blocks)

    # Lookup with prefix overlap
    hit_blocks, num_tokens = cache.lookup(hashes)
    print(f"Reused {num_tokens} tokens from cache!")

    # Check hit rate
    stats = cache.get_stats()
    print(f"Hit rate: {stats['hit_rate']:.1%}")

    out = capsys.readouterr().out
    assert out == "Reused 48 tokens from cache!\nHit rate: 100.0%\n"
    assert hit_blocks == blocks and all(a is b for a, b in zip(hit_blocks, blocks, strict=True))


def test_seed_stats_keys_and_counts() -> None:
    cache = PrefixCache(block_size=4)
    assert list(cache.get_stats()) == SEED_STATS_KEYS
    hashes = cache.compute_block_hashes(list(range(12)))
    cache.insert(hashes[:2], [{"block_id": 0}, {"block_id": 1}])
    found, n = cache.lookup(hashes)  # 2 of 3 blocks cached
    assert [b["block_id"] for b in found] == [0, 1] and n == 8
    assert cache.lookup(cache.compute_block_hashes([9, 9, 9, 9])) == ([], 0)
    stats = cache.get_stats()
    # As in the seed, hits and misses count lookups (a partial match is a hit), not blocks.
    assert stats == {
        "block_size": 4, "enable_lru": True, "evict_count": 0, "hit_count": 1, "hit_rate": 0.5,
        "insert_count": 2, "max_cached_blocks": None, "miss_count": 1, "num_blocks": 2, "num_entries": 2,
        "query_count": 2,
    }
    assert len(cache) == 2
    assert repr(cache) == "PrefixCache(block_size=4, lru=True, entries=2, blocks=2, hit_rate=50.00%)"
    assert cache.lookup([]) == ([], 0) and cache.get_stats()["miss_count"] == 2  # the seed counts it too
    cache.clear()
    assert cache.get_stats()["hit_count"] == 1  # counters survive clear, as in the seed


def test_seed_repr() -> None:
    assert repr(PrefixCache()) == "PrefixCache(block_size=16, lru=True, entries=0, blocks=0, hit_rate=0.00%)"
    assert repr(PrefixCache(4, 3, enable_lru=False)) == \
        "PrefixCache(block_size=4, max=3, entries=0, blocks=0, hit_rate=0.00%)"
    assert str(PrefixCache(4, 3)) == "PrefixCache(block_size=4, max=3, lru=True, entries=0, blocks=0, hit_rate=0.00%)"


def test_seed_block_keys_are_per_block_and_served_only_under_their_prefix() -> None:
    cache = PrefixCache(block_size=4)
    a = cache.compute_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])  # the partial third block is skipped
    b = cache.compute_block_hashes([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and all(isinstance(h, bytes) and len(h) == 32 for h in a)
    # The seed's (and the sageLLM engine's) key: SHA-256 of the block's ids as 4-byte big-endian.
    assert a[0] == hashlib.sha256(struct.pack(">4I", 1, 2, 3, 4)).digest()
    assert a[1] == b[1]  # same tokens, same key, whatever comes before
    assert cache.compute_block_hash([1, 2, 3, 4]) == a[0]
    assert cache.compute_block_hash([1, 2], block_size=2) == cache.compute_block_hashes([1, 2], block_size=2)[0]
    # ...but the cache chains the keys of a prompt: block 2 is served only after block 1.
    cache.insert(a, [{"block_id": 1}, {"block_id": 2}])
    assert cache.lookup(a) == ([{"block_id": 1}, {"block_id": 2}], 8)
    assert cache.lookup(b) == ([], 0)
    assert cache.lookup(a[1:]) == ([], 0)
    with pytest.raises(ValueError, match="out of range"):
        cache.compute_block_hashes([1, 2, 3, -4])
    with pytest.raises(ValueError, match="Token count 3 doesn't match block_size 4"):
        cache.compute_block_hash([1, 2, 3])
    with pytest.raises(ValueError, match="block_size 8"):
        cache.compute_block_hash([1, 2, 3, 4], block_size=8)
    with pytest.raises(TypeError):
        cache.compute_block_hashes([1.5, 2.5, 3.5, 4.5])


def test_seed_hashing_and_lookup_refuse_tensors_with_typed_errors() -> None:
    """A torch tensor where the seed API takes an int or a list of keys raised torch's RuntimeError
    from inside a comparison or truth test (``len(tokens) != block_size``, ``if not block_hashes``),
    and a tensor that requires grad raised it from numpy's conversion."""
    torch = pytest.importorskip("torch")
    cache = PrefixCache(block_size=4)
    with pytest.raises(TypeError, match="block_size must be an int, got Tensor"):
        cache.compute_block_hash([1, 2, 3, 4], block_size=torch.arange(3))
    with pytest.raises(TypeError, match="tokens must be a flat sequence of ints, got Tensor"):
        cache.compute_block_hash(torch.zeros(4, requires_grad=True))
    with pytest.raises(TypeError, match="tokens must be a flat sequence of ints, got Tensor"):
        cache.compute_block_hashes(torch.zeros(8, requires_grad=True))
    with pytest.raises(TypeError, match="block hash must be bytes, got Tensor"):
        cache.lookup(torch.arange(3))
    stats = cache.get_stats()
    # what the seed took stays taken: a float block size equal to the count; None is no keys for
    # neither (0.5.2.5 and 0.5.4.15 raise TypeError, 'NoneType' object is not iterable)
    assert cache.compute_block_hash([1, 2, 3, 4], block_size=4.0) == cache.compute_block_hash([1, 2, 3, 4])
    assert cache.compute_block_hash([1, 2, 3, 4], block_size=np.int64(4)) == cache.compute_block_hash([1, 2, 3, 4])
    with pytest.raises(TypeError, match="None"):
        cache.lookup(None)  # type: ignore[arg-type]
    assert cache.get_stats()["miss_count"] == stats["miss_count"]


def test_seed_evict_invalidate_clear() -> None:
    cache = PrefixCache(block_size=4)
    owner_a, owner_b = uuid.uuid4(), uuid.uuid4()
    ha = cache.compute_block_hashes(list(range(16)))
    hb = cache.compute_block_hashes(list(range(100, 108)))
    cache.insert(ha, [{"block_id": i, "handle_id": owner_a} for i in range(4)])
    cache.insert(hb, [{"block_id": 10 + i, "handle_id": owner_b} for i in range(2)])
    assert len(cache) == 6
    assert cache.invalidate(owner_b) == 2 and cache.invalidate(owner_b) == 0
    assert cache.invalidate(uuid.uuid4()) == 0
    assert cache.evict_by_count(3) == 3  # leaves first: the tail of chain A
    assert cache.lookup(ha)[1] == 4 and cache.get_stats()["evict_count"] == 2 + 3  # invalidated ones count too
    assert cache.evict_by_count(2**40) == 1 and len(cache) == 0  # any count, as in the seed
    with pytest.raises(ValueError, match="num_blocks"):
        cache.evict_by_count(-1)
    cache.clear()
    assert len(cache) == 0 and cache.lookup(ha) == ([], 0)


@pytest.mark.parametrize("capacity", [None, 32])
def test_seed_owner_table_forgets_handles_whose_blocks_left(capacity: int | None) -> None:
    # One entry per handle_id ever inserted would grow for the life of a server: entries of
    # handles with no cached block go once they outnumber the cache, and live ones keep working.
    cache = PrefixCache(block_size=2, max_cached_blocks=capacity)
    handles = [uuid.uuid4() for _ in range(2000)]
    for i, handle in enumerate(handles):
        hashes = cache.compute_block_hashes([i, i + 1, 7, 7])
        cache.insert(hashes, [{"block_id": 2 * i, "handle_id": handle}, {"block_id": 2 * i + 1, "handle_id": handle}])
        if i % 2 and i < len(handles) - 1:
            cache.evict_by_count(len(cache))
    assert len(cache._owners) <= 2 * len(cache) + 64 + 2
    assert set(cache._owners.values()) >= set(cache._trie.cached_owners())
    assert cache.invalidate(handles[-2]) == 2  # cached since the last eviction: still found by its handle
    assert cache.invalidate(handles[1]) == 0
    again = uuid.uuid4()  # a new handle never gets the number of a forgotten one
    cache.insert(cache.compute_block_hashes([5000, 5001]), [{"block_id": -1, "handle_id": again}])
    assert cache._owners[again] > max(number for key, number in cache._owners.items() if key != again)
    assert cache.invalidate(again) == 1


def test_seed_evict_by_count_needs_lru() -> None:
    cache = PrefixCache(block_size=4, enable_lru=False)
    hashes = cache.compute_block_hashes(list(range(8)))
    cache.insert(hashes, [{"block_id": 0}, {"block_id": 1}])
    with pytest.raises(RuntimeError, match="LRU eviction not enabled"):
        cache.evict_by_count(1)
    assert len(cache) == 2


def test_seed_capacity_bounds_the_cache() -> None:
    cache = PrefixCache(block_size=2, max_cached_blocks=3)
    for start in range(0, 40, 4):
        hashes = cache.compute_block_hashes(list(range(start, start + 4)))
        cache.insert(hashes, [{"block_id": start}, {"block_id": start + 1}])
        assert len(cache) <= 3
    assert cache.get_stats()["evict_count"] > 0 and cache.get_stats()["max_cached_blocks"] == 3


def test_seed_bounded_cache_serves_the_right_blocks_while_ids_are_reused() -> None:
    # A bounded cache recycles its internal block ids as the trie evicts; every lookup must still
    # return the dicts inserted under those keys, and its table stays bounded.
    cache = PrefixCache(block_size=2, max_cached_blocks=6)
    prompts = [[p, p + 1, 100, 101, p + 7, p + 8] for p in range(0, 400, 10)]
    for step, prompt in enumerate(prompts):
        hashes = cache.compute_block_hashes(prompt)
        found, _ = cache.lookup(hashes)
        fresh = [{"block_id": (step, i)} for i in range(len(found), len(hashes))]
        cache.insert(hashes, found + fresh)
        again, tokens = cache.lookup(hashes)
        assert tokens == 6 and again == found + fresh
        assert len(cache) <= 6 and len(cache._blocks) <= 12
        if step >= 2:  # an older prompt is either gone or served with its own blocks
            old, _ = cache.lookup(cache.compute_block_hashes(prompts[step - 2]))
            assert all(block["block_id"][0] == step - 2 for block in old)
    assert cache.get_stats()["evict_count"] > 0


def test_seed_unbounded_cache_reuses_the_ids_of_removed_blocks() -> None:
    # An unbounded cache counts its internal ids up; removed blocks' ids are swept for reuse, so the
    # table stays near the live size, a reused id never serves the object it held before, and the
    # removed blocks' objects are let go.
    class Block(dict):  # a dict that can be weakly referenced
        pass

    cache = PrefixCache(block_size=2)
    gone: list[weakref.ref[Block]] = []
    live: dict[tuple[bytes, ...], list[Block]] = {}
    peak = 0
    for step in range(400):
        prompt = [step, step + 1, 7, 8, step, 9] if step % 3 else [5, 6, 7, 8, step, 9]  # some share block 0
        hashes = cache.compute_block_hashes(prompt)
        found, _ = cache.lookup(hashes)
        fresh = [Block(block_id=(step, i)) for i in range(len(found), len(hashes))]
        cache.insert(hashes, found + fresh)
        assert cache.lookup(hashes) == (found + fresh, 6)
        live[tuple(hashes)] = found + fresh
        if step % 25 == 24:  # drop about half of what is cached
            before = len(cache)
            assert cache.evict_by_count(before // 2) == before // 2
            for key, blocks in list(live.items()):  # what is still served is what was inserted
                got, tokens = cache.lookup(list(key))
                assert got == blocks[: tokens // 2]
                if tokens < 6:
                    gone += [weakref.ref(b) for b in blocks[tokens // 2:]]
                    del live[key]
        peak = max(peak, len(cache))
        assert len(cache._blocks) - len(cache._free_ids) <= 2 * len(cache) + 64  # swept past that
        assert len(cache._blocks) <= 2 * peak + 64 + 3  # freed ids go out again before new ones
    assert len(cache._blocks) < 400  # 800-odd ids were handed out
    cache._forget_evicted([], force=True)
    del found, fresh, blocks, got
    assert all(ref() is None for ref in gone)  # removed blocks' objects are not kept
    cache.clear()
    assert cache._blocks == [] and cache._free_ids == [] and cache._next_id == 0


@pytest.mark.parametrize("capacity", [None, 24])
def test_seed_cache_serves_only_its_own_prefixes_under_threads(capacity: int | None) -> None:
    # Threads look up and insert overlapping prompts while one of them evicts and one inserts owned
    # blocks (the per-block path): every block a lookup returns is the object inserted for exactly
    # that prefix, whatever ids were swept and reused meanwhile.
    cache = PrefixCache(block_size=2, max_cached_blocks=capacity)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for step in range(300):
                tokens = [int(t) for t in rng.integers(0, 3, size=8)]  # few distinct prefixes: much sharing
                hashes = cache.compute_block_hashes(tokens)
                found, n = cache.lookup(hashes)
                for i, block in enumerate(found):
                    assert block["prefix"] == tuple(tokens[: 2 * (i + 1)])
                owner = {"handle_id": uuid.UUID(int=seed)} if seed == 1 and step % 2 else {}
                fresh = [{"block_id": (seed, step, i), "prefix": tuple(tokens[: 2 * (i + 1)]), **owner}
                         for i in range(n // 2, len(hashes))]
                cache.insert(hashes, found + fresh)
                if seed == 0 and step % 20 == 19:
                    cache.evict_by_count(len(cache) // 2)
        except BaseException as exc:  # reported below: a failed assert in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    if capacity is not None:
        assert len(cache) <= capacity
    else:
        assert len(cache._blocks) - len(cache._free_ids) <= 2 * len(cache) + 64 + 8


def test_seed_insert_after_lookup_sees_changes_made_in_between() -> None:
    # An insert right after a lookup of the same keys reuses the lookup's match length; anything
    # that changed the cache in between must make it look again.
    cache = PrefixCache(block_size=2)
    a = cache.compute_block_hashes([1, 2, 3, 4, 5, 6])
    assert cache.lookup(a) == ([], 0)
    cache.insert(a[:2], [{"block_id": "x0"}, {"block_id": "x1"}])  # changes the cache after the lookup
    cache.insert(a, [{"block_id": "a0"}, {"block_id": "a1"}, {"block_id": "a2"}])
    assert cache.lookup(a) == ([{"block_id": "x0"}, {"block_id": "x1"}, {"block_id": "a2"}], 6)
    assert cache.get_stats()["insert_count"] == 3  # x0, x1, a2: the first two were not inserted twice
    mutable = [bytearray(key) for key in a]  # other key types work too, and are never served stale
    assert cache.lookup(mutable)[1] == 6
    mutable[2][0] ^= 1
    assert cache.lookup(mutable)[1] == 4
    found, _ = cache.lookup(a)
    assert cache.evict_by_count(1) == 1  # a2, the only leaf
    cache.insert(a, found)
    assert cache.lookup(a)[1] == 6 and cache.get_stats()["insert_count"] == 4


def test_seed_block_keys_from_lists_tuples_and_arrays_agree() -> None:
    cache = PrefixCache(block_size=4)
    tokens = [0, 1, 2**31, 2**32 - 1, 7, 8, 9, 10, 11]
    expected = [hashlib.sha256(struct.pack(">4I", *tokens[i : i + 4])).digest() for i in (0, 4)]
    assert cache.compute_block_hashes(tokens) == expected
    assert cache.compute_block_hashes(tuple(tokens)) == expected
    assert cache.compute_block_hashes(np.array(tokens, dtype=np.int64)) == expected
    assert cache.compute_block_hashes([]) == [] and cache.compute_block_hashes([1, 2, 3]) == []
    with pytest.raises(ValueError, match=r"token id 4294967296 at position 2 is out of range"):
        cache.compute_block_hashes([1, 2, 2**32, 4])
    with pytest.raises(ValueError, match=r"token id 18446744073709551615 is out of range"):  # not wrapped negative
        cache.compute_block_hashes(np.array([1, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(TypeError, match=r"\[1\] must be an int, got str"):
        cache.compute_block_hashes([1, "2", 3, 4])


def test_seed_block_keys_read_every_kind_of_int_anywhere_in_a_long_list() -> None:
    class Token(int):
        pass

    cache = PrefixCache(block_size=16)
    odd = [0, 1, 2**30 - 1, 2**30, 2**31, 2**32 - 1, Token(5), -0]  # one digit, two digits, subclass
    rng = np.random.default_rng(3)
    for at in (0, 63, 64, 65, 200, 255):  # the main loop (64 ahead prefetched) and its tail
        tokens = rng.integers(0, 50_000, size=256).tolist()
        tokens[at : at + 1] = [odd[at % len(odd)]]
        expected = [hashlib.sha256(struct.pack(">16I", *tokens[i : i + 16])).digest() for i in range(0, 256, 16)]
        assert cache.compute_block_hashes(tokens) == expected, at
        for bad, error, match in ((-1, ValueError, f"token id -1 at position {at} "),
                                  (2**64, ValueError, f"token id {2**64} at position {at} "),
                                  (-(2**40), ValueError, f"at position {at} "),
                                  (1.0, TypeError, rf"\[{at}\] must be an int, got float"),
                                  (True, TypeError, rf"\[{at}\] must be an int, got bool True")):
            tokens[at] = bad
            with pytest.raises(error, match=match):
                cache.compute_block_hashes(tokens)


def test_seed_block_keys_refuse_bools_and_numpy_scalars_in_lists_on_every_path() -> None:
    # The original package (isagellm-kv-cache 0.5.4.15) packed each item with int.to_bytes: it hashed
    # True as token 1 (a bool is an int) and failed on a numpy scalar with AttributeError. Here a
    # bool is no token id on any path, as every other token reader of this package has it (an array
    # of bools, hash_tokens); a numpy scalar inside a list is refused as the original refused it,
    # while a numpy array of ints is read. Both are TypeErrors naming the position, no key is made.
    cache = PrefixCache(block_size=4)
    for tokens, at, got in (([True, 2, 3, 4], 0, "bool True"), ((1, 2, 3, False), 3, "bool False"),
                            ([1, np.int64(2), 3, 4], 1, "int64"), ([1, 2, np.True_, 4], 2, "bool")):
        for compute in (cache.compute_block_hash, cache.compute_block_hashes):
            with pytest.raises(TypeError, match=rf"^tokens\[{at}\] must be an int, got {got}"):
                compute(tokens)
    for compute in (cache.compute_block_hash, cache.compute_block_hashes):
        with pytest.raises(TypeError, match="got bool"):
            compute(np.array([True, True, False, True]))
    with pytest.raises(TypeError, match="got bool at position 1"):
        RadixPrefixCache(block_size=4).hash_tokens([1, True, 3, 4])
    ints = [1, 2, 3, 4]
    expected = hashlib.sha256(struct.pack(">4I", *ints)).digest()
    assert cache.compute_block_hash(ints) == cache.compute_block_hash(tuple(ints)) == expected
    assert cache.compute_block_hash(np.array(ints, dtype=np.int32)) == cache.compute_block_hashes(ints)[0] == expected
    assert cache.get_stats()["insert_count"] == 0 and len(cache) == 0


def _sha256_compress(block: bytes, state: bytes | None = None) -> bytes:
    """FIPS 180-4's SHA-256 compression of one 64-byte block onto `state` (eight big-endian words;
    SHA-256's initial hash value when None), in plain Python: the reference for the chains."""
    assert len(block) == 64
    k = [_frac_root(p, 3) for p in _primes(64)]
    h = list(struct.unpack(">8L", state)) if state is not None else [_frac_root(p, 2) for p in _primes(8)]
    rotr = lambda x, n: ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF  # noqa: E731
    w = list(struct.unpack(">16L", block))
    for t in range(16, 64):
        s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3)
        s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10)
        w.append((w[t - 16] + s0 + w[t - 7] + s1) & 0xFFFFFFFF)
    a, b, c, d, e, f, g, hh = h
    for t in range(64):
        t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t]) & 0xFFFFFFFF
        t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & 0xFFFFFFFF
        a, b, c, d, e, f, g, hh = (t1 + t2) & 0xFFFFFFFF, a, b, c, (d + t1) & 0xFFFFFFFF, e, f, g
    return struct.pack(">8L", *((x + y) & 0xFFFFFFFF for x, y in zip(h, (a, b, c, d, e, f, g, hh), strict=True)))


def _primes(n: int) -> list[int]:
    out: list[int] = []
    candidate = 2
    while len(out) < n:
        if all(candidate % p for p in out):
            out.append(candidate)
        candidate += 1
    return out


def _frac_root(p: int, degree: int) -> int:
    """First 32 bits of the fractional part of p ** (1 / degree), exactly (integer roots)."""
    scaled = p << (64 * degree)  # the root of this is root(p) * 2**64
    lo, hi = 0, 1 << (64 + 8)
    while lo < hi:  # integer degree-th root by bisection
        mid = (lo + hi + 1) // 2
        if mid**degree <= scaled:
            lo = mid
        else:
            hi = mid - 1
    return (lo >> 32) & 0xFFFFFFFF


def test_sha256_compress_reference_is_sha256() -> None:
    # The reference above, with FIPS padding applied by hand, is SHA-256 itself.
    message = b"abc"
    padded = message + b"\x80" + b"\0" * (55 - len(message)) + struct.pack(">Q", 8 * len(message))
    assert _sha256_compress(padded) == hashlib.sha256(message).digest()


def _plain_chain(tokens: list[int], block_size: int) -> list[bytes]:
    """The SHA-256 block digests of an unsalted, unkeyed prompt, from hashing.hpp's description."""
    state = hashlib.sha256(b"sagellm-kv sha256 chain v2" + struct.pack("<I", block_size)).digest()
    out = []
    for start in range(0, len(tokens) // block_size * block_size, block_size):
        data = struct.pack(f"<{block_size}i", *tokens[start : start + block_size])
        data += bytes(-len(data) % 64)
        for at in range(0, len(data), 64):
            state = _sha256_compress(data[at : at + 64], state)
        out.append(state)
    return out


@pytest.mark.parametrize("block_size", [16, 4, 20])
def test_block_digests_follow_the_documented_chain(block_size: int) -> None:
    tokens = [7, -1, 2**31 - 1, -(2**31), *range(60)]
    expected = _plain_chain(tokens, block_size)
    assert [bytes(d) for d in _core.hash_blocks(np.asarray(tokens, dtype=np.int64), block_size)] == expected
    cache = RadixPrefixCache(block_size=block_size, capacity_blocks=None)
    assert [bytes(d) for d in cache.hash_tokens(tokens)] == expected


def test_core_sha256_helpers_match_references() -> None:
    data = bytes(range(256)) * 2
    assert _core.sha256_chunks(data, 64) == [hashlib.sha256(data[i : i + 64]).digest() for i in range(0, 512, 64)]
    # Whole 64-byte pieces take the compression-only path, other lengths OpenSSL's Update/Final.
    rng = np.random.default_rng(7)
    for chunk in (64, 128, 192, 256, 60, 100, 4, 1):
        data = rng.integers(0, 256, size=chunk * 3, dtype=np.uint8).tobytes()
        assert _core.sha256_chunks(data, chunk) == [
            hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)], chunk
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
    chained = [keys[0]]
    for key in keys[1:]:
        chained.append(_sha256_compress(chained[-1] + key))
    assert _core.sha256_chain(b"".join(keys)) == b"".join(chained)
    assert _core.sha256_chain(b"") == b"" and _core.sha256_chunks(b"", 4) == []
    with pytest.raises(ValueError, match="whole number of 3-byte chunks"):
        _core.sha256_chunks(b"abcd", 3)
    with pytest.raises(ValueError, match="chunk_bytes must be > 0"):
        _core.sha256_chunks(b"abcd", 0)
    with pytest.raises(ValueError, match="whole number of 32-byte keys"):
        _core.sha256_chain(b"x" * 33)
    with pytest.raises(TypeError, match="bytes-like"):
        _core.sha256_chain("text")  # type: ignore[arg-type]


def test_sha256_chain_cached_hands_back_the_last_pair_for_the_same_key_bytes() -> None:
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    pair = _core.sha256_chain_cached(keys)
    assert pair == (b"".join(keys), _core.sha256_chain(b"".join(keys)))
    # Equal bytes in other objects (the engine hashes its lookup keys itself): the same pair, not rehashed.
    assert _core.sha256_chain_cached(tuple(bytes(bytearray(k)) for k in keys), pair) is pair
    for other in (keys[:4], [*keys[:4], keys[0]], [*keys, keys[0]]):
        fresh = _core.sha256_chain_cached(other, pair)
        assert fresh is not pair and fresh == (b"".join(other), _core.sha256_chain(b"".join(other)))
    assert _core.sha256_chain_cached([], pair) == (b"", b"")
    with pytest.raises(TypeError, match=r"keys\[1\] must be bytes, got bytearray"):
        _core.sha256_chain_cached([keys[0], bytearray(keys[1])], pair)
    with pytest.raises(ValueError, match=r"keys\[2\] must be 32 bytes, got 31"):
        _core.sha256_chain_cached([keys[0], keys[1], keys[2][:31]])
    with pytest.raises(TypeError, match="list or tuple"):
        _core.sha256_chain_cached(b"".join(keys))
    for bad_last in ((b"", b"", b""), (pair[0], "digests"), (pair[0], pair[1][:32]), [pair[0], pair[1]]):
        with pytest.raises(TypeError, match="last must be None or a pair"):
            _core.sha256_chain_cached(keys, bad_last)


def test_probe_peek_and_insert_objects_read_concatenated_digest_bytes() -> None:
    digests = _core.hash_blocks(list(range(16)), 4)
    packed = digests.tobytes()
    cache = _core.PrefixCache(block_size=4)
    table: list[Any] = []
    blocks: list[Any] = [{"n": i} for i in range(4)]
    assert cache.insert_objects(packed[:64], 0, blocks[:2], table, ids=0) == (2, 2)
    assert cache.peek(packed)[0] == 2 and cache.probe(packed, table) == (2, blocks[:2])
    assert cache.insert_objects(packed, 2, blocks, table, ids=2) == (2, 2)
    assert cache.probe(digests, table) == (4, blocks) and cache.peek(packed[:96])[0] == 3
    with pytest.raises(ValueError, match="whole number of 32-byte digests, got 33 bytes"):
        cache.probe(packed[:33], table)
    with pytest.raises(TypeError, match="list of 32-byte digests, got bytes"):
        cache.match(packed)  # only the seed's calls take them concatenated


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c, h: c.insert(h, [{"block_id": 0}]), ValueError),
        (lambda c, h: c.insert(h, [{"block_id": 0}, "block"]), TypeError),
        (lambda c, h: c.lookup([1.5]), TypeError),
    ],
)
def test_seed_bad_input_changes_nothing(call: Any, error: type[Exception]) -> None:
    cache = PrefixCache(block_size=4)
    hashes = cache.compute_block_hashes(list(range(8)))
    cache.insert(hashes[:1], [{"block_id": 0}])
    before = cache.get_stats()
    with pytest.raises(error):
        call(cache, hashes)
    assert cache.get_stats() == before


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"block_size": True}, {"max_cached_blocks": 0},
                                    {"max_cached_blocks": -3}])
def test_seed_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PrefixCache(**kwargs)


# --- the fast path ------------------------------------------------------------------------------


def test_scheduler_flow_with_a_pool() -> None:
    pool = make_pool(16)
    cache = RadixPrefixCache(block_size=4, pool=pool)
    first = prompt(1, 2, 3)
    digests = cache.hash_tokens(first)
    assert digests.shape == (3, 32) and digests.dtype == np.uint8
    hit, ids = cache.match(digests)
    assert hit == 0 and ids.size == 0
    new = pool.allocate(3)
    inserted, redundant = cache.insert(digests, new)
    assert inserted == 3 and redundant.size == 0
    pool.free(new)  # request 1 ends; the cache keeps its own reference
    assert pool.num_used_blocks == 3 and all(pool.ref_count(int(b)) == 1 for b in new)

    second = prompt(1, 2, 7, 8)
    d2 = cache.hash_tokens(second)
    hit, ids = cache.match(d2)
    assert hit == 2 and ids.tolist() == new[:2].tolist()
    fresh = pool.allocate(len(d2) - hit)  # only the missing blocks
    inserted, _ = cache.insert(d2[hit:], fresh, parent=d2[hit - 1])
    assert inserted == 2 and len(cache) == 5
    pool.free(fresh)
    # Matched blocks are protected until released: nothing of the shared prefix can go.
    assert cache.evict(10) == 3  # 3, then 8 and its parent 7; never the matched (in-use) 1 and 2
    assert cache.contains(d2[0]) and cache.contains(d2[1])
    cache.release(d2[:hit])
    assert cache.evict(10) == 2
    assert len(cache) == 0 and pool.num_free_blocks == 16  # every block went back to the pool


def test_match_tokens_is_hash_plus_match_in_one_call() -> None:
    pool = make_pool(16)
    cache = RadixPrefixCache(block_size=4, pool=pool)
    tokens = prompt(5, 6, 7)
    ids = pool.allocate(3)
    cache.insert(cache.hash_tokens(tokens), ids)
    pool.free(ids)
    n, got, digests = cache.match_tokens(np.concatenate([tokens, [1, 2]]))  # a partial block is ignored
    assert n == 3 and got.tolist() == ids.tolist() and digests.tolist() == cache.hash_tokens(tokens).tolist()
    peeked, peeked_ids = cache.peek(digests)
    assert peeked == 3 and peeked_ids.tolist() == got.tolist()
    cache.release(digests)


def test_insert_tokens_is_hash_plus_insert_in_one_call() -> None:
    pool = make_pool(16)
    cache = RadixPrefixCache(block_size=4, pool=pool)
    tokens = prompt(5, 6, 7)
    ids = pool.allocate(3)
    try:
        inserted, redundant, digests = cache.insert_tokens(tokens, ids)
    finally:
        pool.free(ids)
    assert inserted == 3 and redundant.size == 0
    np.testing.assert_array_equal(digests, cache.hash_tokens(tokens))
    assert cache.peek(cache.hash_tokens(tokens))[0] == 3
    spare = pool.allocate(2)
    with pytest.raises(ValueError, match="block_ids holds 2 ids"):
        cache.insert_tokens(tokens, spare)
    pool.free(spare)


def test_capacity_evicts_lru_leaves_and_caller_keeps_the_rest() -> None:
    pool = make_pool(32)
    cache = RadixPrefixCache(block_size=4, capacity_blocks=4, pool=pool)
    for value in (1, 2, 3, 4):
        ids = pool.allocate(1)
        cache.insert(cache.hash_tokens(prompt(value)), ids)
        pool.free(ids)
    one = cache.hash_tokens(prompt(1))
    hit, _ = cache.match(one)  # 1 becomes the most recently used
    cache.release(one[:hit])
    ids = pool.allocate(1)
    cache.insert(cache.hash_tokens(prompt(5)), ids)  # evicts the least recently used: 2
    pool.free(ids)
    present = [cache.contains(cache.hash_tokens(prompt(v))[0]) for v in (1, 2, 3, 4, 5)]
    assert present == [True, False, True, True, True]
    assert pool.num_used_blocks == 4

    # A chain longer than the capacity: the cache keeps what fits, the caller frees the rest.
    ids = pool.allocate(6)
    inserted, _ = cache.insert(cache.hash_tokens(prompt(9, 9, 9, 9, 9, 9)), ids)
    assert inserted == 4 and len(cache) == 4
    pool.free(ids)
    assert pool.num_used_blocks == 4
    assert cache.stats()["evictions"] == 5


def test_policies_fifo_priority() -> None:
    fifo = RadixPrefixCache(block_size=4, capacity_blocks=2, policy="fifo")
    fifo.insert(fifo.hash_tokens(prompt(1)), [0])
    fifo.insert(fifo.hash_tokens(prompt(2)), [1])
    one = fifo.hash_tokens(prompt(1))
    hit, _ = fifo.match(one)
    fifo.release(one[:hit])
    fifo.insert(fifo.hash_tokens(prompt(3)), [2])  # FIFO ignores the recent use of 1
    assert not fifo.contains(fifo.hash_tokens(prompt(1))[0])

    prio = RadixPrefixCache(block_size=4, policy="priority")
    prio.insert(prio.hash_tokens(prompt(1)), [0], priority=5)
    prio.insert(prio.hash_tokens(prompt(2)), [1], priority=1)
    prio.insert(prio.hash_tokens(prompt(3)), [2], priority=9)
    assert prio.evict(1) == 1 and not prio.contains(prio.hash_tokens(prompt(2))[0])
    assert RadixPrefixCache(block_size=4, policy="ttl", ttl_seconds=1.0).policy == "ttl"


def test_salts_keep_tenants_apart() -> None:
    cache = RadixPrefixCache(block_size=4)
    tokens = prompt(1, 2)
    a = cache.hash_tokens(tokens, salt=b"tenant-a")
    b = cache.hash_tokens(tokens, salt=b"tenant-b")
    plain = cache.hash_tokens(tokens)
    assert not (a == b).all(axis=1).any() and not (a == plain).all(axis=1).any()
    cache.insert(a, [0, 1])
    assert cache.peek(b)[0] == 0 and cache.peek(plain)[0] == 0 and cache.peek(a)[0] == 2
    n, _, _ = cache.match_tokens(tokens, salt=b"tenant-b")
    assert n == 0
    n, _, digests = cache.match_tokens(tokens, salt=b"tenant-a")
    assert n == 2
    cache.release(digests)
    lora = cache.hash_tokens(tokens, salt=b"tenant-a", extra=b"lora-7")
    assert not (lora == a).all(axis=1).any()


def test_events_drained_in_order() -> None:
    cache = RadixPrefixCache(block_size=4, event_queue_capacity=16)
    digests = cache.hash_tokens(prompt(1, 2))
    cache.insert(digests, [3, 4], token_ids=prompt(1, 2).astype(np.int32), extra_key=b"salt")
    cache.evict(1)
    cache.clear()
    events = cache.drain_events()
    assert [e["type"] for e in events] == ["stored", "removed", "cleared"]
    stored = events[0]
    assert stored["digests"] == [d.tobytes() for d in digests] and stored["parent"] is None
    assert stored["token_ids"] == prompt(1, 2).tolist() and stored["block_size"] == 4
    assert stored["extra_key"] == b"salt"
    assert events[1]["digests"] == [digests[1].tobytes()]
    assert cache.drain_events() == []


def test_invalidate_by_owner() -> None:
    cache = RadixPrefixCache(block_size=4)
    cache.insert(cache.hash_tokens(prompt(1, 2)), [0, 1], owner=7)
    cache.insert(cache.hash_tokens(prompt(3)), [2], owner=8)
    assert cache.invalidate(7) == 2 and len(cache) == 1 and cache.invalidate(7) == 0


@pytest.mark.skipif("xxh3_128" not in hash_algorithms(), reason="built without xxHash")
def test_xxh3_option_differs_from_sha256() -> None:
    fast = RadixPrefixCache(block_size=4, hash_algorithm="xxh3_128")
    safe = RadixPrefixCache(block_size=4)
    tokens = prompt(1, 2)
    assert fast.hash_tokens(tokens).shape == (2, 32)
    assert not (fast.hash_tokens(tokens) == safe.hash_tokens(tokens)).all()


# --- bad input on the fast path: typed errors, nothing changed -----------------------------------


@pytest.fixture
def loaded() -> tuple[RadixPrefixCache, PagedKVPool, np.ndarray]:
    pool = make_pool(16)
    cache = RadixPrefixCache(block_size=4, pool=pool)
    ids = pool.allocate(2)
    digests = cache.hash_tokens(prompt(1, 2))
    cache.insert(digests, ids)
    pool.free(ids)
    return cache, pool, digests


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c, p, d: c.hash_tokens(np.zeros(8, dtype=np.float32)), TypeError, "dtype int32 or int64"),
        (lambda c, p, d: c.hash_tokens(np.zeros(8, dtype=np.int16)), TypeError, "int16"),
        (lambda c, p, d: c.hash_tokens(np.zeros((2, 4), dtype=np.int64)), ValueError, "1-D"),
        (lambda c, p, d: c.match_tokens(np.zeros((2, 4), dtype=np.int32)), ValueError, "1-D"),
        (lambda c, p, d: c.match(np.zeros((2, 31), dtype=np.uint8)), ValueError, r"shape \(n, 32\)"),
        (lambda c, p, d: c.match([b"x" * 31]), ValueError, "32 bytes"),
        (lambda c, p, d: c.match(np.zeros((2, 32), dtype=np.int8)), TypeError, "uint8"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), np.array([3, 4], dtype=np.int32)),
         KVConfigInvalidError, "2 block ids for 1 digests"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), np.array([15], dtype=np.int32)),
         KVInvalidBlockError, "not allocated"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), np.array([99], dtype=np.int32)),
         KVInvalidBlockError, "99"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), [0], parent=b"\x01" * 32), KVCacheMissError,
         "parent digest 0101.* is not cached"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), [0]), KVConfigInvalidError, "block id 0 .*already caches"),
        (lambda c, p, d: c.insert(d[::-1].copy(), [0, 1]), KVConfigInvalidError, "different parent"),
        (lambda c, p, d: c.release(c.hash_tokens(prompt(5))), KVRefCountUnderflowError, "not cached"),
        (lambda c, p, d: c.release(d), KVRefCountUnderflowError, "no use left"),
        (lambda c, p, d: c.evict(-1), ValueError, "num_blocks"),
        # Bools were taken as 1 (evict(True) evicted a block); floats and ints past 64 bits were pybind's
        # "incompatible function arguments", naming no argument.
        (lambda c, p, d: c.evict(True), TypeError, "num_blocks must be an int, got bool"),
        (lambda c, p, d: c.evict(1.0), TypeError, "num_blocks must be an int, got float"),
        (lambda c, p, d: c.invalidate(True), TypeError, "owner must be an int, got bool"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), [0], owner=True), TypeError, "owner .*bool"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), [0], priority=2**70), ValueError, f"priority .*{2**70}"),
        (lambda c, p, d: c.insert(c.hash_tokens(prompt(5)), [0], priority=0.5), TypeError, "priority .*float"),
        (lambda c, p, d: c.insert_tokens(prompt(5), [0], owner=1.0), TypeError, "owner .*float"),
        (lambda c, p, d: c.hash_tokens(prompt(5), block_size=True), TypeError, "block_size .*bool"),
    ],
)
def test_fast_path_bad_input(loaded: Any, call: Any, error: type[Exception], match: str) -> None:
    cache, pool, digests = loaded
    before = (len(cache), pool.num_free_blocks, cache.stats()["inserts"])
    with pytest.raises(error, match=match):
        call(cache, pool, digests)
    assert (len(cache), pool.num_free_blocks, cache.stats()["inserts"]) == before
    cache._native.check_invariants()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": "mru"}, KVConfigInvalidError, "mru"),
        ({"hash_algorithm": "md5"}, KVConfigInvalidError, "md5"),
        ({"capacity_blocks": -1}, ValueError, "capacity_blocks"),
        ({"capacity_blocks": 0}, ValueError, "capacity_blocks"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"event_queue_capacity": -2}, ValueError, "event_queue_capacity"),
        ({"block_size": True}, TypeError, "block_size must be an int, got bool"),  # was blocks of 1 token
        ({"block_size": 4.0}, TypeError, "block_size must be an int, got float"),
        ({"capacity_blocks": True}, TypeError, "capacity_blocks must be an int, got bool"),
        ({"capacity_blocks": 2**70}, ValueError, f"capacity_blocks .*{2**70}"),
        ({"pool": "pool"}, TypeError, "PagedKVPool"),
        ({"block_size": 8, "pool": make_pool(4, block_size=4)}, KVMetadataMismatchError, "block_size"),
    ],
)
def test_fast_path_bad_configuration(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"block_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        RadixPrefixCache(**kwargs)


def test_fast_path_evict_of_more_than_any_cache_holds_evicts_what_it_can(loaded: Any) -> None:
    cache, _, _ = loaded
    assert cache.evict(2**70) == 2 and len(cache) == 0  # was pybind's "incompatible function arguments"


# --- property test against a plain-Python model of the trie -----------------------------------------

CAPACITY = 6
_prompt = st.lists(st.integers(0, 2), min_size=1, max_size=4)
_op = st.one_of(
    st.tuples(st.just("match"), _prompt),
    st.tuples(st.just("release"), st.integers(0, 10)),
    st.tuples(st.just("insert"), _prompt),
    st.tuples(st.just("evict"), st.integers(0, 4)),
)


class TrieModel:
    """Nodes keyed by digest: parent digest, block id, users (outstanding matches)."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, dict[str, Any]] = {}

    def prefix(self, digests: np.ndarray) -> int:
        n = 0
        while n < len(digests) and digests[n].tobytes() in self.nodes:
            n += 1
        return n

    def children(self, key: bytes) -> list[bytes]:
        return [k for k, v in self.nodes.items() if v["parent"] == key]

    def busy(self, key: bytes) -> bool:
        """In use, or some descendant is: such a node may not be evicted."""
        return self.nodes[key]["users"] > 0 or any(self.busy(c) for c in self.children(key))

    def removable(self) -> set[bytes]:
        return {k for k in self.nodes if not self.busy(k)}


def check_removed(model: TrieModel, cache: RadixPrefixCache) -> set[bytes]:
    """Syncs the model with evictions the cache made; checks only idle subtrees went."""
    removed = {k for k in model.nodes if not cache.contains(k)}
    for key in removed:
        assert not model.busy(key), "an in-use node (or the parent of one) was evicted"
        assert all(c in removed for c in model.children(key)), "a node went but its child stayed"
    for key in removed:
        del model.nodes[key]
    return removed


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=40))
def test_trie_against_model(ops: list[tuple[Any, ...]]) -> None:
    pool = make_pool(CAPACITY + 8)
    cache = RadixPrefixCache(block_size=4, capacity_blocks=CAPACITY, pool=pool)
    model = TrieModel()
    outstanding: list[np.ndarray] = []
    for op in ops:
        if op[0] == "match":
            digests = cache.hash_tokens(prompt(*op[1]))
            expected = model.prefix(digests)
            n, ids = cache.match(digests)
            assert n == expected
            assert ids.tolist() == [model.nodes[d.tobytes()]["block"] for d in digests[:n]]
            for d in digests[:n]:
                model.nodes[d.tobytes()]["users"] += 1
            if n:
                outstanding.append(digests[:n])
        elif op[0] == "release":
            if not outstanding:
                continue
            digests = outstanding.pop(op[1] % len(outstanding))
            cache.release(digests)
            for d in digests:
                model.nodes[d.tobytes()]["users"] -= 1
        elif op[0] == "insert":
            digests = cache.hash_tokens(prompt(*op[1]))
            cached = model.prefix(digests)
            evictions = cache.stats()["evictions"]
            ids = pool.allocate(len(digests))
            inserted, redundant = cache.insert(digests, ids)
            assert redundant.tolist() == list(range(cached))
            removed = check_removed(model, cache)
            assert cache.stats()["evictions"] - evictions == len(removed)
            assert not any(d.tobytes() in removed for d in digests[:cached]), "insert evicted its own prefix"
            for i in range(cached, cached + inserted):
                parent = digests[i - 1].tobytes() if i else None
                model.nodes[digests[i].tobytes()] = {"parent": parent, "block": int(ids[i]), "users": 0}
            assert all(cache.contains(d) for d in digests[: cached + inserted])
            if cached + inserted < len(digests):
                assert not cache.contains(digests[cached + inserted])
            pool.free(ids)  # the caller's references; the cache holds its own on what it kept
        else:
            removable = len(model.removable())
            evicted = cache.evict(op[1])
            removed = check_removed(model, cache)
            assert evicted == len(removed) == min(op[1], removable)

        assert len(cache) == len(model.nodes) <= CAPACITY
        assert pool.num_used_blocks == len(model.nodes)
        assert all(pool.ref_count(v["block"]) == 1 for v in model.nodes.values())
        assert sorted(cache.cached_block_ids().tolist()) == sorted(v["block"] for v in model.nodes.values())
        cache._native.check_invariants()

    for digests in outstanding:
        cache.release(digests)
    cache.clear()
    assert len(cache) == 0 and pool.num_free_blocks == pool.num_blocks


def test_example_runs_from_any_directory(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Reused 48 tokens from cache!" in proc.stdout and "all prefix-cache steps done" in proc.stdout


def test_probe_counts_and_renews_without_holding() -> None:
    cache = _core.PrefixCache(block_size=4, capacity_blocks=6)
    a = _core.hash_blocks(list(range(12)), 4)
    b = _core.hash_blocks(list(range(100, 112)), 4)
    cache.insert(a, np.arange(3, dtype=np.int32))
    cache.insert(b, np.arange(3, 6, dtype=np.int32))
    table = [f"block {i}" for i in range(6)]
    assert cache.probe(a, table) == (3, ["block 0", "block 1", "block 2"])  # a is now the newest
    n, ids = cache.probe(b)
    assert n == 3 and ids.tolist() == [3, 4, 5]
    stats = cache.stats()
    assert stats["lookups"] == 2 and stats["in_use_blocks"] == 0  # counted, nothing held
    assert cache.evict(3) == 3 and cache.peek(a)[0] == 0  # b's probe came last: a went first
    cache.insert(b, np.arange(3, 6, dtype=np.int32))
    with pytest.raises(KeyError, match="block id 3"):
        cache.probe(b, [])  # a table that lacks a cached id: an error, not a crash
    with pytest.raises(KeyError, match="block id 4"):
        cache.probe(b, ["x", "x", "x", "x", None])  # None: no entry
    with pytest.raises(TypeError, match="table must be a list"):
        cache.probe(b, {3: "x"})  # type: ignore[call-overload]


def test_insert_objects_checks_everything_before_changing_anything() -> None:
    ids = _core.BlockAllocator(8)
    cache = _core.PrefixCache(block_size=4, capacity_blocks=4, allocator=ids)
    digests = _core.hash_blocks(list(range(16)), 4)
    table: list[Any] = []
    with pytest.raises(TypeError, match=r"blocks\[2\] must be a dict, got str"):
        cache.insert_objects(digests, 1, [{}, {}, "x", {}], table)
    with pytest.raises(ValueError, match="start 4 must lie within 4 digests"):
        cache.insert_objects(digests, 4, [{}] * 4, table)
    with pytest.raises(ValueError, match="ids are given for a cache without an allocator"):
        cache.insert_objects(digests, 0, [{}] * 4, table, ids=0)
    with pytest.raises(TypeError, match="table must be a list"):
        cache.insert_objects(digests, 0, [{}] * 4, {})  # type: ignore[arg-type]
    assert cache.insert_objects(digests, 0, [{}, {"handle_id": 7}, {}, {}], table) is None  # owners: insert()
    assert len(cache) == 0 and table == [] and ids.num_available == 8
    blocks: list[Any] = [{"n": i} for i in range(4)]
    assert cache.insert_objects(digests[:2], 0, blocks[:2], table) == (2, 2)
    assert cache.insert_objects(digests, 2, blocks, table) == (2, 2)  # continues the chain
    assert cache.probe(digests, table) == (4, blocks)
    assert ids.num_available == 4  # the cache's references only
    unbounded = _core.PrefixCache(block_size=4)
    other: list[Any] = []
    assert unbounded.insert_objects(digests[:2], 0, blocks[:2], other, ids=100) == (2, 2)  # a run from 100
    assert other == [None] * 100 + blocks[:2]
    for bad, match in ((np.array([7], dtype=np.int32), "1 ids for 2 new blocks"),
                       (np.array([7, -1], dtype=np.int32), "id -1 is negative"),
                       (2**31 - 2, "first id 2147483646 leaves no room for 2 ids")):
        with pytest.raises(ValueError, match=match):
            unbounded.insert_objects(digests, 2, blocks, other, ids=bad)
    assert len(unbounded) == 2 and len(other) == 102  # refused: nothing changed
    assert unbounded.insert_objects(digests, 2, blocks, other, ids=np.array([5, 3], dtype=np.int32)) == (2, 2)
    assert other[3] is blocks[3] and other[5] is blocks[2]
    assert unbounded.probe(digests, other) == (4, blocks)


def test_insert_objects_leaves_the_allocator_one_reference_per_cached_block() -> None:
    # The cache adopts the references insert_objects takes for the blocks it caches; those of blocks
    # already cached (a start before the cached prefix ends) or past the capacity go back at once.
    ids = _core.BlockAllocator(8)
    cache = _core.PrefixCache(block_size=4, capacity_blocks=3, allocator=ids)
    digests = _core.hash_blocks(list(range(24)), 4)  # 6 blocks
    table: list[Any] = []
    blocks: list[Any] = [{"n": i} for i in range(6)]
    assert cache.insert_objects(digests[:2], 0, blocks[:2], table) == (2, 2)
    assert ids.num_available == 6
    assert cache.insert_objects(digests[:3], 0, blocks[:3], table) == (3, 3)  # 2 redundant, 1 new
    assert ids.num_available == 5 and len(cache) == 3
    assert cache.evict(3) == 3 and ids.num_available == 8  # one reference each, the cache's
    assert cache.insert_objects(digests, 0, blocks, table) == (3, 6)  # only 3 fit
    assert ids.num_available == 5 and cache.probe(digests, table) == (3, blocks[:3])
    assert cache.evict(3) == 3 and ids.num_available == 8


def test_seed_insert_takes_any_sequence_and_refuses_non_dict_blocks_unchanged() -> None:
    for capacity in (None, 8):
        cache = PrefixCache(block_size=4, max_cached_blocks=capacity)
        hashes = cache.compute_block_hashes(list(range(12)))
        with pytest.raises(TypeError, match=r"blocks\[1\] must be a dict, got int"):
            cache.insert(hashes, ({"block_id": 0}, 5, {"block_id": 2}))
        assert len(cache) == 0 and cache.lookup(hashes) == ([], 0)
        blocks = ({"block_id": 0}, {"block_id": 1}, {"block_id": 2})
        cache.insert(hashes, blocks)  # a tuple
        found, tokens = cache.lookup(hashes)
        assert tokens == 12 and all(a is b for a, b in zip(found, blocks, strict=True))
        owned = [{"block_id": 9, "handle_id": "h"}]
        other = cache.compute_block_hashes(list(range(100, 104)))
        cache.insert(other, owned)  # an owner: the general path, invalidated by its handle
        assert cache.lookup(other)[0] == owned and cache.invalidate("h") == 1  # type: ignore[arg-type]


# --- the seed PrefixCache: callbacks, large bounds, a model ------------------------------------------


def _finishes(body: Any, seconds: float = 20.0) -> None:
    """Runs `body` on a daemon thread, so that a deadlock fails the test instead of hanging the run."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlocked"
    assert not errors, errors[0]


@pytest.mark.parametrize("capacity", [None, 2])
def test_seed_finalisers_may_use_the_cache_and_nested_calls_are_refused(capacity: int | None) -> None:
    # The cache lets go of block objects (an id reused, a sweep, clear) only after releasing its lock,
    # so a finaliser may call it; a call nested inside one of its calls on the same thread (here a
    # handle_id's __eq__) gets a RuntimeError, not a deadlock, and the outer call changes nothing.
    cache = PrefixCache(block_size=2, max_cached_blocks=capacity)
    probe_keys = cache.compute_block_hashes([0, 1])
    seen: list[int] = []

    class Block(dict):  # type: ignore[type-arg]
        def __del__(self) -> None:
            seen.append(cache.lookup(probe_keys)[1])

    class Handle:
        def __hash__(self) -> int:
            return 1  # all equal hashes: the owner table compares them

        def __eq__(self, other: object) -> bool:
            cache.lookup(probe_keys)
            return self is other

    def body() -> None:
        made = 0
        for step in range(60):
            owner = {"handle_id": uuid.UUID(int=step % 3)} if step % 4 == 1 else {}
            cache.insert(cache.compute_block_hashes([step, 1, 2, 3]), [Block(**owner), Block(**owner)])
            made += 2
            if capacity is None and step % 10 == 9:
                cache.evict_by_count(len(cache))
        cache.invalidate(uuid.UUID(int=1))
        cache.clear()
        assert len(seen) == made  # every object went, each finaliser's lookup answered
        first = cache.compute_block_hashes([7, 7])
        cache.insert(first, [{"handle_id": Handle()}])
        before = cache.get_stats()
        with pytest.raises(RuntimeError, match="called again on a thread inside one of its calls"):
            cache.insert(cache.compute_block_hashes([8, 8]), [{"handle_id": Handle()}])
        assert cache.get_stats() == before and len(cache) == 1
        assert cache.lookup(first)[1] == 2  # the lock was let go

    _finishes(body)


def _waiting_for_the_lock(frame: Any) -> bool:
    """Whether `frame` (another thread's top frame) is inside a seed PrefixCache lock acquire: at a
    ``with`` (BEFORE_WITH) or an ``acquire()`` call in the PrefixCache's module."""
    if frame is None or frame.f_code.co_filename != PrefixCache.lookup.__code__.co_filename:
        return False
    method = ""
    for ins in dis.get_instructions(frame.f_code):
        if ins.opname == "LOAD_METHOD":
            method = ins.argval
        if ins.offset == frame.f_lasti:
            return ins.opname == "BEFORE_WITH" or (ins.opname in ("PRECALL", "CALL") and method == "acquire")
    return False


SEED_LOCKED_CALLS: dict[str, Any] = {
    "lookup": lambda cache, keys: cache.lookup(keys),
    "lookup of nothing": lambda cache, keys: cache.lookup([]),
    "insert": lambda cache, keys: cache.insert(keys, [{}, {}]),
    "evict_by_count": lambda cache, keys: cache.evict_by_count(1),
    "invalidate": lambda cache, keys: cache.invalidate(uuid.UUID(int=1)),
    "clear": lambda cache, keys: cache.clear(),
}


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
@pytest.mark.parametrize("call", list(SEED_LOCKED_CALLS))
def test_seed_keyboard_interrupt_right_after_the_lock_is_taken_leaves_it_free(call: str) -> None:
    # A Ctrl-C lands where the interpreter next checks for signals. After lock.acquire() that is the
    # end of the acquire call itself, before any `try:` that releases the lock: the lock stayed held
    # and every other thread's next call waited forever. Here a real signal becomes pending at
    # exactly that point: a helper thread holds the lock while this (the main) thread waits for it,
    # lets it go while holding the GIL (this thread takes the lock, then waits for the GIL), sends
    # SIGUSR1 to this thread, whose handler raises KeyboardInterrupt, and only then lets it run.
    cache = PrefixCache(block_size=2)
    keys = cache.compute_block_hashes([1, 2, 3, 4])
    cache.insert(keys[:1], [{"handle_id": uuid.UUID(int=1)}])
    main = threading.get_ident()
    held = threading.Event()
    landed: list[bool] = []  # per signal: whether it landed inside a call of the cache
    helper_errors: list[BaseException] = []

    def interrupt(signum: int, frame: Any) -> None:
        files = set()
        while frame is not None:
            files.add(frame.f_code.co_filename)
            frame = frame.f_back
        landed.append(PrefixCache.lookup.__code__.co_filename in files)
        raise KeyboardInterrupt

    def keep_the_gil(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # the switch interval is long: nothing takes the GIL from here
            pass

    def helper() -> None:
        try:
            with cache._lock:
                held.set()
                deadline = time.monotonic() + 20
                while not _waiting_for_the_lock(sys._current_frames().get(main)):
                    assert time.monotonic() < deadline, "the main thread never waited for the lock"
                    time.sleep(0.001)
            keep_the_gil(0.2)  # the main thread took the lock meanwhile and waits for the GIL
            signal.pthread_kill(main, signal.SIGUSR1)  # its handler is pending, the GIL still held here
            keep_the_gil(0.2)
        except BaseException as exc:  # reported below
            helper_errors.append(exc)

    previous_handler = signal.signal(signal.SIGUSR1, interrupt)
    previous_interval = sys.getswitchinterval()
    thread = threading.Thread(target=helper, daemon=True)
    try:
        sys.setswitchinterval(10.0)
        thread.start()
        assert held.wait(20)
        with pytest.raises(KeyboardInterrupt):
            SEED_LOCKED_CALLS[call](cache, keys)
    finally:
        sys.setswitchinterval(previous_interval)
        signal.signal(signal.SIGUSR1, previous_handler)
        thread.join(20)
    assert not helper_errors, helper_errors[0]
    assert landed == [True]
    _finishes(lambda: cache.lookup(keys), 5.0)  # another thread's call is not left waiting
    assert cache.lookup(keys)[1] in (0, 2, 4)  # and this thread's call is not refused as nested


def test_seed_huge_bounds_take_no_memory_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    # The seed took any bound; an id allocator of twice a huge one took 16 GB and half a minute.
    from sagellm_kv_cache import prefix_cache

    huge = PrefixCache(block_size=2, max_cached_blocks=10**9)
    assert huge._ids is None and huge._trie.capacity == 10**9
    beyond = PrefixCache(block_size=2, max_cached_blocks=10**12)
    assert beyond._trie.capacity is None and beyond.get_stats()["max_cached_blocks"] == 10**12
    hashes = beyond.compute_block_hashes([1, 2, 3, 4])
    beyond.insert(hashes, [{"n": 0}, {"n": 1}])
    assert beyond.lookup(hashes) == ([{"n": 0}, {"n": 1}], 4)
    # Past the allocator's threshold (lowered here to see it) the trie alone keeps the bound.
    monkeypatch.setattr(prefix_cache, "_ALLOCATOR_MAX_BLOCKS", 2)
    cache = PrefixCache(block_size=2, max_cached_blocks=3)
    assert cache._ids is None
    for step in range(50):
        tokens = [step % 7, 0, step, 1]
        hashes = cache.compute_block_hashes(tokens)
        found, _ = cache.lookup(hashes)
        cache.insert(hashes, found + [{"prefix": tuple(tokens[: 2 * (i + 1)])} for i in range(len(found), 2)])
        assert len(cache) <= 3
        for old in range(max(0, step - 3), step + 1):
            tokens = [old % 7, 0, old, 1]
            got, _ = cache.lookup(cache.compute_block_hashes(tokens))
            assert all(block["prefix"] == tuple(tokens[: 2 * (i + 1)]) for i, block in enumerate(got))
    assert cache.get_stats()["evict_count"] > 0


def test_seed_insert_with_owners_is_all_or_nothing() -> None:
    class Shrinking(Sequence[dict[str, Any]]):  # claims 3 items, yields 2
        def __len__(self) -> int:
            return 3

        @overload
        def __getitem__(self, i: int) -> dict[str, Any]: ...
        @overload
        def __getitem__(self, i: slice) -> Sequence[dict[str, Any]]: ...
        def __getitem__(self, i: int | slice) -> Any:
            if isinstance(i, slice):
                return [{"handle_id": "q"}]
            if i >= 2:
                raise IndexError(i)
            return {"handle_id": "q"}

    for capacity in (None, 8):
        cache = PrefixCache(block_size=2, max_cached_blocks=capacity)
        hashes = cache.compute_block_hashes([1, 2, 3, 4, 5, 6])
        with pytest.raises(TypeError, match=r"blocks\[1\]\['handle_id'\] must be hashable, got list"):
            cache.insert(hashes, [{"handle_id": "a"}, {"handle_id": ["x"]}, {}])
        with pytest.raises(ValueError, match="blocks yielded 2 items but has length 3"):
            cache.insert(hashes, Shrinking())
        assert len(cache) == 0 and cache.lookup(hashes) == ([], 0) and cache.get_stats()["insert_count"] == 0


_seed_op = st.one_of(
    # (values, handle_id, how: 0 passes the found blocks, 1 other objects there, 2 inserts without a lookup)
    st.tuples(st.just("insert"), _prompt, st.sampled_from([None, 1, 2]), st.integers(0, 2)),
    st.tuples(st.just("lookup"), _prompt),
    st.tuples(st.just("lookup_all")),
    st.tuples(st.just("evict"), st.integers(0, 4)),
    st.tuples(st.just("invalidate"), st.sampled_from([1, 2])),
    st.tuples(st.just("clear")),
    st.tuples(st.just("sweep")),  # what an unbounded cache does once stale ids pile up
)


def check_seed_ids(cache: PrefixCache) -> None:
    """No synthetic id is held twice: the cached ids are distinct and each has its object; an unbounded
    cache's free ids are distinct, not cached and hold no object."""
    live = cache._trie.cached_block_ids().tolist()
    assert len(set(live)) == len(live) == len(cache)
    assert all(cache._blocks[i] is not None for i in live)
    free = cache._free_ids
    assert len(set(free)) == len(free) and not set(free) & set(live)
    assert all(cache._blocks[i] is None for i in free)


@pytest.mark.parametrize(("capacity", "lru"), [(None, True), (3, True), (3, False), (1, True)])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_seed_op, max_size=30))
def test_seed_cache_against_model(capacity: int | None, lru: bool, ops: list[tuple[Any, ...]]) -> None:
    # The model: chained prefix (tuple of block values) -> the object cached for it, with its owner.
    # Whatever the cache evicted, every block a lookup returns is the model's object for that prefix.
    cache = PrefixCache(block_size=2, max_cached_blocks=capacity, enable_lru=lru)
    model: dict[tuple[int, ...], tuple[dict[str, Any], int | None]] = {}
    prompts: set[tuple[int, ...]] = set()

    def lookup(values: tuple[int, ...]) -> int:
        found, tokens = cache.lookup(cache.compute_block_hashes(prompt(*values, block_size=2)))
        assert tokens == 2 * len(found)
        for i, block in enumerate(found):
            assert block is model[values[: i + 1]][0]
        return len(found)

    for op in ops:
        if op[0] == "insert":
            values = tuple(op[1])
            prompts.add(values)
            hashes = cache.compute_block_hashes(prompt(*values, block_size=2))
            if op[3] == 2:  # the cache may have changed since this prompt's last lookup
                cached = cache._trie.peek(cache._chain(hashes))[0]
                found = [{"stale": True}] * cached
            else:
                found, _ = cache.lookup(hashes)
                cached = len(found)
            owner = {} if op[2] is None else {"handle_id": op[2]}
            fresh = [{"at": values[: i + 1], **owner} for i in range(cached, len(values))]
            cache.insert(hashes, (found if op[3] == 0 else [{"stale": True}] * cached) + fresh)
            for i in range(cached, len(values)):
                model[values[: i + 1]] = (fresh[i - cached], op[2])
            assert lookup(values) == (len(values) if capacity is None else min(len(values), capacity))
        elif op[0] == "lookup":
            lookup(tuple(op[1]))
        elif op[0] == "lookup_all":
            for values in prompts:
                lookup(values)
        elif op[0] == "evict":
            before = len(cache)
            if not lru:
                with pytest.raises(RuntimeError):
                    cache.evict_by_count(op[1])
            else:
                assert cache.evict_by_count(op[1]) == before - len(cache) == min(op[1], before)
        elif op[0] == "invalidate":
            cache.invalidate(op[1])  # type: ignore[arg-type]
            gone = [key for key, (_, owner) in model.items() if owner == op[1]]
            for key in list(model):  # the owner's blocks and every block after them
                if any(key[: len(g)] == g for g in gone):
                    del model[key]
        elif op[0] == "sweep":
            cache._forget_evicted([], force=True)
        else:
            cache.clear()
            model.clear()
            assert len(cache) == 0
        if capacity is not None:
            assert len(cache) <= capacity
        check_seed_ids(cache)
    for values in prompts:
        lookup(values)


@pytest.mark.parametrize("capacity", [None, 4])
def test_seed_insert_reads_the_blocks_once_whatever_changes_the_list(capacity: int | None) -> None:
    # The owned-blocks path releases the GIL in every trie call, so another thread may change the
    # caller's list meanwhile; here a handle_id's __hash__ does it, deterministically. The cache must
    # store what it read, not leave a cached block without its object (every later lookup of the
    # prefix raised KeyError "cached but not in table").
    cache = PrefixCache(block_size=2, max_cached_blocks=capacity)
    blocks: list[dict[str, Any]] = []

    class Shrinker:
        def __hash__(self) -> int:
            if len(blocks) == 3:
                blocks.pop()
            return 7

    blocks += [{"handle_id": "a"}, {"handle_id": Shrinker()}, {"handle_id": "c"}]
    hashes = cache.compute_block_hashes([1, 2, 3, 4, 5, 6])
    expected = list(blocks)
    cache.insert(hashes, blocks)
    found, tokens = cache.lookup(hashes)
    assert tokens == 6 and all(a is b for a, b in zip(found, expected, strict=True))
    check_seed_ids(cache)


def test_probe_nested_in_a_finaliser_keeps_the_outer_calls_ids() -> None:
    # probe() walks the trie into a per-thread buffer, then builds its result list. Building that list
    # may start a garbage collection whose finaliser probes again on this thread: the nested call must
    # not overwrite the ids the outer call has yet to read (it did: A's lookup answered B's blocks).
    import gc

    trie = _core.PrefixCache(block_size=16)
    a = np.random.default_rng(1).integers(0, 256, size=(4, 32), dtype=np.uint8)
    b = a ^ np.uint8(0xFF)
    trie.insert(a, np.arange(4, dtype=np.int32))
    trie.insert(b, np.arange(10, 14, dtype=np.int32))
    table: list[object] = [f"a{i}" for i in range(4)] + [None] * 6 + [f"b{i}" for i in range(4)]
    nested: list[list[object]] = []

    class ProbesWhenCollected:
        def __del__(self) -> None:
            nested.append(trie.probe(b, table)[1])

    probe = trie.probe  # bound before: the call itself allocates nothing the collector counts
    threshold = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        garbage = ProbesWhenCollected()
        garbage.cycle = garbage  # type: ignore[attr-defined]
        del garbage
        lists = [[] for _ in range(200)]  # empties the interpreter's free list of list objects, so the
        gc.set_threshold(1)               # result list is a fresh allocation that starts a collection
        gc.enable()
        _, values = probe(a, table)
    finally:
        gc.set_threshold(*threshold)
        if not was_enabled:
            gc.disable()
    del lists
    assert nested == [["b0", "b1", "b2", "b3"]], "the finaliser never ran: the test tested nothing"
    assert values == ["a0", "a1", "a2", "a3"]


def test_metadata_only_cache_maps_dense_and_sparse_block_ids_alike() -> None:
    # Without an allocator, ids counted up from 0 sit in a dense table and others (far, negative) in a
    # map; the table's growth moves map entries it comes to cover. Every id must stay findable.
    cache = _core.PrefixCache(block_size=4)
    prompts = [list(range(1000 * p, 1000 * p + 4 * 64)) for p in range(40)]
    digests = [_core.hash_blocks(tokens, 4) for tokens in prompts]
    assert cache.insert(digests[0][:1], np.array([3000], dtype=np.int32))[0] == 1  # far: the map
    assert cache.insert(digests[1][:1], np.array([-7], dtype=np.int32))[0] == 1  # negative: the map
    for p in range(2, 40):  # dense ids 0, 1, ... until the table reaches past 3000
        assert cache.insert(digests[p], np.arange(64 * (p - 2), 64 * (p - 1), dtype=np.int32))[0] == 64
    cache.check_invariants()
    assert len(cache) == 2 + 38 * 64 and set(cache.cached_block_ids().tolist()) == {3000, -7, *range(38 * 64)}
    for taken, owner in ((3000, 0), (-7, 1), (5, 2), (38 * 64 - 1, 39)):
        with pytest.raises(ValueError, match=f"block id {taken} .*already caches digest"):
            cache.insert(digests[0][1:2], np.array([taken], dtype=np.int32), parent=digests[0][0])
        assert cache.lookup(digests[owner][0 if owner < 2 else (taken - 64 * (owner - 2))])["block_id"] == taken
    assert cache.evict(10_000) == 2 + 38 * 64 and len(cache) == 0
    cache.check_invariants()
    assert cache.insert(digests[0][:2], np.array([3000, 5], dtype=np.int32))[0] == 2  # ids free again
    cache.check_invariants()
    assert cache.clear() == 2 and len(cache) == 0
    cache.check_invariants()


def test_radix_peek_refuses_concatenated_digest_bytes_as_match_does() -> None:
    # The native peek takes one bytes object of n * 32 bytes for the seed cache's calls; the public
    # RadixPrefixCache must not: its match, release and insert refuse bytes, so a peek that answered
    # for them (one 32-byte digest passed bare looks like a chain of one) would answer for an
    # argument the real lookup then refuses.
    cache = RadixPrefixCache(block_size=4)
    digests = cache.hash_tokens(np.arange(8, dtype=np.int32))
    cache.insert(digests, np.array([0, 1], dtype=np.int32))
    before = cache.stats()
    for arg in (digests.tobytes(), digests[0].tobytes()):
        for call in (cache.match, cache.peek, cache.release):
            with pytest.raises(TypeError, match="list of 32-byte digests, got bytes"):
                call(arg)
        with pytest.raises(TypeError, match="list of 32-byte digests, got bytes"):
            cache.insert(arg, np.array([5, 6], dtype=np.int32)[: len(arg) // 32])
    assert cache.stats() == before and cache.peek(digests)[0] == 2
    assert cache.peek(list(map(bytes, digests)))[0] == 2  # a list of bytes digests, as before


def test_threads_alternating_on_one_cache_get_only_their_own_blocks() -> None:
    # The cache keeps the last keys' chain (compared by bytes) and the last lookup's digests (by
    # identity) across calls, whichever thread made them. Threads that interleave lookups and inserts
    # of their own prompts, with keys that are equal bytes in other objects, must each be answered
    # with the blocks cached under their own prefix, in order, however the calls interleave.
    import random

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors: list[tuple[Any, ...]] = []
    for capacity in (None, 24):
        cache = PrefixCache(block_size=4, max_cached_blocks=capacity)

        def worker(tid: int, cache: PrefixCache = cache) -> None:
            rnd = random.Random(tid)
            for _ in range(400):
                prompt, nb = rnd.randrange(8), rnd.randint(1, 5)
                keys = cache.compute_block_hashes([tid * 1000 + prompt * 10 + i for i in range(4 * nb)])
                if rnd.random() < 0.5:
                    keys = [k[:16] + k[16:] for k in keys]  # equal bytes, other objects
                blocks, tokens = cache.lookup(keys)
                if tokens != 4 * len(blocks) or any(b["tag"] != (tid, prompt, j) for j, b in enumerate(blocks)):
                    errors.append((tid, prompt, tokens, [b["tag"] for b in blocks]))
                if len(blocks) < nb:
                    cache.insert(keys, [{"tag": (tid, prompt, j)} for j in range(nb)])

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        try:
            for t in threads:
                t.start()
        finally:
            for t in threads:
                t.join()
            sys.setswitchinterval(old)
        sys.setswitchinterval(1e-6)
        cache._trie.check_invariants()
        stats = cache.get_stats()
        assert stats["hit_count"] + stats["miss_count"] == 1600 and stats["hit_count"] > 100, stats
    sys.setswitchinterval(old)
    assert errors == []


@pytest.mark.parametrize("capacity", [None, 8, 100])
def test_metadata_only_ids_dense_sparse_and_negative_follow_a_model(capacity: int | None) -> None:
    # Random inserts (ids dense, far, negative, at the int32 ends), evictions, invalidations, clears and
    # held matches on a cache without an allocator: every cached digest maps to the id it was inserted
    # with, the cached ids are exactly those, and an id is refused exactly when it is cached already.
    import random

    for seed in range(4):
        rnd = random.Random(seed)
        cache = _core.PrefixCache(block_size=1, capacity_blocks=capacity)
        model: dict[bytes, int] = {}
        held: list[bytes] = []
        outcomes = {"refused": 0, "sparse": 0, "dense": 0}

        def pick(rnd: random.Random = rnd) -> int:
            r = rnd.random()
            if r < 0.5:
                return rnd.randrange(64)
            if r < 0.7:
                return rnd.randrange(5000)
            if r < 0.85:
                return rnd.choice([-1, -2, -(2**31), 2**31 - 1, 2**31 - 2, rnd.randrange(-100, 0)])
            return rnd.randrange(2**31)

        for _ in range(300):
            op = rnd.random()
            if op < 0.6:
                k = rnd.randint(1, 5)
                digests = [rnd.randbytes(32) for _ in range(k)]
                ids = [pick() for _ in range(k)]
                cached = set(cache.cached_block_ids().tolist())
                refused = len(set(ids)) < k or bool(cached & set(ids))
                parent = rnd.choice(list(model)) if model and rnd.random() < 0.3 else None
                try:
                    n, _ = cache.insert(digests, np.array(ids, dtype=np.int32), parent=parent, owner=rnd.randint(0, 3))
                except ValueError:
                    assert refused, ids
                    outcomes["refused"] += 1
                else:
                    assert not refused, (ids, cached & set(ids))
                    model.update(zip(digests[:n], ids[:n], strict=True))
                    for i in ids[:n]:
                        outcomes["dense" if 0 <= i < 5000 else "sparse"] += 1
            elif op < 0.7:
                cache.evict(rnd.randint(0, 5))
            elif op < 0.8:
                cache.invalidate(rnd.randint(0, 3))
            elif op < 0.83:
                cache.clear()
            elif op < 0.9 and model:
                d = rnd.choice(list(model))
                if cache.match([d])[0] == 1:
                    held.append(d)
            elif held:
                cache.release([held.pop(rnd.randrange(len(held)))])
            cache.check_invariants()
            model = {d: i for d, i in model.items() if cache.contains(d)}
            assert all(cache.lookup(d)["block_id"] == i for d, i in model.items())
            assert sorted(model.values()) == sorted(cache.cached_block_ids().tolist())
        assert min(outcomes.values()) > 5, outcomes
