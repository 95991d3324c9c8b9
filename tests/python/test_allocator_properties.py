"""Hypothesis: random alloc/free/share sequences against a plain-Python model of ref counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sagellm_kv_cache import KVCacheSpec, KVDoubleFreeError, KVInvalidBlockError, KVPoolFullError, PagedKVPool

NUM_BLOCKS = 32
ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 12)),
        st.tuples(st.just("free"), st.lists(st.integers(-2, NUM_BLOCKS + 2), max_size=6)),
        st.tuples(st.just("incref"), st.lists(st.integers(-2, NUM_BLOCKS + 2), max_size=6)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_pool_matches_model(sequence: list[tuple[str, object]]) -> None:
    pool = PagedKVPool(KVCacheSpec(1, 1, 4, "fp32", 4), NUM_BLOCKS)
    refs = [0] * NUM_BLOCKS
    for op, arg in sequence:
        if op == "alloc":
            n = int(arg)  # type: ignore[call-overload]
            free = [i for i in range(NUM_BLOCKS) if refs[i] == 0]
            if n > len(free):
                try:
                    pool.allocate(n)
                    raise AssertionError("allocation beyond capacity succeeded")
                except KVPoolFullError:
                    pass
            else:
                for block in pool.allocate(n).tolist():
                    assert refs[block] == 0, "a held block was handed out again"
                    refs[block] = 1
        else:
            ids = list(arg)  # type: ignore[call-overload]
            trial = refs.copy()
            ok = True
            for i in ids:
                if not 0 <= i < NUM_BLOCKS or (op == "incref" and trial[i] == 0) or (op == "free" and trial[i] == 0):
                    ok = False
                    break
                trial[i] += 1 if op == "incref" else -1
            try:
                getattr(pool, op)(ids)
                assert ok, f"{op}({ids}) should have been refused"
                refs = trial
            except (KVDoubleFreeError, KVInvalidBlockError):
                assert not ok, f"{op}({ids}) refused but valid"
        assert pool.num_free_blocks == refs.count(0)
        for i in range(NUM_BLOCKS):
            assert pool.ref_count(i) == refs[i]
