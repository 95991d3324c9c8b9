"""W8: vLLM 0.33 offloading-manager call sequence, our trie-backed manager vs vLLM's CPUOffloadingManager (LRU).

Both managers are driven by the same workload and the same driver, the way vLLM's offloading connector
calls them for one request: ``on_new_request``, ``lookup`` block by block until the first miss,
``prepare_load`` + ``complete_load`` of the hit prefix, ``prepare_store`` + ``complete_store`` of the rest,
``on_request_finished``. Keys are vLLM-shaped (32-byte block hash + 4-byte group). Requests share
prefixes (a few hundred system prompts, each continued by a private tail); the tier holds about half
of the distinct blocks, so it evicts. Reported: ns per manager call (wall time, best of the repeats;
``cpu_time_ratio`` is the same comparison in process CPU time, steadier on a shared machine), both hit
ratios (both LRU), ``manager_only_ratio`` (the same with the driver's own time, measured by driving a
stand-in that replays our answers, taken off both), and each method's own cost, every call timed alone
(``<method>_ns``: ours vs vLLM's).

Second row: whole engine steps of vLLM's real scheduler + connector (tests/python/vllm_harness.py, KV on
the CPU) over shared-prefix requests, with our spec, against the same spec whose manager is swapped for
vLLM's CPUOffloadingManager (the worker, our pool, is the same in both: vLLM's own CPU copy worker needs
CUDA/XPU). Needs vLLM importable (``VLLM_TARGET_DEVICE=cpu``); skipped otherwise.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from common import Row

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _workload(num_requests: int, seed: int = 0) -> tuple[list[tuple[str, list[bytes]]], int]:
    rng = random.Random(seed)
    prefixes = [[rng.randbytes(32) + b"\0\0\0\0" for _ in range(rng.randrange(8, 48))] for _ in range(300)]
    requests, distinct = [], set()
    for i in range(num_requests):
        prefix = prefixes[min(int(rng.expovariate(1 / 40)), len(prefixes) - 1)]
        keys = prefix + [rng.randbytes(32) + b"\0\0\0\0" for _ in range(rng.randrange(1, 16))]
        distinct.update(keys)
        requests.append((f"req-{i}", keys))
    return requests, len(distinct)


def _drive(manager: Any, requests: list[tuple[str, list[bytes]]]) -> tuple[float, float, int, int]:
    """Runs the connector-shaped call sequence; returns (wall s, CPU s, manager calls, hit blocks).

    As vLLM's connector does, ``complete_load`` / ``complete_store`` get the job's keys as a set, and a
    request's context lives as long as the request. The calls are counted after the clock stops, so
    the time is the manager calls plus the loop that issues them.
    """
    from vllm.v1.kv_offload.base import LookupResult, ReqContext

    hit_result = LookupResult.HIT
    hit_counts: list[int] = []
    stored: list[bool] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for rid, keys in requests:
        ctx = ReqContext(rid)
        manager.on_new_request(ctx)
        n = 0
        for key in keys:
            if manager.lookup(key, ctx) is not hit_result:
                break
            n += 1
        if n:
            manager.prepare_load(keys[:n], ctx)
            manager.complete_load(set(keys[:n]), ctx)
        out = manager.prepare_store(keys[n:], ctx)
        if out is not None and out.keys_to_store:
            manager.complete_store(set(out.keys_to_store), ctx)
            stored.append(True)
        manager.on_request_finished(ctx)
        hit_counts.append(n)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    calls = sum(min(n + 1, len(keys)) for n, (_, keys) in zip(hit_counts, requests, strict=True))  # lookups
    calls += 2 * sum(1 for n in hit_counts if n) + 3 * len(requests) + len(stored)
    return elapsed, cpu, calls, sum(hit_counts)


class _Replay:
    """A stand-in manager that answers from a recording of another one and does nothing else: driving
    it measures the driver's own share of a sequence (the loop, the sets, the request contexts)."""

    def __init__(self, answers: list[Any]) -> None:
        self._next = iter(answers).__next__

    def lookup(self, key: Any, ctx: Any) -> Any:
        return self._next()

    def prepare_store(self, keys: Any, ctx: Any) -> Any:
        return self._next()

    def on_new_request(self, ctx: Any) -> None:
        return None

    def prepare_load(self, keys: Any, ctx: Any) -> None:
        return None

    def complete_load(self, keys: Any, ctx: Any) -> None:
        return None

    def complete_store(self, keys: Any, ctx: Any) -> None:
        return None

    def on_request_finished(self, ctx: Any) -> None:
        return None


