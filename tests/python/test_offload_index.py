"""The native offload index's binding (``_core.OffloadIndex``): key maps, errors that change nothing,
answers built as the given classes. The vLLM manager on top of it is tested in test_vllm_offload.py."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from alloc_failure import fail_each_allocation, failing_at
from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import KVCacheError


def k(i: int) -> bytes:
    return i.to_bytes(32, "big") + b"\0\0\0\0"


def test_store_load_and_key_maps() -> None:
    idx = _core.OffloadIndex(4)
    out = idx.prepare_store([k(1), k(2), k(3)])
    assert out is not None
    keys, slots, evicted = out
    assert keys == [k(1), k(2), k(3)] and slots.dtype == np.int32 and evicted == []
    assert idx.pending == dict(zip(keys, slots.tolist(), strict=True)) and idx.resident == {}
    assert idx.complete_store({k(3), k(1), k(2), k(9)}) == keys  # reservation order; k(9) was never stored
    assert idx.resident == dict(zip(keys, slots.tolist(), strict=True)) and idx.pending == {}
    with pytest.raises(TypeError):  # the maps are the index's: read-only views
        idx.resident[k(1)] = 3  # type: ignore[index]
    assert idx.prepare_load([k(1), k(2)]).tolist() == slots[:2].tolist()
    assert idx.stats()["in_use_blocks"] == 2
    idx.complete_load({k(2), k(1)})
    assert idx.stats()["in_use_blocks"] == 0
    idx.check_invariants()


def test_bad_input_raises_and_changes_nothing() -> None:
    idx = _core.OffloadIndex(4)
    with pytest.raises(TypeError, match="bytes"):
        idx.prepare_store([k(1), "two"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="duplicate"):
        idx.prepare_store([k(1), k(2), k(1)])
    with pytest.raises(TypeError):
        idx.prepare_store(5)  # type: ignore[arg-type]
    assert idx.stats()["free_slots"] == 4 and idx.pending == {}
    with pytest.raises(KeyError, match="not offloaded"):
        idx.prepare_load([k(1)])
    stored = idx.prepare_store([k(1)])
    assert stored is not None
    idx.complete_store(stored[0])
    with pytest.raises(KeyError, match="no load in flight"):
        idx.complete_load([k(7)])
    with pytest.raises(KVCacheError):  # resident but not pinned
        idx.complete_load([k(1)])
    with pytest.raises(ValueError):
        _core.OffloadIndex(0)
    with pytest.raises(TypeError, match=r"object\.__new__"):
        _core.OffloadIndex(4, slots_type=int)
    idx.check_invariants()


def test_no_room_returns_none_and_failed_stores_free_their_slots() -> None:
    idx = _core.OffloadIndex(2)
    first = idx.prepare_store([k(1), k(2)])
    assert first is not None
    assert idx.prepare_store([k(3)]) is None  # everything pending
    assert idx.complete_store([k(1), k(2)], success=False) == []
    assert idx.stats()["free_slots"] == 2 and idx.pending == {} and idx.resident == {}
    idx.check_invariants()


def test_eviction_reports_keys_and_spares_the_call() -> None:
    idx = _core.OffloadIndex(3)
    for i in (1, 2, 3):
        out = idx.prepare_store([k(i)])
        assert out is not None
        idx.complete_store(out[0])
    idx.touch([k(1), k(42)])  # k(42) is not there: ignored
    out = idx.prepare_store([k(2), k(4)])  # k(2) is in the call: not a victim; k(3) is the LRU
    assert out is not None and out[0] == [k(4)] and out[2] == [k(3)]
    assert k(3) not in idx.resident and idx.stats()["evictions"] == 1
    idx.complete_store(out[0])
    idx.check_invariants()


class _Spec:
    block_ids: np.ndarray


class _Out:
    keys_to_store: list[bytes]
    store_spec: _Spec
    evicted_keys: list[bytes]


def test_answers_built_as_the_given_classes() -> None:
    idx = _core.OffloadIndex(2, slots_type=_Spec, store_type=_Out)
    out = idx.prepare_store([k(1)], None)
    assert isinstance(out, _Out) and isinstance(out.store_spec, _Spec)
    assert out.keys_to_store == [k(1)] and out.evicted_keys == [] and len(out.store_spec.block_ids) == 1
    idx.complete_store(out.keys_to_store)
    spec = idx.prepare_load([k(1)])
    assert isinstance(spec, _Spec) and spec.block_ids.tolist() == out.store_spec.block_ids.tolist()
    idx.complete_load([k(1)])


def test_reset_clears_the_maps_in_place_and_slot_digest() -> None:
    idx = _core.OffloadIndex(2)
    resident = idx.resident
    out = idx.prepare_store([k(1)])
    assert out is not None
    idx.complete_store(out[0])
    idx.prepare_load([k(1)])
    idx.reset()
    assert resident is idx.resident and resident == {} and idx.stats()["in_use_blocks"] == 0
    idx.check_invariants()
    assert _core.OffloadIndex.slot_digest(258) == (258).to_bytes(8, "little") + b"sagellm-kv vllm slot".ljust(24, b"\0")


def test_lookup_function_answers_from_the_key_maps() -> None:
    idx = _core.OffloadIndex(2)
    lookup = idx.lookup_function("hit", "pending", "miss")
    out = idx.prepare_store([k(1), k(2)])
    assert out is not None
    idx.complete_store([k(1)])
    assert [lookup(k(1), None), lookup(k(2)), lookup(k(3), object())] == ["hit", "pending", "miss"]
    with pytest.raises(TypeError):
        lookup()
    with pytest.raises(TypeError):
        lookup([1], None)  # unhashable, as with `in`


TAMPERED_MAPS = """
import gc, itertools
from sagellm_kv_cache import _core
from sagellm_kv_cache.errors import KVCacheError

