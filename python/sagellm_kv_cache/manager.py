"""Request-level KV bookkeeping in one native call per scheduler step: :class:`RequestManager`.

The role of vLLM's ``KVCacheManager`` (or SGLang's ``RadixCache`` plus its allocator), owned by the
C++ core (``cpp/include/sagellm_kv/request_manager.hpp``). Per request it keeps the token count, the
block table and the chained digests of its full blocks:

- :meth:`RequestManager.admit` hashes the prompt's full blocks, takes the longest cached prefix,
  allocates the rest and publishes the prompt's full blocks (all or nothing under the budget);
- :meth:`RequestManager.append` / :meth:`~RequestManager.append_decode` add tokens of running
  requests, allocating a block when one fills and publishing each block that becomes full;
- :meth:`RequestManager.finish` / :meth:`~RequestManager.abort` / :meth:`~RequestManager.preempt`
  release them (published blocks stay cached until evicted; a preempted request is resumed by
  admitting it again with all its tokens).

Token ids are taken as the caller holds them: lists or tuples of ints, ``array.array``, numpy
arrays, torch CPU tensors; no intermediate numpy array is built. Request ids are ints in
``[0, 2**64)``. Block ids come back as ``np.int32`` arrays. Running blocks are never evicted; when
the pool is short the manager evicts unused cached blocks to make room, and evicts none when even
all of them would not make enough (such a refusal leaves the cache as it was). A refusal raises
:class:`~sagellm_kv_cache.errors.KVPoolFullError` (a ``MemoryError``) naming the request that did
not fit, and changes no request. Bad input raises ``TypeError`` / ``ValueError`` (unknown request
ids: :class:`~sagellm_kv_cache.errors.KVConfigInvalidError`, a ``ValueError``) and changes nothing.

Thread-safe: one internal mutex serialises the calls; prompt hashing runs outside it with the GIL
released, so admits from several threads hash in parallel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from sagellm_kv_cache import _core
from sagellm_kv_cache._numbers import flag, text
from sagellm_kv_cache.paged import PagedKVPool, _int64_arg

__all__ = ["RequestManager"]

Int32Array = npt.NDArray[np.int32]


class RequestManager:
    """Native per-request KV manager over a :class:`PagedKVPool` (or a bare id allocator).

    >>> from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    >>> pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16), 64)
    >>> rm = RequestManager(pool)
    >>> cached, table = rm.admit(1, list(range(40)))
    >>> cached, len(table)
    (0, 3)
    >>> rm.finish(1)

    ``cache`` shares an existing :class:`~sagellm_kv_cache.prefix_cache.RadixPrefixCache` (it must
    use the same pool); otherwise the manager makes its own from ``capacity_blocks``, ``policy``,
    ``hash_algorithm`` and ``event_queue_capacity``. ``enable_caching=False`` keeps block tables only
    (nothing is hashed). ``match_last_token=False`` (default, as vLLM) stops a prompt's match one
    token short of its end so at least one token is always computed.
    """

    def __init__(
        self,
        pool: PagedKVPool | None = None,
        *,
        num_blocks: int | None = None,
        block_size: int | None = None,
        cache: Any = None,
        enable_caching: bool = True,
        capacity_blocks: int | None = None,
        policy: str = "lru",
        hash_algorithm: str = "sha256",
        event_queue_capacity: int = 0,
        match_last_token: bool = False,
    ) -> None:
        if pool is not None and not isinstance(pool, PagedKVPool):
            raise TypeError(f"pool must be a PagedKVPool or None, got {type(pool).__name__}")
        num_blocks = None if num_blocks is None else _int64_arg("num_blocks", num_blocks)
        block_size = None if block_size is None else _int64_arg("block_size", block_size)
        capacity_blocks = None if capacity_blocks is None else _int64_arg("capacity_blocks", capacity_blocks)
        event_queue_capacity = _int64_arg("event_queue_capacity", event_queue_capacity)
        enable_caching = flag("enable_caching", enable_caching)
        match_last_token = flag("match_last_token", match_last_token)
        policy = text("policy", policy)
        hash_algorithm = text("hash_algorithm", hash_algorithm)
        if pool is None:
            if num_blocks is None:
                raise ValueError("give a pool, or num_blocks for a metadata-only manager")
            self._allocator: Any = _core.BlockAllocator(num_blocks)
            bs = 16 if block_size is None else block_size
        else:
            self._allocator = pool._native
            bs = pool.spec.block_size if block_size is None else block_size
            if bs != pool.spec.block_size:
                raise ValueError(f"block_size {bs} differs from the pool's block_size {pool.spec.block_size}")
        self.pool = pool
        native_cache = None
        if cache is not None:
            native_cache = getattr(cache, "_native", cache)
            if not isinstance(native_cache, _core.PrefixCache):
                raise TypeError(f"cache must be a RadixPrefixCache or None, got {type(cache).__name__}")
        elif enable_caching:
            native_cache = _core.PrefixCache(
                block_size=bs,
                capacity_blocks=capacity_blocks,
                policy=policy,
                allocator=self._allocator,
                event_queue_capacity=event_queue_capacity,
                hash_algorithm=hash_algorithm,
            )
        self._cache = native_cache
        self._native = _core.RequestManager(
            self._allocator, native_cache, block_size=bs, hash_algorithm=hash_algorithm,
            match_last_token=match_last_token,
        )
        self.block_size = int(self._native.block_size)

    # --- admission --------------------------------------------------------------------------

    def admit(self, request_id: int, tokens: Any, *, salt: bytes | str | None = None,
              extra: bytes | str | None = None) -> tuple[int, Int32Array]:
        """Admits one request: ``(num_cached_tokens, block_table)``. ``KVPoolFullError`` when short."""
        return self._native.admit(request_id, tokens, salt, extra)

    def admit_batch(self, request_ids: Any, tokens: Any, *, salt: bytes | str | None = None,
                    extra: bytes | str | None = None) -> tuple[Int32Array, Int32Array, npt.NDArray[np.int64]]:
        """Admits all of ``request_ids`` (``tokens[i]`` each) or none.

        Returns ``(num_cached_tokens[n], block_tables, offsets[n + 1])``: request i's table is
        ``block_tables[offsets[i]:offsets[i + 1]]``. Requests of one batch do not share the blocks
        they introduce (the next batch does).
        """
        return self._native.admit_batch(request_ids, tokens, salt, extra)

    def reserve(self, request_id: int, num_tokens: int) -> Int32Array:
        """Admits a request by token count only (ids unknown: nothing is hashed, matched or shared).

        The handle-style allocation of the seed ``KVPool.alloc``; returns the block table.
        """
        return self._native.reserve(request_id, _int64_arg("num_tokens", num_tokens))

    # --- running requests -------------------------------------------------------------------

    def append(self, request_id: int, tokens: Any) -> Int32Array:
        """Adds tokens to a running request; returns the ids of the blocks it gained."""
        return self._native.append(request_id, tokens)

    def append_batch(self, request_ids: Any, tokens: Any) -> tuple[Int32Array, Int32Array]:
        """Adds ``tokens[i]`` to ``request_ids[i]``, all or nothing: ``(new_block_counts, new_block_ids)``."""
        return self._native.append_batch(request_ids, tokens)

    def append_decode(self, request_ids: Any, tokens: Any, out: Int32Array | None = None) -> Int32Array:
        """A decode step: one token per request, all or nothing.

        Returns, per request, the block it gained or -1; pass ``out`` (int32, one per request) to
        reuse a buffer.
        """
        return self._native.append_decode(request_ids, tokens, out)

    # --- ending -----------------------------------------------------------------------------

    def finish(self, request_ids: Any) -> None:
        """Ends one request (an int) or several; their published blocks stay cached."""
        self._native.finish(request_ids)

    def abort(self, request_ids: Any) -> None:
        """As :meth:`finish`, counted as aborted."""
        self._native.abort(request_ids)

    def preempt(self, request_ids: Any) -> int:
        """Releases the requests; resume one by admitting all its tokens. Returns the tokens they held."""
        return int(self._native.preempt(request_ids))

    # --- queries ----------------------------------------------------------------------------

    def block_table(self, request_id: int) -> Int32Array:
        return self._native.block_table(request_id)

    def block_tables(self, request_ids: Any, out: Int32Array | None = None, width: int | None = None) -> Int32Array:
        """Block tables as rows of a 2-D int32 array padded with -1.

        Into ``out`` when given: its first ``len(request_ids)`` rows are written, the rest are left as
        they are, and its columns are the width (a ``width`` that differs is a ValueError).
        """
        return self._native.block_tables(request_ids, out, None if width is None else _int64_arg("width", width))

    def num_tokens(self, request_id: int) -> int:
        return int(self._native.num_tokens(request_id))

    def running(self) -> list[int]:
        return list(self._native.running())

    def __contains__(self, request_id: object) -> bool:
        return bool(self._native.__contains__(request_id))

    def __len__(self) -> int:
        return len(self._native)

    @property
    def num_free_blocks(self) -> int:
        """Blocks the allocator can hand out now (unused cached blocks come on top, by eviction)."""
        return int(self._allocator.num_available if self.pool is None else self._allocator.num_free_blocks)

    @property
    def hash_algorithm(self) -> str:
        return str(self._native.hash_algorithm)

    def stats(self) -> dict[str, Any]:
        """Manager counters, plus the prefix cache's under ``"cache"`` when caching is on."""
        s: dict[str, Any] = dict(self._native.stats())
        if self._cache is not None:
            s["cache"] = self._cache.stats()
        return s

    def check_invariants(self) -> None:
        """Raises ``KVCacheError`` naming the first broken internal invariant; for tests."""
        self._native.check_invariants()
        if self._cache is not None:
            self._cache.check_invariants()

    def __repr__(self) -> str:
        return (f"RequestManager(block_size={self.block_size}, running={len(self)}, "
                f"caching={self._cache is not None}, hash_algorithm={self.hash_algorithm!r})")
