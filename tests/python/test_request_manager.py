"""RequestManager: the native per-request KV manager, from Python."""

from __future__ import annotations

import array
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sagellm_kv_cache import KVCacheSpec, PagedKVPool, _core
from sagellm_kv_cache.errors import KVConfigInvalidError, KVPoolFullError
from sagellm_kv_cache.manager import RequestManager
from sagellm_kv_cache.prefix_cache import RadixPrefixCache

BS = 16


def make(num_blocks: int = 256, **kw: object) -> tuple[PagedKVPool, RequestManager]:
    pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=BS),
                       num_blocks, zero_fill=False)
    return pool, RequestManager(pool, **kw)  # type: ignore[arg-type]


def test_admit_share_finish_keeps_published_blocks() -> None:
    pool, rm = make()
    cached, table = rm.admit(1, list(range(40)))
    assert cached == 0 and table.dtype == np.int32 and len(table) == 3
    cached2, table2 = rm.admit(2, [*range(32), 7, 8])
    assert cached2 == 32 and list(table2[:2]) == list(table[:2]) and table2[2] != table[2]
    rm.finish([1, 2])
    assert len(rm) == 0
    assert pool.num_used_blocks == 2  # the two published full blocks stay cached
    assert rm.stats()["cache"]["cached_blocks"] == 2
    rm.check_invariants()


@pytest.mark.parametrize("convert", [
    list, tuple,
    lambda t: array.array("q", t), lambda t: array.array("i", t), lambda t: array.array("H", t),
    lambda t: np.asarray(t, dtype=np.int32), lambda t: np.asarray(t, dtype=np.int64),
    lambda t: np.asarray(t, dtype=np.int64)[::-1][::-1].copy(),
    lambda t: np.repeat(np.asarray(t, dtype=np.int64), 2)[::2],
    lambda t: memoryview(array.array("l", t)), lambda t: [np.int64(x) for x in t],
])
def test_token_sources_give_identical_digests(convert: object) -> None:
    tokens = list(range(100, 150))
    _, rm = make()
    rm.admit(1, tokens)
    rm.admit(2, convert(tokens))  # type: ignore[operator]
    assert rm.num_tokens(2) == 50
    assert list(rm.block_table(2)[:3]) == list(rm.block_table(1)[:3])


@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
@pytest.mark.parametrize(("salt", "extra"), [(None, None), (b"tenant", None), (None, b"lora"), (b"tenant", b"lora")])
def test_digests_hashed_while_reading_a_list_equal_the_cores(algorithm: str, salt: bytes | None,
                                                              extra: bytes | None) -> None:
    # A list is hashed block by block in the binding as it is read; arrays and lists with odd items
    # are hashed by the core after reading. Each must find the others' blocks.
    tokens = list(range(300, 366))  # 4 full blocks of 16 and 2 tokens
    pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=16), 64)
    rm = RequestManager(pool, hash_algorithm=algorithm)
    odd = [*tokens[:20], np.int64(tokens[20]), *tokens[21:]]
    for i, source in enumerate([tokens, np.asarray(tokens, dtype=np.int32), odd, tuple(tokens)]):
        cached, _ = rm.admit(i, source, salt=salt, extra=extra)
        assert cached == (0 if i == 0 else 64), (i, cached)
        rm.finish(i)
    cached, _ = rm.admit(9, tokens, salt=b"other", extra=extra)  # another tenant shares nothing
    assert cached == 0
    rm.finish(9)
    batch = [tokens, odd, [*tokens[:40], 7, 7]]  # the third shares two blocks, then differs
    cached_batch, _, _ = rm.admit_batch([10, 11, 12], batch, salt=salt, extra=extra)
    assert list(cached_batch) == [64, 64, 32]
    rm.finish([10, 11, 12])
    rm.check_invariants()


def test_torch_cpu_tensor_tokens() -> None:
    torch = pytest.importorskip("torch")
    _, rm = make()
    rm.admit(1, list(range(40)))
    cached, _ = rm.admit(2, torch.arange(40, dtype=torch.int64))
    assert cached == 32


@pytest.mark.parametrize("bad, exc", [
    ([1, 2.5], TypeError), (["a"], TypeError), ([1, 2**31], ValueError), ([-(2**31) - 1], ValueError),
    (np.zeros((2, 2), dtype=np.int32), ValueError), (np.zeros(3, dtype=np.float32), TypeError), ("abc", TypeError),
    (5, TypeError), ([], KVConfigInvalidError), (np.array([2**40]), ValueError),
])
def test_bad_tokens_change_nothing(bad: object, exc: type[Exception]) -> None:
    pool, rm = make()
    rm.admit(1, list(range(20)))
    before = (pool.num_used_blocks, rm.stats())
    with pytest.raises(exc):
        rm.admit(2, bad)
    with pytest.raises(exc if exc is not KVConfigInvalidError else KVConfigInvalidError):
        rm.append(1, bad)
    assert (pool.num_used_blocks, rm.stats()) == before
    assert 2 not in rm and rm.num_tokens(1) == 20
    rm.check_invariants()


