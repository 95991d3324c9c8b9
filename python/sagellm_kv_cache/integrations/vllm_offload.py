"""vLLM 0.33 KV offloading tier on our native prefix trie and host pool (an ``OffloadingSpec``).

vLLM's ``OffloadingConnector`` loads an out-of-tree spec by name and module path::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "SageOffloadingSpec",
        "spec_module_path": "sagellm_kv_cache.integrations.vllm_offload", "cpu_bytes_to_use": 8000000000}}'

Two halves, in two processes:

* :class:`SageOffloadingManager` (scheduler process): the index of offloaded chunks, kept by the native
  ``_core.OffloadIndex`` (``offload_index.hpp``). Resident chunks live in our native hash trie (a
  request's chunks chained in prefix order) over a native block allocator whose ids are the host-pool
  chunk slots; the trie's policy (LRU by default) picks victims among leaves (a prefix's tail before
  its head), and its references pin chunks being loaded. Chunks being stored sit outside the trie
  until ``complete_store`` (not readable before), so they can never be evicted or loaded half-written.
* :class:`SageOffloadingWorker` (each worker process): ``num_chunks`` host slots filled from / copied back
  into vLLM's canonical int8 KV views. KV on the CPU: a :class:`~sagellm_kv_cache.PagedKVPool` and its
  ``scatter`` / ``gather_into``, synchronous. KV on a GPU: a ``ChunkCopier`` (``chunk_copies.py``), pinned
  slots and copies on streams of their own, reported by ``get_finished`` once their events complete.

vLLM keys (``OffloadKey``: the chained block hash + a 4-byte group index) are the keys of the index's
two dicts (resident and pending chunk -> slot); a trie node is named by the pool slot it holds (a
32-byte digest per slot), since a slot belongs to one chunk at a time: no key is hashed again.

Not supported: hybrid models (more than one KV-cache group: the spec refuses them at construction);
tensor/pipeline parallel > 1 is untested (each rank keeps its own shard in its own pool under the same
chunk ids, which is how vLLM's CPU tier works without its shared region; ``cpu_bytes_to_use`` counts
all ranks).

This module imports vLLM; the rest of the package never imports it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Mapping

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
from sagellm_kv_cache.integrations.chunk_copies import ChunkCopier, _indices, _written_once
from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool

__all__ = [
    "SageLoadStoreSpec",
    "SageOffloadingManager",
    "SageOffloadingSpec",
    "SageOffloadingWorker",
    "slot_digest",
]


def _check_copies(copies: str) -> None:
    """The worker's copy path must be one of ``auto``, ``pool``, ``stream`` (see SageOffloadingWorker)."""
    if copies not in ("auto", "pool", "stream"):
        raise ValueError(f"copies must be 'auto', 'pool' or 'stream', got {copies!r}")


# The native index numbers its slots with int32.
_MAX_CHUNKS = 2**31 - 1


def _extra_int(extra: Mapping[str, object], key: str) -> int | None:
    """``kv_connector_extra_config[key]`` as an int (None when absent): an int, a whole finite float (JSON's
    ``8e9``) or a string of digits, as vLLM's own specs read it; ValueError naming the key for anything
    else (a bool, 4.7, NaN, a list) rather than a truncated or unnamed one."""
    value = extra.get(key)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"kv_connector_extra_config[{key!r}] must be an integer, got {value!r}")


def slot_digest(slot: int) -> bytes:
    """The trie digest naming pool slot ``slot``: its 8-byte little-endian number, then a fixed tag."""
    return _core.OffloadIndex.slot_digest(slot)


class SageLoadStoreSpec(BlockIDsLoadStoreSpec):
    """Host-pool chunk slots, in the order of the keys they were prepared for."""

    @classmethod
    def of_array(cls, slots: npt.NDArray[np.int32]) -> SageLoadStoreSpec:
        """A spec over an int32 slot array the caller hands over (no copy, unlike the list constructor)."""
        spec = cls.__new__(cls)
        spec.block_ids = slots
        return spec


_HIT, _HIT_PENDING, _MISS = LookupResult.HIT, LookupResult.HIT_PENDING, LookupResult.MISS
# on_new_request's answer: the connector only reads it, so every request shares one.
_CHUNK_LEVEL = RequestOffloadingContext()


class _Trail:
    """Per-request note of one manager between resets (``owner``: its epoch; kept in the ReqContext): the
    request's last key known to the tier, which its next stored chunk chains from."""

    __slots__ = ("last", "owner")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.last: OffloadKey | None = None