def _recorded(manager: Any, requests: list[tuple[str, list[bytes]]]) -> list[Any]:
    """The answers of ``manager``'s lookup / prepare_store calls over the sequence, in order."""
    answers: list[Any] = []
    lookup, prepare_store = manager.lookup, manager.prepare_store

    def record_lookup(key: Any, ctx: Any) -> Any:
        answers.append(lookup(key, ctx))
        return answers[-1]

    def record_store(keys: Any, ctx: Any) -> Any:
        answers.append(prepare_store(keys, ctx))
        return answers[-1]

    manager.lookup, manager.prepare_store = record_lookup, record_store
    _drive(manager, requests)
    return answers


_METHODS = ("on_new_request", "lookup", "prepare_load", "complete_load", "prepare_store", "complete_store",
            "on_request_finished")


def _per_call(manager: Any, requests: list[tuple[str, list[bytes]]]) -> dict[str, float]:
    """The same sequence with every call timed on its own: ns per call of each method, less the cost of
    reading the clock twice (measured here). Coarser than the whole-sequence time; it says where it goes."""
    from vllm.v1.kv_offload.base import LookupResult, ReqContext

    clock = time.perf_counter_ns
    probe = min(-clock() + clock() for _ in range(10_000))
    spent = dict.fromkeys(_METHODS, 0)
    count = dict.fromkeys(_METHODS, 0)

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = clock()
        out = fn(*args)
        spent[name] += clock() - t0
        count[name] += 1
        return out

    hit_result = LookupResult.HIT
    for rid, keys in requests:
        ctx = ReqContext(rid)
        timed("on_new_request", manager.on_new_request, ctx)
        n = 0
        for key in keys:
            if timed("lookup", manager.lookup, key, ctx) is not hit_result:
                break
            n += 1
        if n:
            timed("prepare_load", manager.prepare_load, keys[:n], ctx)
            timed("complete_load", manager.complete_load, set(keys[:n]), ctx)
        out = timed("prepare_store", manager.prepare_store, keys[n:], ctx)
        if out is not None and out.keys_to_store:
            timed("complete_store", manager.complete_store, set(out.keys_to_store), ctx)
        timed("on_request_finished", manager.on_request_finished, ctx)
    return {name: max(spent[name] / count[name] - probe, 0.0) for name in _METHODS if count[name]}


def _vllm_manager_spec() -> Any:
    from sagellm_kv_cache.integrations.vllm_offload import SageOffloadingSpec
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    class VllmManagerSpec(SageOffloadingSpec):
        """Our spec with vLLM's CPUOffloadingManager (LRU) on the scheduler side."""

        _vllm_manager: Any = None

        def get_manager(self) -> Any:
            if self._vllm_manager is None:
                self._vllm_manager = CPUOffloadingManager(num_chunks=self.num_chunks, cache_policy="lru")
            return self._vllm_manager

    return VllmManagerSpec


def __getattr__(name: str) -> Any:  # the connector imports the spec class by name from this module
    if name == "VllmManagerSpec":
        return _vllm_manager_spec()
    raise AttributeError(name)


def _steps(spec_name: str, quick: bool) -> tuple[float, int, int]:
    """Seconds per engine step, steps, blocks loaded from the tier."""
    tests = str(Path(__file__).resolve().parent.parent / "tests" / "python")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from vllm_harness import Engine

    module = "w8_vllm_offload" if spec_name == "VllmManagerSpec" else "sagellm_kv_cache.integrations.vllm_offload"
    e = Engine(block_size=16, num_gpu_blocks=64, num_chunks=256, max_tokens_per_step=512, max_seqs=8,
               spec_name=spec_name, spec_module_path=module, verify=False)
    rng = random.Random(1)
    systems = [[rng.randrange(30_000) for _ in range(rng.randrange(64, 256))] for _ in range(12)]
    prompts = [systems[rng.randrange(len(systems))] + [rng.randrange(30_000) for _ in range(rng.randrange(8, 64))]
               for _ in range(40 if quick else 160)]
    import torch

    # The worker's copies are a few KiB: torch's intra-op thread pool only adds waits to them, ten-fold
    # on a busy machine, which would drown the managers' difference. Same setting for both specs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for i in range(0, len(prompts), 4):
            for p in prompts[i:i + 4]:
                e.add(p, max_tokens=4)
            e.drain()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return elapsed / e.steps, e.steps, e.sage_worker.loaded_blocks