def test_bad_ids_change_nothing() -> None:
    pool, rm = make()
    rm.admit(1, list(range(20)))
    used = pool.num_used_blocks
    with pytest.raises(KVConfigInvalidError, match="request 9 is not running"):
        rm.append(9, [1])
    with pytest.raises(KVConfigInvalidError):
        rm.admit(1, [1, 2])  # already running
    with pytest.raises(KVConfigInvalidError):
        rm.admit_batch([5, 5], [[1], [2]])
    with pytest.raises(KVConfigInvalidError):
        rm.finish([1, 1])
    with pytest.raises(KVConfigInvalidError):
        rm.finish([1, 9])
    with pytest.raises(ValueError):
        rm.admit(-1, [1])
    with pytest.raises(TypeError):
        rm.admit(1.5, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rm.admit_batch([3, 4], [[1]])
    with pytest.raises(ValueError):
        rm.append_decode([1], [1, 2])
    assert pool.num_used_blocks == used and len(rm) == 1 and rm.num_tokens(1) == 20
    rm.check_invariants()


def test_bools_are_neither_request_ids_nor_tokens() -> None:
    # True was request 1 (finish(True) ended it) and [True] token 1.
    pool, rm = make()
    rm.admit(1, list(range(20)))
    before = (pool.num_used_blocks, rm.stats())
    calls = [lambda: rm.finish(True), lambda: rm.abort([True]), lambda: rm.preempt((1, True)),
             lambda: rm.admit(True, [1]), lambda: rm.append(True, [1]), lambda: rm.block_tables([True]),
             lambda: rm.num_tokens(True)]
    for call in calls:
        with pytest.raises(TypeError, match="must be an int, got bool"):
            call()
    with pytest.raises(TypeError, match="must hold integers, got bool at position 1"):
        rm.admit(2, [5, True, 7])
    with pytest.raises(TypeError, match="got bool at position 0"):
        rm.append(1, [False])
    assert (pool.num_used_blocks, rm.stats()) == before and rm.running() == [1] and rm.num_tokens(1) == 20
    with pytest.raises(TypeError, match="got bool"):
        RadixPrefixCache(BS).hash_tokens([True] * BS)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"num_blocks": True}, TypeError, "num_blocks must be an int, got bool"),  # was a pool of 1 block
    ({"num_blocks": 8.0}, TypeError, "num_blocks must be an int, got float"),
    ({"num_blocks": 8, "block_size": True}, TypeError, "block_size must be an int, got bool"),  # was 1
    ({"num_blocks": 8, "capacity_blocks": True}, TypeError, "capacity_blocks must be an int, got bool"),
    ({"num_blocks": 8, "capacity_blocks": 2**70}, ValueError, f"capacity_blocks .*{2**70}"),
    ({"num_blocks": 8, "event_queue_capacity": 1.0}, TypeError, "event_queue_capacity must be an int"),
    ({"num_blocks": 8, "enable_caching": "no"}, TypeError, "enable_caching must be a bool, got str"),  # was on
    ({"num_blocks": 8, "match_last_token": "no"}, TypeError, "match_last_token must be a bool, got str"),
])
def test_constructor_arguments_are_checked_by_name(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RequestManager(**kwargs)


def test_reserve_counts_are_checked_by_name() -> None:
    pool, rm = make()
    for bad, error in ((True, TypeError), (2.0, TypeError), (2**70, ValueError)):
        with pytest.raises(error, match="num_tokens"):
            rm.reserve(1, bad)  # type: ignore[arg-type]
    assert 1 not in rm and pool.num_used_blocks == 0
    assert list(rm.reserve(1, np.int64(20))) == [0, 1]


def test_admit_batch_all_or_nothing_names_the_request() -> None:
    pool, rm = make(num_blocks=5)
    with pytest.raises(KVPoolFullError, match=r"request 12 \(position 2\)"):
        rm.admit_batch([10, 11, 12], [list(range(32)), list(range(100, 132)), list(range(200, 232))])
    assert len(rm) == 0 and pool.num_used_blocks == 0
    cached, tables, offsets = rm.admit_batch([10, 11], [list(range(32)), list(range(100, 132))])
    assert list(cached) == [0, 0] and list(offsets) == [0, 2, 4] and len(set(tables.tolist())) == 4
    rm.check_invariants()


def test_decode_steps_allocate_and_publish() -> None:
    _, rm = make()
    rm.admit_batch([1, 2], [list(range(15)), list(range(100, 116))])
    out = np.empty(2, dtype=np.int32)
    got = rm.append_decode([1, 2], [15, 116], out=out)
    assert got is out
    assert out[0] == -1 and out[1] >= 0  # request 2 crossed into a new block
    assert rm.stats()["cache"]["cached_blocks"] == 2  # request 1's first block became full
    tables = rm.block_tables([1, 2])
    assert tables.shape == (2, 2) and tables[0, 1] == -1 and tables[1, 1] == out[1]
    buf = np.zeros((4, 8), dtype=np.int32)
    assert rm.block_tables([2, 1], out=buf) is buf and buf[0, 1] == out[1] and buf[1, 1] == -1
    assert rm.block_tables([2, 1], out=buf, width=8) is buf
    with pytest.raises(ValueError, match="width 4 does not match out's 8 columns"):
        rm.block_tables([2, 1], out=buf, width=4)  # was ignored: the caller expected 4-wide rows
    counts, new = rm.append_batch([1, 2], [list(range(16, 40)), [1]])
    assert list(counts) == [2, 0] and len(new) == 2
    rm.check_invariants()


def test_append_refusal_changes_nothing() -> None:
    pool, rm = make(num_blocks=3)
    rm.admit(1, list(range(16)))
    rm.admit(2, list(range(100, 116)))
    with pytest.raises(KVPoolFullError):
        rm.append_batch([1, 2], [list(range(16, 33)), [5]])
    assert rm.num_tokens(1) == 16 and rm.num_tokens(2) == 16 and pool.num_used_blocks == 2
    rm.check_invariants()


def test_a_refusal_under_a_budget_below_the_blocks_in_use_evicts_nothing() -> None:
    # A budget lowered below the blocks in use leaves the pool short by the excess, which evicting
    # must make up first: a refusal that evicting cannot avert leaves the cache as it was.
    pool, rm = make(num_blocks=12)
    rm.admit(1, list(range(64)))  # 4 blocks, cached unused once finished
    rm.finish([1])
    rm.admit(2, list(range(1000, 1096)))  # 6 blocks, held: 10 in use
    pool.set_budget_blocks(6)
    with pytest.raises(KVPoolFullError):
        rm.admit(3, list(range(5000, 5016)))
    assert rm.stats()["cache"]["cached_blocks"] == 10
    assert rm.stats()["evicted_for_room"] == 0
    pool.set_budget_blocks(9)  # 1 over: evicting the 4 unused makes room for 3
    rm.admit(4, list(range(5000, 5048)))
    assert rm.stats()["evicted_for_room"] == 4
    rm.check_invariants()


def test_preempt_and_resume_matches_back() -> None:
    _, rm = make()
    rm.admit(7, list(range(20)))
    rm.append(7, list(range(20, 40)))
    assert rm.preempt(7) == 40 and 7 not in rm
    cached, _ = rm.admit(7, list(range(40)))
    assert cached == 32
    assert rm.stats()["preempted"] == 1


def test_match_last_token_option() -> None:
    _, rm = make()
    rm.admit(1, list(range(32)))
    rm.finish(1)
    assert rm.admit(2, list(range(32)))[0] == 16
    _, rm2 = make(match_last_token=True)
    rm2.admit(1, list(range(32)))
    rm2.finish(1)
    assert rm2.admit(2, list(range(32)))[0] == 32


def test_shares_a_radix_prefix_cache() -> None:
    pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=BS), 64,
                       zero_fill=False)
    cache = RadixPrefixCache(block_size=BS, pool=pool)
    ids = pool.allocate(2)
    cache.insert_tokens(np.arange(32, dtype=np.int32), ids)
    pool.free(ids)
    rm = RequestManager(pool, cache=cache)
    assert rm.admit(1, list(range(33)))[0] == 32
    with pytest.raises(TypeError):
        RequestManager(pool, cache=object())


