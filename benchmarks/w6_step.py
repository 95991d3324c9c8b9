"""STEP: a scheduler step through the native request manager, token ids as Python lists.

256 running requests each append one generated token per step (one ``append_decode`` call per
step); every 16 steps the 16 oldest finish and 16 new requests are admitted in one ``admit_batch``:
1,024-token prompts = one of 32 shared 768-token system prompts + 256 fresh tokens. Block size 16,
SHA-256, unbounded cache over a 65,536-block pool (nothing is evicted).

Reference: the same bookkeeping with vLLM's semantics in plain Python (hashlib chained hashes, a
dict digest -> block, per-request block lists, a free deque). Also reported: the fixed cost of one
binding call (a membership test on the manager) against a no-op Python method call.
"""

from __future__ import annotations

import gc
import hashlib
import struct
import time
from collections import deque

import numpy as np
from common import Row, best_of
from sagellm_kv_cache import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.manager import RequestManager

BLOCK = 16
RUNNING = 256
SYSTEM_PROMPTS = 32
SHARED_TOKENS = 768
FRESH_TOKENS = 256
CHURN_EVERY = 16
POOL_BLOCKS = 65_536


class PyStepReference:
    """vLLM-style per-request bookkeeping in pure Python."""

    def __init__(self, num_blocks: int) -> None:
        self.free: deque[int] = deque(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.ref = [0] * num_blocks
        # id -> [num_tokens, blocks, digests, partial-block tokens]
        self.requests: dict[int, list] = {}

    def _hash(self, parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}i", *tokens)).digest()

    def admit(self, rid: int, tokens: list[int]) -> int:
        digests: list[bytes] = []
        parent = b"\0" * 32
        full = len(tokens) // BLOCK
        for b in range(full):
            parent = self._hash(parent, tokens[b * BLOCK:(b + 1) * BLOCK])
            digests.append(parent)
        blocks: list[int] = []
        for d in digests[: (len(tokens) - 1) // BLOCK]:
            blk = self.cached.get(d)
            if blk is None:
                break
            self.ref[blk] += 1
            blocks.append(blk)
        hit = len(blocks)
        while len(blocks) < (len(tokens) + BLOCK - 1) // BLOCK:
            blk = self.free.popleft()
            self.ref[blk] = 1
            blocks.append(blk)
        for d, blk in zip(digests[hit:], blocks[hit:], strict=False):
            self.cached.setdefault(d, blk)
        self.requests[rid] = [len(tokens), blocks, digests, tokens[full * BLOCK:]]
        return hit * BLOCK

    def decode(self, rids: list[int], tokens: list[int]) -> None:
        for rid, tok in zip(rids, tokens, strict=True):
            r = self.requests[rid]
            r[0] += 1
            if r[0] > len(r[1]) * BLOCK:
                blk = self.free.popleft()
                self.ref[blk] = 1
                r[1].append(blk)
            tail = r[3]
            tail.append(tok)
            if len(tail) == BLOCK:
                parent = r[2][-1] if r[2] else b"\0" * 32
                d = self._hash(parent, tail)
                r[2].append(d)
                self.cached.setdefault(d, r[1][len(r[2]) - 1])
                r[3] = []

    def finish(self, rid: int) -> None:
        _, blocks, digests, _ = self.requests.pop(rid)
        cached_blocks = {self.cached.get(d) for d in digests}
        for blk in blocks:
            self.ref[blk] -= 1
            if self.ref[blk] == 0 and blk not in cached_blocks:
                self.free.append(blk)


def make_prompts(count: int, rng: np.random.Generator, systems: np.ndarray) -> list[list[int]]:
    choice = rng.integers(0, SYSTEM_PROMPTS, size=count)
    fresh = rng.integers(0, 32_000, size=(count, FRESH_TOKENS), dtype=np.int32)
    return [np.concatenate([systems[c], fresh[i]]).tolist() for i, c in enumerate(choice)]


def drive(system: object, steps: int, seed: int = 0) -> tuple[float, float, float]:
    """Runs the schedule; returns (seconds per decode step, seconds per admitted request, hit ratio)."""
    rng = np.random.default_rng(seed)
    systems = rng.integers(0, 32_000, size=(SYSTEM_PROMPTS, SHARED_TOKENS), dtype=np.int32)
    churns = steps // CHURN_EVERY
    prompts = make_prompts(RUNNING + churns * CHURN_EVERY, rng, systems)
    generated = rng.integers(0, 32_000, size=(steps, RUNNING), dtype=np.int32).tolist()
    is_native = isinstance(system, RequestManager)
    running: deque[int] = deque(range(RUNNING))
    next_id = RUNNING
    if is_native:
        system.admit_batch(list(running), prompts[:RUNNING])  # type: ignore[attr-defined]
    else:
        for rid in running:
            system.admit(rid, prompts[rid])  # type: ignore[attr-defined]
    decode_s = admit_s = 0.0
    hit_tokens = admitted_tokens = 0
    # As timeit does: no cyclic GC passes over the half-million token ints held here while timing.
    gc.collect()
    gc.disable()
    try:
        _steps(system, steps, is_native, running, prompts, generated, next_id, totals := [0.0, 0.0, 0, 0])
    finally:
        gc.enable()
    decode_s, admit_s, hit_tokens, admitted_tokens = totals
    return decode_s / steps, admit_s / max(1, churns * CHURN_EVERY), hit_tokens / max(1, admitted_tokens)


def _steps(system: object, steps: int, is_native: bool, running: deque[int], prompts: list[list[int]],
           generated: list[list[int]], next_id: int, totals: list) -> None:
    decode_s = admit_s = 0.0
    hit_tokens = admitted_tokens = 0
    for step in range(steps):
        ids = list(running)
        start = time.perf_counter()
        system.append_decode(ids, generated[step]) if is_native else system.decode(ids, generated[step])  # type: ignore[attr-defined]
        decode_s += time.perf_counter() - start
        if (step + 1) % CHURN_EVERY == 0:
            done = [running.popleft() for _ in range(CHURN_EVERY)]
            new_ids = list(range(next_id, next_id + CHURN_EVERY))
            batch = prompts[next_id: next_id + CHURN_EVERY]
            next_id += CHURN_EVERY
            start = time.perf_counter()
            if is_native:
                system.finish(done)  # type: ignore[attr-defined]
                cached, _, _ = system.admit_batch(new_ids, batch)  # type: ignore[attr-defined]
                hit_tokens += int(cached.sum())
            else:
                for rid in done:
                    system.finish(rid)  # type: ignore[attr-defined]
                for rid, toks in zip(new_ids, batch, strict=True):
                    hit_tokens += system.admit(rid, toks)  # type: ignore[attr-defined]
            admit_s += time.perf_counter() - start
            admitted_tokens += sum(len(t) for t in batch)
            running.extend(new_ids)
    totals[:] = [decode_s, admit_s, hit_tokens, admitted_tokens]


def call_floor() -> tuple[float, float]:
    """ns per call: a membership test on the native manager, and a no-op Python method."""
    rm = RequestManager(num_blocks=16, enable_caching=False)
    native = rm._native
    contains = native.__contains__

    class Noop:
        def __contains__(self, item: object) -> bool:
            return False

    noop = Noop().__contains__
    n = 200_000
    ours = best_of(5, lambda: [contains(1) for _ in range(n)]) / n
    ref = best_of(5, lambda: [noop(1) for _ in range(n)]) / n
    return ours * 1e9, ref * 1e9


def run(quick: bool = False) -> list[Row]:
    steps = 64 if quick else 256
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=BLOCK)
    rm = RequestManager(PagedKVPool(spec, POOL_BLOCKS, zero_fill=False))
    decode, admit, ratio = drive(rm, steps)
    rm.check_invariants()
    ref_decode, ref_admit, ref_ratio = drive(PyStepReference(POOL_BLOCKS), steps)
    floor, noop = call_floor()
    extra = {"hit_ratio_manager": ratio, "hit_ratio_reference": ref_ratio}
    return [
        Row("STEP decode, 256 running (manager)", "us/step", decode * 1e6, ref_decode * 1e6, "vLLM semantics, Python",
            extra=extra),
        Row("STEP admit 1,024-token prompt", "us/request", admit * 1e6, ref_admit * 1e6, "vLLM semantics, Python"),
        Row("binding call floor (x in manager)", "ns/call", floor, noop, "no-op Python method"),
    ]
