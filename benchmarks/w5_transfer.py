"""W5: pool-to-pool block transfer between two processes over gloo against a raw gloo send.

Ours: ``BlockTransfer.send_blocks`` on rank 0 / ``recv_blocks`` on rank 1 — C++ gather into staging
buffers, header and replies, per-chunk checksum, scatter into freshly allocated blocks — timed on
the destination from a common barrier until the blocks are in its pool. Reference: the same number
of bytes as one contiguous torch tensor through ``GlooBackend.send``/``recv`` (no gather, no
checksum, no scatter), timed the same way. Each repetition runs both, alternating, so they share
the machine's noise; the best of the repetitions is reported. Block ids are a random permutation,
as in a pool that has been in use.

    python benchmarks/run.py --only W5 [--quick]
    python benchmarks/w5_transfer.py --sizes 64,1024 --chunk-mib 4 --depth 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any

from common import Row, print_table

# 32 layers x 8 KV heads x 128 dims x fp16 x 16 tokens (a Llama-3-8B shard): 2 MiB per block.
SPEC = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "fp16", "block_size": 16}
MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, sizes_mib: list[int], repeats: int, options: dict[str, Any], results: Any) -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy as np
    import torch
    from sagellm_comm import GlooBackend
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    backend = GlooBackend()
    backend.init(rank, 2, "127.0.0.1", port)
    spec = KVCacheSpec(**SPEC)
    bt = BlockTransfer(backend, **options)
    out: dict[int, dict[str, float]] = {}
    for size in sizes_mib:
        n = size * MIB // spec.block_nbytes
        pool = PagedKVPool(spec, n + 8)
        raw = torch.from_numpy(np.ones(n * spec.block_nbytes, dtype=np.uint8))
        if rank == 0:
            ids = np.random.default_rng(size).permutation(n + 8)[:n].astype(np.int32)
            pool.allocate(n + 8)  # every block in use; we send a scattered subset
        best = {"ours": float("inf"), "raw": float("inf")}
        for rep in range(repeats + 1):  # the first round warms pages, sockets and staging buffers
            for kind in ("raw", "ours") if rep % 2 else ("ours", "raw"):
                backend.barrier()
                start = time.perf_counter()
                if kind == "raw":
                    backend.send(raw, 1) if rank == 0 else backend.recv(raw, 0)
                elif rank == 0:
                    bt.send_blocks(pool, ids, 1)
                else:
                    got = bt.recv_blocks(pool, 0)
                elapsed = time.perf_counter() - start
                if rank == 1 and kind == "ours":
                    pool.free(got)
                if rep:
                    best[kind] = min(best[kind], elapsed)
        out[size] = {"bytes": float(n * spec.block_nbytes), **best}
        del pool, raw
    results.put((rank, out))
    results.close()
    results.join_thread()
    os._exit(0)


def measure(sizes_mib: list[int], repeats: int, options: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Runs both ranks; returns the destination's best times per size."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, sizes_mib, repeats, options, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in range(2))
    for p in procs:
        p.join(timeout=30)
    return got[1]


def run(quick: bool = False) -> list[Row]:
    sizes = [64, 256] if quick else [64, 1024]
    repeats = 3 if quick else 5
    options = {"chunk_bytes": 4 * MIB, "pipeline_depth": 4}
    rows = []
    for size, t in measure(sizes, repeats, options).items():
        label = f"{size} MiB" if size < 1024 else f"{size // 1024} GiB"
        ours, raw = t["bytes"] / t["ours"] / 1e9, t["bytes"] / t["raw"] / 1e9
        rows.append(Row(f"W5 transfer {label} (2 procs)", "GB/s", ours, raw,
                        "raw gloo send/recv, same bytes", higher_is_better=True,
                        extra={"bytes": int(t["bytes"]), "cpus": os.cpu_count(), **options}))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256", help="MiB per transfer, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--checksum", default="segsum64")
    parser.add_argument("--gather-thread", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    options = {"chunk_bytes": int(args.chunk_mib * MIB), "pipeline_depth": args.depth, "checksum": args.checksum,
               "gather_thread": {"auto": None, "on": True, "off": False}[args.gather_thread]}
    rows = []
    for size, t in measure([int(s) for s in args.sizes.split(",")], args.repeats, options).items():
        rows.append(Row(f"W5 transfer {size} MiB", "GB/s", t["bytes"] / t["ours"] / 1e9, t["bytes"] / t["raw"] / 1e9,
                        "raw gloo send/recv", higher_is_better=True))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