class SageOffloadingManager(OffloadingManager):
    """vLLM ``OffloadingManager`` over our native offload index (scheduler side).

    The bookkeeping is ``_core.OffloadIndex`` (``cpp/include/sagellm_kv/offload_index.hpp``): pool
    slots from a native block allocator, resident chunks as nodes of our native trie chained in
    request order (a chunk's parent is the chunk before it in the request that stored it, when that
    one is still resident), so eviction takes leaves first, in the trie's policy order (the tail of a
    prefix goes before its head, which vLLM's flat LRU does not do); ``prepare_load`` pins a chain
    until ``complete_load``; chunks being stored are pending (not readable, never evicted) until
    ``complete_store``. Its binding keeps the key -> slot maps as two dicts, so ``lookup`` (vLLM calls
    it once per key) is a dict probe here, and every other call crosses into C++ once with its whole
    key list. This class only adapts: per request it remembers the last key (the next store's parent)
    and builds vLLM's result objects. ``complete_load`` / ``complete_store`` take the keys of earlier
    ``prepare_*`` calls in any order (vLLM passes sets); a load may complete in parts (its pins stay
    until its last key is released). Single-threaded like vLLM's own manager (the
    connector serializes calls); the native index is thread-safe anyway.
    ``policy`` is one of the trie's policies (``lru``, ``fifo``, ``priority``, ``ttl``).
    """

    def __init__(self, num_chunks: int, *, policy: str = "lru", enable_events: bool = False) -> None:
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks <= 0:
            raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
        self.medium = Medium.CPU
        self.num_chunks = num_chunks
        self.policy = policy
        # The index builds vLLM's answers itself: SageLoadStoreSpec / PrepareStoreOutput instances.
        self._index = _core.OffloadIndex(num_chunks, policy, slots_type=SageLoadStoreSpec,
                                         store_type=PrepareStoreOutput)
        # Read-only views of the index's key maps (the same objects for its lifetime: a reset clears them).
        self._res = self._index.resident
        self._pending = self._index.pending
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._epoch = object()  # request notes of an earlier epoch are stale
        # vLLM asks once per key: a C function over the same dicts answers as `lookup` below does, without
        # a Python frame (an instance attribute, so it shadows the method).
        setattr(self, "lookup", self._index.lookup_function(_HIT, _HIT_PENDING, _MISS))  # noqa: B010

    def _new_trail(self, req_context: ReqContext) -> _Trail:
        trail = _Trail(self._epoch)
        req_context.set_state(trail)
        return trail

    # --- lookups and loads ------------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._res:
            return _HIT
        return _HIT_PENDING if key in self._pending else _MISS

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        return CacheHitSource.HOST

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        """Pins each key and its trie ancestors until :meth:`complete_load`; all keys must be HITs
        (KeyError naming the first that is not, nothing pinned)."""
        keys = keys if type(keys) is list else list(keys)  # read once: an iterator would be spent by the index
        spec: SageLoadStoreSpec = self._index.prepare_load(keys)
        if keys:
            trail = req_context.get_state(_Trail)
            if trail is None or trail.owner is not self._epoch:
                trail = self._new_trail(req_context)
            trail.last = keys[-1]
        return spec

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self._index.touch(keys)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Releases keys of earlier ``prepare_load`` calls (any order: vLLM passes a set); a load's pins go
        once all its keys are released. KeyError for a key not offloaded, KVRefCountUnderflowError for one
        with no load in flight; either way nothing is released."""
        self._index.complete_load(keys)

    # --- stores -----------------------------------------------------------------------------

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        keys = keys if type(keys) is list else list(keys)
        trail = req_context.get_state(_Trail)
        if trail is None or trail.owner is not self._epoch:
            trail = self._new_trail(req_context)
        out: PrepareStoreOutput | None = self._index.prepare_store(keys, trail.last)
        if out is None:  # no room: everything else is pending or pinned
            return None
        if keys:
            trail.last = keys[-1]
        if self._events is not None and out.evicted_keys:
            self._events.append(OffloadingEvent(keys=out.evicted_keys, medium=self.medium, removed=True))
        return out

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        """Commits (or frees, ``success=False``) the pending keys among ``keys``; others are skipped. A
        failed store's keys are announced as vLLM's manager announces them: a ``metadata_only`` removal
        (no public eviction; the connector's event tracker drops what it recorded for them)."""
        if not success and self._events is not None:
            keys = keys if type(keys) is list else list(keys)  # read twice below
            freed = list(dict.fromkeys(k for k in keys if k in self._pending))
            self._index.complete_store(keys, False)
            if freed:
                self._events.append(OffloadingEvent(keys=freed, medium=self.medium, removed=True,
                                                    metadata_only=True))
            return
        stored = self._index.complete_store(keys, success)
        if stored and self._events is not None:
            self._events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False))

    # --- request lifecycle and bookkeeping ------------------------------------------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return _CHUNK_LEVEL

    def on_request_finished(self, req_context: ReqContext) -> None:
        return None

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None:
            return []
        events, self._events = self._events, []
        out = []
        for event in events:
            if event.metadata_only:  # as vLLM's manager: a key stored again since has its own record
                kept = [k for k in event.keys if k not in self._res and k not in self._pending]
                if not kept:
                    continue
                if len(kept) != len(event.keys):
                    event = OffloadingEvent(keys=kept, medium=event.medium, removed=True, metadata_only=True)
            out.append(event)
        return out

    def reset_cache(self) -> None:
        """Drops everything, loads and stores in flight included, as vLLM's connector expects: it never
        completes a job started before a reset and re-offloads its live requests from their start."""
        self._index.reset()
        self._epoch = object()

    def stats(self) -> dict[str, int]:
        """Resident / pending / free chunk counts plus the trie's counters."""
        out = self._index.stats()
        out.update(resident_chunks=out.pop("resident_slots"), pending_chunks=out.pop("pending_slots"),
                   free_chunks=out.pop("free_slots"), num_chunks=out.pop("num_slots"))
        return out

    def check_invariants(self) -> None:
        """Verifies that the key maps, the slots, the allocator and the trie agree (KVError if not); for tests."""
        self._index.check_invariants()