def reach(idx, which, how):
    if how == "lookup_function":
        return idx.lookup_function(1, 2, 3).__self__[which]
    return gc.get_referents(idx.resident if which == 0 else idx.pending)[0]

values = [0, 1, 3, -1, 2**31, 2**40, True, "x", None, 2.5]
calls = ["prepare_load", "touch", "complete_load", "complete_store", "prepare_store"]
for value, which, how, call in itertools.product(values, (0, 1), ("lookup_function", "referents"), calls):
    idx = _core.OffloadIndex(4)
    idx.prepare_store([b"a", b"b"])
    idx.complete_store([b"a"])
    mapping = reach(idx, which, how)
    assert isinstance(mapping, dict)
    mapping[b"k"] = value
    stats = idx.stats()
    try:
        getattr(idx, call)([b"k"])
    except (KeyError, TypeError, KVCacheError):
        assert idx.stats() == stats, (value, which, how, call)
    del mapping[b"k"]
    idx.check_invariants()
    assert dict(idx.resident) == {b"a": dict(idx.resident)[b"a"]} and list(idx.pending) == [b"b"]
print("ok")
"""


def test_key_maps_changed_behind_the_views_are_refused_not_trusted() -> None:
    """The key maps are shown read-only, but a program can reach the dicts themselves (the lookup
    function's ``__self__``, ``gc.get_referents`` of a view). An entry naming a slot out of range, an
    empty slot or another key's slot was used as is: an out-of-range write of the call's slot marks,
    and a NULL key stored in a dict (SIGSEGV in complete_store). Such an entry is now refused and
    the call changes nothing."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", TAMPERED_MAPS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_a_call_re_entered_while_one_is_in_progress_is_refused() -> None:
    """Python code can run inside a call (an iterable's __iter__ as here, or a finalizer / gc callback
    that an allocation's collection runs): calling the index again from it gets RuntimeError, and the
    call in progress completes intact."""
    idx = _core.OffloadIndex(64)
    keys = [k(i) for i in range(32)]
    inner: list[object] = []

    class Reentering:
        def __iter__(self) -> Iterator[bytes]:
            try:
                inner.append(idx.prepare_store([k(1000)]))
            except RuntimeError as exc:
                inner.append(exc)
            return iter(keys)

    out = idx.prepare_store(Reentering())
    assert len(inner) == 1 and isinstance(inner[0], RuntimeError) and "already in a call" in str(inner[0])
    assert out is not None and out[0] == keys and k(1000) not in idx.pending
    idx.complete_store(out[0])
    idx.check_invariants()


def test_complete_store_is_all_or_nothing_when_memory_runs_out() -> None:
    # Each Python allocation of the call fails in turn (CPython's _testcapi hooks): the call commits
    # every pending key or none, and the key maps always agree with the index. The binding used to
    # drop the keys from `pending` before the core's commit and to fill `resident` after it, so a
    # failure in between left slots without keys (or keys without their slots' state).
    stored_keys = [k(i) for i in range(40)]  # `resident` grows (a dict resize) while they go in

    def attempt(n: int) -> bool:
        idx = _core.OffloadIndex(64)
        first = idx.prepare_store(stored_keys[:30])
        second = idx.prepare_store(stored_keys[30:])  # a second run, chained from the root
        assert first is not None and second is not None
        keys = [*reversed(stored_keys), k(99), stored_keys[0]]  # scrambled, one never stored, one twice
        done = failing_at(n, lambda: idx.complete_store(keys))
        idx.check_invariants()
        if done is None:
            assert idx.resident == {} and len(idx.pending) == 40
            assert idx.stats()["pending_slots"] == 40
            return False
        assert done == stored_keys and len(idx.resident) == 40 and idx.pending == {}
        assert idx.stats()["resident_slots"] == 40
        return True

    fail_each_allocation(attempt, min_failures=3)


class _Spec:
    pass


class _Out:
    pass


@pytest.mark.parametrize("store_type", [None, _Out])
def test_prepare_store_is_all_or_nothing_when_memory_runs_out(store_type: type | None) -> None:
    # The store evicts 20 resident keys. Each Python allocation of the call fails in turn: the call
    # reserves and evicts, filling the maps and its answer, or changes nothing. The binding used to
    # build its answer and pending entries after the core had reserved (and evicted), so a failure
    # left keys evicted in the index but still resident in the map, or slots reserved for keys no
    # caller knew about.
    old = [k(i) for i in range(30)]
    new = [k(100 + i) for i in range(30)]

    def attempt(n: int) -> bool:
        idx = _core.OffloadIndex(40, slots_type=_Spec if store_type else None, store_type=store_type)
        assert idx.prepare_store(old) is not None
        idx.complete_store(old)
        out = failing_at(n, lambda: idx.prepare_store(new))
        idx.check_invariants()
        if out is None:
            assert idx.resident == dict(zip(old, range(30), strict=True)) and idx.pending == {}
            return False
        if store_type is None:
            keys, slots, gone = out
        else:
            keys, slots, gone = out.keys_to_store, out.store_spec.block_ids, out.evicted_keys
        assert keys == new and len(gone) == 20 and set(gone) <= set(old) and type(gone) is list
        assert idx.pending == dict(zip(new, slots.tolist(), strict=True))
        assert set(idx.resident) == set(old) - set(gone)
        gone.extend(gone)  # the answer's lists are ordinary lists
        return True

    fail_each_allocation(attempt, min_failures=3)


def test_prepare_load_pins_only_when_it_answers() -> None:
    # The answer (a slots_type instance) used to be made after the pin: a MemoryError there left
    # the keys pinned by a load no caller knew about, so they could never be evicted.
    keys = [k(i) for i in range(8)]

    def attempt(n: int) -> bool:
        idx = _core.OffloadIndex(16, slots_type=_Spec)
        assert idx.prepare_store(keys) is not None
        idx.complete_store(keys)
        out = failing_at(n, lambda: idx.prepare_load(keys))
        idx.check_invariants()
        if out is None:
            assert idx.stats()["in_use_blocks"] == 0
            return False
        assert out.block_ids.tolist() == [idx.resident[key] for key in keys]
        assert idx.stats()["in_use_blocks"] == 8
        return True

    fail_each_allocation(attempt, min_failures=1)


def test_keys_that_are_no_chain_cannot_break_the_trie() -> None:
    # The trie inserts with trusted_chain (its checks skipped), yet an engine's keys are not checked
    # to be a hash chain. They never reach the trie: its digests name slots (slot_digest), and the
    # promise rests on slot states the index checks itself. Here the keys are anything but a chain:
    # the same keys under different prefixes and in different orders, a key equal to the trie's name
    # of a slot or to its root digest, empty and long keys, `prev` naming a key of the same call, a
    # pending key, an unknown one; completions in any order with repeats and strangers, failures,
    # loads and touches. After every call the trie and the key maps agree with a model (key ->
    # slot, served under that key whatever came before it), and pinned keys are never evicted.
    rng = np.random.default_rng(11)
    pool = [k(i) for i in range(7)] + [_core.OffloadIndex.slot_digest(s) for s in range(3)] + [
        bytes(32), b"", b"x" * 100]
    idx = _core.OffloadIndex(6)
    resident: dict[bytes, int] = {}
    pending: dict[bytes, int] = {}
    pins: list[list[bytes]] = []

    def pick(n: int) -> list[bytes]:
        return [pool[i] for i in rng.integers(0, len(pool), size=n)]

    for step in range(3000):
        op = rng.integers(0, 5)
        if op == 0:
            keys = pick(int(rng.integers(1, 5)))
            prev = rng.choice(np.array([None, *pool, keys[-1]], dtype=object))
            fresh = [key for key in keys if key not in resident and key not in pending]
            if len(set(fresh)) != len(fresh):
                with pytest.raises(ValueError, match="duplicate"):
                    idx.prepare_store(keys, prev)
                continue
            out = idx.prepare_store(keys, prev)
            if out is None:
                continue
            to_store, slots, evicted = out
            assert to_store == fresh, step
            assert not set(evicted) & {key for pinned in pins for key in pinned}, step
            assert not set(evicted) & set(keys), step
            for key in evicted:
                del resident[key]
            pending.update(zip(to_store, slots.tolist(), strict=True))
        elif op == 1:
            keys = pick(int(rng.integers(1, 6)))
            success = bool(rng.integers(0, 4))
            done = idx.complete_store(keys, success)
            named = [key for key in dict.fromkeys(keys) if key in pending]
            assert sorted(done) == (sorted(named) if success else []), step
            for key in named:
                slot = pending.pop(key)
                if success:
                    resident[key] = slot
        elif op == 2 and resident:
            keys = [key for key in pick(4) if key in resident] or [next(iter(resident))]
            assert idx.prepare_load(keys).tolist() == [resident[key] for key in keys], step
            pins.append(keys)
        elif op == 3 and pins:
            idx.complete_load(pins.pop(int(rng.integers(0, len(pins)))))
        else:
            idx.touch(pick(3))
        assert dict(idx.resident) == resident and dict(idx.pending) == pending, step
        idx.check_invariants()
    assert idx.stats()["evictions"] > 100  # the sequence did make the index evict
