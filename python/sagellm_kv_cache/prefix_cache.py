"""Prefix caching: the native fast path (:class:`RadixPrefixCache`) and the seed's :class:`PrefixCache`.

Block ``i`` of a prompt is identified by a chained digest: ``H(digest(i-1), key, tokens of block i)``
with SHA-256 (OpenSSL) by default. A per-tenant ``salt`` enters the first block only, so tenants with
different salts never share a block; an ``extra`` key (LoRA id, multimodal hash) enters every block.
The trie lives in C++: longest-prefix match takes a reference on every matched block (``release``
drops it), only unreferenced leaves are evicted, and evicted blocks go back to the pool.

Scheduler flow with a pool::

    cache = RadixPrefixCache(block_size=16, capacity_blocks=8192, pool=pool)
    digests = cache.hash_tokens(prompt)                  # one C++ call for the whole prompt
    hit, ids = cache.match(digests)                      # reuse ids[:hit]; they are referenced
    new = pool.allocate(len(digests) - hit)              # only the missing blocks
    ... prefill writes K/V into `new` ...
    cache.insert(digests[hit:], new, parent=digests[hit - 1] if hit else None)
    pool.free(new); cache.release(digests[:hit])         # at request end; the cache keeps its own refs
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sagellm_kv_cache import _core
from sagellm_kv_cache._numbers import array_of, finite_number, integer, plain, positive_int, shown, text
from sagellm_kv_cache.errors import KVPoolFullError
from sagellm_kv_cache.paged import _INT32_MAX, PagedKVPool, _int64_arg

if TYPE_CHECKING:
    from sagellm_kv_cache.observability.hooks import MetricsHook
    from sagellm_kv_cache.observability.metrics import MetricsCollector
    from sagellm_kv_cache.observability.wiring import PrefixCacheObserver
    from sagellm_kv_cache.profiling.access_stats import AccessStatsCollector

__all__ = ["BlockHash", "PrefixCache", "RadixPrefixCache", "hash_algorithms"]

BlockHash = bytes
Digests = npt.NDArray[np.uint8]
POLICIES = ("lru", "fifo", "priority", "ttl")
_MAX_ID = 2**31 - 1
# Above this many blocks a bounded seed PrefixCache counts its ids up as an unbounded one does
# instead of holding an id allocator of twice its capacity, whose memory is taken up front.
_ALLOCATOR_MAX_BLOCKS = 1 << 20


def hash_algorithms() -> list[str]:
    """Hash algorithms this build offers ("sha256" always; "xxh3_128" when built with xxHash)."""
    return list(_core.available_hash_algorithms())


class RadixPrefixCache:
    """Hash-trie prefix cache over a :class:`PagedKVPool` (or metadata-only without one).

    ``policy`` is one of ``lru`` (default), ``fifo``, ``priority`` (lowest first, LRU tie-break)
    or ``ttl`` (entries older than ``ttl_seconds`` first, then LRU). ``capacity_blocks`` bounds the
    cached blocks; inserting beyond it evicts first. Thread-safe.

    ``hash_algorithm="xxh3_128"`` is a fast non-cryptographic option: collisions can be forced by
    an adversary, so use it only for trusted single-tenant traffic.

    Observability (all optional, off by default): ``metrics_collector`` (with ``metrics_hook``,
    default :class:`MetricsHook`) counts each ``match`` as hit / missed tokens and blocks and each
    eviction; ``access_stats`` records every queried block as a hit or a miss, labelled by the first
    16 hex digits of its digest. Without them no per-block Python work is done.
    """

    def __init__(
        self,
        block_size: int = 16,
        capacity_blocks: int | None = None,
        policy: str = "lru",
        *,
        pool: PagedKVPool | None = None,
        ttl_seconds: float = 300.0,
        event_queue_capacity: int = 0,
        hash_algorithm: str = "sha256",
        metrics_collector: MetricsCollector | None = None,
        metrics_hook: MetricsHook | None = None,
        access_stats: AccessStatsCollector | None = None,
    ) -> None:
        if pool is not None and not isinstance(pool, PagedKVPool):
            raise TypeError(f"pool must be a PagedKVPool or None, got {type(pool).__name__}")
        # Checked here: pybind takes True as 1 and names no argument for a float or an int past 64 bits.
        block_size = _int64_arg("block_size", block_size)
        capacity_blocks = None if capacity_blocks is None else _int64_arg("capacity_blocks", capacity_blocks)
        event_queue_capacity = _int64_arg("event_queue_capacity", event_queue_capacity)
        policy = text("policy", policy)
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float | np.integer | np.floating):
            raise TypeError(f"ttl_seconds must be a number, got {type(ttl_seconds).__name__}")
        if isinstance(ttl_seconds, int):  # an int past the float range has no double; a float inf the native judges
            ttl_seconds = finite_number("ttl_seconds", ttl_seconds)
        hash_algorithm = text("hash_algorithm", hash_algorithm)
        self.pool = pool
        self._native = _core.PrefixCache(
            block_size=block_size,
            capacity_blocks=capacity_blocks,
            policy=policy,
            ttl_seconds=ttl_seconds,
            allocator=None if pool is None else pool._native,
            event_queue_capacity=event_queue_capacity,
            hash_algorithm=hash_algorithm,
        )
        self.block_size = int(block_size)
        self.hash_algorithm = hash_algorithm
        self._observer: PrefixCacheObserver | None = None
        if metrics_collector is not None or metrics_hook is not None or access_stats is not None:
            from sagellm_kv_cache.observability.wiring import PrefixCacheObserver

            self._observer = PrefixCacheObserver(self.block_size, metrics_collector, metrics_hook, access_stats)

    # --- hashing ----------------------------------------------------------------------------

    def hash_tokens(
        self,
        tokens: Any,
        *,
        parent: bytes | None = None,
        salt: bytes | None = None,
        extra: bytes | None = None,
        block_size: int | None = None,
    ) -> Digests:
        """Chained digests of the full blocks of ``tokens`` (int32/int64 array), shape (n, 32)."""
        size = self.block_size if block_size is None else _int64_arg("block_size", block_size)
        return _core.hash_blocks(tokens, size, parent=parent, salt=salt, extra=extra, algorithm=self.hash_algorithm)

    # --- the trie ---------------------------------------------------------------------------

    def match(self, digests: Any) -> tuple[int, npt.NDArray[np.int32]]:
        """Longest cached prefix: (number matched, their block ids). Takes a reference on each."""
        n, ids = self._native.match(digests)
        if self._observer is not None:
            self._observer.matched(digests, int(n))
        return int(n), ids

    def match_tokens(self, tokens: Any, *, salt: bytes | None = None,
                     extra: bytes | None = None) -> tuple[int, npt.NDArray[np.int32], Digests]:
        """Hash + match in one call: (number matched, block ids, digests of all full blocks)."""
        n, ids, digests = self._native.match_tokens(tokens, salt=salt, extra=extra)
        if self._observer is not None:
            self._observer.matched(digests, int(n))
        return int(n), ids, digests

    def peek(self, digests: Any) -> tuple[int, npt.NDArray[np.int32]]:
        """Like :meth:`match` without taking references, touching recency or counting stats."""
        if digests.__class__ is bytes:
            # The native peek also reads the seed cache's concatenated digests; match does not, and
            # neither does this one (a bare 32-byte digest would pass for a chain of one).
            raise TypeError("digests must be an (n, 32) uint8 array or a list of 32-byte digests, got bytes")
        n, ids = self._native.peek(digests)
        return int(n), ids

    def release(self, digests: Any) -> None:
        """Drops the references ``match`` took. All or nothing."""
        self._native.release(digests)

    def insert(
        self,
        digests: Any,
        block_ids: Any,
        *,
        parent: Any = None,
        token_ids: Any = None,
        owner: int = 0,
        priority: int = 0,
        extra_key: bytes | None = None,
        cache_salt: bytes | None = None,
    ) -> tuple[int, npt.NDArray[np.int32]]:
        """Publishes full blocks; returns (newly inserted, positions whose block was redundant).

        A digest already cached keeps its block: the caller should free its own copy at the
        returned positions. The cache takes one reference on every block it keeps.
        ``cache_salt`` (the tenant salt the digests were hashed with) only travels in the stored
        event, so that a KV-aware router keeps the tenant's blocks apart.
        """
        owner, priority = integer("owner", owner), _int64_arg("priority", priority)
        evictions = self._evictions_so_far()
        n, redundant = self._native.insert(digests, block_ids, parent=parent, token_ids=token_ids, owner=owner,
                                           priority=priority, extra_key=extra_key, cache_salt=cache_salt)
        self._observe_evictions(evictions)
        return int(n), redundant

    def insert_tokens(self, tokens: Any, block_ids: Any, *, salt: bytes | None = None, extra: bytes | None = None,
                      owner: int = 0, priority: int = 0) -> tuple[int, npt.NDArray[np.int32], Digests]:
        """Hash + insert of the first ``len(block_ids)`` full blocks of ``tokens`` in one call.

        Returns (newly inserted, redundant positions, the digests of those blocks).
        """
        owner, priority = integer("owner", owner), _int64_arg("priority", priority)
        evictions = self._evictions_so_far()
        n, redundant, digests = self._native.insert_tokens(tokens, block_ids, salt=salt, extra=extra, owner=owner,
                                                           priority=priority)
        self._observe_evictions(evictions)
        return int(n), redundant, digests

    def evict(self, num_blocks: int) -> int:
        """Evicts up to ``num_blocks`` unreferenced leaves by the policy; returns how many went."""
        # "Up to": a count past what any cache holds evicts everything it can.
        num_blocks = positive_int("num_blocks", num_blocks, allow_zero=True)
        evicted = int(self._native.evict(min(num_blocks, _INT32_MAX)))
        if self._observer is not None:
            self._observer.evicted(evicted)
        return evicted

    def _evictions_so_far(self) -> int:
        # Capacity evictions happen inside insert; with an observer, count them by the stats delta.
        return 0 if self._observer is None else int(self._native.stats()["evictions"])

    def _observe_evictions(self, before: int) -> None:
        if self._observer is not None:
            self._observer.evicted(int(self._native.stats()["evictions"]) - before)

    def invalidate(self, owner: int) -> int:
        """Removes the unreferenced nodes inserted with ``owner``; returns how many."""
        return int(self._native.invalidate(integer("owner", owner)))

    def clear(self) -> int:
        return int(self._native.clear())

    def drain_events(self) -> list[dict[str, Any]]:
        """Stored / removed / cleared events since the last drain (vLLM KV-event shapes).

        A stored event of blocks inserted with a tenant salt carries it as ``cache_salt`` (bytes; a
        str salt as its UTF-8 bytes), whoever inserted them: this cache, or a
        :class:`~sagellm_kv_cache.manager.RequestManager` publishing into it. When events were
        dropped since the last drain (more than ``event_queue_capacity`` queued), the first is
        ``{"type": "cleared", "events_lost": True}``: the cache keeps its blocks, but a router must
        forget its view there (it missed changes), then apply the events that follow.
        """
        return list(self._native.drain_events())

    def stats(self) -> dict[str, Any]:
        return dict(self._native.stats())

    def contains(self, digest: Any) -> bool:
        return bool(self._native.contains(digest))

    def cached_block_ids(self) -> npt.NDArray[np.int32]:
        return self._native.cached_block_ids()

    @property
    def capacity_blocks(self) -> int | None:
        cap = self._native.capacity
        return None if cap is None else int(cap)

    @property
    def policy(self) -> str:
        return str(self._native.policy)

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return (f"RadixPrefixCache(block_size={self.block_size}, capacity_blocks={self.capacity_blocks}, "
                f"policy={self.policy!r}, cached={len(self)})")


def _key_digest(key: Any) -> bytes:
    """The seed accepts any bytes as a block key; the trie wants 32-byte digests."""
    if isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key)
        return raw if len(raw) == 32 else hashlib.sha256(b"sagellm-kv seed key\0" + raw).digest()
    if isinstance(key, np.ndarray) and key.dtype == np.uint8 and key.size == 32:
        return key.tobytes()
    if isinstance(key, str):
        return hashlib.sha256(b"sagellm-kv seed str\0" + key.encode()).digest()
    raise TypeError(f"block hash must be bytes, got {type(key).__name__}")


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _big_endian_u32(tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    """Token ids as the seed hashes them; ids outside [0, 2**32) have no such form."""
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFFFFFF):
        bad = int(tokens[(tokens < 0) | (tokens > 0xFFFFFFFF)][0])
        raise ValueError(f"token id {bad} is out of range [0, 2**32)")
    return tokens.astype(">u4")


class PrefixCache:
    """The seed's block-hash prefix cache, backed by the C++ trie.

    Block keys are the seed's: ``compute_block_hash`` is SHA-256 of one block's token ids as 4-byte
    big-endian integers, which is also what the sageLLM engine computes by itself for its lookups,
    so keys from either side meet. Such keys do not depend on the blocks before them; ``insert`` and
    ``lookup`` chain them (position 0 first) before they reach the trie, so a block is served only
    under the prefix it was cached with (the original served it under any prefix). Both take the
    keys of a prompt from its first block on.

    Blocks are the caller's dicts (``{"block_id": ..., "handle_id": ...}``) and come back from
    ``lookup`` as the same objects. Hits and misses count ``lookup`` calls. With ``enable_lru=False``
    ``evict_by_count`` is refused, as in the seed, and a full cache evicts in insertion order (the
    seed ignored ``max_cached_blocks`` without LRU and grew without bound).

    Thread-safe: one lock serialises the calls. The cache lets go of the objects it drops (evicted,
    replaced, cleared) only after releasing that lock, so their finalisers may use the cache. Code
    that runs inside a call on the same thread (a finaliser the garbage collector runs there, a
    signal handler, a ``handle_id``'s ``__eq__``) and calls the cache again gets a RuntimeError
    instead of a deadlock.
    """

    def __init__(self, block_size: int = 16, max_cached_blocks: int | None = None, enable_lru: bool = True) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size!r}")
        if block_size > _INT32_MAX:  # the native trie's limit
            raise ValueError(f"block_size must be at most {_INT32_MAX}, got {shown(block_size)}")
        if max_cached_blocks is not None and (
            isinstance(max_cached_blocks, bool) or not isinstance(max_cached_blocks, int) or max_cached_blocks <= 0
        ):
            raise ValueError(f"max_cached_blocks must be a positive int or None, got {max_cached_blocks!r}")
        self.block_size = block_size
        self.max_cached_blocks = max_cached_blocks
        self.enable_lru = bool(enable_lru)
        # Block ids are synthetic: self._blocks[id] is the caller's object cached under `id` (None: no
        # entry), so lookups map ids to objects by index. A bounded cache takes its ids from an id
        # allocator of twice its capacity that the trie references: an evicted block's id returns
        # there and is reused, overwriting the stale object, so no sweep is ever needed; one insert
        # still finds free ids for up to `capacity` new blocks (the trie evicts to make room). An
        # unbounded cache counts ids up and, once removed entries pile up, sweeps their ids into
        # self._free_ids for reuse, so its table stays near its peak size (see _forget_evicted).
        # A very large bound (above _ALLOCATOR_MAX_BLOCKS) takes the unbounded scheme, its capacity
        # enforced by the trie alone (no capacity at all past the most ids there can be).
        self._ids: _core.BlockAllocator | None = None
        if max_cached_blocks is not None and max_cached_blocks <= _ALLOCATOR_MAX_BLOCKS:
            self._ids = _core.BlockAllocator(2 * max_cached_blocks)
        capacity = max_cached_blocks if max_cached_blocks is not None and max_cached_blocks <= _MAX_ID else None
        self._trie = _core.PrefixCache(block_size=block_size, capacity_blocks=capacity,
                                       policy="lru" if self.enable_lru else "fifo", allocator=self._ids)
        # Reentrant, so that this thread's nested call (see _refuse_nested) never waits for itself; _busy
        # marks a call in progress (read and written by the lock's holder only).
        self._lock = threading.RLock()
        self._busy = False
        self._blocks: list[dict | None] = []
        self._next_id = 0  # the next never-used synthetic id of an unbounded cache (see _take_ids)
        self._free_ids: list[int] = []  # swept ids of an unbounded cache, to reuse first
        # handle_id -> the trie's owner number. Entries whose blocks have all left the cache are
        # dropped once they outnumber the cached blocks (see _forget_owners); numbers never repeat.
        self._owners: dict[Any, int] = {}
        self._owner_numbers = itertools.count(1)
        self._empty_lookups = 0  # the seed counts a lookup of no blocks as a miss; the trie never sees it
        self._invalidated = 0  # blocks invalidate() removed: the seed counts them in evict_count
        self._last_chain: tuple[bytes, bytes] | None = None  # see _chain: (keys, digests), concatenated
        # The last lookup's digests, match length and the trie generation it saw: an insert of the
        # same digests right after it (no change to the trie since) knows its cached prefix without
        # walking the trie again. Every change of the trie's contents bumps the generation.
        self._generation = 0
        self._last_match: tuple[bytes, int, int] | None = None

    # --- hashing ----------------------------------------------------------------------------

    def _tokens(self, tokens: Sequence[int]) -> npt.NDArray[np.int64]:
        arr = array_of("tokens", tokens)
        if arr.size == 0:
            return np.empty(0, dtype=np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must be a flat sequence of ints, got {arr.dtype} with shape {arr.shape}")
        if arr.dtype == np.uint64 and int(arr.max()) > 0xFFFFFFFF:  # before int64 would wrap it negative
            raise ValueError(f"token id {int(arr[arr > 0xFFFFFFFF][0])} is out of range [0, 2**32)")
        return arr.astype(np.int64, copy=False)

    def compute_block_hash(self, tokens: Sequence[int], block_size: int | None = None) -> BlockHash:
        """Key of one full block: SHA-256 of its token ids as 4-byte big-endian unsigned integers."""
        size = self.block_size if block_size is None else plain(block_size)
        # Compared with the token count below (a float equal to it passes, as in the original); an
        # object whose comparison is no bool (a tensor) would raise from inside that comparison.
        if isinstance(size, bool) or not isinstance(size, int | float):
            raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
        if (tokens.__class__ is list or tokens.__class__ is tuple) and tokens:
            # compute_block_hashes' reader, so that both take and refuse the same items (a bool, a
            # numpy scalar: TypeError naming its position).
            if len(tokens) != size:
                raise ValueError(f"Token count {len(tokens)} doesn't match block_size {size}")
            return _core.sha256_chunks(tokens, 4 * len(tokens))[0]
        arr = self._tokens(tokens)
        if len(arr) != size:
            raise ValueError(f"Token count {len(arr)} doesn't match block_size {size}")
        return hashlib.sha256(_big_endian_u32(arr).tobytes()).digest()

    def compute_block_hashes(self, tokens: Sequence[int], block_size: int | None = None) -> list[BlockHash]:
        """Keys of the full blocks of ``tokens`` (a trailing partial block is skipped)."""
        size = self.block_size if block_size is None else block_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"block_size must be a positive int, got {size!r}")
        if size > _INT32_MAX:  # as the constructor; 4 * size bytes per block must fit the native int64
            raise ValueError(f"block_size must be at most {_INT32_MAX}, got {shown(size)}")
        if tokens.__class__ is list or tokens.__class__ is tuple:
            # Packed as 4-byte big-endian (and range-checked) inside the one C++ call, which skips a
            # trailing partial block itself: no slice of the caller's list (a finaliser run by the
            # slice's allocation could empty the list, and CPython would then read its freed items).
            return _core.sha256_chunks(tokens, 4 * size, True)
        arr = self._tokens(tokens)
        return _core.sha256_chunks(_big_endian_u32(arr[: len(arr) - len(arr) % size]).tobytes(), 4 * size)

    # --- lookup / insert --------------------------------------------------------------------

    def _chain(self, block_hashes: Sequence[BlockHash]) -> bytes:
        """The trie digests of a prompt's seed keys, position 0 first, concatenated: key 0 as is, then
        the SHA-256 compression of ``digest[i-1] || key[i]`` (one C++ call), so a block is found only
        under the prefix it was cached with. The last result is kept: a caller's insert usually follows
        its lookup of the same keys (equal bytes, compared in C++), and then gets the same object."""
        keys = block_hashes if block_hashes.__class__ is list or block_hashes.__class__ is tuple \
            else tuple(block_hashes)
        try:  # 32-byte bytes objects, as compute_block_hashes makes them
            pair = _core.sha256_chain_cached(keys, self._last_chain)
        except (TypeError, ValueError):
            # Other keys (may raise TypeError). Not kept: a mutable key (bytearray) could change.
            return _core.sha256_chain(b"".join(map(_key_digest, keys)))
        self._last_chain = pair  # one store: threads see the old or the new pair
        return pair[1]

    def lookup(self, block_hashes: Sequence[BlockHash]) -> tuple[list[dict], int]:
        """Longest cached prefix: (its block dicts, number of tokens they cover)."""
        # Read once, and never tested for truth: an array of keys (a tensor) has no truth value.
        if block_hashes.__class__ is list or block_hashes.__class__ is tuple:
            keys: Sequence[BlockHash] = block_hashes
        elif block_hashes is None:  # the original raised TypeError ('NoneType' object is not iterable) too
            raise TypeError("block_hashes must be a sequence of block hashes, got None")
        else:
            keys = tuple(block_hashes)
        if not keys:
            with self._lock:  # see _refuse_nested
                if self._busy:
                    self._refuse_nested()
                self._busy = True
                try:
                    self._empty_lookups += 1
                finally:
                    self._busy = False
            return [], 0
        digests = self._chain(keys)
        with self._lock:  # see _refuse_nested
            if self._busy:
                self._refuse_nested()
            self._busy = True
            try:
                n, blocks = self._trie.probe(digests, self._blocks)
                self._last_match = (digests, n, self._generation)
            finally:
                self._busy = False
        return blocks, n * self.block_size

    def _refuse_nested(self) -> None:
        """This thread holds the lock and a call is in progress on it: the caller is nested inside
        that call (a finaliser, a signal handler, a handle_id's ``__eq__``). Refuses, rather than
        waiting for itself; the caller's ``with`` undoes its acquire.

        Every call takes the lock as ``with self._lock:``, then ``if self._busy: refuse``, then
        ``self._busy = True`` and a ``try`` whose ``finally`` clears it, written out in each method.
        Nothing between the acquire and the ``try`` checks for pending signals (``BEFORE_WITH`` does
        not, and neither do the attribute loads and stores), so a KeyboardInterrupt from a signal
        handler is raised before the acquire or inside the ``try``, never with the lock held and no
        ``finally`` to release it: ``lock.acquire()`` followed by ``try`` would leave it held when
        the interrupt lands at the end of the acquire call, as would an ``_acquire()`` helper method.
        A nested call that lands between the acquire and ``_busy = True`` (a finaliser run by the
        store) runs whole: the outer call has not started."""
        raise RuntimeError("PrefixCache was called again on a thread inside one of its calls (by a finaliser, "
                           "a signal handler or a handle_id's __eq__ run during that call); call it once that "
                           "call returns")

    def insert(self, block_hashes: Sequence[BlockHash], blocks: Sequence[dict]) -> None:
        """Caches ``blocks`` under the chained ``block_hashes`` (same length; a chain from the root)."""
        if len(block_hashes) != len(blocks):
            raise ValueError(f"block_hashes length {len(block_hashes)} != blocks length {len(blocks)}")
        if not blocks:
            return
        # One list of the objects, held until the lock is released (a sequence may make them anew).
        objects: list[Any] = blocks if blocks.__class__ is list else list(blocks)
        if len(objects) != len(block_hashes):
            raise ValueError(f"blocks yielded {len(objects)} items but has length {len(block_hashes)}")
        digests = self._chain(block_hashes)
        dropped: list[Any] = []  # objects the table lets go of: released after the lock (see the class doc)
        with self._lock:  # see _refuse_nested
            if self._busy:
                self._refuse_nested()
            self._busy = True
            try:
                # The leading blocks already cached keep their dicts; only the rest get ids and entries.
                last = self._last_match
                if last is not None and last[0] is digests and last[2] == self._generation:
                    start = last[1]
                else:
                    start, _ = self._trie.peek(digests)
                if start < len(objects):
                    self._insert_locked(digests, start, objects, dropped)
                elif len(objects) != len(digests) >> 5:  # emptied since the check above (a finaliser, a thread)
                    raise ValueError(f"blocks changed length during insert: {len(objects)} items for "
                                     f"{len(digests) >> 5} block hashes")
            finally:
                self._busy = False

    def _insert_locked(self, digests: bytes, start: int, blocks: list[Any], dropped: list[Any]) -> None:
        self._generation += 1
        # Anonymous blocks (no handle_id), the common case: ids, insert and table in one C++ call.
        need = len(blocks) - start
        if self._ids is not None:
            ids: Any = None  # the trie's allocator gives them
        elif not self._free_ids and self._next_id + need <= _MAX_ID:
            ids = self._next_id  # a run of never-used ids
        else:
            ids = self._take_ids(need, dropped)
        done = self._trie.insert_objects(digests, start, blocks, self._blocks, ids, dropped)
        if done is not None:
            if isinstance(ids, int):
                self._next_id += done[1]
            self._forget_evicted(dropped)
            return
        if isinstance(ids, np.ndarray):
            self._free_ids.extend(ids.tolist())  # not used: an owner key sends them to the path below
        # The new blocks only (position i is owned[i - first]), copied: the trie calls below release
        # the GIL, and the caller's list must not change under them. The leading cached blocks are not
        # stored, so only the new ones must be dicts.
        first, n = start, len(digests) // 32
        owned = blocks[first:]
        if len(owned) != n - first:
            raise ValueError(f"blocks changed length during insert: {first + len(owned)} items for {n} block hashes")
        rows = np.frombuffer(digests, dtype=np.uint8).reshape(n, 32)
        try:  # dict.get refuses anything but a dict: the type check comes with the owner keys
            owner_keys = list(map(dict.get, owned, itertools.repeat("handle_id")))
        except TypeError:
            bad = next(i for i, block in enumerate(owned) if not isinstance(block, dict))
            raise TypeError(f"blocks[{first + bad}] must be a dict, got {type(owned[bad]).__name__}") from None
        # Every owner's number before anything changes: an unhashable handle_id fails here.
        try:
            owners = [0 if key is None else self._owner_number(key) for key in owner_keys]
        except TypeError:
            bad = next(i for i, key in enumerate(owner_keys) if key is not None and not _hashable(key))
            raise TypeError(f"blocks[{first + bad}]['handle_id'] must be hashable, got "
                            f"{type(owner_keys[bad]).__name__}") from None
        while start < n:
            # The trie records one owner per insert call: cut the chain where the owner changes.
            owner = owners[start - first]
            end = start + 1
            while end < n and owners[end - first] == owner:
                end += 1
            ids = self._take_ids(end - start, dropped)
            try:
                inserted, _ = self._trie.insert(rows[start : start + len(ids)], ids,
                                                parent=rows[start - 1] if start else None, owner=owner)
            finally:
                if self._ids is not None:
                    self._ids.free(ids)  # the trie holds its own reference on the blocks it kept
            # A full cache may take only the leading blocks that fit.
            table = self._blocks
            for block_id, block in zip(ids[:inserted].tolist(), owned[start - first : start - first + inserted],
                                       strict=True):
                if block_id >= len(table):
                    table.extend([None] * (block_id + 1 - len(table)))
                dropped.append(table[block_id])
                table[block_id] = block
            if inserted < end - start:
                break
            start = end
        self._forget_owners(dropped)
        self._forget_evicted(dropped)

    def _owner_number(self, key: Any) -> int:
        number = self._owners.get(key)
        if number is None:
            number = self._owners[key] = next(self._owner_numbers)
        return number

    def _forget_owners(self, dropped: list[Any]) -> None:
        # Each cached block has at most one owner, so entries beyond the cached blocks are mostly
        # owners whose blocks were evicted: keep those the trie still holds (amortised O(1) per insert).
        if len(self._owners) <= 2 * len(self._trie) + 64:
            return
        live = set(self._trie.cached_owners())
        dropped.append(self._owners)
        self._owners = {key: number for key, number in self._owners.items() if number in live}

    def _take_ids(self, n: int, dropped: list[Any]) -> npt.NDArray[np.int32]:
        """Fresh synthetic block ids (fewer than ``n`` only when a bounded cache has no more).

        Unbounded: swept ids first, then never-used ones counting up. An id the caller does not end
        up caching is not lost: it is not in the trie, so a sweep takes it back once the table
        reaches past it.
        """
        if self._ids is not None:
            return self._ids.allocate(min(n, int(self._ids.num_available)))
        if len(self._free_ids) < n and self._next_id + n - len(self._free_ids) > _MAX_ID:
            self._forget_evicted(dropped, force=True)
            if self._next_id + n - len(self._free_ids) > _MAX_ID:
                raise KVPoolFullError(_MAX_ID, context={"cached_blocks": len(self._trie), "requested": n})
        reused = self._free_ids[-n:] if n else []
        del self._free_ids[len(self._free_ids) - len(reused):]
        fresh = n - len(reused)
        self._next_id += fresh
        return np.asarray(reused + list(range(self._next_id - fresh, self._next_id)), dtype=np.int32)

    def _forget_evicted(self, dropped: list[Any], force: bool = False) -> None:
        # Evictions happen inside C++. An unbounded cache drops the objects of removed blocks once
        # stale entries dominate its table and keeps their ids for reuse; every id below the table's
        # length that is neither cached nor already free is stale (including ids taken for blocks
        # that were never cached). A bounded cache reuses its ids through the allocator instead.
        # The objects go to `dropped`, which the caller releases after the lock.
        if self._ids is not None:
            return
        held = len(self._blocks) - len(self._free_ids)
        if not force and held <= 2 * len(self._trie) + 64:
            return
        taken = np.zeros(len(self._blocks), dtype=bool)
        live = self._trie.cached_block_ids()
        taken[live[live < len(taken)]] = True
        taken[self._free_ids] = True
        stale = np.flatnonzero(~taken).tolist()
        table = self._blocks
        for block_id in stale:
            dropped.append(table[block_id])
            table[block_id] = None
        self._free_ids.extend(stale)

    # --- eviction / invalidation ------------------------------------------------------------

    def evict_by_count(self, num_blocks: int) -> int:
        if not self.enable_lru:
            raise RuntimeError("LRU eviction not enabled (this cache was created with enable_lru=False)")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        dropped: list[Any] = []
        with self._lock:  # see _refuse_nested
            if self._busy:
                self._refuse_nested()
            self._busy = True
            try:
                evicted = int(self._trie.evict(min(num_blocks, _MAX_ID)))  # the trie holds fewer than that
                self._generation += 1
                self._forget_evicted(dropped)
            finally:
                self._busy = False
        return evicted

    def invalidate(self, handle_id: uuid.UUID) -> int:
        """Removes every cached block inserted with this ``handle_id``; returns how many."""
        dropped: list[Any] = []
        with self._lock:  # see _refuse_nested
            if self._busy:
                self._refuse_nested()
            self._busy = True
            try:
                owner = self._owners.get(handle_id)
                if owner is None:
                    return 0
                removed = int(self._trie.invalidate(owner))
                self._invalidated += removed
                self._generation += 1
                self._forget_evicted(dropped)
            finally:
                self._busy = False
        return removed

    def clear(self) -> None:
        with self._lock:  # see _refuse_nested
            if self._busy:
                self._refuse_nested()
            self._busy = True
            try:
                self._trie.clear()
                self._generation += 1
                dropped = (self._blocks, self._owners)  # let go of after the lock (see the class doc)
                self._blocks = []
                self._free_ids.clear()
                self._next_id = 0  # no id is referenced any more
                self._owners = {}
            finally:
                self._busy = False
        del dropped

    # --- stats ------------------------------------------------------------------------------

    def get_stats(self) -> dict:
        """The seed's counters: hits and misses per ``lookup`` call, inserted and evicted blocks
        (``evict_count`` includes the blocks :meth:`invalidate` removed, as in the seed).

        Counters survive :meth:`clear`, as in the seed. ``query_count`` (lookups, hits plus misses) is
        ours: the sageLLM engine's ``RuntimeStats`` divides ``hit_count`` by it, and reported a hit rate
        of 0.0 on the seed, which has no such key.
        """
        s = self._trie.stats()
        hits = int(s["hit_lookups"])
        misses = int(s["lookups"]) - hits + self._empty_lookups
        return {
            "num_entries": len(self._trie),
            "num_blocks": int(s["cached_blocks"]),
            "hit_count": hits,
            "miss_count": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "query_count": hits + misses,
            "insert_count": int(s["inserts"]),
            "evict_count": int(s["evictions"]) + self._invalidated,
            "block_size": self.block_size,
            "max_cached_blocks": self.max_cached_blocks,
            "enable_lru": self.enable_lru,
        }

    def __len__(self) -> int:
        return len(self._trie)

    def __repr__(self) -> str:
        stats = self.get_stats()
        parts = [f"block_size={self.block_size}"]
        if self.max_cached_blocks is not None:
            parts.append(f"max={self.max_cached_blocks}")
        if self.enable_lru:
            parts.append("lru=True")
        parts += [f"entries={stats['num_entries']}", f"blocks={stats['num_blocks']}",
                  f"hit_rate={stats['hit_rate']:.2%}"]
        return f"PrefixCache({', '.join(parts)})"