def test_no_caching_metadata_only() -> None:
    rm = RequestManager(num_blocks=8, enable_caching=False)
    _, table = rm.admit(1, list(range(40)))
    assert len(table) == 3 and rm.num_free_blocks == 5
    rm.finish(1)
    assert rm.num_free_blocks == 8


def test_w2_hit_ratio_equals_fast_path() -> None:
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, 32000, size=(20, 128), dtype=np.int32)
    reqs = [np.concatenate([prompts[c], rng.integers(0, 32000, 32, dtype=np.int32)])
            for c in rng.integers(0, 20, 300)]
    for capacity in (None, 64):
        spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=BS)
        pool = PagedKVPool(spec, 3000, zero_fill=False)
        fast = RadixPrefixCache(block_size=BS, capacity_blocks=capacity, pool=pool)
        hits = 0
        for tokens in reqs:
            matched, _, digests = fast.match_tokens(tokens)
            fresh = pool.allocate(len(digests) - matched)
            fast.insert(digests[matched:], fresh, parent=digests[matched - 1] if matched else None)
            pool.free(fresh)
            fast.release(digests[:matched])
            hits += matched
        pool2 = PagedKVPool(spec, 3000, zero_fill=False)
        rm = RequestManager(pool2, capacity_blocks=capacity, match_last_token=True)
        for i, tokens in enumerate(reqs):
            rm.admit(i, tokens.tolist())
            rm.finish(i)
        assert rm.stats()["hit_blocks"] == hits
        assert rm.stats()["cache"]["cached_blocks"] == fast.stats()["cached_blocks"]