class SageOffloadingWorker(OffloadingWorker):
    """Moves chunks between vLLM's canonical KV views and our host memory (worker side).

    A chunk is ``blocks_per_chunk`` vLLM blocks. Two paths (``copies``):

    * ``"pool"`` (the default for KV on the CPU): a :class:`PagedKVPool` slot per chunk holding, for
      each KV tensor of the (single) group in order, ``blocks_per_chunk`` pages of that tensor's row
      size, filled and read with the pool's ``scatter`` / ``gather_into`` inside ``submit_*``;
    * ``"stream"`` (the default for KV on a GPU): a :class:`~sagellm_kv_cache.integrations.chunk_copies.ChunkCopier`,
      whose slots live in pinned host memory and whose copies run on streams of their own that wait
      for the compute stream; ``get_finished`` reports a job once its event has completed, and
      ``wait`` blocks on given jobs. On CPU tensors it runs too (every job completes in its call).
    """

    def __init__(self, kv_caches: CanonicalKVCaches, num_chunks: int, blocks_per_chunk: int, *,
                 copies: str = "auto") -> None:
        if len(kv_caches.group_data_refs) != 1:
            raise ValueError(f"only one KV-cache group is supported, got {len(kv_caches.group_data_refs)}")
        if blocks_per_chunk <= 0:
            raise ValueError(f"blocks_per_chunk must be positive, got {blocks_per_chunk}")
        _check_copies(copies)
        seen: list[int] = []
        for ref in kv_caches.group_data_refs[0]:
            if ref.tensor_idx not in seen:
                seen.append(ref.tensor_idx)
        self._tensors: list[torch.Tensor] = [kv_caches.tensors[i].tensor for i in seen]
        self._rows = [int(t.shape[1]) * t.element_size() for t in self._tensors]
        self._num_blocks = min(int(t.shape[0]) for t in self._tensors)
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_bytes = blocks_per_chunk * sum(self._rows)
        if copies == "auto":
            copies = "stream" if self._tensors[0].is_cuda else "pool"
        self.copies = copies
        self.pool: PagedKVPool | None = None
        self._copier: ChunkCopier | None = None
        if copies == "stream":
            self._copier = ChunkCopier([t.view(torch.int8) for t in self._tensors], num_chunks, blocks_per_chunk)
        else:
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
        # an empty group needs no chunk whatever its block index (vLLM's own handler skips it)
        n_chunks = -(-(n + skip) // self.blocks_per_chunk) if n else 0
        if n_chunks != len(slots):
            raise ValueError(f"{n} blocks from offset {skip} need {n_chunks} chunks, got {len(slots)}")
        partial = skip != 0 or (n + skip) % self.blocks_per_chunk != 0
        return n, skip, partial

    def _slots(self, slots: object, call: str) -> npt.NDArray[np.int32]:
        """A job's slots checked as the ChunkCopier checks them, before any copy: ValueError naming one out
        of range (the pool would name it one of its "block ids") or, for a store, one named twice (its two
        chunks would land in one slot, the later overwriting the earlier). A load may read a slot twice."""
        assert self.pool is not None
        checked = _indices(slots, "slot", self.pool.num_blocks)
        if call == "store":
            _written_once(checked, "slot", "store")
        return checked.astype(np.int32)  # < num_chunks <= 2**31 - 1

    def _positions(self, skip: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(skip, skip + n, dtype=torch.int64)
        return pos // self.blocks_per_chunk, pos % self.blocks_per_chunk

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, BlockIDsLoadStoreSpec)
        start = time.perf_counter()
        slots = dst_spec.block_ids
        n, skip, partial = self._plan(src_spec, slots)
        if self._copier is not None:
            self._copier.store(job_id, src_spec.block_ids, slots, skip)
            self.stored_blocks += n
            return True
        assert self.pool is not None
        # checked here: on a GPU an index out of range is a device-side assert, fatal to the process
        gpu_ids = torch.from_numpy(_indices(src_spec.block_ids, "block id", self._num_blocks))
        slots = self._slots(slots, "store")
        buf, views = self._staging(len(slots))
        if partial and len(slots):
            self.pool.gather_into(slots, buf)
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
        if self._copier is not None:
            self._copier.load(job_id, slots, dst_spec.block_ids, skip, expedited=expedited)
            self.loaded_blocks += n
            return True
        assert self.pool is not None
        dst_ids = _indices(dst_spec.block_ids, "block id", self._num_blocks)
        _written_once(dst_ids, "block id", "load")  # index_copy_ into one block twice: undefined on a GPU
        slots = self._slots(slots, "load")
        gpu_ids = torch.from_numpy(dst_ids)
        buf, views = self._staging(len(slots))
        if len(slots):
            self.pool.gather_into(slots, buf)
        chunk, sub = self._positions(skip, n)
        for t, view in zip(self._tensors, views, strict=True):
            ids = gpu_ids.to(t.device)
            t.index_copy_(0, ids, view[chunk, sub].to(t.device).view(t.dtype))
        self.loaded_blocks += n
        self._finished.append(TransferResult(job_id, True, n * sum(self._rows), time.perf_counter() - start))
        return True

    def get_finished(self) -> list[TransferResult]:
        done, self._finished = self._finished, []
        if self._copier is not None:
            done += [TransferResult(f.job_id, True, f.nbytes, f.seconds) for f in self._copier.finished()]
        return done

    def wait(self, job_ids: set[int]) -> None:
        if self._copier is not None:
            self._copier.wait(job_ids)  # pool-path transfers complete inside submit_*

    def shutdown(self) -> None:
        if self._copier is not None:
            self._copier.shutdown()


class SageOffloadingSpec(OffloadingSpec):
    """The ``OffloadingSpec`` vLLM loads by ``spec_name`` / ``spec_module_path``.

    ``kv_connector_extra_config``: ``cpu_bytes_to_use`` (host bytes over all workers) or ``num_chunks``;
    optional ``eviction_policy`` (``lru`` default, ``fifo``, ``priority``, ``ttl``) and ``copies``
    (the worker's path: ``auto`` default, ``pool``, ``stream``; see :class:`SageOffloadingWorker`).
    """

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        if len(config.groups) != 1:
            raise ValueError(f"SageOffloadingSpec supports one KV-cache group (no hybrid models), "
                             f"got {len(config.groups)}")
        num_chunks = _extra_int(self.extra_config, "num_chunks")
        if num_chunks is None:
            cpu_bytes = _extra_int(self.extra_config, "cpu_bytes_to_use")
            if cpu_bytes is None:
                raise ValueError("kv_connector_extra_config needs cpu_bytes_to_use or num_chunks")
            if cpu_bytes <= 0:
                raise ValueError(f"kv_connector_extra_config['cpu_bytes_to_use'] must be positive, got {cpu_bytes}")
            per_chunk = config.worker_kv_bytes_per_block * self.blocks_per_chunk * max(config.parallel.world_size, 1)
            if per_chunk <= 0:
                raise ValueError(f"worker_kv_bytes_per_block must be positive, got {config.worker_kv_bytes_per_block}")
            num_chunks = cpu_bytes // per_chunk
            if not 0 < num_chunks <= _MAX_CHUNKS:
                raise ValueError(f"cpu_bytes_to_use={cpu_bytes} makes {num_chunks} chunks of {per_chunk} bytes; "
                                 f"the host tier holds 1 to {_MAX_CHUNKS}")
        elif not 0 < num_chunks <= _MAX_CHUNKS:
            raise ValueError(f"kv_connector_extra_config['num_chunks'] must be in [1, {_MAX_CHUNKS}], got {num_chunks}")
        self.num_chunks = num_chunks
        self.eviction_policy = str(self.extra_config.get("eviction_policy", "lru"))
        # Refused here, as the copies are, not first by get_manager after the workers are up: a one-slot
        # index parses the name as the manager's will (KVConfigInvalidError naming it and the policies).
        _core.OffloadIndex(1, self.eviction_policy)
        self.copies = str(self.extra_config.get("copies", "auto"))
        _check_copies(self.copies)  # here too: the scheduler process refuses it before any worker starts
        self._manager: SageOffloadingManager | None = None
        self._worker: SageOffloadingWorker | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            self._manager = SageOffloadingManager(self.num_chunks, policy=self.eviction_policy,
                                                  enable_events=self.kv_events_config.enable_kv_cache_events)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = SageOffloadingWorker(kv_caches, self.num_chunks, self.blocks_per_chunk, copies=self.copies)
        return self._worker

