"""Batch planning under a KV budget: ``SchedulerBridge`` over ``KVCacheManager``.

A scheduler hands the bridge its queue (protocol ``SchedulerRequest`` objects); the bridge admits
what fits in priority order, reserves the KV, reuses shared prefixes by fingerprint and places each
request on the least loaded device. Then the manager's token-level prefix API. Prints each step.

    python examples/scheduler_example.py             # no arguments; runs from any directory
"""

from __future__ import annotations

from sagellm_kv_cache import KVCacheManager, PlacementStrategy, RequestType, SchedulerBridge, SchedulerRequest


def request(rid: str, prompt: int, new: int, **fields: object) -> SchedulerRequest:
    return SchedulerRequest(request_id=rid, trace_id="demo", request_type=RequestType.PREFILL,
                            prompt_len=prompt, max_new_tokens=new, **fields)  # type: ignore[arg-type]


def bridge_demo() -> None:
    print("=== SchedulerBridge: 4,096 KV tokens shared by two devices, load-aware placement")
    bridge = SchedulerBridge(4096, block_size=16, devices=["cuda:0", "cuda:1"], enable_load_awareness=True,
                             placement_strategy=PlacementStrategy.LOWEST_KV)
    queue = [request(f"chat-{i}", 600, 200, prefix_fingerprint="system-v1", prefix_hit_len=512) for i in range(4)]
    queue += [request("batch-job", 2000, 500, priority=-1), request("urgent", 300, 100, priority=10)]
    plan = bridge.plan(queue)
    # As in the original, the plan lists every input request; `placement` names the admitted ones and
    # `last_scheduled` holds them with their prefix reuse.
    print(f"plan {plan.plan_id}: {plan.batch_size} requests, admitted {len(plan.placement)}, "
          f"new KV tokens {plan.total_kv_tokens}, deferred {bridge.last_deferred}")
    for r in bridge.last_scheduled:
        print(f"  {r.request_id:<10} on {plan.placement[r.request_id]}  needs {r.kv_tokens_required:>4} tokens, "
              f"{r.prefix_hit_len:>3} reused from the cached prefix")
    for device, load in bridge.get_stats()["load_metrics"].items():
        print(f"  {device}: {load['kv_tokens_used']} tokens, {load['active_requests']} running")

    for request_id in plan.placement:
        bridge.free_request(request_id)
    pool = bridge.get_stats()["pool"]
    print(f"after the batch: {pool['used_tokens']} tokens still held (the cached system prompt, evictable)")
    retry = bridge.plan([request("batch-job", 2000, 500)])
    print(f"the deferred job now fits: admitted {len(retry.placement)} on {retry.placement}")


def manager_demo() -> None:
    print("\n=== KVCacheManager: token-level prefixes over the handles' own blocks")
    manager = KVCacheManager(max_tokens=1024, block_size=16)
    system = list(range(100, 164))  # 64 tokens = 4 blocks
    a = manager.alloc(len(system) + 40)
    manager.register_prefix(system, a)
    handle, matched = manager.query_prefix([*system, 7, 8, 9])
    print(f"query_prefix: {matched} tokens held by handle {handle.handle_id if handle else None}")
    blocks, n = manager.get_reused_blocks(system)
    print(f"get_reused_blocks: {[b.block_id for b in blocks]} ({n} tokens)")
    manager.alloc(950)  # needs room: the unpinned handle `a` is evicted, and its prefix with it
    handle, matched = manager.query_prefix(system)
    print(f"after an allocation that needed room: {manager.get_stats()['evicted_handles']} handle evicted "
          f"(a is {a.state.value}); query_prefix -> {handle}, {matched}")
    print(f"prefix metrics: {manager.get_prefix_metrics()}")


if __name__ == "__main__":
    bridge_demo()
    manager_demo()