def test_threads_admit_and_finish_concurrently() -> None:
    pool, rm = make(num_blocks=4096)
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for i in range(200):
                rid = base + i
                rm.admit(rid, list(range(i % 7 * 16, i % 7 * 16 + 40)))
                rm.append_decode([rid], [1])
                rm.finish(rid)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(rm) == 0
    assert pool.num_used_blocks == rm.stats()["cache"]["cached_blocks"]
    rm.check_invariants()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 40)), max_size=40))
def test_random_operations_keep_accounting(ops: list[tuple[int, int, int]]) -> None:
    pool, rm = make(num_blocks=24, capacity_blocks=12)
    model: dict[int, int] = {}  # request id -> tokens
    for op, rid, n in ops:
        tokens = [(rid * 7 + k) % 50 for k in range(n)]
        try:
            if op == 0 and rid not in model:
                rm.admit(rid, tokens)
                model[rid] = n
            elif op == 1 and rid in model:
                run = tokens[: 1 + n % 5]
                rm.append(rid, run)
                model[rid] += len(run)
            elif op == 2 and rid in model:
                rm.finish(rid)
                del model[rid]
            elif op == 3 and rid in model:
                assert rm.preempt(rid) == model.pop(rid)
        except KVPoolFullError:
            pass
        assert sorted(rm.running()) == sorted(model)
        for r, count in model.items():
            assert rm.num_tokens(r) == count
            assert len(rm.block_table(r)) == (count + BS - 1) // BS
        rm.check_invariants()
        # Every used block is the cache's or a request's own, never both (publishing hands the
        # request's reference to the cache).
        owned, cached = rm.stats()["owned_blocks"], rm.stats()["cache"]["cached_blocks"]
        assert pool.num_used_blocks == owned + cached
    rm.finish(list(model))
    assert pool.num_used_blocks == rm.stats()["cache"]["cached_blocks"]


def test_core_binding_rejects_foreign_cache() -> None:
    pool, _ = make()
    other = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=BS), 8)
    cache = _core.PrefixCache(block_size=BS, allocator=other._native)
    with pytest.raises(KVConfigInvalidError):
        _core.RequestManager(pool._native, cache)


def test_membership_never_raises() -> None:
    _, rm = make()
    rm.admit(3, [1])
    rm.admit(2**64 - 1, [1])
    assert 3 in rm and 2**64 - 1 in rm
    assert -1 not in rm and 2**70 not in rm and "x" not in rm and 3.0 not in rm and 4 not in rm


def test_reserve_by_count() -> None:
    pool, rm = make(num_blocks=8)
    table = rm.reserve(1, 40)
    assert len(table) == 3 and rm.num_tokens(1) == 40
    rm.append(1, [1] * 9)
    assert len(rm.block_table(1)) == 4 and rm.stats()["cache"]["cached_blocks"] == 0
    with pytest.raises(KVPoolFullError):
        rm.reserve(2, 10_000)
    with pytest.raises(ValueError):
        rm.reserve(2, 0)
    assert 2 not in rm
    rm.finish(1)
    assert pool.num_used_blocks == 0


def test_block_size_must_match_the_pool() -> None:
    pool, _ = make()
    with pytest.raises(ValueError, match="block_size 8 differs"):
        RequestManager(pool, block_size=8)
    with pytest.raises(ValueError):
        RequestManager()


