"""Hypothesis: random alloc/free/pin/unpin sequences on the seed KVPool against a plain-Python model.

Bounded (the default), every id stays below ceil(max_tokens / block_size) and a handle is admitted
when its tokens fit the budget and its blocks fit the free ids. With ``overcommit_blocks`` the
budget alone decides, so the live handles hold more ids than that when their last blocks are partly
filled and the id space grows into extra segments and shrinks back. In both modes the model checks
that no id is ever held by two handles, that ``can_admit`` and ``get_available_tokens`` say what
``alloc`` does, and that every refusal leaves the pool as it was.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sagellm_kv_cache import (
    KVBudgetExceededError,
    KVDoubleFreeError,
    KVHandle,
    KVHandlePinnedError,
)
from sagellm_kv_cache.pool import KVPool

MAX_TOKENS = 40
BLOCK_SIZE = 8
SEGMENT = -(-MAX_TOKENS // BLOCK_SIZE)  # ids per segment of the id space
MAX_IDS = SEGMENT * -(-MAX_TOKENS // SEGMENT)  # every handle one token: one id each


class SeedPoolModel(RuleBasedStateMachine):
    overcommit = False

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(MAX_TOKENS, block_size=BLOCK_SIZE, overcommit_blocks=self.overcommit)
        self.id_bound = MAX_IDS if self.overcommit else SEGMENT
        self.live: dict[int, KVHandle] = {}  # allocation number -> handle
        self.allocations = 0
        self.pins: dict[int, int] = {}
        self.freed: list[KVHandle] = []
        self.peak_blocks = 0

    def _tokens(self) -> int:
        return sum(h.num_tokens for h in self.live.values())

    def _available(self) -> int:
        free_ids = self.id_bound - sum(len(h.block_ids) for h in self.live.values())
        return min(MAX_TOKENS - self._tokens(), free_ids * BLOCK_SIZE)

    def _snapshot(self) -> tuple[int, int, int, dict]:
        return (self.pool.get_allocated_tokens(), len(self.pool.handles), len(self.pool.pinned_handles),
                self.pool.block_manager.get_stats())

    @rule(num_tokens=st.one_of(st.integers(1, 3), st.integers(1, MAX_TOKENS + 3)))
    def alloc(self, num_tokens: int) -> None:
        fits = num_tokens <= self._available()
        assert self.pool.can_admit(num_tokens) == fits
        if not fits:
            before = self._snapshot()
            try:
                self.pool.alloc(num_tokens)
                raise AssertionError(f"{num_tokens} tokens admitted over the budget")
            except KVBudgetExceededError:
                pass
            assert self._snapshot() == before
            return
        handle = self.pool.alloc(num_tokens)
        assert handle.num_tokens == num_tokens
        assert len(handle.block_ids) == -(-num_tokens // BLOCK_SIZE)
        self.allocations += 1
        self.live[self.allocations] = handle
        self.pins[self.allocations] = 0
        self.peak_blocks = max(self.peak_blocks, sum(len(h.block_ids) for h in self.live.values()))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)))
        handle = self.live[key]
        if self.pins[key]:
            before = self._snapshot()
            try:
                self.pool.free(handle)
                raise AssertionError("a pinned handle was freed")
            except KVHandlePinnedError:
                pass
            assert self._snapshot() == before
            return
        self.pool.free(handle)
        del self.live[key], self.pins[key]
        self.freed.append(handle)

    @precondition(lambda self: bool(self.freed))
    @rule(data=st.data())
    def free_again(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.freed))
        before = self._snapshot()
        try:
            self.pool.free(handle)
            raise AssertionError("a freed handle was freed again")
        except KVDoubleFreeError:
            pass
        assert self._snapshot() == before

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), unpin=st.booleans())
    def pin_or_unpin(self, data: st.DataObject, unpin: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)))
        handle = self.live[key]
        if not unpin:
            self.pool.pin(handle)
            self.pins[key] += 1
        elif self.pins[key]:
            self.pool.unpin(handle)
            self.pins[key] -= 1
        else:
            before = self._snapshot()
            self.pool.unpin(handle)  # not pinned: nothing happens, as in the original
            assert self._snapshot() == before

    @invariant()
    def matches_model(self) -> None:
        assert self.pool.get_allocated_tokens() == self._tokens()
        assert self.pool.get_available_tokens() == self._available()
        if self.overcommit:  # the original's token budget
            assert self._available() == MAX_TOKENS - self._tokens()
        assert {h.handle_id for h in self.live.values()} == set(self.pool.handles)
        assert {self.live[k].handle_id for k, n in self.pins.items() if n} == self.pool.pinned_handles
        held = np.concatenate([h.block_ids for h in self.live.values()]) if self.live else np.empty(0)
        assert len(np.unique(held)) == len(held), "a block id is held by two handles"
        assert held.size == 0 or (held.min() >= 0 and held.max() < self.id_bound)
        stats = self.pool.block_manager.get_stats()
        assert stats["used_blocks"] == len(held)
        assert stats["total_blocks"] == self.peak_blocks
        seed = self.pool.get_stats()
        assert seed["num_handles"] == len(self.live)
        assert seed["pinned_tokens"] == sum(self.live[k].num_tokens for k, n in self.pins.items() if n)


class OvercommitSeedPoolModel(SeedPoolModel):
    overcommit = True


TestSeedPoolModel = SeedPoolModel.TestCase
TestSeedPoolModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestOvercommitSeedPoolModel = OvercommitSeedPoolModel.TestCase
TestOvercommitSeedPoolModel.settings = TestSeedPoolModel.settings
