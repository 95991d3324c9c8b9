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

vLLM keys (``OffloadKey``: the chained block hash + a 4-byte group index) map to the trie's 32-byte
digests deterministically: keys of at most 32 bytes are zero-padded, longer ones (vLLM's default
32-byte SHA-256 block hash + group = 36 bytes) are SHA-256'd, since their hash part need not be random.

Not supported: hybrid models (more than one KV-cache group: the spec refuses them at construction);
tensor/pipeline parallel > 1 is untested (each rank keeps its own shard in its own pool under the same
chunk ids, which is how vLLM's CPU tier works without its shared region; ``cpu_bytes_to_use`` counts
all ranks). Transfers are synchronous copies done inside ``submit_*`` (on a CUDA KV cache: on the
current stream, not a stream of their own); ``get_finished`` reports them on the next poll.

This module imports vLLM; the rest of the package never imports it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable, Sequence

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


class _Trail:
    """Per-request note (kept in the ReqContext): the request's last key known to the tier."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: bytes | None = None


class SageOffloadingManager(OffloadingManager):
    """vLLM ``OffloadingManager`` over our native trie + block allocator (scheduler side).

    Resident chunks are trie nodes chained in request order: a chunk's parent is the chunk before it
    in the request that stored it (when that one is resident), so eviction takes leaves first (the
    tail of a prefix goes before its head, which vLLM's flat LRU does not do) and loads and stores are
    one native call per run of chained keys. The trie holds recency, the eviction policy and the load
    pins (``match`` references from ``prepare_load`` to ``complete_load``); the allocator hands out
    pool slots. A Python dict mirrors which keys are resident, so ``lookup`` costs one dict probe.
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
        # key -> (slot, digest, previous key of the request): stored but not complete_store'd yet
        self._pending: dict[bytes, tuple[int, bytes, bytes | None]] = {}
        # key -> (slot, digest, parent key in the trie or None): keys in the trie
        self._resident: dict[bytes, tuple[int, bytes, bytes | None]] = {}
        self._slot_key: dict[int, bytes] = {}  # slot -> resident key
        self._events: list[OffloadingEvent] | None = [] if enable_events else None

    @staticmethod
    def _trail(req_context: ReqContext) -> _Trail:
        trail = req_context.get_state(_Trail)
        if trail is None:
            trail = _Trail()
            req_context.set_state(trail)
        return trail

    def _paths(self, keys: Sequence[bytes]) -> list[list[bytes]]:
        """Root-to-key digest paths covering ``keys``: one per key that is no other key's ancestor.

        Independent of the order of ``keys`` (vLLM may complete a load with its keys reordered), and
        fixed while the keys are pinned (a pinned node and its ancestors cannot be evicted).
        """
        resident = self._resident
        if keys:  # common case: the keys are one chain, all on the last key's path
            path, members = [], set()
            walk: bytes | None = keys[-1]
            while walk is not None:
                members.add(walk)
                _, digest, walk = resident[walk]
                path.append(digest)
            if len(members) >= len(keys) and members.issuperset(keys):
                path.reverse()
                return [path]
        ancestors: set[bytes] = set()
        for key in keys:
            node = resident[key][2]
            while node is not None and node not in ancestors:
                ancestors.add(node)
                node = resident[node][2]
        paths: list[list[bytes]] = []
        for key in sorted(set(keys) - ancestors):
            path = []
            walk = key
            while walk is not None:
                _, digest, walk = resident[walk]
                path.append(digest)
            path.reverse()
            paths.append(path)
        return paths

    # --- lookups and loads ------------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._resident:
            return LookupResult.HIT
        return LookupResult.HIT_PENDING if key in self._pending else LookupResult.MISS

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        return CacheHitSource.HOST

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        """Pins each key and its trie ancestors until :meth:`complete_load`; all keys must be HITs."""
        keys = list(keys)
        resident = self._resident
        missing = [k for k in keys if k not in resident]
        if missing:
            raise KeyError(f"prepare_load: key {bytes(missing[0]).hex()} is not offloaded and ready")
        match = self._trie.match
        for path in self._paths(keys):
            match(path)
        if keys:
            self._trail(req_context).last = keys[-1]
        return SageLoadStoreSpec([resident[k][0] for k in keys])

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        present = [k for k in keys if k in self._resident]
        for path in self._paths(present):
            self._trie.match(path)
            self._trie.release(path)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        keys = list(keys)
        missing = [k for k in keys if k not in self._resident]
        if missing:
            raise KeyError(f"complete_load: key {bytes(missing[0]).hex()} has no load in flight")
        for path in self._paths(keys):
            self._trie.release(path)

    # --- stores -----------------------------------------------------------------------------

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        keys = list(keys)
        resident, pending = self._resident, self._pending
        to_store = [k for k in keys if k not in resident and k not in pending]
        trail = self._trail(req_context)
        if not to_store:
            if keys:
                trail.last = keys[-1]
            return PrepareStoreOutput(keys_to_store=[], store_spec=SageLoadStoreSpec([]), evicted_keys=[])
        if len(set(to_store)) != len(to_store):
            raise ValueError("prepare_store: duplicate keys in one call")
        evicted: list[OffloadKey] = []
        need = len(to_store) - self._alloc.num_available
        if need > 0:
            trie = self._trie
            # Pin the keys of this call that are already resident so that eviction cannot take them.
            protect = self._paths([k for k in keys if k in resident])
            for path in protect:
                trie.match(path)
            try:
                if int(trie.stats()["evictable_blocks"]) < need:
                    return None
                trie.evict(need)
            finally:
                for path in protect:
                    trie.release(path)
            if self._alloc.num_available < len(to_store):  # not expected: evictable counted above
                self._forget_evicted(evicted)
                self._emit_removed(evicted)
                return None
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
            self._emit_removed(evicted)
        slot_of = dict(zip(to_store, slots, strict=True))
        prev = trail.last
        for key in keys:  # each stored key remembers the key before it, in the call's (prefix) order
            slot = slot_of.get(key)
            if slot is not None:
                pending[key] = (slot, key_digest(key), prev)
            prev = key
        trail.last = keys[-1]
        return PrepareStoreOutput(keys_to_store=to_store, store_spec=SageLoadStoreSpec(slots), evicted_keys=evicted)

    def _forget_evicted(self, out: list[OffloadKey]) -> None:
        for slot, key in list(self._slot_key.items()):
            if not self._trie.contains(self._resident[key][1]):
                del self._slot_key[slot]
                del self._resident[key]
                out.append(OffloadKey(key))

    def _emit_removed(self, keys: list[OffloadKey]) -> None:
        if keys and self._events is not None:
            self._events.append(OffloadingEvent(keys=keys, medium=self.medium, removed=True))

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        stored: list[OffloadKey] = []
        slots: list[int] = []
        resident, pending = self._resident, self._pending
        run_keys: list[bytes] = []
        run_parent: bytes | None = None
        for key in keys:
            entry = pending.pop(key, None)
            if entry is None:
                continue
            slot, digest, prev = entry
            slots.append(slot)
            if not success:
                continue
            parent = prev if prev is not None and (prev in resident or (run_keys and prev == run_keys[-1])) else None
            if not run_keys or parent != run_keys[-1]:
                self._insert_run(run_keys, run_parent)
                run_keys, run_parent = [], parent
            run_keys.append(key)
            resident[key] = (slot, digest, parent)
            self._slot_key[slot] = key
            stored.append(key)
        self._insert_run(run_keys, run_parent)
        if slots:
            self._alloc.free(slots)  # the trie keeps its own reference on a stored chunk
        if stored and self._events is not None:
            self._events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False))

    def _insert_run(self, run: list[bytes], parent: bytes | None) -> None:
        if not run:
            return
        resident = self._resident
        digests = [resident[k][1] for k in run]
        slots = [resident[k][0] for k in run]
        self._trie.insert(digests, slots, parent=None if parent is None else resident[parent][1])

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
        gone: list[OffloadKey] = []
        self._forget_evicted(gone)

    def stats(self) -> dict[str, int]:
        """Resident / pending / free chunk counts plus the trie's counters."""
        out = {k: int(v) for k, v in self._trie.stats().items()}
        out.update(resident_chunks=len(self._resident), pending_chunks=len(self._pending),
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

