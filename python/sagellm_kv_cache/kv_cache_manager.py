"""``KVCacheManager``: the seed's one-stop manager (pool + prefix reuse + eviction + metrics).

It is a composition of the parts that already exist, so each keeps its own guarantees:

* a :class:`~sagellm_kv_cache.pool.kv_pool.KVPool` holds the token budget and gives every handle
  its real block ids from the lock-free C++ allocator;
* a metadata-only :class:`~sagellm_kv_cache.prefix_cache.RadixPrefixCache` (the C++ digest trie)
  indexes registered prefixes. Its nodes carry the *handle's own block ids*: block ``i`` of a
  registered prefix is ``handle.block_ids[i]``, so a match answers "which physical blocks already
  hold this prefix" directly, and :meth:`KVCacheManager.get_reused_blocks` returns ids an engine
  can put in a block table. Every node is tagged with its handle's owner number, so freeing (or
  evicting) a handle drops its entries with one ``invalidate`` call;
* an :class:`~sagellm_kv_cache.eviction.EvictionManager` orders unpinned handles when an
  allocation would exceed the budget.

Prefix granularity is the full block: a prompt's trailing partial block is neither registered nor
matched. Where two handles register the same leading blocks, the first registration keeps them
(the trie stores one block per digest); the later handle's extra blocks chain from them. Freeing a
handle removes its nodes *and everything chained below them* (their KV was computed on top of
the freed blocks' content, so the chain would be unreachable anyway).

Eviction happens in rounds of at most ``max_evict_handles_per_round`` handles, one round per
allocation: the victims are chosen first and only freed when together they make room, so a failed
allocation evicts nothing. Pinned handles (``pin``) are never victims.

A reset of the pool made directly (``manager.pool.reset()``) drops handles behind the manager's
back; the manager notices it (the pool's ``generation`` moved) at its next call, forgets those
handles and their prefixes, and bumps its own :attr:`KVCacheManager.generation` in turn.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sagellm_protocol.kv import DType, EvictionPolicy, KVBlockState, Layout

from sagellm_kv_cache._numbers import array_of
from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVConfigInvalidError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVInvalidHandleError,
    KVPrefixTooLongError,
    KVRefCountUnderflowError,
)
from sagellm_kv_cache.eviction import EvictionManager, PriorityEviction
from sagellm_kv_cache.models.kv_handle import KVHandle
from sagellm_kv_cache.observability.hooks import MetricsHook
from sagellm_kv_cache.observability.metrics import MetricsCollector
from sagellm_kv_cache.pool.kv_pool import KVPool, parse_device
from sagellm_kv_cache.prefix.index import PrefixIndex
from sagellm_kv_cache.prefix_cache import RadixPrefixCache

if TYPE_CHECKING:
    from sagellm_kv_cache.profiling.access_stats import AccessStatsCollector

__all__ = ["Block", "KVCacheManager"]

# How many evicted handle ids to remember, so a late free() of one says "evicted" rather than
# "double free". Bounded: a long-running manager must not grow without limit.
_EVICTED_MEMORY = 4096
_EVICTED_REASON = "it was evicted to make room for a later allocation"


@dataclass(frozen=True)
class Block:
    """One reusable KV block: its id in the manager's pool and the handle that owns it.

    ``size_bytes`` is ``block_size * bytes_per_token`` (the seed's ``Block`` carried its size too).
    """

    block_id: int
    handle_id: uuid.UUID
    size_bytes: int


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise KVConfigInvalidError(name, value, reason=f"must be >= {minimum}")
    return int(value)


def _token_array(name: str, tokens: object) -> npt.NDArray[np.int64]:
    """Token ids as a 1-D int64 array, or a TypeError/ValueError naming what was wrong."""
    if isinstance(tokens, str | bytes | bytearray) or tokens is None:
        raise TypeError(f"{name} must be a sequence of token ids, got {type(tokens).__name__}")
    if isinstance(tokens, Iterator):  # a generator of ids (the original took any iterable): read it once
        tokens = list(tokens)
    arr = array_of(name, tokens, "a flat sequence of token ids")
    if arr.ndim == 0:  # a scalar, or a set or dict (no order of tokens)
        raise TypeError(f"{name} must be a sequence of token ids, got {type(tokens).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds a token id above the int64 range")
    return arr.astype(np.int64, copy=False)


class KVCacheManager:
    """Token-budgeted KV handles with prefix reuse and automatic eviction (the seed's manager).

    Thread-safe: one lock serialises the manager's own bookkeeping; the pool and trie below are
    thread-safe on their own.

    ``metrics_collector`` (optional) receives the :class:`MetricsHook` counters: ``alloc_count``,
    ``free_count``, ``evict_count``/``evicted_handles``, ``prefix_hits``/``prefix_misses`` and their
    token and block counts. ``access_stats`` (optional) records every queried block as a hit or a
    miss (block id = the first 16 hex digits of its digest). ``logger`` gets one debug line per
    state change.

    ``prefix_index`` (the original's attribute) is a token-level
    :class:`~sagellm_kv_cache.prefix.index.PrefixIndex`: every registered prefix, exactly as given
    (partial blocks too), maps to ``str(handle_id)`` of its handle until that handle is freed or
    evicted. Matching itself goes through the block trie.
    """

    def __init__(
        self,
        max_tokens: int,
        block_size: int = 128,
        *,
        bytes_per_token: int = 32,
        eviction_policy: EvictionPolicy = EvictionPolicy.LRU,
        max_evict_handles_per_round: int | None = None,
        metrics_collector: MetricsCollector | None = None,
        logger: logging.Logger | None = None,
        metrics_hook: MetricsHook | None = None,
        access_stats: AccessStatsCollector | None = None,
    ) -> None:
        max_tokens = _check_int("max_tokens", max_tokens, minimum=1)
        block_size = _check_int("block_size", block_size, minimum=1)
        bytes_per_token = _check_int("bytes_per_token", bytes_per_token, minimum=1)
        if max_evict_handles_per_round is not None:
            max_evict_handles_per_round = _check_int("max_evict_handles_per_round", max_evict_handles_per_round,
                                                     minimum=1)
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise TypeError(f"metrics_collector must be a MetricsCollector or None, "
                            f"got {type(metrics_collector).__name__}")
        if metrics_hook is not None and not isinstance(metrics_hook, MetricsHook):
            raise TypeError(f"metrics_hook must be a MetricsHook or None, got {type(metrics_hook).__name__}")
        if logger is not None and not callable(getattr(logger, "debug", None)):
            raise TypeError(f"logger must be a logging.Logger or None, got {type(logger).__name__}")
        try:
            eviction = EvictionManager(eviction_policy)
        except ValueError as exc:
            raise KVConfigInvalidError("eviction_policy", eviction_policy, reason=str(exc)) from None

        self.max_tokens = max_tokens
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.max_evict_handles_per_round = max_evict_handles_per_round
        self.metrics_collector = metrics_collector
        self.logger = logger
        self._hook = metrics_hook if metrics_hook is not None else (MetricsHook() if metrics_collector else None)
        self._eviction = eviction
        # Admission by tokens alone, as in the original's manager (nothing here sizes storage by
        # the budget's blocks; see KVPool for the engine-facing default).
        self._pool = KVPool(max_tokens, block_size, bytes_per_token, overcommit_blocks=True)
        # Metadata-only trie (no allocator): its nodes name the handles' blocks, which the pool owns.
        # The trie is unbounded on purpose: it can never hold more blocks than the pool has, and the
        # manager evicts whole handles (their nodes go with them), never single trie nodes.
        self._prefix = RadixPrefixCache(block_size, metrics_collector=metrics_collector, metrics_hook=self._hook,
                                        access_stats=access_stats)
        self._lock = threading.RLock()
        self._owner_of: dict[uuid.UUID, int] = {}
        self._handles: dict[int, KVHandle] = {}  # owner number -> live handle
        self._next_owner = 1  # 0 means "no owner" in the trie
        self._registered: set[int] = set()  # owners with nodes in the trie
        self.prefix_index: PrefixIndex[str] = PrefixIndex()
        # owner -> its keys in prefix_index, each once (an ordered set: re-registering adds nothing)
        self._index_keys: dict[int, dict[tuple[int, ...], None]] = {}
        # block id -> owner number (0 = none); one vectorised store per alloc/free, no per-block loop.
        self._block_owner = np.zeros(self._pool.num_blocks, dtype=np.int64)
        self._device_tokens: dict[str, int] = {}
        self._evicted: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._generation = 0  # bumped by reset() and by a reset of the pool made without us
        self._pool_generation = self._pool.generation  # the pool's resets seen (see _catch_up)
        self._lookups = 0
        self._hits = 0
        self._reuse_tokens = 0
        self._evicted_handles = 0
        self._evicted_tokens = 0
        self._eviction_rounds = 0

    # --- allocation ---------------------------------------------------------------------------

    def alloc(
        self,
        num_tokens: int,
        dtype: DType | str = DType.FP16,
        layout: Layout | str = Layout.CONTIGUOUS,
        device: str = "cpu",
        metadata: dict | None = None,
    ) -> KVHandle:
        """A handle for ``num_tokens`` tokens, evicting cold unpinned handles first when needed.

        Raises ``KVBudgetExceededError`` when even the permitted eviction round cannot make room
        (nothing is evicted then), ``TypeError``/``KVConfigInvalidError`` for bad arguments. Under
        the PRIORITY policy a ``metadata["priority"]`` that is not a number is a ``TypeError``, NaN a
        ``ValueError`` (nothing allocated): it could not be ordered against the other handles.
        """
        num_tokens = _check_int("num_tokens", num_tokens, minimum=1)
        dtype = self._enum(DType, "dtype", dtype)
        layout = self._enum(Layout, "layout", layout)
        device = parse_device(device)
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if metadata is not None and "priority" in metadata and self._eviction.policy == EvictionPolicy.PRIORITY:
            PriorityEviction.check_priority(metadata["priority"])
        if num_tokens > self.max_tokens:
            raise KVBudgetExceededError(num_tokens, self.max_tokens,
                                        context={"max_tokens": self.max_tokens, "reason": "larger than the budget"})
        with self._lock:
            self._catch_up()
            victims = self._plan_eviction(num_tokens)
            if victims:
                self._evict(victims, reason=f"alloc of {num_tokens} tokens")
            handle = self._pool.alloc(num_tokens, dtype, layout, device, metadata)
            owner = self._next_owner
            self._next_owner += 1
            self._owner_of[handle.handle_id] = owner
            self._handles[owner] = handle
            self._grow_block_owner(handle.block_ids)
            self._block_owner[handle.block_ids] = owner
            self._device_tokens[device] = self._device_tokens.get(device, 0) + num_tokens
        try:
            if self._hook is not None and self.metrics_collector is not None:
                self._hook.on_alloc(self.metrics_collector, num_tokens=num_tokens, num_blocks=len(handle.block_ids))
            self._debug("alloc %d tokens on %s -> handle %s (%d blocks)", num_tokens, device, handle.handle_id,
                        len(handle.block_ids))
        except BaseException:
            # A hook or logger that raises fails the allocation: the caller never gets the handle, so
            # it must not stay allocated (unless another thread already pinned it through handles()).
            with self._lock:
                still_owned = self._owner_of.get(handle.handle_id)
                if still_owned is not None and handle.pin_count == 0:
                    self._drop(still_owned, handle)
            raise
        return handle

    def free(self, handle: KVHandle) -> None:
        """Returns the handle's tokens and blocks and forgets its registered prefixes.

        ``KVHandlePinnedError`` for a pinned handle, ``KVInvalidHandleError`` for one the manager
        evicted, ``KVDoubleFreeError`` / ``KVHandleNotFoundError`` as the pool reports them.
        """
        self._check_handle(handle)
        with self._lock:
            self._catch_up()
            owner = self._owner_of.get(handle.handle_id)
            if owner is None:
                if handle.handle_id in self._evicted:
                    raise KVInvalidHandleError(handle.handle_id, reason=_EVICTED_REASON)
                self._pool.free(handle)  # raises the pool's precise error (double free, foreign handle)
                raise KVHandleNotFoundError(handle.handle_id)  # pragma: no cover - the pool always raises
            live = self._handles[owner]
            if live.pin_count > 0:
                raise KVHandlePinnedError(handle.handle_id, operation="free", pin_count=live.pin_count)
            self._drop(owner, live)
            if handle is not live:
                handle.state, handle.ref_count = KVBlockState.FREE, 0
        if self._hook is not None and self.metrics_collector is not None:
            self._hook.on_free(self.metrics_collector, num_tokens=live.num_tokens, num_blocks=len(live.block_ids))
        self._debug("free handle %s (%d tokens)", live.handle_id, live.num_tokens)

    def pin(self, handle: KVHandle) -> None:
        """Protects the handle from eviction (and from ``free``) until unpinned."""
        self._check_handle(handle)
        with self._lock:
            self._catch_up()
            live = self._live(handle)
            self._pool.pin(live)
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    def unpin(self, handle: KVHandle) -> None:
        """Undoes one ``pin``; ``KVRefCountUnderflowError`` when the handle is not pinned."""
        self._check_handle(handle)
        with self._lock:
            self._catch_up()
            live = self._live(handle)
            if live.pin_count == 0:  # the pool lets that pass, as the original's did; the manager's own API refuses
                raise KVRefCountUnderflowError(live.handle_id, current_count=0, context={"counter": "pin_count"})
            self._pool.unpin(live)
            if handle is not live:
                handle.pin_count, handle.state = live.pin_count, live.state

    def can_admit(self, num_tokens: int, *, num_blocks: int | None = None, allow_eviction: bool = True) -> bool:
        """Whether ``num_tokens`` tokens could be allocated now, counting what one eviction round
        may free. The token budget is the only limit (the pool never runs out of block ids for
        what the budget admits); ``num_blocks`` is validated and otherwise not needed."""
        num_tokens = _check_int("num_tokens", num_tokens, minimum=0)
        if num_blocks is not None:
            _check_int("num_blocks", num_blocks, minimum=0)
        if num_tokens > self.max_tokens:
            return False
        with self._lock:
            self._catch_up()
            if not allow_eviction:
                return self._fits(num_tokens, 0)
            try:
                self._plan_eviction(num_tokens)
            except KVBudgetExceededError:
                return False
            return True

    # --- prefixes -----------------------------------------------------------------------------

    def register_prefix(self, prefix_tokens: Sequence[int], handle: KVHandle) -> None:
        """Publishes that ``handle`` holds the KV of ``prefix_tokens`` (its first tokens).

        The full blocks are hashed in one C++ call and inserted with the handle's block ids. A
        prefix shorter than one block registers nothing. Registering a prefix that contradicts an
        earlier registration of the same handle (different tokens in the same blocks) replaces it.
        ``KVPrefixTooLongError`` when the prefix is longer than the handle.
        """
        tokens = _token_array("prefix_tokens", prefix_tokens)
        self._check_handle(handle)
        with self._lock:
            self._catch_up()
            live = self._live(handle)
            owner = self._owner_of[live.handle_id]
            if len(tokens) > live.num_tokens:
                raise KVPrefixTooLongError(len(tokens), live.num_tokens, context={"handle_id": str(live.handle_id)})
            digests = self._prefix.hash_tokens(tokens)
            n = len(digests)
            if n:
                ids = live.block_ids[:n]
                try:
                    self._prefix.insert(digests, ids, owner=owner)
                except KVConfigInvalidError:
                    # The only way our own chained digests can be refused: these blocks are cached under
                    # other digests, i.e. the handle was registered with different tokens before.
                    if owner not in self._registered:
                        raise
                    self._prefix.invalidate(owner)
                    self._prefix.insert(digests, ids, owner=owner)
                self._registered.add(owner)
                live.prefix_hash = digests[n - 1].tobytes().hex()
            self._index(owner, live, tokens)
        if n == 0:
            self._debug("register_prefix: %d tokens make no full block of %d; nothing registered",
                        len(tokens), self.block_size)
            return
        self._debug("register_prefix: handle %s holds %d prefix blocks", live.handle_id, n)

    def query_prefix(self, tokens: Sequence[int]) -> tuple[KVHandle | None, int]:
        """The handle holding the longest registered prefix of ``tokens`` and its length in tokens.

        ``(None, 0)`` on a miss. The returned handle holds the KV of *all* matched tokens (it
        registered a prefix covering them) and is touched, so LRU keeps reused handles.
        """
        arr = _token_array("tokens", tokens)
        with self._lock:
            self._catch_up()
            n, ids = self._match(arr)
            if n == 0:
                return None, 0
            handle = self._handles[int(self._block_owner[ids[n - 1]])]
            handle.touch()
        return handle, n * self.block_size

    def get_reused_blocks(self, tokens: Sequence[int]) -> tuple[list[Block], int]:
        """The cached blocks of the longest registered prefix of ``tokens`` and the tokens they cover.

        Block ids are the pool's real ids (possibly from several handles, in prefix order); their
        owners are touched.
        """
        arr = _token_array("tokens", tokens)
        with self._lock:
            self._catch_up()
            n, ids = self._match(arr)
            if n == 0:
                return [], 0
            owners = self._block_owner[ids[:n]]
            size = self.block_size * self.bytes_per_token
            handle_ids = {int(o): self._handles[int(o)].handle_id for o in np.unique(owners)}
            for owner in handle_ids:
                self._handles[owner].touch()
            blocks = [Block(block_id=b, handle_id=handle_ids[o], size_bytes=size)
                      for b, o in zip(ids[:n].tolist(), owners.tolist(), strict=True)]
        return blocks, n * self.block_size

    def get_prefix_metrics(self) -> dict[str, float | int]:
        """Lookups (``query_prefix`` and ``get_reused_blocks``), those that hit, and reused tokens."""
        with self._lock:
            return {
                "prefix_hits": self._hits,
                "prefix_lookups": self._lookups,
                "prefix_hit_rate": self._hits / self._lookups if self._lookups else 0.0,
                "prefix_reuse_tokens": self._reuse_tokens,
            }

    # --- introspection ------------------------------------------------------------------------

    def get_stats(self) -> dict:
        """The pool's seed keys plus blocks, prefix-cache and eviction numbers, flat; and the
        original's two sections: ``pool`` (the pool's seed keys) and ``prefix`` (``entries``, the
        prefixes in :attr:`prefix_index`, plus :meth:`get_prefix_metrics`)."""
        with self._lock:
            stats = self._flat_stats()
            stats["pool"] = dict(self._pool.get_stats())
            stats["prefix"] = {"entries": len(self.prefix_index), **self.get_prefix_metrics()}
            return stats

    def _flat_stats(self) -> dict[str, Any]:
        """:meth:`get_stats` without its ``pool`` and ``prefix`` sections."""
        with self._lock:
            self._catch_up()
            stats: dict[str, Any] = dict(self._pool.get_stats())
            blocks = self._pool.get_block_stats()
            stats.update(
                block_size=self.block_size,
                bytes_per_token=self.bytes_per_token,
                total_blocks=blocks["total_blocks"],
                free_blocks=blocks["free_blocks"],
                used_blocks=blocks["used_blocks"],
                cached_prefix_blocks=len(self._prefix),
                eviction_policy=self._eviction.policy.value,
                max_evict_handles_per_round=self.max_evict_handles_per_round,
                evicted_handles=self._evicted_handles,
                evicted_tokens=self._evicted_tokens,
                eviction_rounds=self._eviction_rounds,
            )
            stats.update(self.get_prefix_metrics())
            return stats

    def get_handle(self, handle_id: uuid.UUID) -> KVHandle:
        """The live handle with this id; ``KVHandleNotFoundError`` otherwise."""
        with self._lock:
            self._catch_up()
            owner = self._owner_of.get(handle_id)
            if owner is None:
                raise KVHandleNotFoundError(handle_id)
            return self._handles[owner]

    def handles(self) -> list[KVHandle]:
        """The live handles, oldest allocation first."""
        with self._lock:
            self._catch_up()
            return list(self._handles.values())

    def tokens_by_device(self) -> dict[str, int]:
        """Tokens held per device label (what a load-aware placer reports as KV usage)."""
        with self._lock:
            self._catch_up()
            return {device: tokens for device, tokens in self._device_tokens.items() if tokens}

    @property
    def pool(self) -> KVPool:
        """The underlying seed pool (read it; allocate through the manager)."""
        return self._pool

    @property
    def kv_pool(self) -> KVPool:
        """The underlying seed pool under the original package's attribute name."""
        return self._pool

    @property
    def eviction_manager(self) -> EvictionManager:
        """The strategy that orders unpinned handles for eviction (original attribute name)."""
        return self._eviction

    @property
    def prefix_cache(self) -> RadixPrefixCache:
        """The underlying trie (metadata-only; block ids are the pool's)."""
        return self._prefix

    @property
    def eviction_policy(self) -> EvictionPolicy:
        return self._eviction.policy

    def reset(self) -> None:
        """Drops every handle (pinned ones too), every prefix and every counter; bumps :attr:`generation`."""
        with self._lock:
            self._generation += 1
            self._prefix.clear()
            for owner, handle in self._handles.items():
                self._unindex(owner, handle)
            self._pool.reset()
            self._pool_generation = self._pool.generation
            self._owner_of.clear()
            self._handles.clear()
            self._registered.clear()
            self._block_owner[:] = 0
            self._device_tokens.clear()
            self._evicted.clear()
            self._lookups = self._hits = self._reuse_tokens = 0
            self._evicted_handles = self._evicted_tokens = self._eviction_rounds = 0
        self._debug("reset")

    @property
    def generation(self) -> int:
        """How many times :meth:`reset` ran, plus how many resets of :attr:`pool` made directly
        (``manager.pool.reset()``) the manager noticed. Whoever keeps handles of this manager (the
        :class:`~sagellm_kv_cache.scheduler_bridge.SchedulerBridge`) compares it with the value it
        saw last to notice that a reset it did not make dropped them."""
        with self._lock:
            self._catch_up()
            return self._generation

    def __len__(self) -> int:
        with self._lock:
            self._catch_up()
            return len(self._handles)

    def __bool__(self) -> bool:
        # A manager is a resource, not a container: truthy while empty (`if manager:` must not
        # depend on how many handles it holds; the original class had no __len__).
        return True

    def __repr__(self) -> str:
        return (f"KVCacheManager(max_tokens={self.max_tokens}, block_size={self.block_size}, "
                f"handles={len(self._handles)}, used_tokens={self._pool.get_allocated_tokens()}, "
                f"policy={self._eviction.policy.value!r})")

    # --- internals ----------------------------------------------------------------------------

    def _match(self, tokens: npt.NDArray[np.int64]) -> tuple[int, npt.NDArray[np.int32]]:
        """Hash + match in one C++ call, references dropped at once: the manager protects KV by
        pinning handles, not by holding trie nodes."""
        n, ids, digests = self._prefix.match_tokens(tokens)
        if n:
            self._prefix.release(digests[:n])
        self._lookups += 1
        if n:
            self._hits += 1
            self._reuse_tokens += n * self.block_size
        return n, ids

    def _fits(self, tokens: int, extra_tokens: int) -> bool:
        return tokens <= self._pool.get_available_tokens() + extra_tokens

    def _grow_block_owner(self, ids: npt.NDArray[np.int32]) -> None:
        # The pool's id space grows when partly filled blocks need more ids than the budget's
        # full blocks; the owner table follows (doubling, so growth is amortised).
        top = int(ids.max()) + 1 if len(ids) else 0
        if top > len(self._block_owner):
            size = min(max(top, 2 * len(self._block_owner)), self._pool.max_block_ids)
            grown = np.zeros(size, dtype=np.int64)
            grown[: len(self._block_owner)] = self._block_owner
            self._block_owner = grown

    def _plan_eviction(self, tokens: int) -> list[KVHandle]:
        """The victims of one round that make room for ``tokens``; [] when it fits.

        Raises ``KVBudgetExceededError`` (and changes nothing) when no permitted round makes room.
        """
        if self._fits(tokens, 0):
            return []
        candidates = [h for h in self._handles.values() if h.is_evictable()]
        available = self._pool.get_available_tokens()
        context: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "pinned_handles": len(self._handles) - len(candidates),
            "evictable_handles": len(candidates),
            "max_evict_handles_per_round": self.max_evict_handles_per_round,
        }
        if candidates:
            # Asking for every evictable token returns all candidates, coldest first.
            ordered = self._eviction.select_victims(candidates, sum(h.num_tokens for h in candidates))
            freed_tokens = 0
            victims: list[KVHandle] = []
            for victim in ordered:
                if self.max_evict_handles_per_round is not None and len(victims) >= self.max_evict_handles_per_round:
                    break
                victims.append(victim)
                freed_tokens += victim.num_tokens
                if self._fits(tokens, freed_tokens):
                    return victims
        raise KVBudgetExceededError(tokens, available, context=context)

    def _evict(self, victims: list[KVHandle], *, reason: str) -> None:
        tokens = sum(v.num_tokens for v in victims)
        nblocks = sum(len(v.block_ids) for v in victims)
        for victim in victims:
            self._drop(self._owner_of[victim.handle_id], victim)
            self._evicted[victim.handle_id] = None
            if len(self._evicted) > _EVICTED_MEMORY:
                self._evicted.popitem(last=False)
        self._evicted_handles += len(victims)
        self._evicted_tokens += tokens
        self._eviction_rounds += 1
        if self._hook is not None and self.metrics_collector is not None:
            self._hook.on_evict(self.metrics_collector, num_victims=len(victims), num_tokens=tokens,
                                num_blocks=nblocks)
        if self.logger is not None:
            self._debug("evicted %d handles (%d tokens, policy %s) for %s: %s", len(victims), tokens,
                        self._eviction.policy.value, reason, ", ".join(str(v.handle_id) for v in victims))

    def _index(self, owner: int, handle: KVHandle, tokens: npt.NDArray[np.int64]) -> None:
        """Records a registered prefix in ``prefix_index`` (caller holds the lock)."""
        if len(tokens):
            key = tuple(tokens.tolist())
            self.prefix_index.insert(key, str(handle.handle_id))
            self._index_keys.setdefault(owner, {})[key] = None

    def _unindex(self, owner: int, handle: KVHandle) -> None:
        """Removes the handle's prefixes from ``prefix_index``, unless a later handle took the key."""
        value = str(handle.handle_id)
        for key in self._index_keys.pop(owner, ()):
            if self.prefix_index.get(key) == value:
                self.prefix_index.remove(key)

    def _catch_up(self) -> None:
        """Notices a reset of the pool made without the manager (``manager.pool.reset()``), which
        dropped handles the manager still lists: forgets those (their prefixes, block owners and
        device tokens; the counters stay) and bumps :attr:`generation`, so the manager never hands
        out, matches or frees KV that no longer exists (caller holds the lock). Checked against the
        pool's live table rather than clearing everything, so a handle allocated after the reset
        (by another thread, before this call) is kept. Costs one attribute read when nothing
        happened."""
        generation = self._pool.generation
        if generation == self._pool_generation:
            return
        self._pool_generation = generation  # read first: a reset during this sweep triggers the next one
        live = self._pool._live_handles  # keyed by handle_id.int; the pool's reset emptied it
        for owner, handle in [(o, h) for o, h in self._handles.items() if h.handle_id.int not in live]:
            self._forget(owner, handle)
        self._generation += 1
        self._debug("the pool was reset underneath: forgot its dropped handles")

    def _unregister(self, owner: int, handle: KVHandle) -> None:
        """Drops the handle's registered prefixes and its index entries (caller holds the lock)."""
        if owner in self._registered:
            self._prefix.invalidate(owner)
            self._registered.discard(owner)
        if owner in self._index_keys:
            self._unindex(owner, handle)

    def _forget(self, owner: int, handle: KVHandle) -> None:
        """Forgets a handle the pool no longer holds, freeing nothing (caller holds the lock)."""
        self._unregister(owner, handle)
        # The ids may already belong to a handle allocated after the reset: clear only ours.
        ids = handle.block_ids
        self._block_owner[ids[self._block_owner[ids] == owner]] = 0
        del self._owner_of[handle.handle_id]
        del self._handles[owner]
        device = handle.device
        self._device_tokens[device] = self._device_tokens.get(device, 0) - handle.num_tokens

    def _drop(self, owner: int, handle: KVHandle) -> None:
        """Forgets the handle's prefixes, then returns its blocks (caller holds the lock)."""
        self._unregister(owner, handle)
        self._block_owner[handle.block_ids] = 0
        self._pool.free(handle)
        del self._owner_of[handle.handle_id]
        del self._handles[owner]
        device = handle.device
        self._device_tokens[device] = self._device_tokens.get(device, 0) - handle.num_tokens

    def _live(self, handle: KVHandle) -> KVHandle:
        owner = self._owner_of.get(handle.handle_id)
        if owner is None:
            if handle.handle_id in self._evicted:
                raise KVInvalidHandleError(handle.handle_id, reason=_EVICTED_REASON)
            raise KVHandleNotFoundError(handle.handle_id, context={"reason": "not allocated by this manager"})
        return self._handles[owner]

    @staticmethod
    def _check_handle(handle: object) -> None:
        if not isinstance(handle, KVHandle):
            raise TypeError(f"expected a KVHandle, got {type(handle).__name__}")

    @staticmethod
    def _enum(kind: Any, name: str, value: object) -> Any:
        try:
            return kind(getattr(value, "value", value))
        except ValueError:
            choices = ", ".join(member.value for member in kind)
            raise KVConfigInvalidError(name, value, reason=f"expected one of {choices}") from None

    def _debug(self, message: str, *args: Any) -> None:
        if self.logger is not None:
            self.logger.debug(message, *args)
