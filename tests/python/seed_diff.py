"""Behavioural differential driver for the seed API: runs one seeded random sequence of calls on
``KVPool``, ``PrefixCache``, ``EvictionManager``, ``SchedulerBridge`` and ``KVCacheManager`` and
prints what each call observably did, one JSON line per call.

Runs unchanged under any interpreter where ``sagellm_kv_cache`` imports: this package's, or a venv
with the original ``isagellm-kv-cache==0.5.4.15``. ``test_seed_diff.py`` runs it under both and
compares the traces::

    python tests/python/seed_diff.py [--seed N] [--ops N] > trace.jsonl

Each line is ``[index, component, op, args, result, state]``. ``result`` is the return value or
``["!", ClassName, families]`` for an exception (``families`` being the builtin bases it is an
instance of); ``state`` is what the component shows after the call (stats, live handles). The
trace is normalised for what legitimately differs between two runs: UUIDs and handles become
``U<n>`` in order of first appearance, block ids become ``"B"`` (the original's are a UUID per
block, ours the allocator's integers: README "Seed API coverage"); instead the trace checks that
no two live handles of a pool share a block id. Timestamps are dropped. Prefix-cache keys are
compared as they are: ours are the original's (SHA-256 of 4-byte big-endian token ids).

The random choices never depend on a result, so both runs make the same calls; a call that the
original accepts and ours refuses (stricter input checks) is undone by the driver when it succeeded
(``"undo"`` in the trace), so that the states stay comparable after it.
"""

from __future__ import annotations

import argparse
import enum
import json
import random
import sys
import uuid
from collections.abc import Callable
from typing import Any

import sagellm_kv_cache as kv

_FAMILIES = (ValueError, TypeError, KeyError, IndexError, LookupError, MemoryError, AttributeError,
             ArithmeticError, RuntimeError, kv.KVCacheError)
_DROPPED_KEYS = {"updated_at", "last_access", "created_at", "queued_at", "scheduled_at", "plan_id"}


class Norm:
    """Maps run-specific values (UUIDs, handles, block ids, times) to comparable ones."""

    def __init__(self) -> None:
        self.ids: dict[Any, str] = {}

    def uid(self, u: Any) -> str:
        key = str(u)
        if key not in self.ids:
            self.ids[key] = f"U{len(self.ids)}"
        return self.ids[key]

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, bool | int | str):
            return v
        if isinstance(v, float):
            return round(v, 9)
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, uuid.UUID):
            return self.uid(v)
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, kv.KVHandle):
            return ["H", self.uid(v.handle_id)]
        if type(v).__name__ in ("Block", "KVBlockRef"):  # a handle's _blocks: ids differ by design
            return "B"
        if isinstance(v, dict):
            return {str(k): self(x) for k, x in sorted(v.items(), key=lambda kvp: str(kvp[0]))
                    if str(k) not in _DROPPED_KEYS}
        if isinstance(v, list | tuple):
            return [self(x) for x in v]
        return f"<{type(v).__name__}>"


def exc(e: BaseException) -> list[Any]:
    """An exception as ``["!", class name, builtin and KV*Error classes it is an instance of]``."""
    kv_bases = [c.__name__ for c in type(e).__mro__ if c.__name__.startswith("KV")]
    return ["!", type(e).__name__, sorted({f.__name__ for f in _FAMILIES if isinstance(e, f)} | set(kv_bases))]


