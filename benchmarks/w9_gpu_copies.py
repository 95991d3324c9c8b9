"""W9: host<->GPU copy bandwidth of the vLLM tier's worker (GPU only; skipped without CUDA).

KV shaped as a Llama-3-8B shard in vLLM's canonical layer-outer form: 32 int8 ``(num_blocks, page)``
views, one per layer, over one device buffer; a page is 16 tokens x 8 KV heads x 128 dims x K and V
x fp16 = 64 KiB, so a block is 2 MiB over all layers. A job stores (device -> host) or loads (host ->
device) ``--blocks`` scattered blocks (a random permutation) in chunks of ``--bpc`` blocks. Timed from
submission to the job's completion (``wait``), best of ``--repeats``; bytes = blocks x 2 MiB.

Compared, on the same device buffer and block ids:

* ours: :class:`~sagellm_kv_cache.integrations.chunk_copies.ChunkCopier` (the worker's GPU path);
* vLLM 0.33's ``CPUOffloadingWorker`` (pinned host tensors, its batched block copy), when vLLM imports;
* the ceiling: one pinned contiguous copy of the same number of bytes (``Tensor.copy_``).

    python benchmarks/w9_gpu_copies.py [--blocks 512] [--bpc 1,16] [--repeats 5]
    python benchmarks/run.py --only W9
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from common import Row, print_table

LAYERS = 32
PAGE = 16 * 8 * 128 * 2 * 2  # bytes of one layer's page of one block


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: Any, repeats: int, submit: Any, finish: Any) -> float:
    best = float("inf")
    for rep in range(repeats + 1):  # the first round warms streams, staging and the caching allocator
        _sync(device)
        start = time.perf_counter()
        submit(rep)
        finish(rep)
        elapsed = time.perf_counter() - start
        if rep:
            best = min(best, elapsed)
    return best


def measure(num_blocks: int, bpc: int, repeats: int, device: str = "cuda") -> dict[str, float]:
    """GB/s of each way (``store``/``load`` of ours and vLLM's, ``ceiling_d2h``/``ceiling_h2d``).
    ``device="cpu"`` runs the same code on CPU tensors (a check of the script, not a GPU figure)."""
    import numpy as np
    import torch
    from sagellm_kv_cache.integrations.chunk_copies import ChunkCopier

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    gpu_blocks = 2 * num_blocks
    buf = torch.randint(-128, 127, (LAYERS, gpu_blocks, PAGE), dtype=torch.int8, device=dev)
    layers = [buf[i] for i in range(LAYERS)]
    ids = np.random.default_rng(0).permutation(gpu_blocks)[:num_blocks].astype(np.int64)
    n_chunks = -(-num_blocks // bpc)
    slots = np.random.default_rng(1).permutation(n_chunks).astype(np.int32)
    nbytes = num_blocks * LAYERS * PAGE
    out: dict[str, float] = {"bytes": float(nbytes)}

    ours = ChunkCopier(layers, n_chunks, bpc)
    out["store"] = nbytes / _timed(dev, repeats, lambda r: ours.store(r, ids, slots), lambda r: ours.wait({r})) / 1e9
    dev_ids = torch.from_numpy(ids).to(dev)
    want = buf[:, dev_ids].clone()
    buf[:, dev_ids] = 0
    out["load"] = nbytes / _timed(dev, repeats, lambda r: ours.load(100 + r, slots, ids),
                                  lambda r: ours.wait({100 + r})) / 1e9
    out["byte_exact"] = float(torch.equal(buf[:, dev_ids], want))
    del want
    ours.finished()
    ours.shutdown()

    host = torch.empty(nbytes, dtype=torch.int8, pin_memory=dev.type == "cuda")
    flat = buf.view(-1)[:nbytes]
    out["ceiling_d2h"] = nbytes / _timed(dev, repeats, lambda r: host.copy_(flat, non_blocking=True),
                                         lambda r: _sync(dev)) / 1e9
    out["ceiling_h2d"] = nbytes / _timed(dev, repeats, lambda r: flat.copy_(host, non_blocking=True),
                                         lambda r: _sync(dev)) / 1e9

    if dev.type != "cuda":
        return out
    try:
        from vllm.v1.kv_offload.base import (
            CanonicalKVCacheRef,
            CanonicalKVCaches,
            CanonicalKVCacheTensor,
            GPULoadStoreSpec,
        )
        from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
        from vllm.v1.kv_offload.cpu.gpu_worker import CPUOffloadingWorker
    except Exception as exc:  # vLLM absent (or without its CUDA parts): ours and the ceiling only
        print(f"W9: vLLM's worker not measured ({type(exc).__name__}: {exc})", file=sys.stderr)
        return out
    kv = CanonicalKVCaches(tensors=[CanonicalKVCacheTensor(t, PAGE) for t in layers],
                           group_data_refs=[[CanonicalKVCacheRef(i, PAGE) for i in range(LAYERS)]])
    theirs = CPUOffloadingWorker(kv, bpc, n_chunks)
    gpu_spec = GPULoadStoreSpec(ids.tolist(), [num_blocks], [0])
    cpu_spec = CPULoadStoreSpec(slots.tolist())
    out["vllm_store"] = nbytes / _timed(dev, repeats, lambda r: theirs.submit_store(r, gpu_spec, cpu_spec),
                                        lambda r: theirs.wait({r})) / 1e9
    out["vllm_load"] = nbytes / _timed(dev, repeats, lambda r: theirs.submit_load(100 + r, cpu_spec, gpu_spec),
                                       lambda r: theirs.wait({100 + r})) / 1e9
    theirs.get_finished()
    theirs.shutdown()
    return out


def _rows(t: dict[str, float], num_blocks: int, bpc: int) -> list[Row]:
    extra = {"blocks": num_blocks, "blocks_per_chunk": bpc, "bytes": int(t["bytes"]),
             "byte_exact": bool(t["byte_exact"]),
             "ceiling_GBps": f"{t['ceiling_d2h']:.1f} d2h / {t['ceiling_h2d']:.1f} h2d"}
    rows = []
    for way, ceiling in (("store", "ceiling_d2h"), ("load", "ceiling_h2d")):
        if f"vllm_{way}" in t:
            rows.append(Row(f"W9 GPU {way}, {bpc} block(s)/chunk", "GB/s", t[way], t[f"vllm_{way}"],
                            "vLLM 0.33 CPUOffloadingWorker", higher_is_better=True,
                            extra={**extra, "vs_ceiling": round(t[way] / t[ceiling], 3)}))
        else:
            rows.append(Row(f"W9 GPU {way}, {bpc} block(s)/chunk", "GB/s", t[way], t[ceiling],
                            "one pinned contiguous copy", higher_is_better=True, extra=extra))
    return rows


def run(quick: bool = False, num_blocks: int = 512, bpcs: tuple[int, ...] = (1, 16), repeats: int = 5) -> list[Row]:
    try:
        import torch
    except ImportError:
        print("W9: skipped (torch is not installed)", file=sys.stderr)
        return []
    if not torch.cuda.is_available():
        print("W9: skipped (no CUDA device)", file=sys.stderr)
        return []
    if quick:
        num_blocks, repeats = 128, 3
    rows = []
    for bpc in bpcs:
        rows += _rows(measure(num_blocks, bpc, repeats), num_blocks, bpc)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=512, help="blocks per job (2 MiB each)")
    parser.add_argument("--bpc", default="1,16", help="blocks per chunk, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the script on CPU tensors (a check of the script, not a GPU figure)")
    args = parser.parse_args(argv)
    bpcs = tuple(int(b) for b in args.bpc.split(","))
    if args.device == "cpu":
        print_table([r for b in bpcs for r in _rows(measure(args.blocks, b, args.repeats, "cpu"), args.blocks, b)])
        return 0
    rows = run(num_blocks=args.blocks, bpcs=bpcs, repeats=args.repeats)
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
