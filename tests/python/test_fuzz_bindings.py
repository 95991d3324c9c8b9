"""Fuzzing the binding layer: random sequences of calls into ``_core`` with well-formed, malformed
and oddly-typed arguments, checked against a plain-Python model, plus threads calling at once.

Every call either does what the model says or raises a typed error (ValueError, TypeError,
IndexError, MemoryError or a ``KV*Error``) and changes nothing; the process never crashes. After
each step the pool's reference counts equal the model's references plus the prefix cache's, and the
cache's internal invariants hold. Bounded: a few hundred examples, seconds in CI.
"""

from __future__ import annotations

import array
import contextlib
import pickle
import random
import threading
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import KVCacheError

NUM_BLOCKS = 24
BLOCK_SIZE = 4
TYPED_ERRORS = (ValueError, TypeError, IndexError, MemoryError, KeyError, KVCacheError)

# The same integers in the many shapes a caller may hold them in.
SHAPES = ["list", "tuple", "int32", "int64", "uint32", "big_endian", "pickled", "strided", "array_i", "int16"]


def shaped(values: list[int], shape: str) -> Any:
    if shape == "list":
        return list(values)
    if shape == "tuple":
        return tuple(values)
    if shape == "int32":
        return np.array(values, dtype=np.int32)
    if shape == "int64":
        return np.array(values, dtype=np.int64)
    if shape == "uint32":
        return np.array(values, dtype=np.uint32)
    if shape == "big_endian":
        return np.array(values, dtype=">i4")
    if shape == "pickled":
        return pickle.loads(pickle.dumps(np.array(values, dtype=np.int64)))
    if shape == "strided":
        return np.repeat(np.array(values, dtype=np.int32), 2)[::2]
    if shape == "int16":
        return np.array(values, dtype=np.int16)
    return array.array("i", values)


MALFORMED: list[Any] = [
    None,
    "0,1",
    b"\x00\x01",
    3.5,
    [1.5, 2.5],
    [[0, 1], [2, 3]],
    np.zeros((2, 2), dtype=np.int32),
    np.array([0.0, 1.0]),
    np.array([True, False]),
    np.array(["a", "b"]),
    [2**40],
    [-(2**40)],
    np.array([2**63], dtype=np.uint64),
    [object()],
    {"a": 1},
]


