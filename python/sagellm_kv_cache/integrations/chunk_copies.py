"""Chunk copies between an engine's paged KV tensors and a host slab, ordered on the device's streams.

This is the GPU path of the vLLM offloading tier's worker (``vllm_offload.SageOffloadingWorker``), kept
free of vLLM so that it can be tested and measured with torch alone. It also runs on CPU tensors, where
every copy completes inside the call.

Data: ``tensors`` are the engine's KV tensors viewed as ``(num_blocks, row_bytes)`` int8 (one per
layer in layer-outer layouts, one packed tensor in block-outer ones); a *block* is row ``b`` of every
tensor. The host side is a :class:`~sagellm_kv_cache._core.HostSlab` of ``num_chunks`` slots, pinned
when the tensors are on a CUDA device. A slot holds ``blocks_per_chunk`` blocks *block-major*: block
``j`` of a chunk fills bytes ``[j * R, (j + 1) * R)`` of its slot, ``R`` being the sum of the row
sizes, with tensor ``k``'s row at offset ``sum(rows[:k])`` in it. So the blocks of one chunk that a job
moves are one contiguous run of the slot, and a job costs one host<->device copy per chunk whatever
the number of layers.

A job (``store``: device blocks -> slots, ``load``: slots -> device blocks):

1. on CUDA it runs on a stream of its own direction (expedited loads have a third one, so they never
   queue behind regular loads) that first waits for everything already queued on the caller's
   current stream: a store reads the KV the model has written, a load lands after any pending write
   to its destination blocks. Jobs of one direction run in submission order;
2. the device-side gather (store) or scatter (load) of the job's blocks goes through ``(rows, R)``
   staging rows on the device, up to ``staging_bytes`` (64 MiB) per direction (at least one chunk;
   grown when a job needs more rows than an earlier one did, reused in stream order); a longer job
   goes through them in batches of whole chunks. They are filled with
   ``index_select`` and emptied with ``index_copy_``; the host<->device copies between them and the
   slots are asynchronous (the slab is pinned);
3. an event recorded after the last copy marks completion: ``finished`` polls the events and returns
   the jobs that are done, each direction in order; ``wait`` blocks until given jobs are done.

Until a job is finished its device blocks (store) and its slots (load) must not be reused, and a
store's slots must not be read: the caller's bookkeeping (vLLM's scheduler and our manager) already
guarantees both. Thread safety: one thread at a time (vLLM's worker calls come from one thread).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sagellm_kv_cache import _core
from sagellm_kv_cache._numbers import array_of

__all__ = ["ChunkCopier", "FinishedCopy"]


@dataclass(frozen=True)
class FinishedCopy:
    """A job that completed: its id, the bytes it moved and the seconds it took (device time on CUDA)."""

    job_id: int
    nbytes: int
    seconds: float


@dataclass
class _Job:
    job_id: int
    nbytes: int
    start: Any  # torch.cuda.Event
    end: Any


def _indices(values: Any, what: str, limit: int) -> npt.NDArray[np.int64]:
    """``values`` (any integer sequence or array, flattened) as int64, each in ``[0, limit)``: TypeError for
    anything but integers (floats are not truncated, booleans not read as 0 / 1), ValueError naming the
    first value out of range."""
    arr = array_of(f"{what}s", values, "integers")
    if arr.dtype.kind not in "iu" and isinstance(values, list | tuple):
        arr = np.asarray(values, dtype=object)  # item by item, to name the bad one (a float, an int past int64)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    flat = arr.reshape(-1)
    if arr.dtype == object:  # Python ints beyond int64, or mixed items
        items = flat.tolist()
        for i, x in enumerate(items):
            if isinstance(x, bool) or not isinstance(x, int | np.integer):
                raise TypeError(f"{what}s must be integers, got {type(x).__name__} at position {i}")
        bad = next((int(x) for x in items if not 0 <= x < limit), None)
    elif arr.dtype.kind in "iu":
        out_of_range = (flat < 0) | (flat >= limit)
        bad = int(flat[out_of_range][0]) if out_of_range.any() else None
    else:
        raise TypeError(f"{what}s must be integers, got dtype {arr.dtype}")
    if bad is not None:
        raise ValueError(f"{what} {bad} out of range [0, {limit})")
    return np.ascontiguousarray(flat, dtype=np.int64)


def _written_once(values: npt.NDArray[np.int64], what: str, call: str) -> None:
    """ValueError naming the first value ``values`` holds twice: a job's targets (a store's slots, a load's
    device blocks) are written once each; a repeated one would be written twice in one job, and which
    write lands last is unordered on a device."""
    if len(np.unique(values)) == len(values):
        return
    first_at: dict[int, int] = {}
    for i, v in enumerate(values.tolist()):
        if first_at.setdefault(v, i) != i:
            raise ValueError(f"{call}: {what} {v} appears at positions {first_at[v]} and {i}; "
                             f"each {what} may be written once per job")


class ChunkCopier:
    """Moves blocks between ``tensors`` and ``num_chunks`` host chunk slots (see the module doc)."""

    def __init__(self, tensors: Sequence[torch.Tensor], num_chunks: int, blocks_per_chunk: int, *,
                 staging_bytes: int = 64 << 20) -> None:
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
            raise TypeError(f"tensors must be a sequence of KV tensors, got {type(tensors).__name__}")
        if not tensors:
            raise ValueError("tensors must hold at least one KV tensor")
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks <= 0:
            raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
        if isinstance(blocks_per_chunk, bool) or not isinstance(blocks_per_chunk, int) or blocks_per_chunk <= 0:
            raise ValueError(f"blocks_per_chunk must be a positive int, got {blocks_per_chunk!r}")
        device = tensors[0].device
        num_blocks = int(tensors[0].shape[0])
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.dtype != torch.int8:
                raise TypeError(f"tensors[{i}] must be a 2-D int8 (num_blocks, row_bytes) view, "
                                f"got {t.dtype} with shape {tuple(t.shape)}")
            if t.device != device or int(t.shape[0]) != num_blocks:
                raise ValueError(f"tensors[{i}] ({t.device}, {int(t.shape[0])} blocks) does not match tensors[0] "
                                 f"({device}, {num_blocks} blocks)")
        self.tensors = list(tensors)
        self.device = device
        self.num_blocks = num_blocks
        self.blocks_per_chunk = blocks_per_chunk
        self.rows = [int(t.shape[1]) for t in self.tensors]
        self.offsets = [sum(self.rows[:k]) for k in range(len(self.rows))]
        self.block_bytes = sum(self.rows)  # R: one block, every tensor's row
        self.chunk_bytes = blocks_per_chunk * self.block_bytes
        self.cuda = device.type == "cuda"
        slab_device = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}" \
            if self.cuda else "cpu"
        self.slab = _core.HostSlab(num_chunks, self.chunk_bytes, slab_device, False)
        # (num_chunks, slot_stride) int8 over the slab (the view keeps the slab alive).
        self.host = torch.from_numpy(self.slab.view()).view(torch.int8)
        self.staging_bytes = int(staging_bytes)  # device staging per direction (at least one chunk's)
        self._staging: dict[str, torch.Tensor] = {}
        self._streams: dict[str, Any] = {}
        self._jobs: dict[str, deque[_Job]] = {"store": deque(), "load": deque(), "expedited": deque()}
        self._done: list[FinishedCopy] = []  # jobs that completed inside their call (CPU tensors)

    @property
    def num_chunks(self) -> int:
        return int(self.slab.num_slots)

    @property
    def pinned(self) -> bool:
        """True when the slab is page-locked (CUDA tensors), so host<->device copies are asynchronous."""
        return bool(self.slab.pinned)

    # --- jobs --------------------------------------------------------------------------------------

    def store(self, job_id: int, block_ids: Any, slots: Any, skip: int = 0) -> None:
        """Copies device blocks ``block_ids`` into chunk slots: block ``i`` goes to position ``skip + i``
        of the job's chunks, chunk ``c`` being slot ``slots[c]`` (so ``slots`` must hold exactly the
        chunks those positions touch, each once: ``ValueError`` naming a repeated slot, as the pool path's
        scatter does). Positions of a chunk outside the job keep their bytes."""
        ids, runs = self._plan(block_ids, slots, skip, writes_slots=True)
        R = self.block_bytes
        with self._job("store", job_id, len(ids)) as staging:
            dev_ids = self._device_ids(ids)
            for lo, hi, batch in self._batches(runs, len(staging)):
                staged = staging[:hi - lo]
                for t, off, row in zip(self.tensors, self.offsets, self.rows, strict=True):
                    staged[:, off:off + row] = t.index_select(0, dev_ids[lo:hi])
                for slot, first, pos, count in batch:
                    self.host[slot, first * R:(first + count) * R].copy_(
                        staged[pos - lo:pos - lo + count].view(-1), non_blocking=True)

    def load(self, job_id: int, slots: Any, block_ids: Any, skip: int = 0, *, expedited: bool = False) -> None:
        """Copies chunk positions back into device blocks: the inverse of :meth:`store` (same
        arguments; a slot may repeat, it is only read, but a block id may not: ``ValueError`` naming
        it, as each block is written once). ``expedited`` runs on a stream of its own, not
        behind regular loads."""
        ids, runs = self._plan(block_ids, slots, skip, writes_slots=False)
        R = self.block_bytes
        with self._job("expedited" if expedited else "load", job_id, len(ids)) as staging:
            dev_ids = self._device_ids(ids)
            for lo, hi, batch in self._batches(runs, len(staging)):
                staged = staging[:hi - lo]
                for slot, first, pos, count in batch:
                    staged[pos - lo:pos - lo + count].view(-1).copy_(
                        self.host[slot, first * R:(first + count) * R], non_blocking=True)
                for t, off, row in zip(self.tensors, self.offsets, self.rows, strict=True):
                    t.index_copy_(0, dev_ids[lo:hi], staged[:, off:off + row])

    def finished(self) -> list[FinishedCopy]:
        """The jobs completed since the last call (each direction in submission order); never blocks."""
        out, self._done = self._done, []
        for queue in self._jobs.values():
            while queue and queue[0].end.query():
                out.append(self._retire(queue.popleft()))
        return out

    def wait(self, job_ids: Collection[int]) -> None:
        """Blocks until the given jobs (those still in flight) are done; ``finished`` then reports them."""
        wanted = set(job_ids)
        for queue in self._jobs.values():
            for job in queue:
                if job.job_id in wanted:
                    job.end.synchronize()

    def shutdown(self) -> None:
        """Waits for every job in flight (their results stay for ``finished``)."""
        for queue in self._jobs.values():
            if queue:
                queue[-1].end.synchronize()  # a direction's jobs complete in order

    def chunk_view(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s bytes as ``(blocks_per_chunk, R)`` int8 on the host (a view, for tests and
        inspection; not to be read while a store into it is in flight)."""
        if isinstance(slot, bool) or not isinstance(slot, int | np.integer):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.num_chunks:
            raise IndexError(f"slot {slot} out of range [0, {self.num_chunks})")
        return self.host[slot, :self.chunk_bytes].view(self.blocks_per_chunk, self.block_bytes)

    # --- internals ---------------------------------------------------------------------------------

    def _plan(self, block_ids: Any, slots: Any, skip: int, *, writes_slots: bool
              ) -> tuple[npt.NDArray[np.int64], list[tuple[int, int, int, int]]]:
        """Checks a job's arguments (before anything is queued) and cuts it into per-chunk runs
        (slot, first position in the chunk, first block of the job, count). A store (``writes_slots``)
        may name a slot once: twice, the later chunk's copy overwrites the earlier's blocks, which the
        caller's bookkeeping then believes stored. A load may name a device block once: twice, two
        positions land in one block and which one wins is undefined on a device (``index_copy_``)."""
        bpc = self.blocks_per_chunk
        if isinstance(skip, bool) or not isinstance(skip, int | np.integer) or not 0 <= skip < bpc:
            raise ValueError(f"skip must be an int in [0, {bpc}), got {skip!r}")
        ids = _indices(block_ids, "block id", self.num_blocks)
        n = len(ids)
        need = -(-(n + int(skip)) // bpc) if n else 0
        num_slots = np.size(slots)
        if num_slots != need:
            raise ValueError(f"{n} blocks from position {skip} need {need} chunks, got {num_slots}")
        slot_ids = _indices(slots, "slot", self.num_chunks)
        if writes_slots:
            _written_once(slot_ids, "slot", "store")
        else:
            _written_once(ids, "block id", "load")
        slot_list = slot_ids.tolist()
        for i, (t, row) in enumerate(zip(self.tensors, self.rows, strict=True)):
            # A tensor resized since construction: an out-of-range index on a GPU is a device-side
            # assert that ends the process's CUDA context, so it is refused here.
            if t.shape != (self.num_blocks, row):
                raise ValueError(f"tensors[{i}] is now {tuple(t.shape)}, was ({self.num_blocks}, {row})")
        runs, pos = [], 0
        for c, slot in enumerate(slot_list):
            first = int(skip) if c == 0 else 0
            count = min(bpc - first, n - pos)
            runs.append((slot, first, pos, count))
            pos += count
        return ids, runs

    def _device_ids(self, ids: npt.NDArray[np.int64]) -> torch.Tensor:
        # Host-to-device from pageable memory returns once the driver has staged the bytes, so the
        # numpy array may go right after; on CPU this is the array itself.
        return torch.from_numpy(ids).to(self.device, non_blocking=True)

    def _stream(self, direction: str) -> Any:
        stream = self._streams.get(direction)
        if stream is None:
            stream = self._streams[direction] = torch.cuda.Stream(self.device)
        return stream

    def _staging_for(self, direction: str, n: int) -> torch.Tensor:
        """The direction's staging rows on the device, grown to ``min(n, cap)`` blocks (never below one
        chunk). Allocated on the direction's stream and used only there, so a new job may reuse it
        while the previous one's copies are still queued: the stream orders them."""
        cap = max(self.blocks_per_chunk, self.staging_bytes // self.block_bytes)
        want = max(self.blocks_per_chunk, min(n, cap))
        have = self._staging.get(direction)
        if have is None or len(have) < want:
            have = self._staging[direction] = torch.empty((want, self.block_bytes), dtype=torch.int8,
                                                          device=self.device)
        return have

    @staticmethod
    def _batches(runs: list[tuple[int, int, int, int]], capacity: int
                 ) -> Iterator[tuple[int, int, list[tuple[int, int, int, int]]]]:
        """Consecutive runs grouped so that each group's blocks fit ``capacity`` staging rows:
        (first block of the job, end, the runs)."""
        batch: list[tuple[int, int, int, int]] = []
        lo = 0
        for run in runs:
            _, _, pos, count = run
            if batch and pos + count - lo > capacity:
                yield lo, pos, batch
                batch, lo = [], pos
            batch.append(run)
        if batch:
            last = batch[-1]
            yield lo, last[2] + last[3], batch

    @contextmanager
    def _job(self, direction: str, job_id: int, n: int) -> Iterator[torch.Tensor]:
        nbytes = n * self.block_bytes
        if not self.cuda:
            start = time.perf_counter()
            yield self._staging_for(direction, n)
            self._done.append(FinishedCopy(job_id, nbytes, time.perf_counter() - start))
            return
        stream = self._stream(direction)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            begin.record(stream)
            yield self._staging_for(direction, n)
            end.record(stream)
        self._jobs[direction].append(_Job(job_id, nbytes, begin, end))

    @staticmethod
    def _retire(job: _Job) -> FinishedCopy:
        return FinishedCopy(job.job_id, job.nbytes, job.start.elapsed_time(job.end) * 1e-3)
