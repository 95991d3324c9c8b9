"""vLLM 0.33 KV offloading tier on our native prefix trie and host pool (an ``OffloadingSpec``).

vLLM's ``OffloadingConnector`` loads an out-of-tree spec by name and module path::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "SageOffloadingSpec",
        "spec_module_path": "sagellm_kv_cache.integrations.vllm_offload", "cpu_bytes_to_use": 8000000000}}'

Two halves, in two processes:

* :class:`SageOffloadingManager` (scheduler process): the index of offloaded chunks. Resident chunks live
  in our native hash trie (``_core.PrefixCache``; a request's chunks chained in prefix order) over a
  native block allocator whose ids are the host-pool chunk slots; the trie's policy (LRU by default)
  picks victims among leaves (a prefix's tail before its head), and its references pin chunks being
  loaded. Chunks being stored sit outside the trie until ``complete_store`` (not readable before), so
  they can never be evicted or loaded half-written.
* :class:`SageOffloadingWorker` (each worker process): a :class:`~sagellm_kv_cache.PagedKVPool` of
  ``num_chunks`` slots, filled from / copied back into vLLM's canonical int8 KV views with the pool's
  ``scatter`` / ``gather_into``.

vLLM keys (``OffloadKey``: the chained block hash + a 4-byte group index) are the manager's dict keys;
a trie node is named by the pool slot it holds (a 32-byte digest per slot, made once), since a slot
belongs to one chunk at a time: no key is hashed again.

Not supported: hybrid models (more than one KV-cache group: the spec refuses them at construction);
tensor/pipeline parallel > 1 is untested (each rank keeps its own shard in its own pool under the same
chunk ids, which is how vLLM's CPU tier works without its shared region; ``cpu_bytes_to_use`` counts
all ranks). Transfers are synchronous copies done inside ``submit_*`` (on a CUDA KV cache: on the
current stream, not a stream of their own); ``get_finished`` reports them on the next poll.

This module imports vLLM; the rest of the package never imports it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from itertools import filterfalse, repeat
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    TransferResult,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from sagellm_kv_cache import _core
from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool

__all__ = [
    "SageLoadStoreSpec",
    "SageOffloadingManager",
    "SageOffloadingSpec",
    "SageOffloadingWorker",
    "slot_digest",
]


def slot_digest(slot: int) -> bytes:
    """The trie digest naming pool slot ``slot``: its 8-byte little-endian number, then a fixed tag."""
    return slot.to_bytes(8, "little") + b"sagellm-kv vllm slot".ljust(24, b"\0")


class SageLoadStoreSpec(BlockIDsLoadStoreSpec):
    """Host-pool chunk slots, in the order of the keys they were prepared for."""

    @classmethod
    def of_array(cls, slots: npt.NDArray[np.int32]) -> SageLoadStoreSpec:
        """A spec over an int32 slot array the caller hands over (no copy, unlike the list constructor)."""
        spec = cls.__new__(cls)
        spec.block_ids = slots
        return spec


_HIT, _HIT_PENDING, _MISS = LookupResult.HIT, LookupResult.HIT_PENDING, LookupResult.MISS
_NO_SLOTS = np.empty(0, dtype=np.int32)
# on_new_request's answer: the connector only reads it, so every request shares one.
_CHUNK_LEVEL = RequestOffloadingContext()


class _Trail:
    """Per-request note of one manager between resets (``owner``: its epoch; kept in the ReqContext): the
    request's last key known to the tier, and its loads in flight: (keys, the digest paths
    ``prepare_load`` pinned for them)."""

    __slots__ = ("last", "loads", "owner")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.last: OffloadKey | None = None
        self.loads: list[tuple[list[OffloadKey], list[list[bytes]]]] = []


class _StoreBatch:
    """The keys one ``prepare_store`` call stored, in its (prefix) order, until ``complete_store``:
    their slots, digests and the key before each in its request (its parent-to-be). vLLM completes a
    store with the set of its keys; the batch keeps the order the trie needs (parents first)."""

    __slots__ = ("digests", "keys", "prevs", "rank", "slots")

    def __init__(self, rank: int, keys: list[OffloadKey], slots: list[int], digests: list[bytes],
                 prevs: list[OffloadKey | None]) -> None:
        self.rank, self.keys, self.slots, self.digests, self.prevs = rank, keys, slots, digests, prevs

    def part(self, done: set[OffloadKey]) -> _StoreBatch:
        """The keys of this batch that are in ``done``, in batch order."""
        pick = [i for i, key in enumerate(self.keys) if key in done]
        return _StoreBatch(self.rank, [self.keys[i] for i in pick], [self.slots[i] for i in pick],
                           [self.digests[i] for i in pick], [self.prevs[i] for i in pick])


def _rank_of(batch: _StoreBatch) -> int:
    return batch.rank



class SageOffloadingManager(OffloadingManager):
    """vLLM ``OffloadingManager`` over our native trie + block allocator (scheduler side).

    Resident chunks are trie nodes chained in request order: a chunk's parent is the chunk before it
    in the request that stored it (when that one is resident), so eviction takes leaves first (the
    tail of a prefix goes before its head, which vLLM's flat LRU does not do). The trie holds recency,
    the eviction policy and the load pins (``match`` references from ``prepare_load`` to
    ``complete_load``); the allocator hands out pool slots.

    vLLM calls ``lookup`` once per key and the other calls once per request, so the Python
    side keeps only what makes those calls few and short: resident key -> slot (a ``lookup`` is one
    dict probe), per slot its key, parent key and digest (lists), the pending stores (one record per
    ``prepare_store`` call, so a ``complete_store`` of its key set inserts one chain with one native
    call), and per request its loads in flight (a request's prefix is pinned by one native ``match``,
    whose block ids are the slots, and released by one ``release``). A request costs about ten
    crossings into C++ however many blocks it has. ``complete_load`` / ``complete_store`` take the
    keys of one earlier ``prepare_*`` call (in any order: vLLM passes sets). Single-threaded like
    vLLM's own manager (the connector serializes calls); the native parts are thread-safe anyway.
    ``policy`` is one of the trie's policies (``lru``, ``fifo``, ``priority``, ``ttl``).
    """

    def __init__(self, num_chunks: int, *, policy: str = "lru", enable_events: bool = False) -> None:
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks <= 0:
            raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
        self.medium = Medium.CPU
        self.num_chunks = num_chunks
        self.policy = policy
        self._slot_digest = [slot_digest(slot) for slot in range(num_chunks)]
        self._rank = 0
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._start()

    def _start(self) -> None:
        """A fresh, empty tier (construction and reset)."""
        num_chunks = self.num_chunks
        self._alloc = _core.BlockAllocator(num_chunks)
        self._trie = _core.PrefixCache(block_size=1, capacity_blocks=None, policy=self.policy, allocator=self._alloc)
        self._pending: dict[OffloadKey, _StoreBatch] = {}  # stored, not complete_store'd yet
        self._res: dict[OffloadKey, int] = {}  # resident key -> its pool slot
        self._slot_key: list[OffloadKey | None] = [None] * num_chunks  # pool slot -> resident key
        self._slot_parent: list[OffloadKey | None] = [None] * num_chunks  # slot -> its key's parent key (None: root)
        self._epoch = object()  # request notes of an earlier epoch are stale

    def _trail(self, req_context: ReqContext) -> _Trail:
        trail = req_context.get_state(_Trail)
        if trail is None or trail.owner is not self._epoch:
            trail = _Trail(self._epoch)
            req_context.set_state(trail)
        return trail

    def _paths(self, keys: Collection[OffloadKey]) -> list[list[bytes]]:
        """Root-to-key digest paths covering ``keys``: one per key that is no other key's ancestor.

        Independent of the order of ``keys`` (vLLM completes loads with a set of keys), and fixed
        while the keys are pinned (a pinned node and its ancestors cannot be evicted).
        """
        res, parent, digest = self._res, self._slot_parent, self._slot_digest
        ancestors: set[OffloadKey] = set()
        for key in keys:
            node = parent[res[key]]
            while node is not None and node not in ancestors:
                ancestors.add(node)
                node = parent[res[node]]
        paths: list[list[bytes]] = []
        for key in sorted(set(keys) - ancestors):
            path = []
            walk: OffloadKey | None = key
            while walk is not None:
                slot = res[walk]
                path.append(digest[slot])
                walk = parent[slot]
            path.reverse()
            paths.append(path)
        return paths

    # --- lookups and loads ------------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._res:
            return _HIT
        return _HIT_PENDING if key in self._pending else _MISS

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        return CacheHitSource.HOST

    def _slots(self, keys: Iterable[OffloadKey], call: str, state: str) -> list[int]:
        try:
            return list(map(self._res.__getitem__, keys))
        except KeyError as exc:
            raise KeyError(f"{call}: key {bytes(exc.args[0]).hex()} {state}") from None

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        """Pins each key and its trie ancestors until :meth:`complete_load`; all keys must be HITs."""
        keys = list(keys)
        try:
            digests = list(map(self._slot_digest.__getitem__, map(self._res.__getitem__, keys)))
        except KeyError as exc:
            raise KeyError(f"prepare_load: key {bytes(exc.args[0]).hex()} is not offloaded and ready") from None
        trie = self._trie
        trail = req_context.get_state(_Trail)
        if trail is None or trail.owner is not self._epoch:
            trail = self._trail(req_context)
        # Usually the keys are a request's prefix: one chain from the root, pinned by one match whose
        # block ids are the slots. Otherwise pin each key's root path and read the slots.
        matched, slots = trie.match(digests)
        paths = [digests]
        if matched != len(keys):
            if matched:
                trie.release(digests[:matched])
            paths = self._paths(keys)
            for path in paths:
                trie.match(path)
            slots = np.fromiter(map(self._res.__getitem__, keys), dtype=np.int32, count=len(keys))
        if keys:
            trail.loads.append((keys, paths))
            trail.last = keys[-1]
        return SageLoadStoreSpec.of_array(slots)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        present = [k for k in keys if k in self._res]
        for path in self._paths(present):
            self._trie.match(path)
            self._trie.release(path)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Releases the pins of a ``prepare_load`` of the same keys (in any order: vLLM passes a set)."""
        unique = keys if isinstance(keys, (set, frozenset)) else set(keys)
        trie = self._trie
        trail = req_context.get_state(_Trail)
        if trail is not None and trail.owner is self._epoch:
            loads = trail.loads
            for i, (loaded, paths) in enumerate(loads):
                # same size and holding each (distinct) loaded key: the same keys
                if len(loaded) == len(keys) and unique.issuperset(loaded):
                    del loads[i]
                    for path in paths:
                        trie.release(path)
                    return
        # Not a load this request prepared here: the pins are the keys' root paths.
        self._slots(unique, "complete_load", "has no load in flight")
        for path in self._paths(unique):
            trie.release(path)

    # --- stores -----------------------------------------------------------------------------

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        keys = keys if type(keys) is list else list(keys)  # read in this call only
        resident, pending = self._res, self._pending
        new = filterfalse(resident.__contains__, keys)
        to_store = list(filterfalse(pending.__contains__, new) if pending else new)
        trail = req_context.get_state(_Trail)
        if trail is None or trail.owner is not self._epoch:
            trail = self._trail(req_context)
        if not to_store:
            if keys:
                trail.last = keys[-1]
            return PrepareStoreOutput(keys_to_store=[], store_spec=SageLoadStoreSpec.of_array(_NO_SLOTS),
                                      evicted_keys=[])
        batch = _StoreBatch(0, to_store, [], [], [])  # filled in once the slots are known
        fresh = dict.fromkeys(to_store, batch)
        if len(fresh) != len(to_store):
            raise ValueError("prepare_store: duplicate keys in one call")
        # Every slot is free, pending (one per pending key) or resident (its only reference the trie's),
        # so the free count needs no call into the allocator (stats() shows both agree).
        need = len(to_store) - (self.num_chunks - len(resident) - len(pending))
        if need > 0:
            call_resident = [] if len(to_store) == len(keys) else [k for k in keys if k in resident]
            if not self._evict(need, call_resident):
                return None
        slot_array = self._alloc.allocate(len(to_store))
        slots: list[int] = slot_array.tolist()
        evicted: list[OffloadKey] = []
        if need > 0:
            # Eviction freed exactly `need` slots and this allocation took every free slot: the
            # evicted keys are the previous owners of the slots just handed out.
            self._forget(slots, evicted)
            if self._events is not None:
                self._emit_removed(evicted)
        if len(to_store) == len(keys):  # the usual case: every key is new, each chains from the one before
            prevs = [trail.last, *keys[:-1]]
        else:
            prev_of = dict(zip(keys[1:], keys, strict=False))
            prev_of[keys[0]] = trail.last
            prevs = list(map(prev_of.__getitem__, to_store))
        self._rank += 1
        batch.rank, batch.slots, batch.prevs = self._rank, slots, prevs
        batch.digests = list(map(self._slot_digest.__getitem__, slots))
        pending.update(fresh)
        trail.last = keys[-1]
        return PrepareStoreOutput(to_store, SageLoadStoreSpec.of_array(slot_array), evicted)

    def _evict(self, need: int, call_resident: list[OffloadKey]) -> bool:
        """Evicts ``need`` chunks, sparing the call's resident keys; False, changing nothing, if it cannot."""
        trie = self._trie
        # Pin the keys of this call that are already resident so that eviction cannot take them.
        protect = self._paths(call_resident) if call_resident else []
        for path in protect:
            trie.match(path)
        try:
            # A node nobody uses has no used descendant either (a match pins a whole root path), so
            # leaves going one after another can free every such node: evict cascades up chains.
            if len(self._res) - trie.num_in_use < need:
                return False
            evicted = trie.evict(need)  # each node evicted frees its slot: the trie held its only reference
        finally:
            for path in protect:
                trie.release(path)
        if evicted == need:
            return True
        gone: list[OffloadKey] = []  # not expected: the count above said enough could go
        self._forget_evicted(gone)
        self._emit_removed(gone)
        return False

    def _forget(self, slots: Iterable[int], out: list[OffloadKey]) -> None:
        """Drops the resident keys that held ``slots`` (evicted from the trie) and lists them in ``out``."""
        slot_key, res = self._slot_key, self._res
        for slot in slots:
            key = slot_key[slot]
            if key is not None:
                slot_key[slot] = None  # (its parent entry is only read while the slot is resident)
                del res[key]
                out.append(key)

    def _forget_evicted(self, out: list[OffloadKey]) -> None:
        contains = self._trie.contains
        self._forget([slot for slot, key in enumerate(self._slot_key)
                      if key is not None and not contains(self._slot_digest[slot])], out)

    def _emit_removed(self, keys: list[OffloadKey]) -> None:
        if keys and self._events is not None:
            self._events.append(OffloadingEvent(keys=keys, medium=self.medium, removed=True))

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        popped: list[_StoreBatch | None] = list(map(self._pending.pop, keys, repeat(None)))
        # keys not pending (never stored, or completed already) are skipped
        got = [batch for batch in popped if batch is not None] if None in popped else cast("list[_StoreBatch]", popped)
        if not got:
            return
        whole = got[0]
        if got.count(whole) == len(got) == len(whole.keys):  # the usual case: one prepare_store's keys
            batches = [whole]
        else:
            done = {key for key, batch in zip(keys, popped, strict=True) if batch is not None}
            batches = sorted({id(b): b.part(done) for b in got}.values(), key=_rank_of)
        stored: list[OffloadKey] = []
        for batch in batches:
            if success:
                self._insert(batch.keys, batch.slots, batch.digests, batch.prevs)
                stored += batch.keys
            self._alloc.free(batch.slots)  # the trie keeps its own reference on a stored chunk
        if stored and self._events is not None:
            self._events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False))

    def _insert(self, keys: list[OffloadKey], slots: list[int], digests: list[bytes],
                prevs: list[OffloadKey | None]) -> None:
        """Adds completed stores (in store order) to the trie, one native insert per run of chained keys."""
        resident, slot_key, slot_parent, slot_digest = self._res, self._slot_key, self._slot_parent, self._slot_digest
        first = prevs[0] if prevs[0] in resident else None
        if prevs[1:] == keys[:-1]:  # the usual case: one request's run of new keys
            self._trie.insert(digests, slots, None if first is None else slot_digest[resident[first]])
            resident.update(zip(keys, slots, strict=True))
            for slot, key in zip(slots, keys, strict=True):
                slot_key[slot] = key
            for slot, key in zip(slots[1:], keys, strict=False):  # each key's parent: the key before it
                slot_parent[slot] = key
            slot_parent[slots[0]] = first
            return
        insert = self._trie.insert
        run_digests: list[bytes] = []
        run_slots: list[int] = []
        run_parent: bytes | None = None
        last: OffloadKey | None = None
        for key, slot, digest, prev in zip(keys, slots, digests, prevs, strict=True):
            parent = prev if prev is not None and prev in resident else None
            if parent is None or parent != last:  # not the continuation of the current run
                if run_digests:
                    insert(run_digests, run_slots, run_parent)
                run_digests, run_slots = [], []
                run_parent = None if parent is None else slot_digest[resident[parent]]
            run_digests.append(digest)
            run_slots.append(slot)
            resident[key] = slot
            slot_key[slot] = key
            slot_parent[slot] = parent
            last = key
        insert(run_digests, run_slots, run_parent)

    # --- request lifecycle and bookkeeping ------------------------------------------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return _CHUNK_LEVEL

    def on_request_finished(self, req_context: ReqContext) -> None:
        return None

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None:
            return []
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> None:
        """Drops everything, loads and stores in flight included, as vLLM's connector expects: it never
        completes a job started before a reset and re-offloads its live requests from their start."""
        self._start()

    def stats(self) -> dict[str, int]:
        """Resident / pending / free chunk counts plus the trie's counters."""
        out = {k: int(v) for k, v in self._trie.stats().items()}
        out.update(resident_chunks=len(self._res), pending_chunks=len(self._pending),
                   free_chunks=int(self._alloc.num_available), num_chunks=self.num_chunks)
        return out