def run(quick: bool = False) -> list[Row]:
    try:
        import sagellm_kv_cache.integrations.vllm_offload  # noqa: F401
        import vllm.v1.kv_offload.cpu.manager  # noqa: F401
    except ImportError as exc:  # vLLM is optional
        print(f"W8: skipped (vLLM not importable: {exc})", file=sys.stderr)
        return []
    requests, distinct = _workload(3_000 if quick else 20_000)
    capacity = distinct // 2
    repeats = 2 if quick else 3
    # vLLM's engine core freezes the GC heap once started (vllm.utils.gc_utils.freeze_gc_heap), so a
    # full collection while serving walks only what serving made. Do the same here, or the managers
    # pay for walking vLLM's ~0.7 M import-time objects, and pay by how many they allocate.
    gc.collect()
    gc.freeze()
    try:
        return _manager_rows(requests, capacity, repeats, quick)
    finally:
        gc.unfreeze()


def _manager_rows(requests: list[tuple[str, list[bytes]]], capacity: int, repeats: int, quick: bool) -> list[Row]:
    from sagellm_kv_cache.integrations.vllm_offload import SageOffloadingManager
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    ours_t = ref_t = ours_cpu = ref_cpu = float("inf")
    ours_hits = ref_hits = calls = ref_calls = 0
    for _ in range(repeats):  # a fresh manager each time: the sequence starts from an empty tier
        t, cpu, calls, ours_hits = _drive(SageOffloadingManager(capacity), requests)
        ours_t, ours_cpu = min(ours_t, t), min(ours_cpu, cpu)
        t, cpu, ref_calls, ref_hits = _drive(CPUOffloadingManager(num_chunks=capacity, cache_policy="lru"), requests)
        ref_t, ref_cpu = min(ref_t, t), min(ref_cpu, cpu)
    blocks = sum(len(k) for _, k in requests)
    extra: dict[str, Any] = {
        "requests": len(requests), "blocks": blocks, "capacity_chunks": capacity, "manager_calls": calls,
        "ours_hit_ratio": ours_hits / blocks, "vllm_hit_ratio": ref_hits / blocks,
        "cpu_time_ratio": ref_cpu / ours_cpu if ours_cpu else float("inf")}
    floor = min(_drive(_Replay(_recorded(SageOffloadingManager(capacity), requests)), requests)[0]
                for _ in range(repeats))
    extra["driver_floor_s"] = floor
    extra["manager_only_ratio"] = (ref_t - floor) / (ours_t - floor) if ours_t > floor else float("inf")
    ours_calls = _per_call(SageOffloadingManager(capacity), requests)
    ref_per_call = _per_call(CPUOffloadingManager(num_chunks=capacity, cache_policy="lru"), requests)
    for name, ns in ours_calls.items():
        extra[f"{name}_ns"] = f"{ns:.0f} vs {ref_per_call[name]:.0f} ({ref_per_call[name] / max(ns, 1.0):.1f}x)"
    rows = [Row("W8 vLLM offload manager calls", "ns/call", ours_t / calls * 1e9, ref_t / ref_calls * 1e9,
                "vLLM 0.33 CPUOffloadingManager (LRU)", extra=extra)]
    ours_step = ref_step = float("inf")
    for _ in range(repeats):  # alternating, best of: one run is a few hundred short steps
        t, steps, ours_loaded = _steps("SageOffloadingSpec", quick)
        ours_step = min(ours_step, t)
        t, ref_steps, ref_loaded = _steps("VllmManagerSpec", quick)
        ref_step = min(ref_step, t)
    rows.append(Row("W8 vLLM engine step (scheduler+connector)", "us/step", ours_step * 1e6, ref_step * 1e6,
                    "same, vLLM's CPUOffloadingManager", extra={"steps": steps, "ref_steps": ref_steps,
                                                                "ours_loaded_blocks": ours_loaded,
                                                                "vllm_loaded_blocks": ref_loaded}))
    return rows


if __name__ == "__main__":
    from common import print_table

    rows = run(quick="--quick" in sys.argv)
    print_table(rows)
    for r in rows:
        for key, value in r.extra.items():
            print(f"  {key} = {value:.4g}" if isinstance(value, float) else f"  {key} = {value}")
