"""vLLM 0.33 KV offloading tier on our native prefix trie and host pool (an ``OffloadingSpec``).

vLLM's ``OffloadingConnector`` loads an out-of-tree spec by name and module path::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "SageOffloadingSpec",
        "spec_module_path": "sagellm_kv_cache.integrations.vllm_offload", "cpu_bytes_to_use": 8000000000}}'

Two halves, in two processes:

* :class:`SageOffloadingManager` (scheduler process): the index of offloaded chunks. Resident chunks live
  in our native hash trie (``_core.PrefixCache``, one flat node per vLLM key) over a native block
  allocator whose ids are the host-pool chunk slots; the trie's policy (LRU by default) picks victims,
  and its references pin chunks being loaded. Chunks being stored sit outside the trie until
  ``complete_store`` (not readable before), so they can never be evicted or loaded half-written.
* :class:`SageOffloadingWorker` (each worker process): a :class:`~sagellm_kv_cache.PagedKVPool` of
  ``num_chunks`` slots, filled from / copied back into vLLM's canonical int8 KV views with the pool's
  ``scatter`` / ``gather_into``.

vLLM keys (``OffloadKey``: the chained block hash + a 4-byte group index) map to the trie's 32-byte
digests deterministically: keys of at most 32 bytes are zero-padded, longer ones (vLLM's default
32-byte SHA-256 block hash + group = 36 bytes) are SHA-256'd, since their hash part need not be random.

Not supported: hybrid models (more than one KV-cache group: the spec refuses them at construction);
tensor/pipeline parallel > 1 is untested (each rank keeps its own shard in its own pool under the same
chunk ids, which is how vLLM's CPU tier works without its shared region). Transfers are synchronous
copies done inside ``submit_*``; ``get_finished`` reports them on the next poll.

This module imports vLLM; the rest of the package never imports it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable

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
    "key_digest",
]

_DIGEST = 32


def key_digest(key: bytes) -> bytes:
    """The trie digest of a vLLM ``OffloadKey`` (deterministic, no hashing)."""
    if len(key) <= _DIGEST:
        return key.ljust(_DIGEST, b"\0")
    return hashlib.sha256(key).digest()


class SageLoadStoreSpec(BlockIDsLoadStoreSpec):
    """Host-pool chunk slots, in the order of the keys they were prepared for."""


class SageOffloadingManager(OffloadingManager):
    """vLLM ``OffloadingManager`` over our native trie + block allocator (scheduler side).

    The trie (one flat node per resident key) holds recency, the eviction policy and the load pins
    (a ``match`` reference per ``prepare_load``); the allocator hands out pool slots. A Python dict
    mirrors which keys are resident so that ``lookup`` (called once per block) costs one dict probe.
    Single-threaded like vLLM's own manager (the connector serializes calls); the native parts are
    thread-safe anyway. ``policy`` is one of the trie's policies (``lru``, ``fifo``, ``priority``, ``ttl``).
    """

    def __init__(self, num_chunks: int, *, policy: str = "lru", enable_events: bool = False) -> None:
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks <= 0:
            raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
        self.medium = Medium.CPU
        self.num_chunks = num_chunks
        self._alloc = _core.BlockAllocator(num_chunks)
        self._trie = _core.PrefixCache(block_size=1, capacity_blocks=None, policy=policy, allocator=self._alloc)
        self._pending: dict[bytes, tuple[int, bytes]] = {}  # key -> (slot, digest): not complete_store'd yet
        self._resident: dict[bytes, bytes] = {}  # key -> digest, for keys in the trie
        self._slot_key: dict[int, bytes] = {}  # slot -> resident key
        self._pins: dict[bytes, int] = {}  # key -> prepare_load calls not completed yet
        self._events: list[OffloadingEvent] | None = [] if enable_events else None

    # --- lookups and loads ------------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._resident:
            return LookupResult.HIT
        return LookupResult.HIT_PENDING if key in self._pending else LookupResult.MISS

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        return CacheHitSource.HOST

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        """Pins each key (a trie reference) until :meth:`complete_load`; all keys must be HITs."""
        keys = list(keys)
        missing = [k for k in keys if k not in self._resident]
        if missing:
            raise KeyError(f"prepare_load: key {bytes(missing[0]).hex()} is not offloaded and ready")
        slots: list[int] = []
        match, pins, resident = self._trie.match, self._pins, self._resident
        for key in keys:
            slots.append(int(match([resident[key]])[1][0]))
            pins[key] = pins.get(key, 0) + 1
        return SageLoadStoreSpec(slots)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            digest = self._resident.get(key)
            if digest is not None:
                self._trie.match([digest])
                self._trie.release([digest])

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        release, pins = self._trie.release, self._pins
        for key in keys:
            count = pins.get(key, 0)
            if count <= 0:
                raise KeyError(f"complete_load: key {bytes(key).hex()} has no load in flight")
            release([self._resident[key]])
            if count == 1:
                del pins[key]
            else:
                pins[key] = count - 1

    # --- stores -----------------------------------------------------------------------------

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        keys = list(keys)
        resident, pending = self._resident, self._pending
        to_store = [k for k in keys if k not in resident and k not in pending]
        if not to_store:
            return PrepareStoreOutput(keys_to_store=[], store_spec=SageLoadStoreSpec([]), evicted_keys=[])
        if len(set(to_store)) != len(to_store):
            raise ValueError("prepare_store: duplicate keys in one call")
        evicted: list[OffloadKey] = []
        need = len(to_store) - self._alloc.num_available
        if need > 0:
            # Pin the keys of this call that are already resident so that eviction cannot take them.
            protect = [resident[k] for k in keys if k in resident and k not in self._pins]
            if len(resident) - len(self._pins) - len(protect) < need:
                return None
            trie = self._trie
            for digest in protect:
                trie.match([digest])
            try:
                trie.evict(need)
            finally:
                for digest in protect:
                    trie.release([digest])
        slots = self._alloc.allocate(len(to_store)).tolist()
        if need > 0:
            # Eviction freed exactly `need` slots and this allocation took every free slot: the
            # evicted keys are the previous owners of the slots just handed out.
            slot_key = self._slot_key
            for slot in slots:
                key = slot_key.pop(slot, None)
                if key is not None:
                    del resident[key]
                    evicted.append(OffloadKey(key))
            if evicted and self._events is not None:
                self._events.append(OffloadingEvent(keys=evicted, medium=self.medium, removed=True))
        for key, slot in zip(to_store, slots, strict=True):
            pending[key] = (slot, key_digest(key))
        return PrepareStoreOutput(keys_to_store=to_store, store_spec=SageLoadStoreSpec(slots), evicted_keys=evicted)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        stored: list[OffloadKey] = []
        slots: list[int] = []
        insert = self._trie.insert
        for key in keys:
            entry = self._pending.pop(key, None)
            if entry is None:
                continue
            slot, digest = entry
            slots.append(slot)
            if success:
                insert([digest], [slot])
                self._resident[key] = digest
                self._slot_key[slot] = key
                stored.append(key)
        if slots:
            self._alloc.free(slots)  # the trie keeps its own reference on a stored chunk
        if stored and self._events is not None:
            self._events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False))

    # --- request lifecycle and bookkeeping ------------------------------------------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        return None

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None:
            return []
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> None:
        """Drops every resident chunk that no load pins (stores in flight stay)."""
        self._trie.clear()
        for key, digest in list(self._resident.items()):
            if not self._trie.contains(digest):
                del self._resident[key]
        self._slot_key = {slot: key for slot, key in self._slot_key.items() if key in self._resident}

    def stats(self) -> dict[str, int]:
        """Resident / pending / free chunk counts plus the trie's counters."""
        out = {k: int(v) for k, v in self._trie.stats().items()}
        out.update(resident_chunks=len(self._resident), pending_chunks=len(self._pending),
                   pinned_chunks=len(self._pins), free_chunks=int(self._alloc.num_available),
                   num_chunks=self.num_chunks)
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