class SageOffloadingWorker(OffloadingWorker):
    """Moves chunks between vLLM's canonical KV views and a :class:`PagedKVPool` (worker side).

    A chunk is ``blocks_per_chunk`` vLLM blocks; its pool slot holds, for each KV tensor of the
    (single) group in order, ``blocks_per_chunk`` pages of that tensor's row size.
    """

    def __init__(self, kv_caches: CanonicalKVCaches, num_chunks: int, blocks_per_chunk: int) -> None:
        if len(kv_caches.group_data_refs) != 1:
            raise ValueError(f"only one KV-cache group is supported, got {len(kv_caches.group_data_refs)}")
        if blocks_per_chunk <= 0:
            raise ValueError(f"blocks_per_chunk must be positive, got {blocks_per_chunk}")
        seen: list[int] = []
        for ref in kv_caches.group_data_refs[0]:
            if ref.tensor_idx not in seen:
                seen.append(ref.tensor_idx)
        self._tensors: list[torch.Tensor] = [kv_caches.tensors[i].tensor for i in seen]
        self._rows = [int(t.shape[1]) * t.element_size() for t in self._tensors]
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_bytes = blocks_per_chunk * sum(self._rows)
        if self.chunk_bytes % 2:
            raise ValueError(f"chunk size {self.chunk_bytes} bytes must be even")
        self.pool = PagedKVPool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=self.chunk_bytes // 2,
                                            dtype="int8", block_size=1), num_chunks, "cpu", zero_fill=False)
        self._finished: list[TransferResult] = []
        self.stored_blocks = 0  # vLLM blocks copied into the pool so far
        self.loaded_blocks = 0  # vLLM blocks copied back out of it

    def _staging(self, n_chunks: int) -> tuple[npt.NDArray[np.uint8], list[torch.Tensor]]:
        buf = np.empty((n_chunks, self.chunk_bytes), dtype=np.uint8)
        whole = torch.from_numpy(buf)
        views, offset = [], 0
        for row in self._rows:
            span = self.blocks_per_chunk * row
            # (chunk, block in chunk, page byte): a view, so writes land in the staging buffer
            part = whole[:, offset:offset + span].view(torch.int8).view(n_chunks, self.blocks_per_chunk, row)
            views.append(part)
            offset += span
        return buf, views

    def _plan(self, gpu: GPULoadStoreSpec, slots: npt.NDArray[np.int32]) -> tuple[int, int, bool]:
        if len(gpu.group_sizes) != 1:
            raise ValueError(f"only one KV-cache group is supported, got {len(gpu.group_sizes)}")
        n = int(gpu.group_sizes[0])
        skip = int(gpu.block_indices[0]) % self.blocks_per_chunk
        n_chunks = -(-(n + skip) // self.blocks_per_chunk)
        if n_chunks != len(slots):
            raise ValueError(f"{n} blocks from offset {skip} need {n_chunks} chunks, got {len(slots)}")
        partial = skip != 0 or (n + skip) % self.blocks_per_chunk != 0
        return n, skip, partial

    def _positions(self, skip: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(skip, skip + n, dtype=torch.int64)
        return pos // self.blocks_per_chunk, pos % self.blocks_per_chunk

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, BlockIDsLoadStoreSpec)
        start = time.perf_counter()
        slots = dst_spec.block_ids
        n, skip, partial = self._plan(src_spec, slots)
        buf, views = self._staging(len(slots))
        if partial and len(slots):
            self.pool.gather_into(slots, buf)
        gpu_ids = torch.from_numpy(np.ascontiguousarray(src_spec.block_ids, dtype=np.int64))
        chunk, sub = self._positions(skip, n)
        for t, view in zip(self._tensors, views, strict=True):
            ids = gpu_ids.to(t.device)
            view[chunk, sub] = t.index_select(0, ids).view(torch.int8).to("cpu")
        if len(slots):
            self.pool.scatter(buf, slots)
        self.stored_blocks += n
        self._finished.append(TransferResult(job_id, True, n * sum(self._rows), time.perf_counter() - start))
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec,
                    expedited: bool = False) -> bool:
        assert isinstance(src_spec, BlockIDsLoadStoreSpec)
        start = time.perf_counter()
        slots = src_spec.block_ids
        n, skip, _ = self._plan(dst_spec, slots)
        buf, views = self._staging(len(slots))
        if len(slots):
            self.pool.gather_into(slots, buf)
        gpu_ids = torch.from_numpy(np.ascontiguousarray(dst_spec.block_ids, dtype=np.int64))
        chunk, sub = self._positions(skip, n)
        for t, view in zip(self._tensors, views, strict=True):
            ids = gpu_ids.to(t.device)
            t.index_copy_(0, ids, view[chunk, sub].to(t.device).view(t.dtype))
        self.loaded_blocks += n
        self._finished.append(TransferResult(job_id, True, n * sum(self._rows), time.perf_counter() - start))
        return True

    def get_finished(self) -> list[TransferResult]:
        done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return None  # transfers complete inside submit_*