class Rng:
    """One ``random()`` draw per choice, so that the stream never depends on a list's length."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.r = random.Random(seed)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def int(self, lo: int, hi: int) -> int:
        return lo + int(self.r.random() * (hi - lo + 1))

    def pick(self, seq: Any) -> Any:
        x = self.r.random()
        return seq[int(x * len(seq))] if seq else None


def handle_view(norm: Norm, h: Any, anon: bool = False) -> list[Any]:
    """What a handle shows; ``anon``: a handle that only one side made, whose id is not numbered."""
    blocks = getattr(h, "_blocks", None)
    return ["U?" if anon else norm.uid(h.handle_id), h.num_tokens, norm(h.state), h.pin_count, h.ref_count,
            None if blocks is None else len(blocks), norm(h.dtype), norm(h.layout), h.device, norm(h.memory_tier)]


def block_ids_distinct(handles: list[Any]) -> bool:
    seen: set[str] = set()
    for h in handles:
        for b in getattr(h, "_blocks", None) or ():
            key = str(b.block_id)
            if key in seen:
                return False
            seen.add(key)
    return True


# --- KVPool -------------------------------------------------------------------------------------


class PoolWorld:
    name = "pool"

    def __init__(self, rng: Rng, norm: Norm) -> None:
        self.rng, self.norm = rng, norm
        self.pool = kv.KVPool(rng.int(32, 256), rng.pick([1, 4, 16]))
        self.other = kv.KVPool(64, 16)
        self.live: list[Any] = []
        self.freed: list[Any] = []

    def describe(self) -> list[Any]:
        return [self.pool.max_tokens, self.pool.block_size]

    def state(self) -> Any:
        live = sorted(self.pool.handles.values(), key=lambda h: self.norm.uid(h.handle_id))
        return {"stats": self.norm(self.pool.get_stats()), "available": self.pool.get_available_tokens(),
                "allocated": self.pool.get_allocated_tokens(),
                "handles": [handle_view(self.norm, h) for h in live], "distinct_blocks": block_ids_distinct(live)}

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(30, self.alloc), (6, self.alloc_bad), (20, self.free), (5, self.free_bad), (6, self.pin),
                (6, self.unpin), (10, self.can_admit), (1, self.reset)]

    def alloc(self) -> tuple[str, Any, Any]:
        r = self.rng
        n = r.int(1, max(2, self.pool.max_tokens // 3)) if r.chance(0.9) else r.int(1, 2 * self.pool.max_tokens)
        args = [n, r.pick(["fp16", "fp32", "bf16", kv.DType.FP16]), r.pick(["contiguous", "paged", kv.Layout.PAGED]),
                r.pick(["cpu", "cuda:0", "cuda:1", "npu:0"]), r.pick([None, {"k": 1}])]
        try:
            h = self.pool.alloc(*args)
        except Exception as e:
            return "alloc", self.norm(args), exc(e)
        self.live.append(h)
        return "alloc", self.norm(args), handle_view(self.norm, h)

    def alloc_bad(self) -> tuple[str, Any, Any]:
        r = self.rng
        args: list[Any] = [4, "fp16", "contiguous", "cpu", None]
        slot = r.int(0, 4)
        args[slot] = r.pick([[0, -1, 2.5, "8", None, True, 10**20], ["bad", None, 3], ["zz", None],
                             ["garbage", 5, "CUDA:0", "", "cuda:", "cpu:1"], ["x", {1: 2}]][slot])
        try:
            h = self.pool.alloc(*args)
        except Exception as e:
            return "alloc_bad", self.norm(args), exc(e)
        view = handle_view(self.norm, h, anon=True)
        self.pool.free(h)  # accepted: undone so that the states stay comparable
        return "alloc_bad", self.norm(args), ["undo", view]

    def free(self) -> tuple[str, Any, Any]:
        if not self.live:
            return "free", None, None
        h = self.live[int(self.rng.r.random() * len(self.live))]
        try:
            self.pool.free(h)
        except Exception as e:
            return "free", self.norm(h), exc(e)
        self.live.remove(h)
        self.freed.append(h)
        return "free", self.norm(h), handle_view(self.norm, h)

    def free_bad(self) -> tuple[str, Any, Any]:
        kind = self.rng.pick(["double", "foreign", "created", "str", "none"])
        target: Any
        if kind == "double":
            target = self.freed[-1] if self.freed else None
        elif kind == "foreign":
            target = self.other.alloc(4, "fp16", "contiguous", "cpu")
        elif kind == "created":
            target = kv.KVHandle.create(num_tokens=4)
        else:
            target = "x" if kind == "str" else None
        if kind == "double" and target is None:
            return "free_bad", kind, None
        try:
            self.pool.free(target)
            result: Any = "ok"
        except Exception as e:
            result = exc(e)
        if kind == "foreign":
            self.other.free(target)
        return "free_bad", kind, result

    def pin(self) -> tuple[str, Any, Any]:
        h = self.rng.pick(self.live + self.freed[-2:])
        if h is None:
            return "pin", None, None
        try:
            self.pool.pin(h)
            return "pin", self.norm(h), [h.pin_count, self.norm(h.state)]
        except Exception as e:
            return "pin", self.norm(h), exc(e)

    def unpin(self) -> tuple[str, Any, Any]:
        h = self.rng.pick(self.live)
        if h is None:
            return "unpin", None, None
        try:
            self.pool.unpin(h)
            return "unpin", self.norm(h), [h.pin_count, self.norm(h.state)]
        except Exception as e:
            return "unpin", self.norm(h), exc(e)

    def can_admit(self) -> tuple[str, Any, Any]:
        r = self.rng
        n = r.pick([r.int(1, self.pool.max_tokens + 8), self.pool.get_available_tokens(),
                    self.pool.get_available_tokens() + 1, 0, -1, 2.5, None, "4"])
        try:
            return "can_admit", n, self.pool.can_admit(n)
        except Exception as e:
            return "can_admit", n, exc(e)

    def reset(self) -> tuple[str, Any, Any]:
        self.pool.reset()
        self.freed += self.live
        self.live = []
        return "reset", None, None


# --- PrefixCache --------------------------------------------------------------------------------


class PrefixWorld:
    """Prompts of several blocks that share prefixes, looked up and inserted from their first block
    (as the sageLLM engine does); no capacity and no eviction. Ours keeps one block per prefix where
    the original kept a copy per insert, so the comparison leaves out the block and insert counts
    after a prefix was inserted twice (see test_seed_diff)."""

    name = "prefix"

    def __init__(self, rng: Rng, norm: Norm) -> None:
        self.rng, self.norm = rng, norm
        self.bs = rng.pick([2, 4])
        self.cap: int | None = None
        self.cache = kv.PrefixCache(self.bs, self.cap, True)
        self.prompts: list[list[int]] = []
        self.owners = [uuid.UUID(int=i + 1) for i in range(4)]
        self.next_block = 0
        self.max_blocks = 5

    def describe(self) -> list[Any]:
        return [self.bs, self.cap, self.cache.enable_lru]

    def state(self) -> Any:
        return {"stats": self.norm(prefix_stats(self.cache)), "len": len(self.cache)}

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(8, self.hashes), (3, self.hash_one), (25, self.lookup), (20, self.insert), (0.5, self.clear),
                (6, self.bad)]

    def prompt(self) -> list[int]:
        """A new prompt that extends a known one (cut at a block boundary) with fresh tokens, or a known one."""
        r = self.rng
        if self.prompts and r.chance(0.4):
            return r.pick(self.prompts)
        base = r.pick(self.prompts) if self.prompts and r.chance(0.6) else []
        cut = self.bs * r.int(0, len(base) // self.bs)
        p = base[:cut] + [r.int(0, 2**31) for _ in range(r.int(1, self.max_blocks * self.bs))]
        self.prompts.append(p)
        return p

    def hashes(self) -> tuple[str, Any, Any]:
        p = self.prompt()
        size = self.rng.pick([None, None, 1, 3])
        try:
            return "hashes", [len(p), size], self.norm(self.cache.compute_block_hashes(p, size))
        except Exception as e:
            return "hashes", [len(p), size], exc(e)

    def hash_one(self) -> tuple[str, Any, Any]:
        p = self.prompt()[: self.bs]
        try:
            return "hash_one", len(p), self.norm(self.cache.compute_block_hash(p))
        except Exception as e:
            return "hash_one", len(p), exc(e)

    def lookup(self) -> tuple[str, Any, Any]:
        p = self.prompt()
        hs = self.cache.compute_block_hashes(p)
        blocks, n = self.cache.lookup(hs)
        return "lookup", len(hs), [self.norm(blocks), n]

    def insert(self) -> tuple[str, Any, Any]:
        p = self.prompt()
        hs = self.cache.compute_block_hashes(p)
        m = self.rng.int(0, len(hs))
        owner = self.rng.pick(self.owners)
        blocks = []
        for _ in range(m):
            blocks.append({"block_id": self.next_block, "handle_id": owner})
            self.next_block += 1
        try:
            self.cache.insert(hs[:m], blocks)
            return "insert", [m, self.norm(owner)], None
        except Exception as e:
            return "insert", [m, self.norm(owner)], exc(e)

    def evict(self) -> tuple[str, Any, Any]:
        n = self.rng.int(0, 4)
        try:
            return "evict", n, self.cache.evict_by_count(n)
        except Exception as e:  # enable_lru=False
            return "evict", n, exc(e)

    def invalidate(self) -> tuple[str, Any, Any]:
        owner = self.rng.pick(self.owners)
        return "invalidate", self.norm(owner), self.cache.invalidate(owner)

    def clear(self) -> tuple[str, Any, Any]:
        self.cache.clear()
        return "clear", None, None

    def bad(self) -> tuple[str, Any, Any]:
        kind = self.rng.pick(["lookup_none", "lookup_ints", "insert_len", "insert_nondict", "evict_neg",
                              "hashes_none", "hashes_bs0", "hashes_neg", "hashes_big", "hash_one_len"])
        # On a scratch cache: the original accepts some of these and corrupts itself (a block that is
        # not a dict breaks its later invalidate with AttributeError).
        c, p = kv.PrefixCache(self.bs, self.cap, True), [7] * (2 * self.bs)
        calls: dict[str, Callable[[], Any]] = {
            "lookup_none": lambda: c.lookup(None),
            "lookup_ints": lambda: c.lookup([123]),
            "insert_len": lambda: c.insert(c.compute_block_hashes(p), [{"block_id": -1}]),
            "insert_nondict": lambda: c.insert(c.compute_block_hashes(p)[:1], ["x"]),
            "evict_neg": lambda: c.evict_by_count(-1),
            "hashes_none": lambda: c.compute_block_hashes(None),
            "hashes_bs0": lambda: c.compute_block_hashes(p, 0),
            "hashes_neg": lambda: c.compute_block_hashes([-1] * self.bs),
            "hashes_big": lambda: c.compute_block_hashes([2**32] * self.bs),
            "hash_one_len": lambda: c.compute_block_hash(p),
        }
        try:
            return "bad", kind, self.norm(calls[kind]())
        except Exception as e:
            return "bad", kind, exc(e)


class SingleBlockPrefixWorld(PrefixWorld):
    """One-block prompts, where a chain of keys and the original's flat map hold the same entries:
    capacity, LRU order, ``evict_by_count`` and ``invalidate`` compare exactly. Inserts follow a
    missed lookup (the engine's order), so no key is inserted twice."""

    name = "prefix1"

    def __init__(self, rng: Rng, norm: Norm) -> None:
        super().__init__(rng, norm)
        # Without LRU the original ignored the capacity (the cache grew without bound); ours evicts in
        # insertion order (prefix_cache.py): a capacity only with LRU.
        # The configuration cycles with the seed, so that any three seeds cover each.
        self.lru, self.cap = [(True, 6), (True, 12), (False, None)][rng.seed // 1000 % 3]
        self.cache = kv.PrefixCache(self.bs, self.cap, self.lru)
        self.max_blocks = 1

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(3, self.hash_one), (25, self.lookup), (20, self.insert), (4, self.evict), (4, self.invalidate),
                (0.5, self.clear), (3, self.bad)]

    def prompt(self) -> list[int]:
        r = self.rng
        if self.prompts and r.chance(0.6):
            return r.pick(self.prompts)
        p = [r.int(0, 2**31) for _ in range(self.bs)]
        self.prompts.append(p)
        return p

    def insert(self) -> tuple[str, Any, Any]:
        p = self.prompt()
        hs = self.cache.compute_block_hashes(p)
        owner = self.rng.pick(self.owners)
        _, hit = self.cache.lookup(hs)
        if hit:
            return "insert", ["hit", self.norm(owner)], None
        self.next_block += 1
        try:
            self.cache.insert(hs, [{"block_id": self.next_block, "handle_id": owner}])
            return "insert", [1, self.norm(owner)], None
        except Exception as e:
            return "insert", [1, self.norm(owner)], exc(e)


# --- EvictionManager ----------------------------------------------------------------------------


class EvictionWorld:
    """``select_victims`` over handles with distinct, fixed times (and priorities in metadata).
    ``LFU`` is left out: the original ordered it as LRU, ours by access count (eviction.py)."""

    name = "eviction"
    POLICIES = (kv.EvictionPolicy.LRU, kv.EvictionPolicy.FIFO, kv.EvictionPolicy.TTL, kv.EvictionPolicy.PRIORITY,
                kv.EvictionPolicy.LIFETIME_AWARE)

    def __init__(self, rng: Rng, norm: Norm) -> None:
        self.rng, self.norm = rng, norm
        self.mgr = kv.EvictionManager(rng.pick(self.POLICIES))

    def describe(self) -> list[Any]:
        return [self.mgr.policy.value]

    def state(self) -> Any:
        return self.norm(self.mgr.policy)  # the original's set_policy takes a str as it is

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(20, self.select), (2, self.set_policy), (3, self.bad)]

    def handles(self) -> list[Any]:
        r = self.rng
        out = []
        times = list(range(1, 40))
        r.r.shuffle(times)
        for i in range(r.int(0, 8)):
            h = kv.KVHandle.create(num_tokens=r.int(1, 40), metadata=r.pick([{}, {}, {"priority": r.int(-2, 5)}]))
            h.created_at = float(times[2 * i])
            h.last_access = float(times[2 * i + 1])
            h.access_count = r.int(0, 5)
            if r.chance(0.2):
                h.pin()
            if r.chance(0.1):
                h.state = kv.KVBlockState.FREE
            self.norm.uid(h.handle_id)
            out.append(h)
        return out

    def select(self) -> tuple[str, Any, Any]:
        hs = self.handles()
        need = self.rng.int(0, 120)
        maxv = self.rng.pick([None, None, 1, 2])
        args = [[[*handle_view(self.norm, h)[:5], h.created_at, h.last_access, h.access_count,
                  h.metadata.get("priority")] for h in hs], need, maxv]
        try:
            return "select", args, self.norm(self.mgr.select_victims(hs, need, maxv))
        except Exception as e:
            return "select", args, exc(e)

    def set_policy(self) -> tuple[str, Any, Any]:
        p = self.rng.pick(self.POLICIES)
        self.mgr.set_policy(p)
        return "set_policy", p.value, None

    def bad(self) -> tuple[str, Any, Any]:
        kind = self.rng.pick(["need_neg", "handles_none", "max_neg", "max_zero", "policy_str"])
        calls: dict[str, Callable[[], Any]] = {
            "need_neg": lambda: self.mgr.select_victims(self.handles(), -5),
            "handles_none": lambda: self.mgr.select_victims(None, 5),
            "max_neg": lambda: self.mgr.select_victims(self.handles(), 5, -1),
            "max_zero": lambda: self.mgr.select_victims(self.handles(), 5, 0),
            "policy_str": lambda: self.mgr.set_policy("lru"),
        }
        try:
            return "bad", kind, self.norm(calls[kind]())
        except Exception as e:
            return "bad", kind, exc(e)


