"""KVOffloadManager: tier bookkeeping, transfer callbacks, pressure- and idle-driven moves."""

from __future__ import annotations

import time

import pytest
from sagellm_kv_cache import KVHandle, KVInvalidHandleError, KVOffloadManager
from sagellm_kv_cache.offload import KVOffloadSpec, KVOffloadTrigger


def registered(manager: KVOffloadManager, tokens: int = 256, device: str = "npu:0") -> str:
    handle = KVHandle.create(tokens, device=device)
    manager.register(handle, device=device)
    return str(handle.handle_id)


def test_three_tier_round_trip() -> None:
    manager = KVOffloadManager()
    hid = registered(manager)
    spec = manager.offload(hid)
    assert spec == KVOffloadSpec(hid, "npu:0", "cpu", KVOffloadTrigger.EXPLICIT, num_tokens=256)
    assert (manager.current_device(hid), manager.is_offloaded(hid), manager.offloaded_count()) == ("cpu", True, 1)
    assert manager.offload_to_nvme(hid).dst_device == "nvme" and manager.is_on_nvme(hid)
    assert manager.restore_from_nvme(hid).dst_device == "cpu" and manager.is_offloaded(hid)
    assert manager.restore(hid).dst_device == "npu:0" and not manager.is_offloaded(hid)
    stats = manager.get_stats()
    assert (stats.offloads_triggered, stats.restores_triggered, stats.nvme_offloads_triggered,
            stats.nvme_restores_triggered, stats.offload_tokens, stats.nvme_restore_tokens) == (1, 1, 1, 1, 256, 256)
    info = manager.get_handle_info(hid)
    assert (info["offload_count"], info["restore_count"], info["original_device"]) == (1, 1, "npu:0")
    nvme_direct = registered(manager, 8)
    manager.offload(nvme_direct)
    manager.offload_to_nvme(nvme_direct)
    assert manager.restore(nvme_direct).src_device == "nvme" and manager.current_device(nvme_direct) == "npu:0"


def test_wrong_moves_are_refused_and_change_nothing() -> None:
    manager = KVOffloadManager(max_offloaded_handles=1)
    a, b = registered(manager), registered(manager)
    with pytest.raises(ValueError, match="must be on CPU before offloading to NVMe"):
        manager.offload_to_nvme(a)
    with pytest.raises(ValueError, match="is not on NVMe"):
        manager.restore_from_nvme(a)
    with pytest.raises(ValueError, match="is not offloaded"):
        manager.restore(a)
    manager.offload(a)
    with pytest.raises(ValueError, match="already on cpu"):
        manager.offload(a)
    with pytest.raises(RuntimeError, match=r"max_offloaded_handles \(1\) reached"):
        manager.offload(b)
    assert manager.current_device(b) == "npu:0" and manager.get_stats().offloads_triggered == 1
    with pytest.raises(KVInvalidHandleError, match="Invalid handle 'nope'"):
        manager.current_device("nope")
    manager.unregister(a)
    manager.unregister(a)  # unknown ids are ignored
    assert manager.registered_count() == 1


@pytest.mark.parametrize("outcome", ["false", "raise"])
def test_failed_transfers_keep_the_handle_in_place(outcome: str) -> None:
    calls: list[KVOffloadSpec] = []

    def transfer(spec: KVOffloadSpec) -> bool:
        calls.append(spec)
        if outcome == "raise":
            raise RuntimeError("dma error")
        return False

    manager = KVOffloadManager(transfer_fn=transfer)
    hid = registered(manager, device="cuda:0")
    spec = manager.offload(hid)
    assert calls == [spec] and manager.current_device(hid) == "cuda:0"
    assert manager.get_stats().offload_failures == 1 and manager.get_stats().offloads_triggered == 0


def test_nvme_moves_use_their_own_function() -> None:
    cpu_moves: list[str] = []
    nvme_moves: list[str] = []
    manager = KVOffloadManager(transfer_fn=lambda s: cpu_moves.append(s.dst_device) is None,
                               nvme_transfer_fn=lambda s: nvme_moves.append(s.dst_device) is None)
    hid = registered(manager)
    manager.offload(hid)
    manager.offload_to_nvme(hid, dst_device="nvme:/tmp/kv")
    manager.restore_from_nvme(hid)
    assert cpu_moves == ["cpu"] and nvme_moves == ["nvme:/tmp/kv", "cpu"]


def test_pressure_offloads_least_recently_active_until_below_threshold() -> None:
    manager = KVOffloadManager(offload_threshold=0.5)
    ids = []
    for tokens in (10, 20, 30, 40):
        ids.append(registered(manager, tokens))
        time.sleep(0.002)
    manager.touch(ids[0])  # now the most recently active
    registered(manager, 50, device="npu:1")  # other devices are left alone
    assert manager.maybe_offload(0.5) == []
    moved = manager.maybe_offload(0.9)
    # 0.9 * 80/100 = 0.72 after the first move, 0.9 * 50/100 = 0.45 after the second: stop
    assert [s.handle_id for s in moved] == [ids[1], ids[2]]
    assert all(s.trigger == KVOffloadTrigger.MEMORY_PRESSURE for s in moved)
    assert [s.handle_id for s in manager.maybe_offload(1.0, max_to_offload=1)] == [ids[3]]


def test_cascade_to_nvme_and_idle_offload() -> None:
    manager = KVOffloadManager(idle_offload_secs=0.01, nvme_offload_threshold=0.8)
    hid = registered(manager, 7)
    assert manager.maybe_offload_idle() == []
    time.sleep(0.02)
    (spec,) = manager.maybe_offload_idle()
    assert spec.trigger == KVOffloadTrigger.IDLE_SEQUENCE and manager.current_device(hid) == "cpu"
    assert manager.maybe_cascade_to_nvme(0.5) == []
    (cascade,) = manager.maybe_cascade_to_nvme(0.85)
    assert cascade.trigger == KVOffloadTrigger.NVME_PRESSURE and manager.is_on_nvme(hid)
    assert KVOffloadManager().maybe_offload_idle() == []  # idle offload off by default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"offload_threshold": 1.5}, "offload_threshold must be in"), ({"nvme_offload_threshold": 0},
                                                                     "nvme_offload_threshold"),
     ({"idle_offload_secs": -1}, "idle_offload_secs"), ({"max_offloaded_handles": 0}, "max_offloaded_handles")],
)
def test_bad_configuration(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVOffloadManager(**kwargs)  # type: ignore[arg-type]