def test_stored_events_carry_the_published_blocks_tokens() -> None:
    # A router re-hashes a stored event's tokens itself: events from the manager's path must carry
    # exactly the tokens of the blocks they publish, from admission and from appends alike.
    from sagellm_kv_cache.observability import kv_wire

    _, rm = make(event_queue_capacity=64)
    prompt = list(range(1000, 1000 + 2 * BS + 3))
    rm.admit(1, prompt)
    rm.append(1, list(range(5000, 5000 + BS)))  # fills the third block
    events = rm._cache.drain_events()
    stored = [e for e in events if e["type"] == "stored"]
    tokens = [t for e in stored for t in e["token_ids"]]
    assert tokens == (prompt + list(range(5000, 5000 + BS)))[: 3 * BS]
    assert sum(len(e["digests"]) for e in stored) == 3
    assert kv_wire.decode_batch(kv_wire.encode_batch(events))[1][0]["token_ids"] == prompt[: 2 * BS]
    rm.check_invariants()
    rm.finish(1)


def test_stored_events_of_a_salted_request_carry_its_salt() -> None:
    # A KV-aware router keeps tenants apart by the salt of a stored event: every block a salted
    # request publishes (admission and appends) carries it, and an unsalted request's carry none.
    from sagellm_kv_cache.observability import kv_wire

    _, rm = make(event_queue_capacity=64)
    prompt = list(range(1000, 1000 + 2 * BS + 3))
    rm.admit(1, prompt, salt=b"tenant-a")
    rm.append(1, list(range(5000, 5000 + BS)))  # fills the third block
    rm.admit(2, prompt, salt="tenant-b")  # another tenant: nothing shared, its own blocks
    rm.admit(3, prompt)
    stored = [e for e in rm._cache.drain_events() if e["type"] == "stored"]
    assert [(e.get("cache_salt"), len(e["digests"])) for e in stored] == [
        (b"tenant-a", 2), (b"tenant-a", 1), (b"tenant-b", 2), (None, 2)]
    wire = kv_wire.decode_batch(kv_wire.encode_batch(stored))[1]
    assert [e["cache_salt"] for e in wire] == ["tenant-a", "tenant-a", "tenant-b", None]
    assert wire[0]["extra_keys"] == [["tenant-a"], None]  # the salt enters the chain's first block only
    rm.finish([1, 2, 3])
    rm.check_invariants()


def test_byte_swapped_tokens_read_by_value_and_bytes_refused() -> None:
    pool, rm = make()
    tokens = np.arange(0, 100, 3, dtype=np.int64)
    _, expected = rm.admit(1, tokens.tolist())
    for dtype in (">i8", ">i4", ">u2", ">u8"):
        cached, table = rm.admit(2, tokens.astype(dtype))  # same digests: matched like the list
        assert cached == 32 and table.tolist()[:2] == expected.tolist()[:2]
        rm.finish(2)
    before = (pool.num_used_blocks, rm.stats())
    for raw in (b"\x00\x01\x02", bytearray(b"\x00\x01")):
        with pytest.raises(TypeError, match="got byte"):
            rm.admit(3, raw)
        with pytest.raises(TypeError, match="got byte"):
            rm.append(1, raw)
    assert (pool.num_used_blocks, rm.stats()) == before and 3 not in rm


def test_request_ids_as_numpy_scalars_uint64_and_buffers() -> None:
    _pool, rm = make()
    for rid in (2**64 - 1, 2**63, 7, 8):
        rm.admit(rid, [1, 2, 3])
    rm.finish(np.array([2**64 - 1, 2**63], dtype=np.uint64))  # above int64: read unsigned, not wrapped
    rm.finish(np.int64(7))
    rm.abort(array.array("q", [8]))
    assert len(rm) == 0
    rm.admit(9, [1])
    with pytest.raises(ValueError, match="got -3 at position 1"):
        rm.finish(np.array([9, -3]))
    with pytest.raises(TypeError, match="dtype float64"):
        rm.finish(np.array([9.0]))
    with pytest.raises(TypeError, match="bytes"):
        rm.finish(b"\x09")
    assert 9 in rm
    rm.check_invariants()


def test_request_ids_as_torch_tensors_read_by_value() -> None:
    torch = pytest.importorskip("torch")
    _pool, rm = make()
    for rid in (1, 2, 3):
        rm.admit(rid, [1, 2, 3])
    for bad in (torch.tensor([True]), torch.tensor([1.0]), torch.tensor([[1]])):
        with pytest.raises(TypeError, match=r"dtype|dimensions"):
            rm.finish(bad)  # was: a one-element bool or float tensor finished request 1 through __index__
    assert len(rm) == 3
    rm.finish(torch.tensor([1, 2]))  # was: TypeError, only one-element tensors have __index__
    rm.preempt(torch.tensor(3))
    assert len(rm) == 0