# --- SchedulerBridge ----------------------------------------------------------------------------


class BridgeWorld:
    """Reservations through ``allocate_request`` / ``free_request`` on the bridge's one device,
    within the budget: the original's bridge, short of tokens, frees other requests' handles
    (``_try_evict``) where ours keeps each reservation pinned until ``free_request``. ``plan`` is
    left out: ours reserves KV for what it admits, the original only summed the requests' needs
    (scheduler_bridge.py's module docstring)."""

    name = "bridge"

    def __init__(self, rng: Rng, norm: Norm) -> None:
        self.rng, self.norm = rng, norm
        self.bridge = kv.SchedulerBridge(rng.int(64, 512), rng.pick([4, 16]), rng.pick([True, False]))
        self.requests: dict[str, int] = {}  # the driver's own account (request -> tokens), never a result
        self.counter = 0

    def describe(self) -> list[Any]:
        return [self.bridge.max_tokens, self.bridge.block_size, self.bridge.enable_prefix_cache]

    def state(self) -> Any:
        stats = self.bridge.get_stats()
        return {"pool": self.norm(stats.get("pool")), "num_requests": stats.get("num_requests"),
                "load": self.norm(stats.get("load_metrics")), "placement": self.norm(stats.get("placement")),
                "requests": sorted(self.bridge._request_handles)}

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(20, self.allocate), (12, self.free), (4, self.bad), (0.5, self.reset)]

    def allocate(self) -> tuple[str, Any, Any]:
        r = self.rng
        rid = f"r{self.counter}"
        n = r.int(1, self.bridge.max_tokens // 2)
        session = r.pick([None, "s1"])
        if sum(self.requests.values()) + n > self.bridge.max_tokens:
            return self.free()
        self.counter += 1
        self.requests[rid] = n
        args = [rid, n, "cuda:0", session]
        try:
            h = self.bridge.allocate_request(*args)
        except Exception as e:
            return "allocate", args, exc(e)
        return "allocate", args, handle_view(self.norm, h)

    def free(self) -> tuple[str, Any, Any]:
        r = self.rng
        rid = r.pick(sorted(self.requests)) if r.chance(0.9) and self.requests else "nope"
        try:
            self.bridge.free_request(rid)
            result: Any = None
        except Exception as e:
            result = exc(e)
        self.requests.pop(rid, None)
        return "free", rid, result

    def bad(self) -> tuple[str, Any, Any]:
        kind = self.rng.pick(["zero", "neg", "float", "rid_none", "device_bad", "device_other"])
        args: list[Any] = {"zero": ["b0", 0], "neg": ["b1", -3], "float": ["b2", 2.5], "rid_none": [None, 4],
                           "device_bad": ["b3", 4, 7], "device_other": ["b4", 4, "cpu"]}[kind]
        # On a scratch bridge: the original registers any device it is given, for good.
        bridge = kv.SchedulerBridge(self.bridge.max_tokens, self.bridge.block_size, self.bridge.enable_prefix_cache)
        try:
            h = bridge.allocate_request(*args)
        except Exception as e:
            return "bad", kind, exc(e)
        return "bad", kind, ["accepted", handle_view(self.norm, h, anon=True)]

    def reset(self) -> tuple[str, Any, Any]:
        self.bridge.reset()
        self.requests = {}
        return "reset", None, None


# --- KVCacheManager -----------------------------------------------------------------------------


class ManagerWorld:
    name = "manager"

    def __init__(self, rng: Rng, norm: Norm) -> None:
        self.rng, self.norm = rng, norm
        self.bs = rng.pick([4, 8])
        self.mgr = kv.KVCacheManager(rng.int(64, 256), self.bs)
        # The driver's own account, never a result: a slot per alloc call (None where it failed).
        self.live: list[Any] = []
        self.tokens: list[int] = []
        self.slots: list[int] = []  # a number per alloc call
        # First block of a registered prompt -> the slot that registered it, and each slot's longest
        # registered prompt. One slot per leading block: where two handles register the same leading
        # blocks ours keeps the first's and drops them with it; and a slot registers only prompts
        # that agree with each other: a handle's block holds one content, so ours replaces a
        # contradicting registration (kv_cache_manager.py). The original kept every registration.
        self.first_blocks: dict[tuple[int, ...], int] = {}
        self.registered: dict[int, list[int]] = {}
        self.prompts: list[list[int]] = []

    def describe(self) -> list[Any]:
        return [self.mgr.kv_pool.max_tokens, self.bs]

    def state(self) -> Any:
        live = sorted(self.mgr.kv_pool.handles.values(), key=lambda h: self.norm.uid(h.handle_id))
        return {"stats": self.norm(self.mgr.get_stats()), "metrics": self.norm(self.mgr.get_prefix_metrics()),
                "handles": [handle_view(self.norm, h) for h in live]}

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(20, self.alloc), (12, self.free), (8, self.register), (12, self.query), (3, self.bad)]

    def prompt(self, register: bool = False) -> list[int]:
        """Whole blocks only: ours registers and matches whole blocks (kv_cache_manager.py), the
        original any token count. Ours also serves a query from any whole-block prefix of a
        registered prompt, the original only from a whole registered prompt; so a query is never
        shorter than a registered prompt it shares blocks with: registrations take a known prompt
        or one cut short, queries a known prompt or one extended."""
        r = self.rng
        if self.prompts and r.chance(0.5):
            base = r.pick(self.prompts)
            if r.chance(0.5):
                return base[: self.bs * r.int(1, len(base) // self.bs)] if register else base
            return base if register else base + [r.int(0, 1000) for _ in range(self.bs)]
        p = [r.int(0, 1000) for _ in range(self.bs * r.int(1, 4))]
        self.prompts.append(p)
        return p

    def alloc(self) -> tuple[str, Any, Any]:
        n = self.rng.int(1, self.mgr.kv_pool.max_tokens // 2)
        if sum(self.tokens) + n > self.mgr.kv_pool.max_tokens:
            return self.free()  # within the budget: eviction is compared in test_seed_diff's notes only
        self.tokens.append(n)
        self.slots.append(len(self.slots) and self.slots[-1] + 1)
        try:
            h = self.mgr.alloc(n)
        except Exception as e:
            self.live.append(None)
            return "alloc", n, exc(e)
        self.live.append(h)
        return "alloc", n, handle_view(self.norm, h)

    def free(self) -> tuple[str, Any, Any]:
        if not self.live:
            return "free", None, None
        i = int(self.rng.r.random() * len(self.live))
        h = self.live.pop(i)
        self.tokens.pop(i)
        slot = self.slots.pop(i)
        self.first_blocks = {k: v for k, v in self.first_blocks.items() if v != slot}
        self.registered.pop(slot, None)
        if h is None:
            return "free", None, None
        try:
            self.mgr.free(h)
            result: Any = handle_view(self.norm, h)
        except Exception as e:
            result = exc(e)
        return "free", self.norm(h), result

    def register(self) -> tuple[str, Any, Any]:
        i = int(self.rng.r.random() * len(self.live)) if self.live else -1
        p = self.prompt(register=True)
        h = self.live[i] if i >= 0 else None
        if h is None or len(p) > self.tokens[i]:  # longer than the handle: see bad()
            return "register", None, None
        slot, known = self.slots[i], self.registered.get(self.slots[i], [])
        if self.first_blocks.get(tuple(p[: self.bs]), slot) != slot or p[: len(known)] != known[: len(p)]:
            return "register", None, None
        self.first_blocks[tuple(p[: self.bs])] = slot
        self.registered[slot] = max(known, p, key=len)
        try:
            self.mgr.register_prefix(p, h)
            return "register", [len(p), self.norm(h)], None
        except Exception as e:
            return "register", [len(p), self.norm(h)], exc(e)

    def query(self) -> tuple[str, Any, Any]:
        p = self.prompt()
        try:
            h, n = self.mgr.query_prefix(p)
            return "query", len(p), [self.norm(h), n]
        except Exception as e:
            return "query", len(p), exc(e)

    def bad(self) -> tuple[str, Any, Any]:
        kind = self.rng.pick(["alloc_zero", "alloc_float", "free_str", "query_none", "register_nonhandle",
                              "register_too_long"])
        # On a scratch manager: what the original accepts (and counts) must not skew the compared state.
        m = kv.KVCacheManager(self.mgr.kv_pool.max_tokens, self.bs)
        calls: dict[str, Callable[[], Any]] = {
            "alloc_zero": lambda: m.alloc(0),
            "alloc_float": lambda: m.alloc(2.5),
            "free_str": lambda: m.free("x"),
            "query_none": lambda: m.query_prefix(None),
            "register_nonhandle": lambda: m.register_prefix([1, 2, 3, 4], "x"),
            "register_too_long": lambda: m.register_prefix(list(range(2 * self.bs)), m.alloc(self.bs)),
        }
        try:
            return "bad", kind, self.norm(calls[kind]())
        except Exception as e:
            return "bad", kind, exc(e)


class ConstructorWorld:
    """Constructors with valid (``ctor``) and invalid (``bad``) arguments; what a new object shows."""

    name = "ctor"
    _P, _E = kv.EvictionPolicy, "eviction"
    CASES: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
        ("ctor", "pool", (100,)), ("ctor", "pool", (100, 16)), ("ctor", "pool", (100, 16, 8)),
        ("ctor", "pool", (1, 1)), ("bad", "pool", (0,)), ("bad", "pool", (-5,)), ("bad", "pool", (1.5,)),
        ("bad", "pool", ("10",)), ("bad", "pool", (None,)), ("bad", "pool", (True,)), ("bad", "pool", (100, 0)),
        ("bad", "pool", (100, -1)), ("bad", "pool", (100, 16, 0)), ("bad", "pool", (100, 16, 32, 5)),
        ("bad", "pool", (100, 16, 32, None, -1)),
        ("ctor", "prefix", ()), ("ctor", "prefix", (4,)), ("ctor", "prefix", (4, 8)),
        ("ctor", "prefix", (4, None, False)), ("bad", "prefix", (0,)), ("bad", "prefix", (-1,)),
        ("bad", "prefix", (True,)), ("bad", "prefix", (16, 0)), ("bad", "prefix", (16, -1)),
        ("ctor", "bridge", (64,)), ("ctor", "bridge", (64, 4, False)), ("bad", "bridge", (0,)),
        ("bad", "bridge", (100, 0)), ("bad", "bridge", (100, 16, False, "x")),
        ("ctor", _E, ()), ("ctor", _E, (_P.FIFO, 10.0, 2)), ("ctor", _E, (_P.TTL,)), ("ctor", _E, (_P.PRIORITY,)),
        ("ctor", _E, (_P.LIFETIME_AWARE,)), ("bad", _E, ("nope",)), ("bad", _E, (_P.LRU, -1.0)),
        ("bad", _E, (_P.LRU, 1.0, "x")),
        ("ctor", "manager", (64,)), ("ctor", "manager", (64, 8)), ("bad", "manager", (0,)),
        ("bad", "manager", (64, 0)), ("bad", "manager", (1.5,)),
    )

    def __init__(self, rng: Rng, norm: Norm) -> None:
        self.rng, self.norm = rng, norm

    def describe(self) -> list[Any]:
        return []

    def state(self) -> Any:
        return None

    def ops(self) -> list[tuple[float, Callable[[], tuple[str, Any, Any]]]]:
        return [(1, self.construct)]

    def construct(self) -> tuple[str, Any, Any]:
        op, kind, args = self.rng.pick(self.CASES)
        make = {"pool": kv.KVPool, "prefix": kv.PrefixCache, "bridge": kv.SchedulerBridge,
                "eviction": kv.EvictionManager, "manager": kv.KVCacheManager}[kind]
        try:
            obj = make(*args)
        except Exception as e:
            return op, [kind, self.norm(args)], exc(e)
        stats = obj.policy if kind == "eviction" else prefix_stats(obj) if kind == "prefix" else obj.get_stats()
        return op, [kind, self.norm(args)], self.norm(stats)


def prefix_stats(cache: Any) -> dict[str, Any]:
    """``PrefixCache.get_stats()`` in the original's keys. Ours adds ``query_count`` (the engine's
    RuntimeStats divides hit_count by it): checked here to be the lookups counted, then left out."""
    stats = dict(cache.get_stats())
    if "query_count" in stats:
        queries = stats.pop("query_count")
        if queries != stats["hit_count"] + stats["miss_count"]:
            stats["query_count_wrong"] = queries  # shows as a divergence
    return stats


WORLDS = {w.name: w for w in (PoolWorld, PrefixWorld, SingleBlockPrefixWorld, EvictionWorld, BridgeWorld,
                                           ManagerWorld, ConstructorWorld)}


def run(seed: int, ops: int, worlds: list[str] | None = None) -> list[list[Any]]:
    """The trace of ``ops`` calls per component, each component on its own random stream."""
    trace: list[list[Any]] = []
    for name in worlds or list(WORLDS):
        rng, norm = Rng(seed * 1000 + sorted(WORLDS).index(name)), Norm()
        world = WORLDS[name](rng, norm)  # type: ignore[abstract]
        trace.append([-1, name, "init", world.describe(), None, world.state()])
        table = world.ops()
        total = sum(w for w, _ in table)
        for i in range(ops):
            x = rng.r.random() * total
            op = table[-1][1]
            for weight, candidate in table:
                x -= weight
                if x < 0:
                    op = candidate
                    break
            try:
                op_name, args, result = op()
                trace.append([i, name, op_name, args, result, world.state()])
            except Exception as e:  # the driver's own calls failed: the rest of this component is moot
                trace.append([i, name, "driver-crash", getattr(op, "__name__", "?"), exc(e), None])
                break
    return trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=2000, help="calls per component")
    ap.add_argument("--worlds", default="", help="comma-separated subset of " + ",".join(WORLDS))
    a = ap.parse_args(argv)
    out = sys.stdout
    for line in run(a.seed, a.ops, [w for w in a.worlds.split(",") if w] or None):
        out.write(json.dumps(line, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