def fits_int32(v: int) -> bool:
    return -(2**31) <= v < 2**31


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = _core.PagedKVPool(1, 1, 2, "fp32", BLOCK_SIZE, NUM_BLOCKS)
        self.cache = _core.PrefixCache(block_size=BLOCK_SIZE, allocator=self.pool, capacity_blocks=12)
        self.user = [0] * NUM_BLOCKS  # references the test holds
        self.matches: list[np.ndarray] = []  # digests of outstanding matches, to release

    # --- helpers ---------------------------------------------------------------------------------
    def held(self) -> list[int]:
        return [b for b in range(NUM_BLOCKS) for _ in range(self.user[b])]

    def totals(self) -> list[int]:
        cached = [0] * NUM_BLOCKS
        for b in self.cache.cached_block_ids().tolist():
            cached[b] += 1
        return [u + c for u, c in zip(self.user, cached, strict=True)]

    def snapshot(self) -> list[int]:
        return [self.pool.ref_count(b) for b in range(NUM_BLOCKS)]

    def refused(self, call: Any) -> None:
        before = self.snapshot()
        size = len(self.cache)
        try:
            call()
        except TYPED_ERRORS:
            pass
        else:
            raise AssertionError("a malformed call was accepted")
        assert self.snapshot() == before
        assert len(self.cache) == size

    # --- allocator ------------------------------------------------------------------------------
    @rule(n=st.integers(-3, NUM_BLOCKS + 3))
    def allocate(self, n: int) -> None:
        free = sum(1 for t in self.totals() if t == 0)
        if n < 0 or n > free:
            self.refused(lambda: self.pool.allocate(n))
            return
        before = self.totals()
        for b in self.pool.allocate(n).tolist():
            assert before[b] == 0 and self.pool.ref_count(b) == 1, "a held block was handed out again"
            self.user[b] = 1

    @rule(
        data=st.data(),
        shape=st.sampled_from(SHAPES),
        bad=st.sampled_from(["none", "range", "free", "negative", "repeat"]),
    )
    def free_or_incref(self, data: st.DataObject, shape: str, bad: str) -> None:
        # Frees name only references the test holds (a multiset drawn from them): freeing one the
        # cache holds would be a double free that counts cannot tell from a legitimate one.
        held = self.held()
        op = data.draw(st.sampled_from(["free", "incref"]))
        if op == "free":
            ids = data.draw(st.permutations(held))[: data.draw(st.integers(0, 6))] if held else []
        else:
            ids = data.draw(st.lists(st.sampled_from(held), max_size=6)) if held else []
        totals = self.totals()
        sole = [b for b in range(NUM_BLOCKS) if totals[b] == 1 and self.user[b] == 1]
        if bad == "repeat" and sole:
            ids += [sole[0], sole[0]] if sole[0] not in ids else [sole[0]]
        elif bad == "range":
            ids.append(NUM_BLOCKS + data.draw(st.integers(0, 5)))
        elif bad == "negative":
            ids.insert(data.draw(st.integers(0, len(ids))), -1 - data.draw(st.integers(0, 5)))
        elif bad == "free" and 0 in totals:
            ids.append(totals.index(0))
        if shape in ("uint32",) and any(i < 0 for i in ids):
            shape = "int64"
        if shape == "int16" and any(not -(2**15) <= i < 2**15 for i in ids):
            shape = "int32"
        arg = shaped(ids, shape)
        # Valid: every id in range, and for free each id at most as often as the test holds it.
        valid = all(0 <= i < NUM_BLOCKS for i in ids) and all(
            (ids.count(i) <= totals[i]) if op == "free" else totals[i] > 0 for i in ids
        )
        if not valid:
            self.refused(lambda: getattr(self.pool, op)(arg))
            return
        getattr(self.pool, op)(arg)
        for i in ids:
            self.user[i] += -1 if op == "free" else 1

    @rule(data=st.data())
    def copy_gather_scatter(self, data: st.DataObject) -> None:
        allocated = [b for b, t in enumerate(self.totals()) if t > 0]
        if len(allocated) < 2:
            return
        src = data.draw(st.lists(st.sampled_from(allocated), max_size=3))
        dst = data.draw(st.lists(st.sampled_from(allocated), min_size=len(src), max_size=len(src)))
        pairs = [(s, d) for s, d in zip(src, dst, strict=True) if s != d]
        written = [d for _, d in pairs]
        ok = len(set(written)) == len(written) and not set(written) & {s for s, _ in pairs}
        if ok:
            self.pool.copy_blocks(src, dst)
        else:
            self.refused(lambda: self.pool.copy_blocks(src, dst))
        ids = data.draw(st.lists(st.integers(-1, NUM_BLOCKS), max_size=4))
        nbytes = self.pool.block_nbytes
        if all(0 <= i < NUM_BLOCKS for i in ids):
            staged = self.pool.gather(ids)
            assert staged.nbytes == len(ids) * nbytes
            if len(set(ids)) == len(ids):
                self.pool.scatter(staged, ids)
            else:
                self.refused(lambda: self.pool.scatter(staged, ids))
        else:
            self.refused(lambda: self.pool.gather(ids))
            self.refused(lambda: self.pool.scatter(np.zeros(len(ids) * nbytes, np.uint8), ids))

    @rule(
        method=st.sampled_from(["free", "incref", "gather", "allocate", "copy_blocks", "scatter"]),
        value=st.sampled_from(MALFORMED),
    )
    def malformed(self, method: str, value: Any) -> None:
        calls = {
            "free": lambda: self.pool.free(value),
            "incref": lambda: self.pool.incref(value),
            "gather": lambda: self.pool.gather(value),
            "allocate": lambda: self.pool.allocate(value),
            "copy_blocks": lambda: self.pool.copy_blocks(value, value),
            "scatter": lambda: self.pool.scatter(value, value),
        }
        self.refused(calls[method])

    # --- prefix cache ---------------------------------------------------------------------------
    @rule(data=st.data(), shape=st.sampled_from(["list", "int32", "int64", "pickled", "big_endian", "strided"]))
    def insert_tokens(self, data: st.DataObject, shape: str) -> None:
        n_blocks = data.draw(st.integers(0, 4))
        tokens = data.draw(st.lists(st.integers(0, 3), min_size=n_blocks * BLOCK_SIZE, max_size=n_blocks * BLOCK_SIZE))
        held = sorted({b for b in range(NUM_BLOCKS) if self.user[b] > 0})
        if len(held) < n_blocks:
            return
        ids = data.draw(st.permutations(held))[:n_blocks]
        # A block already caching another digest is refused; the invariant checks nothing changed.
        with contextlib.suppress(*TYPED_ERRORS):
            self.cache.insert_tokens(shaped(tokens, shape), shaped(ids, "int32"))

    @rule(data=st.data(), shape=st.sampled_from(["list", "int32", "int64", "pickled", "big_endian"]))
    def match(self, data: st.DataObject, shape: str) -> None:
        tokens = data.draw(st.lists(st.integers(0, 3), max_size=4 * BLOCK_SIZE))
        n, ids, digests = self.cache.match_tokens(shaped(tokens, shape))
        assert len(ids) == n and len(digests) == len(tokens) // BLOCK_SIZE
        if n:
            self.matches.append(digests[:n])

    @precondition(lambda self: bool(self.matches))
    @rule(as_list=st.booleans())
    def release(self, as_list: bool) -> None:
        digests = self.matches.pop()
        self.cache.release([bytes(d) for d in digests] if as_list else pickle.loads(pickle.dumps(digests)))

    @rule(n=st.integers(0, 5), which=st.sampled_from(["evict", "clear"]))
    def shrink(self, n: int, which: str) -> None:
        if which == "evict":
            self.cache.evict(n)
        else:
            self.cache.clear()

    @rule(value=st.sampled_from([*MALFORMED, np.zeros((2, 31), np.uint8), [b"x" * 31], np.zeros((1, 32), np.int8)]))
    def malformed_prefix(self, value: Any) -> None:
        self.refused(lambda: self.cache.release(value) if value is not None else self.cache.release(3))
        self.refused(lambda: self.cache.insert(value, [0]))
        if not (isinstance(value, list) and value and isinstance(value[0], int)):  # big int64 tokens are valid
            self.refused(lambda: self.cache.match_tokens(value if value is not None else 7))

    # --- invariants -----------------------------------------------------------------------------
    @invariant()
    def counts_match(self) -> None:
        assert self.snapshot() == self.totals()
        self.cache.check_invariants()

    def teardown(self) -> None:
        for digests in self.matches:
            self.cache.release(digests)
        self.cache.clear()
        held = self.held()
        if held:
            self.pool.free(held)
        assert self.pool.num_used_blocks == 0


CoreMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCoreMachine = CoreMachine.TestCase


def test_threads_calling_at_once_with_random_arguments() -> None:
    """Four threads, each with its own blocks, hammer one pool and one cache with valid, refused and
    malformed calls; the shared state stays consistent and every block comes back."""
    pool = _core.PagedKVPool(1, 1, 2, "fp32", BLOCK_SIZE, 256)
    cache = _core.PrefixCache(block_size=BLOCK_SIZE, allocator=pool, capacity_blocks=64)
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[int] = []
        try:
            for _ in range(1500):
                op = rng.randrange(7)
                if op == 0:
                    with contextlib.suppress(MemoryError):
                        mine.extend(pool.allocate(rng.randrange(0, 8)).tolist())
                elif op == 1 and mine:
                    k = rng.randrange(1, len(mine) + 1)
                    pool.free(np.array(mine[:k], dtype=rng.choice([np.int32, np.int64])))
                    del mine[:k]
                elif op == 2:
                    # A refused batch racing the other threads: mine, then an id no one holds.
                    bad = [*mine[:3], rng.choice([-1, 256, 10**6])]
                    try:
                        pool.free(bad)
                        raise AssertionError("refused free was accepted")
                    except KVCacheError:
                        pass
                elif op == 3:
                    with contextlib.suppress(*TYPED_ERRORS):
                        pool.incref(rng.choice(MALFORMED))
                elif op == 4 and len(mine) >= 2:
                    toks = np.array([rng.randrange(4) for _ in range(2 * BLOCK_SIZE)], dtype=np.int64)
                    with contextlib.suppress(ValueError):  # a block of mine already caches another digest
                        cache.insert_tokens(toks, mine[:2])
                elif op == 5:
                    toks = [rng.randrange(4) for _ in range(2 * BLOCK_SIZE)]
                    n, _ids, digests = cache.match_tokens(toks)
                    cache.release(digests[:n])
                elif op == 6:
                    cache.evict(rng.randrange(3))
            if mine:
                pool.free(mine)
        except BaseException as e:  # reported to the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    cache.check_invariants()
    cache.clear()
    assert len(cache) == 0
    assert pool.num_used_blocks == 0
    assert all(pool.ref_count(b) == 0 for b in range(256))