class SageOffloadingSpec(OffloadingSpec):
    """The ``OffloadingSpec`` vLLM loads by ``spec_name`` / ``spec_module_path``.

    ``kv_connector_extra_config``: ``cpu_bytes_to_use`` (host bytes over all workers) or ``num_chunks``;
    optional ``eviction_policy`` (``lru`` default, ``fifo``, ``priority``, ``ttl``).
    """

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        if len(config.groups) != 1:
            raise ValueError(f"SageOffloadingSpec supports one KV-cache group (no hybrid models), "
                             f"got {len(config.groups)}")
        num_chunks = self.extra_config.get("num_chunks")
        if num_chunks is None:
            cpu_bytes = self.extra_config.get("cpu_bytes_to_use")
            if not cpu_bytes:
                raise ValueError("kv_connector_extra_config needs cpu_bytes_to_use or num_chunks")
            per_chunk = config.worker_kv_bytes_per_block * self.blocks_per_chunk * max(config.parallel.world_size, 1)
            if per_chunk <= 0:
                raise ValueError(f"worker_kv_bytes_per_block must be positive, got {config.worker_kv_bytes_per_block}")
            num_chunks = int(cpu_bytes) // per_chunk
        self.num_chunks = int(num_chunks)
        if self.num_chunks <= 0:
            raise ValueError(f"the host tier holds no chunk (num_chunks={self.num_chunks})")
        self.eviction_policy = str(self.extra_config.get("eviction_policy", "lru"))
        self._manager: SageOffloadingManager | None = None
        self._worker: SageOffloadingWorker | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            self._manager = SageOffloadingManager(self.num_chunks, policy=self.eviction_policy,
                                                  enable_events=self.kv_events_config.enable_kv_cache_events)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = SageOffloadingWorker(kv_caches, self.num_chunks, self.blocks_per_chunk)
        return self._worker

