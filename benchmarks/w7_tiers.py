"""W7: tiered storage. Demote/promote bandwidth per tier pair against the plain copy of the same bytes,
and the overlap of background demotions with a compute loop.

* device <-> host: the host slab's batched block copies (what a demotion and a promotion run) against
  memcpy (numpy copyto) of the same bytes; then the whole path through ``TieredPrefixCache``
  (eviction, copy on the background thread, index updates) against the same memcpy.
* host <-> disk: the disk tier's slot writes and checked reads (header + payload in one positional
  call, checksum) against a sequential write / read of the same bytes with the same open flags
  (O_DIRECT where the filesystem takes it) into a plain file.
* overlap: a compute loop (numpy matmul, GIL released) alone, a demotion storm alone, and both at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import Row, best_of
from sagellm_kv_cache import _core
from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.tiers import DiskTier, TieredPrefixCache

# 4 layers x 8 KV heads x 128 dims x fp16 x 16 tokens = 256 KiB per block (as W4).
SPEC = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype="fp16", block_size=16)


def _raw_file_io(directory: Path, bufs: list[np.ndarray], direct: bool) -> tuple[float, float]:
    """Sequential write then read of ``bufs`` to a plain file, same flags as the disk tier."""
    path = directory / "raw.bin"
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        size = bufs[0].nbytes
        os.ftruncate(fd, size * len(bufs))

        def write() -> None:
            for i, b in enumerate(bufs):
                os.pwrite(fd, b, i * size)

        def read() -> None:
            for i, b in enumerate(bufs):
                os.preadv(fd, [b], i * size)

        write()
        return best_of(3, write), best_of(3, read)
    finally:
        os.close(fd)


def _disk_rows(n: int, tmp: Path) -> list[Row]:
    pool_bytes = SPEC.block_nbytes
    slab = _core.HostSlab(n, pool_bytes)
    view = slab.view()
    view[:] = np.random.default_rng(0).integers(0, 256, view.shape, dtype=np.uint8)
    disk = DiskTier(tmp / "tier", n, pool_bytes)
    digests = [i.to_bytes(32, "little") for i in range(n)]
    out = [Row] * 0
    try:
        def write() -> None:
            for i in range(n):
                disk.write(i, digests[i], view[i], i + 1)

        def read() -> None:
            for i in range(n):
                if not disk.read(i, digests[i], view[i]):
                    raise RuntimeError("disk tier read failed its check")

        write()
        t_write, t_read = best_of(3, write), best_of(3, read)
        direct = disk.direct_io
    finally:
        disk.close()
    t_raw_write, t_raw_read = _raw_file_io(tmp, [view[i] for i in range(n)], direct)
    nbytes = n * pool_bytes
    gbps = lambda t: nbytes / t / 1e9  # noqa: E731
    flags = "O_DIRECT" if direct else "buffered"
    out = [
        Row(f"W7 host->disk {n} blocks", "GB/s", gbps(t_write), gbps(t_raw_write),
            f"sequential pwrite of the same bytes ({flags})", higher_is_better=True,
            extra={"bytes": nbytes, "direct_io": direct}),
        Row(f"W7 disk->host {n} blocks (checked)", "GB/s", gbps(t_read), gbps(t_raw_read),
            f"sequential pread of the same bytes ({flags})", higher_is_better=True,
            extra={"bytes": nbytes, "direct_io": direct}),
    ]
    return out


def _copy_rows(n: int) -> list[Row]:
    pool = PagedKVPool(SPEC, n)
    ids = pool.allocate(n)
    slab = _core.HostSlab(n, pool.block_nbytes)
    slots = np.random.default_rng(1).permutation(n).astype(np.int32)  # scattered slots, as in use
    src = np.ones(n * pool.block_nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    slab.copy_from_pool(pool._native, ids, slots)
    np.copyto(dst, src)
    t_down = best_of(5, lambda: slab.copy_from_pool(pool._native, ids, slots))
    t_up = best_of(5, lambda: slab.copy_to_pool(pool._native, slots, ids))
    t_memcpy = best_of(5, lambda: np.copyto(dst, src))
    gbps = lambda t: src.nbytes / t / 1e9  # noqa: E731
    return [
        Row(f"W7 device->host copy {n} blocks", "GB/s", gbps(t_down), gbps(t_memcpy), "memcpy (numpy copyto)",
            higher_is_better=True, extra={"bytes": src.nbytes, "device": pool.device}),
        Row(f"W7 host->device copy {n} blocks", "GB/s", gbps(t_up), gbps(t_memcpy), "memcpy (numpy copyto)",
            higher_is_better=True, extra={"bytes": src.nbytes, "device": pool.device}),
    ]


def _end_to_end_rows(n: int) -> list[Row]:
    """Demotion of n cached blocks and their promotion back, through TieredPrefixCache."""
    pool = PagedKVPool(SPEC, 2 * n)
    tc = TieredPrefixCache(pool, device_blocks=n, host_blocks=n)
    tokens = np.arange(n * SPEC.block_size, dtype=np.int32)
    digests = tc.hash_tokens(tokens)
    ids = tc.allocate(n)
    tc.insert(digests, ids)
    pool.free(ids)
    src = np.ones(n * pool.block_nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    t_memcpy = best_of(5, lambda: np.copyto(dst, src))
    best_down = best_up = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for fut in tc._demote(n):
            fut.result()
        best_down = min(best_down, time.perf_counter() - t0)
        t0 = time.perf_counter()
        m = tc.match(digests)
        best_up = min(best_up, time.perf_counter() - t0)
        assert m.num_matched == n and int(m.hits(1)) == n
        tc.release(digests)
    tc.close()
    gbps = lambda t: src.nbytes / t / 1e9  # noqa: E731
    return [
        Row(f"W7 demote {n} blocks (cache, device->host)", "GB/s", gbps(best_down), gbps(t_memcpy),
            "memcpy (numpy copyto)", higher_is_better=True, extra={"bytes": src.nbytes}),
        Row(f"W7 promote {n} blocks (match, host->device)", "GB/s", gbps(best_up), gbps(t_memcpy),
            "memcpy (numpy copyto)", higher_is_better=True, extra={"bytes": src.nbytes}),
    ]


def _overlap_rows(n: int, tmp: Path) -> list[Row]:
    """Compute alone, demotions (device -> host -> disk) alone, then both at once."""
    a = np.random.default_rng(2).standard_normal((384, 384)).astype(np.float32)

    def compute() -> None:
        b = a
        for _ in range(60):
            b = np.tanh(a @ b)

    def storm(directory: Path) -> None:
        pool = PagedKVPool(SPEC, n + 64)
        with TieredPrefixCache(pool, device_blocks=64, host_blocks=64, disk_dir=directory, disk_blocks=n) as tc:
            for i in range(n // 8):
                d = tc.hash_tokens(np.arange(i * 1000, i * 1000 + 8 * SPEC.block_size, dtype=np.int32))
                ids = tc.allocate(8)
                tc.insert(d, ids)
                pool.free(ids)
            tc.flush()

    compute()
    t_compute = best_of(3, compute)
    runs = iter(range(100))
    t_storm = best_of(3, lambda: storm(tmp / f"s{next(runs)}"))

    def both() -> None:
        t = threading.Thread(target=storm, args=(tmp / f"s{next(runs)}",))
        t.start()
        compute()
        t.join()

    t_both = best_of(3, both)
    return [Row(f"W7 overlap: compute + {n}-block demotion storm", "s", t_both, t_compute + t_storm,
                "compute then storm, one after the other",
                extra={"compute_s": t_compute, "storm_s": t_storm, "both_s": t_both,
                       "hidden_fraction": (t_compute + t_storm - t_both) / min(t_compute, t_storm)})]


def run(quick: bool = False) -> list[Row]:
    n = 128 if quick else 512  # 32 MiB / 128 MiB of 256 KiB blocks
    tmp = Path(tempfile.mkdtemp(prefix="sagellm-kv-w7-", dir=os.environ.get("SAGELLM_KV_BENCH_DIR")))
    try:
        rows = _copy_rows(n) + _end_to_end_rows(n) + _disk_rows(n, tmp) + _overlap_rows(n, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from common import print_table

    print_table(run())
