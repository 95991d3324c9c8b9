"""W5: pool-to-pool block transfer between processes, on each path, against its raw reference.

Two comparisons, each with its own reference measured in the same processes, alternating with ours
so both share the machine's noise (best of the repetitions is reported):

* same-host path (``BlockTransfer(same_host=True)``: C++ gather into the source's memfd staging
  ring, footers and acks over the handover's Unix socket, checksum and scatter out of the destination's
  mapping) against a single-thread ``memcpy`` of the same number of bytes between two buffers of one process;
* gloo path (``same_host=False``: gather into staging buffers, gloo send of payload + footer,
  checksum and scatter) against a raw ``GlooBackend.send``/``recv`` of the same bytes as one
  contiguous tensor (no gather, no checksum, no scatter).

Transfers are timed on the destination from a common barrier until the blocks are in its pool.
Each row also gives the CPU time per transfer of the busiest source and destination process (all
their threads): on a loaded machine it moves far less than the wall time, so it shows what a change
costs when the wall-clock ratio is drowned in noise.
Block ids are a random permutation, as in a pool that has been in use. With ``--concurrency c``,
``2c`` processes run ``c`` transfers at once (rank i sends to rank i + c); each reference runs
``c``-fold at once too (memcpy on every destination), and the slowest destination's time counts.

    python benchmarks/run.py --only W5 [--quick]
    python benchmarks/w5_transfer.py --sizes 64,1024 --concurrency 1,2,4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from typing import Any

from common import Row, print_table

# 32 layers x 8 KV heads x 128 dims x fp16 x 16 tokens (a Llama-3-8B shard): 2 MiB per block.
SPEC = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "fp16", "block_size": 16}
MIB = 1 << 20
KINDS = ("shm", "memcpy", "gloo", "raw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, sizes_mib: list[int], repeats: int, options: dict[str, Any],
            results: Any) -> None:
    try:
        out = _transfers(rank, world, port, sizes_mib, repeats, options)
    except BaseException:
        out = traceback.format_exc()  # reported, so that the parent stops every rank instead of waiting
    results.put((rank, out))
    results.close()
    results.join_thread()
    os._exit(0)


def _transfers(rank: int, world: int, port: int, sizes_mib: list[int], repeats: int, options: dict[str, Any]
               ) -> dict[int, dict[str, float]]:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy as np
    import torch
    from sagellm_comm import GlooBackend
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    backend = GlooBackend()
    backend.init(rank, world, "127.0.0.1", port)
    pairs = world // 2
    sender = rank < pairs
    peer = rank + pairs if sender else rank - pairs
    spec = KVCacheSpec(**SPEC)
    shm_chunk = options.pop("shm_chunk_bytes", None)
    paths = {"shm": BlockTransfer(backend, same_host=True, **options),
             "gloo": BlockTransfer(backend, same_host=False, **options)}
    if shm_chunk:
        paths["shm"]._shm_chunk_bytes = shm_chunk  # a sweep of the ring's slot size
    out: dict[int, dict[str, float]] = {}
    for size in sizes_mib:
        n = size * MIB // spec.block_nbytes
        pool = PagedKVPool(spec, n + 8, huge_pages=True)
        raw = torch.from_numpy(np.ones(n * spec.block_nbytes, dtype=np.uint8))
        copy_to = None if sender else np.ones(n * spec.block_nbytes, dtype=np.uint8)
        if sender:
            ids = np.random.default_rng(size).permutation(n + 8)[:n].astype(np.int32)
            pool.allocate(n + 8)  # every block in use; we send a scattered subset
        best = dict.fromkeys(KINDS, float("inf"))
        cpu = dict.fromkeys(KINDS, float("inf"))  # CPU seconds of this process (all its threads)
        seen_path = ""
        for rep in range(repeats + 1):  # the first round warms pages, sockets, rings and staging buffers
            for kind in KINDS if rep % 2 else KINDS[::-1]:
                backend.barrier()
                start = time.perf_counter()
                cpu_start = time.process_time()
                if kind == "raw":
                    backend.send(raw, peer) if sender else backend.recv(raw, peer)
                elif kind == "memcpy":
                    if copy_to is not None:
                        np.copyto(copy_to, raw.numpy())
                elif sender:
                    paths[kind].send_blocks(pool, ids, peer)
                else:
                    got = paths[kind].receive(pool, peer)
                    if kind == "shm":
                        seen_path = got.path
                elapsed = time.perf_counter() - start
                cpu_used = time.process_time() - cpu_start
                if not sender and kind in ("shm", "gloo"):
                    pool.free(got.block_ids)
                if rep:
                    best[kind] = min(best[kind], elapsed)
                    cpu[kind] = min(cpu[kind], cpu_used)
        out[size] = {"bytes": float(n * spec.block_nbytes), **best, "shm_path_used": float(seen_path == "shm"),
                     **{f"cpu_{k}": v for k, v in cpu.items()}}
        del pool, raw, copy_to
    return out


def measure(sizes_mib: list[int], repeats: int, options: dict[str, Any], concurrency: int = 1
            ) -> dict[int, dict[str, float]]:
    """Runs 2 x ``concurrency`` ranks; per size, the slowest destination's best time of each kind."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    world = 2 * concurrency
    procs = [ctx.Process(target=_worker, args=(r, world, port, sizes_mib, repeats, options, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < world:
            rank, value = results.get(timeout=1800)
            if isinstance(value, str):  # a rank failed: its peers would wait for it forever
                raise RuntimeError(f"W5 rank {rank} failed:\n{value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30 if len(got) == world else 0)
            if p.is_alive():
                p.kill()
    merged: dict[int, dict[str, float]] = {}
    for size in sizes_mib:
        srcs = [got[r][size] for r in range(concurrency)]
        dests = [got[r][size] for r in range(concurrency, world)]
        merged[size] = {k: max(d[k] for d in dests) for k in (*KINDS, "bytes")}
        merged[size]["shm_path_used"] = min(d["shm_path_used"] for d in dests)
        for k in KINDS:  # CPU per transfer, the busiest source and destination (least noisy on a loaded box)
            merged[size][f"cpu_src_{k}"] = max(d[f"cpu_{k}"] for d in srcs)
            merged[size][f"cpu_dst_{k}"] = max(d[f"cpu_{k}"] for d in dests)
    return merged


def _rows(size: int, t: dict[str, float], concurrency: int, options: dict[str, Any]) -> list[Row]:
    label = f"{size} MiB" if size < 1024 else f"{size // 1024} GiB"
    gbps = {k: t["bytes"] / t[k] / 1e9 for k in KINDS}
    extra = {"bytes": int(t["bytes"]), "cpus": os.cpu_count(), "concurrent": concurrency, **options}

    def cpu_ms(kind: str) -> str:  # "source / destination" CPU milliseconds per transfer
        return f"{t[f'cpu_src_{kind}'] * 1e3:.0f} / {t[f'cpu_dst_{kind}'] * 1e3:.0f}"

    return [
        Row(f"W5 same-host {label} x{concurrency}", "GB/s", gbps["shm"], gbps["memcpy"],
            "1-thread memcpy, same bytes", higher_is_better=True,
            extra={**extra, "shm_path_used": bool(t["shm_path_used"]), "cpu_ms_src/dst": cpu_ms("shm"),
                   "reference_cpu_ms": cpu_ms("memcpy")}),
        Row(f"W5 gloo {label} x{concurrency}", "GB/s", gbps["gloo"], gbps["raw"],
            "raw gloo send/recv, same bytes", higher_is_better=True,
            extra={**extra, "cpu_ms_src/dst": cpu_ms("gloo"), "reference_cpu_ms": cpu_ms("raw")}),
    ]


def run(quick: bool = False) -> list[Row]:
    sizes = [64, 256] if quick else [64, 1024]
    repeats = 3 if quick else 5
    options = {"chunk_bytes": 4 * MIB, "pipeline_depth": 4}
    rows = []
    for size, t in measure(sizes, repeats, options).items():
        rows += _rows(size, t, 1, options)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256", help="MiB per transfer, comma-separated")
    parser.add_argument("--concurrency", default="1", help="concurrent transfers, comma-separated (e.g. 1,2,4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--shm-chunk-mib", type=float, default=0.0, help="ring slot size (default: the library's)")
    parser.add_argument("--checksum", default="segsum64", choices=("segsum64", "crc32"))
    parser.add_argument("--gather-thread", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    options = {"chunk_bytes": int(args.chunk_mib * MIB), "pipeline_depth": args.depth, "checksum": args.checksum,
               "gather_thread": {"auto": None, "on": True, "off": False}[args.gather_thread]}
    if args.shm_chunk_mib:
        options["shm_chunk_bytes"] = int(args.shm_chunk_mib * MIB)
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        for size, t in measure([int(s) for s in args.sizes.split(",")], args.repeats, options, c).items():
            rows += _rows(size, t, c, options)
    print_table(rows)
    for r in rows:
        print(f"  {r.workload}: CPU ms per transfer, source / destination: ours {r.extra['cpu_ms_src/dst']}, "
              f"reference {r.extra['reference_cpu_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
