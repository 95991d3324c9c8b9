"""The sageLLM engine's own KV cache calls, timed inside the engine, on this package or another install.

    python benchmarks/engine_calls.py [--requests 4000] [--prompts 1000] [--blocks 200000]
                                      [--compare PYTHON] [--rounds 3]

isagellm-core's ``KVCacheManager`` (what ``LLMEngine`` builds around ``KVPool`` and ``PrefixCache``)
serves each request of the W2 trace (1,024-token shared prompts plus 256 fresh tokens, as Python
lists) the way the engine does:

* ``allocate_slots(request, n, 0, tokens=ids)``: the engine hashes the prompt's blocks itself (a
  hashlib call per block, in the engine), looks them up in our ``PrefixCache`` and allocates a
  ``KVHandle`` from our ``KVPool``;
* ``cache_blocks(request, n)``: our ``compute_block_hashes`` and ``insert`` of a dict per block;
* ``free(request_id)``: ``unpin`` and ``free`` of the handle.

Timers around every public method of the manager's pool, prefix cache and eviction manager, and
around the handle's ``_blocks`` property (the engine reads it for every block table), split
each request's time into the library's share and the engine's own (its hashing, bookkeeping and
logging; the engine logs every prefix hit at INFO, so the run sets ``sagellm_core``'s loggers to
WARNING, as a deployment that does not want a line per request would). The timers cost ~0.1 us
per call and are counted in the library's share.

``--compare PYTHON`` runs the same trace under another interpreter too, e.g. a venv holding the
engine and the original package (``pip install torch==2.13.0 --index-url
https://download.pytorch.org/whl/cpu`` first, then ``pip install isagellm-core==0.5.4.26
isagellm-kv-cache==0.5.4.15``); both run in turns, each in a fresh process, and the best round of
each is compared.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class CallTimer:
    """Wraps the public methods of the library objects the engine holds; times outermost calls only
    (a library method calling another through ``self`` is not counted twice)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def wrap(self, obj: Any, label: str) -> None:
        for name in dir(obj):
            if name.startswith("_"):
                continue
            try:
                method = getattr(obj, name)
            except Exception:  # a property that raises in this state: not a method
                continue
            if callable(method) and not isinstance(method, type):
                setattr(obj, name, self._timed(method, f"{label}.{name}"))

    def wrap_property(self, cls: type, name: str, label: str) -> None:
        """Times reads of ``cls.name`` where it is a property (the library's code runs on each read)."""
        prop = cls.__dict__.get(name)
        if isinstance(prop, property) and prop.fget is not None:
            setattr(cls, name, property(self._timed(prop.fget, label)))

    def _timed(self, method: Any, key: str) -> Any:
        clock = time.perf_counter

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return method(*args, **kwargs)
            self._depth = 1
            start = clock()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + clock() - start
                self.calls[key] = self.calls.get(key, 0) + 1
                self._depth = 0

        return timed


def run_once(num_requests: int, num_prompts: int, num_blocks: int) -> dict[str, Any]:
    """One pass over the trace in this process: per-request totals and the library's share."""
    sys.path.insert(0, str(HERE))
    import sagellm_kv_cache
    from prefix_workload import make_requests
    from sagellm_core.engine_core.kv_cache_manager import KVCacheConfig, KVCacheManager
    from sagellm_kv_cache.models import KVHandle
    from sagellm_protocol.types import Request

    logging.getLogger("sagellm_core").setLevel(logging.WARNING)
    token_lists = [r.tolist() for r in make_requests(num_requests, num_prompts)]
    requests = [Request(request_id=f"r{i}", trace_id=f"r{i}", model="bench", prompt="", max_tokens=1,
                        metadata={"prompt_token_ids": tokens}) for i, tokens in enumerate(token_lists)]
    manager = KVCacheManager(KVCacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_cache=True,
                                           head_dim=8, num_kv_heads=1))
    timer = CallTimer()
    for obj, label in ((manager.kv_pool, "KVPool"), (manager.prefix_cache, "PrefixCache"),
                       (manager.eviction_manager, "EvictionManager")):
        if obj is not None:
            timer.wrap(obj, label)
    # The engine reads every handle's blocks (`getattr(handle, "_blocks", [])`) for its block tables:
    # ours is a property, so those reads are library time too (the original has no such attribute).
    timer.wrap_property(KVHandle, "_blocks", "KVHandle._blocks")
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for request, tokens in zip(requests, token_lists, strict=True):
            manager.allocate_slots(request, len(tokens), 0, tokens=tokens)
            manager.cache_blocks(request, len(tokens))
            manager.free(request.request_id)
        total = time.perf_counter() - start
    finally:
        gc.enable()
    stats = manager.get_stats()
    leaked = stats["pool"]["num_handles"]
    if leaked:
        raise RuntimeError(f"{leaked} handles were left allocated after every request was freed")
    per_request = 1e6 / num_requests
    return {
        "manager_us": native_manager_us(token_lists, num_blocks),
        "package": f"{sagellm_kv_cache.__name__} {getattr(sagellm_kv_cache, '__version__', '?')} "
                   f"({Path(sagellm_kv_cache.__file__).parent})",
        "total_us": total * per_request,
        "library_us": sum(timer.seconds.values()) * per_request,
        "calls": {k: [timer.calls[k] / num_requests, v * per_request] for k, v in sorted(timer.seconds.items())},
        "hit_rate": stats["prefix_cache"]["hit_rate"],
        "cached_blocks": stats["prefix_cache"]["num_blocks"],
    }


def native_manager_us(token_lists: list[list[int]], num_blocks: int) -> float | None:
    """This package's native RequestManager on the same requests (admit, finish), in the same process:
    the reference for the library's share. None where it does not exist (the original package)."""
    try:
        from sagellm_kv_cache import KVCacheSpec, PagedKVPool
        from sagellm_kv_cache.manager import RequestManager
    except ImportError:
        return None
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=16)
    manager = RequestManager(PagedKVPool(spec, num_blocks, zero_fill=False), capacity_blocks=None,
                             match_last_token=True)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for i, tokens in enumerate(token_lists):
            manager.admit(i, tokens)
            manager.finish(i)
        return (time.perf_counter() - start) * 1e6 / len(token_lists)
    finally:
        gc.enable()


def child(python: str, args: argparse.Namespace, *, own_env: bool) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--child", "--requests", str(args.requests),
           "--prompts", str(args.prompts), "--blocks", str(args.blocks)]
    # The compared interpreter imports its own install: this process's PYTHONPATH is not passed on.
    env = None if own_env else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def show(label: str, r: dict[str, Any]) -> None:
    engine = r["total_us"] - r["library_us"]
    print(f"{label}: {r['package']}")
    print(f"  {r['total_us']:.1f} us/request: library {r['library_us']:.1f}, engine's own code {engine:.1f}; "
          f"prefix hit rate {r['hit_rate']:.4f}, {r['cached_blocks']} blocks cached")
    for key, (calls, us) in r["calls"].items():
        print(f"    {key:<34} {calls:5.2f} calls/request {us:8.2f} us/request")
    if r["manager_us"] is not None:
        print(f"  the native RequestManager on the same requests, same process: {r['manager_us']:.1f} us/request; "
              f"the library's share of the engine's calls is {r['library_us'] / r['manager_us']:.2f}x that")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=200_000, help="the engine's kv_cache_num_blocks")
    parser.add_argument("--compare", metavar="PYTHON", help="also run under this interpreter and compare")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per interpreter (best is kept)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_once(args.requests, args.prompts, args.blocks)))
        return 0
    try:
        import sagellm_core  # noqa: F401
    except ImportError:
        print("the sageLLM engine is not installed: pip install torch==2.13.0 --index-url "
              "https://download.pytorch.org/whl/cpu (first), then "
              "pip install isagellm-core==0.5.4.26", file=sys.stderr)
        return 1
    interpreters = [("this package", sys.executable)]
    if args.compare:
        interpreters.append(("compared", args.compare))
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for label, python in interpreters:  # in turns, so a slow spell does not land on one side only
            r = child(python, args, own_env=label == "this package")
            if label not in best or r["total_us"] < best[label]["total_us"]:
                best[label] = r
    print(f"W2 trace through isagellm-core's KVCacheManager: {args.requests} requests, best of {args.rounds} "
          f"fresh processes each")
    for label, r in best.items():
        show(label, r)
    if args.compare:
        ours, other = best["this package"], best["compared"]
        print(f"library time per request: compared / this package = {other['library_us'] / ours['library_us']:.2f}x; "
              f"whole request: {other['total_us'] / ours['total_us']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
