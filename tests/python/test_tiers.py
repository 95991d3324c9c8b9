"""Tiered KV storage (device pool -> host slab -> disk slots): byte-exact demotion and promotion, hits
reported per tier, restart from the disk directory, kill -9 during a demotion storm, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sagellm_kv_cache import KVHandle, KVOffloadManager, _core
from sagellm_kv_cache.errors import KVInvalidBlockError, KVMemoryExhaustedError, KVMetadataMismatchError
from sagellm_kv_cache.offload import OffloadStorage
from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.tiers import TIER_DEVICE, TIER_DISK, TIER_HOST, DiskTier, HostTier, TieredPrefixCache
from tier_requests import writes_fail_past

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="fp16", block_size=4)


def content(digest: bytes, nbytes: int) -> np.ndarray:
    """The bytes a block with this digest holds in these tests (a function of the digest)."""
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def assert_holds(pool: PagedKVPool, block_ids: np.ndarray, digests: np.ndarray) -> None:
    """Block ``block_ids[i]`` of ``pool`` holds the content of ``digests[i]``."""
    got = pool.gather(block_ids).reshape(len(digests), -1)
    for row, d in zip(got, digests, strict=True):
        np.testing.assert_array_equal(row, content(d.tobytes(), pool.block_nbytes))


def fill(tc: TieredPrefixCache, tokens: np.ndarray) -> np.ndarray:
    """One request: match, compute (write content) what missed, insert, release. Returns digests."""
    pool = tc.pool
    digests = tc.hash_tokens(tokens)
    m = tc.match(digests)
    for i in range(m.num_matched):
        np.testing.assert_array_equal(pool.gather([int(m.block_ids[i])]), content(digests[i].tobytes(),
                                                                                  pool.block_nbytes))
    if m.num_matched < len(digests):
        fresh = tc.allocate(len(digests) - m.num_matched)
        for j, b in enumerate(fresh):
            pool.scatter(content(digests[m.num_matched + j].tobytes(), pool.block_nbytes), [int(b)])
        tc.insert(digests[m.num_matched:], fresh, parent=digests[m.num_matched - 1] if m.num_matched else None)
        pool.free(fresh)
    tc.release(digests[: m.num_matched])
    return digests


def prompt(i: int, blocks: int = 3) -> np.ndarray:
    return np.arange(i * 1000, i * 1000 + blocks * SPEC.block_size, dtype=np.int32)


@pytest.fixture(params=[True, False], ids=["background", "inline"])
def background(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_demote_and_promote_are_byte_exact_and_hits_are_reported_per_tier(tmp_path: Path, background: bool) -> None:
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=32,
                           background=background) as tc:
        digests = [fill(tc, prompt(i)) for i in range(4)]  # 12 blocks: 3 device, 3 host, 6 disk
        tc.flush()
        where = [[tc.location(r.tobytes()) for r in d] for d in digests]
        assert where[3] == ["device"] * 3
        assert where[2] == ["host"] * 3
        assert where[0] == where[1] == ["disk"] * 3
        st = tc.stats()
        assert st["blocks"] == {"device": 3, "host": 3, "disk": 6}
        assert st["demoted_to_host"] == 9 and st["demoted_to_disk"] == 6

        for i, expect in ((3, TIER_DEVICE), (2, TIER_HOST), (0, TIER_DISK)):
            m = tc.match(digests[i])
            assert m.num_matched == 3
            assert m.tiers.tolist() == [expect] * 3
            assert_holds(pool, m.block_ids, digests[i])
            tc.release(digests[i])
        st = tc.stats()
        assert st["hits"] == {"device": 3, "host": 3, "disk": 3}
        assert st["promoted_from_host"] == 3 and st["promoted_from_disk"] == 3
        assert st["bytes_moved"]["host_to_device"] == 3 * pool.block_nbytes
        assert st["bytes_moved"]["disk_to_device"] == 3 * pool.block_nbytes
        assert st["corrupt_reads"] == 0
        tc.flush()
        assert len(tc.device) <= 3


def test_make_room_counts_blocks_in_use_above_a_lowered_budget_as_missing() -> None:
    # Under a budget lowered below the blocks in use the pool is short by the excess (its
    # num_free_blocks reads 0): make_room must demote that many more before `num_blocks` are free.
    pool = PagedKVPool(SPEC, 12)
    with TieredPrefixCache(pool, device_blocks=12, host_blocks=16) as tc:
        fill(tc, prompt(0, blocks=6))  # 6 cached device blocks nobody uses
        held = pool.allocate(4)  # 10 in use
        pool.set_budget_blocks(6)  # 4 over
        tc.make_room(2)
        tc.flush()
        assert pool.num_free_blocks == 2
        fresh = tc.allocate(2)
        pool.free(fresh)
        pool.free(held)


def test_a_lower_tier_hit_continues_a_device_prefix(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 12)
    with TieredPrefixCache(pool, device_blocks=4, host_blocks=16) as tc:
        base = fill(tc, prompt(0, blocks=4))
        for i in range(1, 4):
            fill(tc, prompt(i, blocks=1))  # pushes the base's leaves down to the host tier
        tc.flush()
        locations = [tc.location(r.tobytes()) for r in base]
        assert "host" in locations
        m = tc.match(base)
        assert m.num_matched == 4
        assert set(m.tiers.tolist()) <= {TIER_DEVICE, TIER_HOST} and TIER_HOST in m.tiers.tolist()
        assert_holds(pool, m.block_ids, base)
        tc.release(base)


def test_a_demotion_larger_than_the_host_tier_spills_through_it(tmp_path: Path, background: bool) -> None:
    pool = PagedKVPool(SPEC, 16)
    with TieredPrefixCache(pool, device_blocks=12, host_blocks=2, disk_dir=tmp_path, disk_blocks=32,
                           background=background) as tc:
        digests = [fill(tc, prompt(i)) for i in range(4)]
        for fut in tc.demote(12):
            fut.result()
        assert tc.stats()["blocks"] == {"device": 0, "host": 2, "disk": 10}
        for d in digests:
            m = tc.match(d)
            assert m.num_matched == 3
            got = pool.gather(m.block_ids).reshape(3, -1)
            for row, dg in zip(got, d, strict=True):
                np.testing.assert_array_equal(row, content(dg.tobytes(), pool.block_nbytes))
            tc.release(d)


def test_without_lower_tiers_eviction_drops(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=3) as tc:
        for i in range(3):
            fill(tc, prompt(i))
        assert tc.stats()["dropped"]["device"] == 6
        assert pool.num_used_blocks == 3


def test_stats_report_empty_lower_tiers_with_their_capacity(tmp_path: Path) -> None:
    # An empty tier has len() 0; stats() must still report it as configured, not as absent.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=4, host_blocks=5, disk_dir=tmp_path, disk_blocks=6) as tc:
        s = tc.stats()
        assert s["capacity"] == {"device": 4, "host": 5, "disk": 6}
        assert s["blocks"] == {"device": 0, "host": 0, "disk": 0}
        assert s["host_pinned"] is False
        assert s["disk_direct_io"] in (True, False)
    with TieredPrefixCache(pool, device_blocks=4) as tc:
        s = tc.stats()
        assert s["capacity"] == {"device": 4, "host": 0, "disk": 0}
        assert s["host_pinned"] is None and s["disk_direct_io"] is None


def test_a_full_disk_tier_drops_its_oldest(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=3) as tc:
        digests = [fill(tc, prompt(i)) for i in range(4)]
        tc.flush()
        assert [tc.location(r.tobytes()) for r in digests[0]] == [None] * 3
        assert [tc.location(r.tobytes()) for r in digests[1]] == ["disk"] * 3
        assert tc.stats()["dropped"]["disk"] == 3


def test_restart_serves_the_disk_tier_from_the_directory(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=32) as tc:
        digests = [fill(tc, prompt(i)) for i in range(4)]
    # A new process (here: a new cache and pool) reopens the directory.
    pool2 = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool2, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=32) as tc2:
        assert len(tc2.disk or ()) == 6
        for i in (0, 1):
            m = tc2.match(digests[i])
            assert m.num_matched == 3 and m.tiers.tolist() == [TIER_DISK] * 3
            got = pool2.gather(m.block_ids).reshape(3, -1)
            for row, d in zip(got, digests[i], strict=True):
                np.testing.assert_array_equal(row, content(d.tobytes(), pool2.block_nbytes))
            tc2.release(digests[i])
        assert tc2.match(digests[3]).num_matched == 0  # device and host tiers do not persist


def test_a_torn_slot_is_dropped_on_open_and_never_served(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=32) as tc:
        digests = [fill(tc, prompt(i)) for i in range(4)]
        tc.flush()
        disk = tc.disk
        assert disk is not None
        victim = disk.index[digests[0][1].tobytes()].slot
        stride = disk.slot_nbytes
    with open(tmp_path / "slots.bin", "r+b") as f:  # flip one payload byte of one slot
        f.seek(victim * stride + 5)
        b = f.read(1)
        f.seek(victim * stride + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    reopened = DiskTier(tmp_path, 32, pool.block_nbytes)
    assert reopened.dropped_on_open == 1 and len(reopened) == 5
    reopened.close()
    # Without the scan on open, the read check catches it: the chain stops before the bad block.
    pool2 = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool2, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=32,
                           verify_on_open=False) as tc2:
        m = tc2.match(digests[0])
        assert m.num_matched == 1
        assert tc2.stats()["corrupt_reads"] == 1
        np.testing.assert_array_equal(pool2.gather(m.block_ids), content(digests[0][0].tobytes(), pool2.block_nbytes))
        tc2.release(digests[0][:1])


_STORM = textwrap.dedent("""
    import sys, numpy as np
    from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.tiers import TieredPrefixCache
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype="fp16", block_size=4)
    pool = PagedKVPool(spec, 16)
    tc = TieredPrefixCache(pool, device_blocks=4, host_blocks=4, disk_dir=sys.argv[1], disk_blocks=64)
    i = 0
    while True:
        toks = np.arange(i * 100, i * 100 + 12, dtype=np.int32)
        d = tc.hash_tokens(toks)
        m = tc.match(d)
        fresh = tc.allocate(len(d) - m.num_matched)
        for j, b in enumerate(fresh):
            key = d[m.num_matched + j].tobytes()
            rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
            pool.scatter(rng.integers(0, 256, pool.block_nbytes, dtype=np.uint8), [int(b)])
        tc.insert(d[m.num_matched:], fresh, parent=d[m.num_matched - 1] if m.num_matched else None)
        pool.free(fresh)
        tc.release(d[:m.num_matched])
        i += 1
        if i == 40:
            print("storming", flush=True)
""")


def test_kill_9_during_a_demotion_storm_leaves_only_intact_blocks(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _STORM, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "storming"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype="fp16", block_size=4)
    nbytes = spec.block_nbytes
    disk = DiskTier(tmp_path, 64, nbytes)
    try:
        assert len(disk) > 0, "no complete block survived"
        buf = disk.bounce_buffer()
        for digest in disk:
            entry = disk.index[digest]
            assert disk.read(entry.slot, digest, buf)  # every indexed slot has its bytes
            np.testing.assert_array_equal(buf[:nbytes], content(digest, nbytes))
        print(f"survived: {len(disk)} complete blocks, dropped {disk.dropped_on_open}")
    finally:
        disk.close()


def test_bad_input_is_refused_with_typed_errors(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    with pytest.raises(TypeError):
        TieredPrefixCache("pool")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device_blocks"):
        TieredPrefixCache(pool, device_blocks=0)
    with pytest.raises(ValueError, match="exceeds"):
        TieredPrefixCache(pool, device_blocks=9)
    with pytest.raises(ValueError, match="host_blocks"):
        TieredPrefixCache(pool, host_blocks=-1)
    with pytest.raises(TypeError, match="disk_blocks"):
        TieredPrefixCache(pool, disk_dir=tmp_path, disk_blocks=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disk_dir"):
        TieredPrefixCache(pool, disk_blocks=4)
    with TieredPrefixCache(pool, device_blocks=4) as tc:
        with pytest.raises(ValueError, match="num_blocks"):
            tc.demote(-1)
        assert tc.demote(0) == []
        with pytest.raises(ValueError, match="digests"):
            tc.match(np.zeros((2, 16), dtype=np.uint8))
        with pytest.raises(TypeError, match="digest 1"):
            tc.match([b"\0" * 32, b"short"])
        assert tc.match([b"\1" * 32]).num_matched == 0
        assert tc.stats()["lookups"] == 1
    DiskTier(tmp_path / "a", 4, pool.block_nbytes).close()
    with pytest.raises(KVMetadataMismatchError, match="block_nbytes"):
        DiskTier(tmp_path / "a", 4, pool.block_nbytes * 2)
    held = DiskTier(tmp_path / "b", 4, pool.block_nbytes)
    try:
        with pytest.raises(ValueError, match="in use"):
            DiskTier(tmp_path / "b", 4, pool.block_nbytes)
    finally:
        held.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        DiskTier(tmp_path / "file" / "sub", 4, pool.block_nbytes)
    (tmp_path / "c" / "slots.bin").mkdir(parents=True)  # was: a raw IsADirectoryError
    with pytest.raises(ValueError, match=r"slots.bin' cannot be opened: Is a directory"):
        DiskTier(tmp_path / "c", 4, pool.block_nbytes)


def test_host_slab_bindings_check_slots_and_sizes() -> None:
    pool = PagedKVPool(SPEC, 4)
    slab = _core.HostSlab(2, pool.block_nbytes)
    ids = pool.allocate(2)
    data = np.arange(2 * pool.block_nbytes, dtype=np.uint64).astype(np.uint8)
    pool.scatter(data, ids)
    slab.copy_from_pool(pool._native, ids, [1, 0])
    view = slab.view()
    np.testing.assert_array_equal(view[1, : pool.block_nbytes], data[: pool.block_nbytes])
    with pytest.raises(KVInvalidBlockError):
        slab.copy_from_pool(pool._native, ids, [0, 2])
    before = view.copy()
    # one slot twice: which block it would hold depended on the copy order (the last one won)
    with pytest.raises(ValueError, match="slot 0 appears at positions 0 and 1; each slot may be written once"):
        slab.copy_from_pool(pool._native, ids, [0, 0])
    np.testing.assert_array_equal(view, before)
    slab.copy_to_pool(pool._native, [1, 1], ids)  # reading a slot twice is fine
    np.testing.assert_array_equal(pool.gather(ids), np.concatenate([data[: pool.block_nbytes]] * 2))
    with pytest.raises(ValueError, match="entries"):
        slab.copy_to_pool(pool._native, [0], ids)
    small = _core.HostSlab(1, 16)
    with pytest.raises(KVMetadataMismatchError):
        small.copy_from_pool(pool._native, ids[:1], [0])
    with pytest.raises(ValueError):
        _core.HostSlab(0, 16)
    with pytest.raises(ValueError):
        _core.HostSlab(1, 0)
    del slab
    assert view.sum() >= 0  # the view keeps the slab alive
    pool.free(ids)


def test_host_tier_payload_checks_its_slot() -> None:
    """numpy read slot -1 as the last slot (another block's bytes), and 2**64 - 1 as OverflowError."""
    host = HostTier(4, 64)
    host.view[3, :64] = 7
    assert (host.payload(3) == 7).all() and host.payload(0).shape == (64,)
    with pytest.raises(IndexError, match=r"slot -1 out of range \[0, 4\)"):
        host.payload(-1)
    with pytest.raises(IndexError, match=f"slot {2**64 - 1} out of range"):
        host.payload(2**64 - 1)
    with pytest.raises(TypeError, match="slot must be an int, got float"):
        host.payload(1.0)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_host_tier_is_pinned_for_a_cuda_pool(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8, device="cuda:0")
    with TieredPrefixCache(pool, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=32) as tc:
        assert tc.stats()["host_pinned"] is True
        digests = [fill(tc, prompt(i)) for i in range(4)]
        m = tc.match(digests[0])
        assert m.num_matched == 3 and m.tiers.tolist() == [TIER_DISK] * 3
        tc.release(digests[0])


# --- KVOffloadManager with real movement ---------------------------------------------------------


def _handle_with_bytes(pool: PagedKVPool, blocks: int, seed: int) -> tuple[KVHandle, np.ndarray]:
    handle = KVHandle.create(blocks * SPEC.block_size, device="cuda:0")
    ids = pool.allocate(blocks)
    data = np.random.default_rng(seed).integers(0, 256, blocks * pool.block_nbytes, dtype=np.uint8)
    pool.scatter(data, ids)
    handle._block_ids = ids
    return handle, data


def test_offload_manager_moves_real_bytes_through_every_tier(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    storage = OffloadStorage(pool, host_blocks=4, disk_dir=tmp_path, disk_blocks=8)
    manager = KVOffloadManager(storage=storage)
    handle, data = _handle_with_bytes(pool, 3, seed=1)
    hid = str(handle.handle_id)
    manager.register(handle, device="cuda:0")

    spec = manager.offload(hid)
    assert spec.dst_device == "cpu" and manager.is_offloaded(hid)
    assert pool.num_used_blocks == 0 and handle.block_ids.size == 0  # device blocks given back
    where, slots = storage.placement(hid) or ("", [])
    assert where == "host" and len(slots) == 3
    np.testing.assert_array_equal(np.concatenate([storage.host.payload(s) for s in slots]), data)

    manager.offload_to_nvme(hid)
    assert storage.placement(hid) is not None and storage.placement(hid)[0] == "disk"  # type: ignore[index]
    assert storage.host.slots.num_available == 4
    manager.restore_from_nvme(hid)
    manager.restore(hid)
    assert manager.current_device(hid) == "cuda:0" and handle.block_ids.size == 3
    np.testing.assert_array_equal(pool.gather(handle.block_ids), data)

    # Straight from NVMe to the device, too.
    manager.offload(hid)
    manager.offload_to_nvme(hid)
    manager.restore(hid)
    np.testing.assert_array_equal(pool.gather(handle.block_ids), data)
    stats = manager.get_stats()
    assert (stats.offloads_triggered, stats.restores_triggered, stats.nvme_offloads_triggered,
            stats.nvme_restores_triggered) == (2, 1, 2, 2)  # a restore from NVMe counts as an NVMe restore
    assert storage.bytes_moved["disk_to_device"] == 3 * pool.block_nbytes
    storage.close()


def test_offload_that_cannot_complete_changes_nothing(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 8)
    storage = OffloadStorage(pool, host_blocks=2, disk_dir=tmp_path, disk_blocks=8)
    manager = KVOffloadManager(storage=storage)
    handle, data = _handle_with_bytes(pool, 3, seed=2)
    hid = str(handle.handle_id)
    manager.register(handle, device="cuda:0")
    manager.offload(hid)  # 3 blocks, 2 host slots: refused
    assert manager.current_device(hid) == "cuda:0" and manager.get_stats().offload_failures == 1
    np.testing.assert_array_equal(pool.gather(handle.block_ids), data)
    assert storage.host.slots.num_available == 2

    small, small_data = _handle_with_bytes(pool, 2, seed=3)
    sid = str(small.handle_id)
    manager.register(small, device="cuda:0")
    manager.offload(sid)
    manager.offload_to_nvme(sid)
    where, disk_slots = storage.placement(sid) or ("", [])
    assert where == "disk"
    disk = storage.disk
    assert disk is not None
    with open(tmp_path / "slots.bin", "r+b") as f:  # tear one slot
        f.seek(disk_slots[1] * disk.slot_nbytes)
        f.write(b"\0" * 16)
    manager.restore(sid)  # the checksum refuses it: the handle stays on NVMe
    assert manager.current_device(sid) == "nvme" and manager.get_stats().nvme_restore_failures == 1
    assert pool.num_used_blocks == 3
    manager.unregister(sid)
    assert disk.slots.num_available == 8
    del small_data
    storage.close()


def test_offload_storage_bad_configuration(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 4)
    storage = OffloadStorage(pool, host_blocks=2)
    with pytest.raises(ValueError, match="not both"):
        KVOffloadManager(storage=storage, transfer_fn=lambda s: True)
    with pytest.raises(TypeError):
        KVOffloadManager(storage="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        OffloadStorage("pool", host_blocks=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disk_dir"):
        OffloadStorage(pool, host_blocks=2, disk_blocks=2)
    manager = KVOffloadManager(storage=storage)
    foreign = KVHandle.create(16, device="cuda:0")
    foreign._block_ids = np.array([3], dtype=np.int32)  # not allocated in the pool
    with pytest.raises(ValueError, match="allocated"):
        manager.register(foreign, device="cuda:0")
    assert manager.registered_count() == 0
    handle, _ = _handle_with_bytes(pool, 1, seed=4)
    for src, dst in (("device", "device"), ("device", "disk"), ("gpu", "host")):
        with pytest.raises(ValueError, match="cannot move"):  # was: AttributeError (no _<src>_to_<dst>)
            storage.move(handle, src, dst)
    assert storage.placement(str(handle.handle_id)) is None and pool.is_allocated(int(handle.block_ids[0]))


# --- tiered replay -------------------------------------------------------------------------------


def test_tiered_replay_reports_hits_per_tier_and_verifies_promoted_bytes() -> None:
    from sagellm_kv_cache.replay import load_trace, replay, sample_trace_path

    reqs = load_trace(sample_trace_path())
    from sagellm_kv_cache.replay import replay_tiered

    tiered = replay_tiered(reqs, 100, 200, 1000, direct_io=False)
    hits = tiered.hits_by_tier
    assert hits is not None and sum(hits.values()) == tiered.hits
    assert hits["host"] > 0 and hits["disk"] > 0
    assert tiered.verified_blocks == hits["host"] + hits["disk"]  # every promoted block checked
    assert tiered.hit_ratio > replay(reqs, 100).hit_ratio  # the lower tiers keep reuse the device drops
    moved = tiered.bytes_moved
    assert moved is not None and moved["device_to_host"] > 0 and moved["host_to_disk"] > 0
    assert tiered.tokens_saved_by_tier == {t: h * 512 for t, h in hits.items()}
    # Device -> disk without a host tier behaves as one LRU cache of both capacities.
    direct = replay_tiered(reqs, 200, 0, 800, direct_io=False)
    assert abs(direct.hit_ratio - replay(reqs, 1000).hit_ratio) < 0.002
    with pytest.raises(ValueError, match="block_bytes"):
        replay_tiered(reqs, 100, 10, 0, block_bytes=1000)


def test_replay_cli_takes_tier_capacities(tmp_path: Path) -> None:
    import json

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sagellm_kv_cache.replay_cli", "replay", *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)

    out = tmp_path / "rows.json"
    proc = cli("--capacity-blocks", "100", "--host-blocks", "200", "--disk-blocks", "1000", "--buffered-io",
               "--disk-dir", str(tmp_path / "disk"), "--json", str(out), "--plot", str(tmp_path / "tiers.png"))
    assert proc.returncode == 0, proc.stderr
    assert "prefill tokens saved" in proc.stdout and "host_to_disk" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["host_blocks"] == 200 and row["disk_blocks"] == 1000
    assert set(row["hits_by_tier"]) == {"device", "host", "disk"}
    assert (tmp_path / "tiers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "disk" / "slots.bin").exists()  # the disk tier persists in --disk-dir
    bad = cli("--capacity-blocks", "inf", "--host-blocks", "10")
    assert bad.returncode == 2 and "bounded" in bad.stderr
    bad = cli("--capacity-blocks", "10", "--host-blocks", "10", "--block-bytes", "1000")
    assert bad.returncode == 2 and "block_bytes" in bad.stderr
    bad = cli("--capacity-blocks", "10", "--disk-blocks", "-1")
    assert bad.returncode == 2


def test_a_disk_tier_whose_description_cannot_be_written_is_a_value_error(tmp_path: Path) -> None:
    """tier.json written through a temporary file: a failure there was a raw OSError (a traceback from
    sagellm-kv replay --disk-dir on a read-only file system)."""
    (tmp_path / "tier.tmp").mkdir()  # in the way of the temporary file
    with pytest.raises(ValueError, match=r"tier\.json' cannot be written: Is a directory"):
        DiskTier(tmp_path, 2, 4096)
    # The slot file is the directory's lock, taken before the description: it stays, empty.
    assert (tmp_path / "slots.bin").stat().st_size == 0
    (tmp_path / "tier.tmp").rmdir()
    DiskTier(tmp_path, 2, 4096).close()


_OPEN_RACE = textwrap.dedent("""
    import json, os, sys
    from sagellm_kv_cache.tiers import DiskTier
    base, block_nbytes = sys.argv[1], int(sys.argv[2])
    for line in sys.stdin:  # one directory name per round, sent to both processes at once
        directory = os.path.join(base, line.strip())
        try:
            tier = DiskTier(directory, 2, block_nbytes, direct_io=False)
        except ValueError:  # in use by the other process, or its description
            print("refused", flush=True)
            continue
        with open(os.path.join(directory, "tier.json"), encoding="utf-8") as f:
            print(json.load(f)["block_nbytes"], flush=True)
        tier.close()
""")


def test_two_processes_creating_one_disk_tier_leave_the_openers_description(tmp_path: Path) -> None:
    """tier.json was written before the directory lock: two processes creating a directory at once
    with different block sizes both found no description, both wrote theirs, and the one that won
    the lock could be left using slots under the other's description."""
    sizes = (4096, 8192)
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_RACE, str(tmp_path), str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for n in sizes]
    wrong: list[tuple[int, int, str]] = []
    opened = 0
    try:
        for i in range(150):
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"d{i}\n")
                p.stdin.flush()
            for n, p in zip(sizes, procs, strict=True):
                assert p.stdout is not None
                seen = p.stdout.readline().strip()
                assert seen, f"round {i}: the process of block size {n} ended"
                if seen != "refused":
                    opened += 1
                    if int(seen) != n:
                        wrong.append((i, n, seen))
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            p.wait(timeout=30)
            assert p.stdout is not None
            p.stdout.close()
    assert not wrong, f"(round, block size, description it saw): {wrong[:5]}"
    assert opened >= 150  # in each round at least the process that took the lock opened the tier
    for i in range(150):
        meta = json.loads((tmp_path / f"d{i}" / "tier.json").read_text(encoding="utf-8"))
        slots = (tmp_path / f"d{i}" / "slots.bin").stat().st_size
        assert slots == 2 * (meta["block_nbytes"] + 4096), (i, meta, slots)


def test_a_disk_tier_that_fails_to_open_releases_its_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="disk_blocks"):
        DiskTier(tmp_path / "many", 2**31, 4096)  # beyond the slot allocator: refused before any file
    assert not (tmp_path / "many" / "slots.bin").exists()
    # A file of 2**61 bytes fails after the slot file is open and locked (EFBIG on ext4, or no
    # memory for the bounce buffer elsewhere): each attempt fails the same way, never as "in use".
    for _ in range(2):
        with pytest.raises((ValueError, KVMemoryExhaustedError), match=r"do not fit|cannot allocate"):
            DiskTier(tmp_path / "huge", 2**17, 2**44)
    (tmp_path / "huge" / "tier.json").unlink()
    DiskTier(tmp_path / "huge", 2, 4096).close()


def test_a_failing_disk_drops_blocks_but_keeps_the_host_tier_whole(tmp_path: Path, background: bool) -> None:
    pool = PagedKVPool(SPEC, 16)
    with TieredPrefixCache(pool, device_blocks=3, host_blocks=3, disk_dir=tmp_path, disk_blocks=8,
                           background=background) as tc:
        on_disk = fill(tc, prompt(0))
        on_host = fill(tc, prompt(1))
        fill(tc, prompt(2))  # prompt 0: device -> host -> disk
        tc.flush()
        assert tc.location(on_disk[0].tobytes()) == "disk"
        assert tc.disk is not None and tc.host is not None
        tc.disk.close()  # the disk fails under the cache: every slot read and write is refused
        for i in range(3, 7):  # host spills to disk fail: the device's victims drop, the device keeps working
            fill(tc, prompt(i))  # was: RuntimeError "host tier has no free slot" once the slots leaked
        tc.flush()
        failed = [f.exception() for f in tc.demote(3)]  # spills the host tier again: the error is reported
        assert failed and all(isinstance(e, OSError) for e in failed)
        s = tc.stats()
        # The spills' victims never left their host slots: they stay cached (were dropped, 6 or more).
        assert s["dropped"]["host"] == 0 and s["dropped"]["device"] >= 12
        assert [tc.location(d.tobytes()) for d in on_host] == ["host"] * 3
        host = tc.host
        assert host.slots.num_available + len(host.index) == host.num_blocks  # no slot lost
        used = pool.num_used_blocks
        m = tc.match(on_disk)  # an unreadable slot is a miss, as a torn one; nothing leaks
        assert m.num_matched == 0 and pool.num_used_blocks == used
        assert tc.stats()["corrupt_reads"] >= 1 and tc.location(on_disk[0].tobytes()) is None
        m = tc.match(on_host)
        assert m.num_matched == 3 and m.tiers.tolist() == [TIER_HOST] * 3
        assert_holds(pool, m.block_ids, on_host)
        tc.release(on_host)


def test_a_closed_tiered_cache_refuses_work_and_never_hangs(tmp_path: Path) -> None:
    pool = PagedKVPool(SPEC, 16)
    tc = TieredPrefixCache(pool, device_blocks=4, host_blocks=4)
    held = fill(tc, prompt(0))
    fill(tc, prompt(1))
    m = tc.match(held)  # a running request's uses
    assert m.num_matched == len(held)
    tc.close()
    before = (pool.num_used_blocks, len(tc.device), tc.stats()["blocks"])
    with pytest.raises(RuntimeError, match="closed"):
        fill(tc, prompt(2))  # was: the demotion's digests stayed pending forever
    for call in (lambda: tc.match(held), lambda: tc.demote(1), lambda: tc.make_room(16)):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert (pool.num_used_blocks, len(tc.device), tc.stats()["blocks"]) == before
    tc.release(held)  # releasing uses still works, and demotes nothing
    assert len(tc.device) == before[1] and not tc._pending



def _slots_accounted(tier: HostTier | DiskTier) -> bool:
    """Every slot of a host or disk tier is free or named by exactly one index entry."""
    named = [e if isinstance(e, int) else e.slot for e in tier.index.values()]
    return len(set(named)) == len(named) and tier.slots.num_available + len(named) == tier.num_blocks


@pytest.mark.parametrize("lower", ["host", "disk"])
def test_a_claim_given_back_after_the_digest_was_stored_again_loses_no_slot(tmp_path: Path, lower: str) -> None:
    # A promotion claims a lower-tier copy, then cannot use it (the device is full) and gives it
    # back; meanwhile another request computed the same digest and it was demoted into that tier
    # again. The give-back must not overwrite the new entry: that entry's slot would be lost. (The
    # interleaving is forced by calling the claim and the give-back directly.) The copy given up counts
    # as replaced: freed uncounted, the tier held one block fewer than its counters said.
    pool = PagedKVPool(SPEC, 8)
    tiers = {"host_blocks": 4} if lower == "host" else {"disk_dir": tmp_path, "disk_blocks": 4}
    with TieredPrefixCache(pool, device_blocks=4, background=False, **tiers) as tc:  # type: ignore[arg-type]
        tier = tc.host if lower == "host" else tc.disk
        assert tier is not None
        x = fill(tc, prompt(0, blocks=1))[0].tobytes()
        tc.demote(4)
        claim = tc._claim(x)
        assert claim is not None and tc.location(x) is None
        fill(tc, prompt(0, blocks=1))  # the same digest, computed again and demoted again
        tc.demote(4)
        assert tc.location(x) == lower
        tc._unclaim([(x, *claim)])
        assert tc.location(x) == lower
        assert _slots_accounted(tier)
        host, host_count, disk, disk_count = _balanced(tc)
        assert (host, disk) == (host_count, disk_count) == ((1, 0) if lower == "host" else (0, 1))
        assert tc.stats()["replaced"][lower] == 1


def _write_twice_at_once(tc: Any, key: bytes) -> None:
    """Two disk writes of ``key`` from two threads, each held until both have taken a slot."""
    disk = tc.disk
    payload = disk.bounce_buffer().copy()
    both_have_a_slot = threading.Barrier(2, timeout=10)
    real_write = disk.write

    def write_when_both_hold_a_slot(*args: Any) -> None:
        both_have_a_slot.wait()
        real_write(*args)

    disk.write = write_when_both_hold_a_slot
    writers = [threading.Thread(target=tc._write_disk, args=(key, payload)) for _ in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=10)
    disk.write = real_write


def test_two_demotions_of_one_digest_writing_at_once_lose_no_disk_slot(tmp_path: Path) -> None:
    # Inline demotions run in the callers' threads, so one digest evicted twice (computed again
    # between) can be written to two disk slots at once; the second to publish must free the first's
    # slot (same bytes), not overwrite its index entry. Both writes are held until both have a slot.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=4, disk_dir=tmp_path, disk_blocks=4, background=False) as tc:
        disk = tc.disk
        assert disk is not None
        key = b"\x07" * 32
        _write_twice_at_once(tc, key)
        assert tc.location(key) == "disk"
        assert _slots_accounted(disk)


def test_closing_the_disk_tier_waits_for_io_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An inline demotion writes a slot in the caller's thread while another thread closes the tier.
    # The descriptor it is writing through must not be closed under it: the number is reused by the
    # next open() in the process, and the slot's bytes would land in that unrelated file.
    pool = PagedKVPool(SPEC, 8)
    tc = TieredPrefixCache(pool, device_blocks=4, disk_dir=tmp_path / "tier", disk_blocks=4, background=False)
    disk = tc.disk
    assert disk is not None
    in_write, go_on = threading.Event(), threading.Event()
    real_pwritev = os.pwritev

    def held_pwritev(fd: int, buffers: Any, offset: int) -> int:
        in_write.set()
        assert go_on.wait(10)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", held_pwritev)
    payload = disk.bounce_buffer().copy()
    writer = threading.Thread(target=disk.write, args=(0, b"\x05" * 32, payload, 1))
    writer.start()
    assert in_write.wait(10)
    closer = threading.Thread(target=tc.close)
    closer.start()
    closer.join(timeout=0.5)  # a close that does not wait for the write has closed the file by now
    others = [tmp_path / f"unrelated{i}" for i in range(2)]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in others]  # reuse any number freed
    go_on.set()
    writer.join(timeout=10)
    closer.join(timeout=10)
    for fd in fds:
        os.close(fd)
    assert not closer.is_alive() and not writer.is_alive()
    assert [p.stat().st_size for p in others] == [0, 0]
    reopened = DiskTier(tmp_path / "tier", 4, pool.block_nbytes)
    assert len(reopened) == 1  # the write landed in the tier's own file
    reopened.close()


@pytest.mark.parametrize("with_disk", [False, True], ids=["host", "host+disk"])
def test_promoting_the_whole_host_tier_into_a_full_device_is_a_hit(tmp_path: Path, background: bool,
                                                                   with_disk: bool) -> None:
    # The promotion claims every host slot, then makes room on the device by demoting its cached
    # blocks, which need host slots: none is free and none can be spilled (all are claimed). The
    # demoted blocks go past the host tier (to disk, or are dropped); the lookup itself was a
    # RuntimeError "host tier has no free slot and nothing to demote".
    pool = PagedKVPool(SPEC, 4)
    disk = {"disk_dir": tmp_path, "disk_blocks": 8} if with_disk else {}
    with TieredPrefixCache(pool, device_blocks=4, host_blocks=2, background=background,
                           **disk) as tc:  # type: ignore[arg-type]
        wanted = fill(tc, prompt(0, blocks=2))
        tc.demote(2)
        tc.flush()
        others = [fill(tc, prompt(i, blocks=2)) for i in (1, 2)]  # the device: full, all cached
        assert pool.num_free_blocks == 0
        m = tc.match(wanted)
        assert m.num_matched == 2 and m.tiers.tolist() == [TIER_HOST, TIER_HOST]
        assert_holds(pool, m.block_ids, wanted)
        tc.release(wanted)
        tc.flush()
        gone = [tc.location(d.tobytes()) for d in others[0]]
        assert gone == (["disk", "disk"] if with_disk else [None, None])
        assert _slots_accounted(tc.host)
        if with_disk:
            assert tc.disk is not None and _slots_accounted(tc.disk)


def test_a_lookup_racing_a_demotion_waits_for_it_instead_of_missing(tmp_path: Path) -> None:
    # Between taking a block out of the device trie and registering its demotion as in flight, the
    # digest was in no tier: a lookup there missed (and the request recomputed the block) instead of
    # waiting for the copy, as the tier contract says. The eviction is held open here while another
    # thread looks the digest up.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=4, host_blocks=4) as tc:
        x = fill(tc, prompt(0, blocks=1))
        native = tc.device._native
        found: list[list[int]] = []
        lookers: list[threading.Thread] = []

        class EvictionHeldOpen:
            def __getattr__(self, name: str) -> Any:
                return getattr(native, name)

            def evict_detached(self, n: int) -> Any:
                out = native.evict_detached(n)
                lookers.append(threading.Thread(target=lambda: found.append(tc.match(x).tiers.tolist())))
                lookers[0].start()
                lookers[0].join(timeout=0.5)  # a lookup that does not wait has its answer by now
                return out

        tc.device._native = EvictionHeldOpen()  # type: ignore[assignment]
        tc.demote(1)
        tc.device._native = native
        lookers[0].join(timeout=10)
        assert found == [[TIER_HOST]]  # the lookup waited for the copy: a host hit, not a miss
        tc.release(x)


def test_a_failing_disk_does_not_fail_a_lookup_that_makes_room(tmp_path: Path, background: bool) -> None:
    # The promotion of a host hit makes room on a full device by demoting cached blocks; they can only
    # go to disk, which fails. The demoted blocks are freed (dropped) either way, so the hit is served;
    # the lookup itself raised the disk's OSError.
    pool = PagedKVPool(SPEC, 6)
    with TieredPrefixCache(pool, device_blocks=6, host_blocks=2, disk_dir=tmp_path, disk_blocks=8,
                           background=background) as tc:
        wanted = fill(tc, prompt(0, blocks=2))
        for i in range(1, 4):
            fill(tc, prompt(i, blocks=2))  # the device: full; prompt 0 went to the host tier
        tc.flush()
        assert [tc.location(d.tobytes()) for d in wanted] == ["host", "host"]
        assert tc.disk is not None
        tc.disk.close()  # the disk fails under the cache
        m = tc.match(wanted)
        assert m.num_matched == 2 and m.tiers.tolist() == [TIER_HOST, TIER_HOST]
        assert_holds(pool, m.block_ids, wanted)
        tc.release(wanted)
        assert _slots_accounted(tc.host)


def test_a_failing_disk_under_a_demotion_that_finds_few_host_slots_loses_none_of_them(tmp_path: Path,
                                                                                      background: bool) -> None:
    # A lookup claims two of the host tier's three slots and makes room on a full device: of the two
    # blocks it demotes, one gets the free host slot and one has to go past the host tier, to the
    # failing disk. The host slot stays the host tier's (it was lost for good, a tier of 2 slots).
    pool = PagedKVPool(SPEC, 4)
    with TieredPrefixCache(pool, device_blocks=4, host_blocks=3, disk_dir=tmp_path, disk_blocks=8,
                           background=background) as tc:
        wanted = fill(tc, prompt(0, blocks=2))
        for fut in tc.demote(2):
            fut.result()
        assert [tc.location(d.tobytes()) for d in wanted] == ["host", "host"]
        fill(tc, prompt(1, blocks=4))  # the device: full
        assert tc.disk is not None and tc.host is not None
        tc.disk.close()  # the disk fails under the cache
        m = tc.match(wanted)
        assert m.num_matched == 2 and m.tiers.tolist() == [TIER_HOST, TIER_HOST]
        assert_holds(pool, m.block_ids, wanted)
        tc.release(wanted)
        tc.flush()
        assert _slots_accounted(tc.host)
        assert len(tc.host) == 1 and tc.stats()["demoted_to_host"] == 3  # the block that had a slot is there


def test_a_lookup_waiting_for_a_demotion_that_fails_still_finds_another_copy(tmp_path: Path) -> None:
    # D is on the host and (computed again) on the device. The device copy's demotion fails (its host slot
    # needs a spill to a failing disk); a lookup of D that waited for it still finds the host copy, which
    # was never touched (it was a miss: the request recomputed a block the host held).
    import threading

    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, host_blocks=2, disk_dir=tmp_path, disk_blocks=4) as tc:
        x = fill(tc, prompt(0, blocks=1))
        tc.demote(1)[0].result()
        d = fill(tc, prompt(1, blocks=1))
        tc.demote(1)[0].result()  # the host: x (oldest), d
        ids = tc.allocate(1)
        pool.scatter(content(d[0].tobytes(), pool.block_nbytes), ids)
        tc.insert(d, ids)  # d again on the device, as a request that computed it without a lookup
        pool.free(ids)
        assert tc.disk is not None and tc.host is not None and list(tc.host.index) == [x[0].tobytes(), d[0].tobytes()]
        tc.disk.close()  # the disk fails under the cache: x cannot be spilled to make room
        gate = threading.Event()
        assert tc._executor is not None
        tc._executor.submit(gate.wait)  # holds the copies back until the lookup waits for d
        failed = tc.demote(1)
        found: list[list[int]] = []
        looker = threading.Thread(target=lambda: found.append(tc.match(d).tiers.tolist()))
        looker.start()
        time.sleep(0.3)
        gate.set()
        looker.join(timeout=10)
        assert isinstance(failed[0].exception(), OSError)
        assert found == [[TIER_HOST]]  # was a miss ([]) while the host held d all along
        tc.release(d)


def test_a_failed_host_spill_keeps_the_victims_it_did_not_write(tmp_path: Path) -> None:
    # A real write error: past RLIMIT_FSIZE a write fails with EFBIG. The disk tier takes its first slot
    # only. Two device blocks are demoted into a full host tier: its two oldest blocks are spilled, the
    # first lands on disk, the second's write fails. That block's bytes are still in its host slot: it
    # stays cached there (was dropped, and its slot and the first's went back unused). The slot the
    # first left takes the newest device block; the other goes past the host tier, to the failing disk,
    # and is dropped from the device. The demotion reports the error.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, host_blocks=2, disk_dir=tmp_path, disk_blocks=4,
                           background=False) as tc:
        spilled = fill(tc, prompt(0, blocks=2))
        tc.demote(2)
        demoted = fill(tc, prompt(1, blocks=2))
        assert tc.disk is not None and tc.host is not None
        first, second = tc.host.index  # oldest first: the spill's order
        assert {first, second} == {d.tobytes() for d in spilled}
        with writes_fail_past(tc.disk.slot_nbytes):
            failed = [f.exception() for f in tc.demote(2)]
        assert [type(e) for e in failed] == [OSError]
        assert (tc.location(first), tc.location(second)) == ("disk", "host")
        assert sorted(map(str, [tc.location(d.tobytes()) for d in demoted])) == ["None", "host"]
        s = tc.stats()
        assert s["demoted_to_disk"] == 1 and s["demoted_to_host"] == 3
        assert s["dropped"] == {"device": 1, "host": 0, "disk": 0}
        assert _slots_accounted(tc.host) and _slots_accounted(tc.disk)
        assert next(iter(tc.host.index)) == second  # still the host tier's oldest
        m = tc.match(spilled)  # both served, byte-exact: one from disk, the one that stayed from the host
        assert m.num_matched == 2
        assert m.tiers.tolist() == [TIER_DISK if d.tobytes() == first else TIER_HOST for d in spilled]
        assert_holds(pool, m.block_ids, spilled)
        tc.release(spilled)


def test_a_failed_disk_write_keeps_the_block_whose_slot_it_took_while_its_bytes_are_intact(tmp_path: Path) -> None:
    # A write into a full disk tier takes its oldest block's slot (or, for a digest the disk holds, that
    # copy's). A real write error refused before any byte landed (EFBIG: nothing past byte 0) leaves that
    # block's bytes whole: it stays cached (was dropped). A write torn inside the slot (a short write past
    # the slot's first page) overwrote them: then the block is dropped, never served.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, disk_dir=tmp_path, disk_blocks=2, background=False) as tc:
        disk = tc.disk
        assert disk is not None
        old = [fill(tc, prompt(i, blocks=1))[0].tobytes() for i in range(2)]
        tc.demote(1)
        tc.demote(1)
        assert list(disk.index) == old
        fill(tc, prompt(2, blocks=1))
        with writes_fail_past(0):
            assert [type(f.exception()) for f in tc.demote(1)] == [OSError]
        assert list(disk.index) == old  # the oldest kept its slot and its place
        assert tc.stats()["dropped"] == {"device": 1, "host": 0, "disk": 0}
        ids = tc.allocate(1)
        pool.scatter(content(old[1], pool.block_nbytes), ids)
        tc.insert([old[1]], ids)  # computed again without a lookup: on the device and on disk
        pool.free(ids)
        assert tc.location(old[1]) == "device" and old[1] in disk.index
        with writes_fail_past(0):  # a rewrite in place of the same digest: the copy there stays
            assert [type(f.exception()) for f in tc.demote(1)] == [OSError]
        assert list(disk.index) == old and tc.stats()["dropped"]["disk"] == 0
        fill(tc, prompt(3, blocks=1))
        with writes_fail_past(disk.index[old[0]].slot * disk.slot_nbytes + 4096):
            assert [type(f.exception()) for f in tc.demote(1)] == [OSError]
        assert list(disk.index) == old[1:]  # torn: dropped
        assert tc.stats()["dropped"] == {"device": 3, "host": 0, "disk": 1}
        assert _slots_accounted(disk)
        assert tc.match([old[0]]).num_matched == 0
        m = tc.match([old[1]])  # the kept copy is served, byte-exact
        assert m.num_matched == 1 and m.tiers.tolist() == [TIER_DISK]
        assert_holds(pool, m.block_ids, np.frombuffer(old[1], np.uint8).reshape(1, 32))
        tc.release([old[1]])
        assert tc.stats()["corrupt_reads"] == 0


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_a_lookup_that_a_close_fails_gives_back_the_device_blocks_it_acquired(tmp_path: Path) -> None:
    # The lookup acquires the device prefix, then waits for the rest, in flight to the host (the copies
    # are held back). close() runs meanwhile; once the copy lands the promotion finds the cache closed
    # and the lookup raises. The device block it acquired stayed in use for good (never evictable).
    pool = PagedKVPool(SPEC, 8)
    tc = TieredPrefixCache(pool, device_blocks=4, host_blocks=4)
    digests = fill(tc, prompt(0, blocks=2))
    gate = threading.Event()
    assert tc._executor is not None
    tc._executor.submit(gate.wait)
    tc.demote(1)  # the leaf: in flight to the host behind the gate
    assert tc.location(digests[0].tobytes()) == "device"
    errors: list[BaseException] = []

    def lookup() -> None:
        try:
            tc.match(digests)
        except BaseException as exc:
            errors.append(exc)

    looker = threading.Thread(target=lookup)
    looker.start()
    _until(lambda: tc.device.stats()["in_use_blocks"] == 1, "the lookup acquired the device prefix")
    closer = threading.Thread(target=tc.close)
    closer.start()
    _until(lambda: tc._closed, "close() began")
    gate.set()
    looker.join(timeout=10)
    closer.join(timeout=10)
    assert not looker.is_alive() and not closer.is_alive()
    assert [str(e) for e in errors] == ["TieredPrefixCache is closed"]
    assert tc.device.stats()["in_use_blocks"] == 0
    assert tc.device.evict(1) == 1  # unreferenced again: evictable
    assert tc.location(digests[1].tobytes()) == "host"  # the claimed copy went back to its tier


def test_disk_slots_keep_token_records_that_fit_their_header_page(tmp_path: Path) -> None:
    # A record is read back as written (an empty extra key is not an absent one); one too large for the
    # header page is left out (its block loads without it), and a buffer reused for a block without a
    # record does not carry the previous block's record into its slot.
    from sagellm_kv_cache.tiers import _BlockMeta

    pool = PagedKVPool(SPEC, 4)
    keys = [bytes([i]) * 32 for i in range(3)]
    fits = _BlockMeta(np.array([0, 7, 2**32 - 1, 5], np.int64), keys[1], b"", None)
    too_large = _BlockMeta(np.arange(4, dtype=np.int64), None, b"x" * 4096, b"salt")  # the page is 4 KiB
    disk = DiskTier(tmp_path, 4, pool.block_nbytes)
    buf = disk.bounce_buffer()
    disk.write(0, keys[0], buf, 1, fits)
    disk.write(1, keys[1], buf, 2, too_large)
    disk.write(2, keys[2], buf, 3)  # the buffer's header page held keys[1]'s attempt, keys[0]'s record
    disk.close()
    reopened = DiskTier(tmp_path, 4, pool.block_nbytes, keep_records=True)
    try:
        assert set(reopened.index) == set(keys) and reopened.dropped_on_open == 0
        assert list(reopened.records) == [keys[0]]
        got = reopened.records[keys[0]]
        assert got.tokens.tolist() == fits.tokens.tolist() and got.tokens.dtype == np.int64
        assert (got.parent, got.extra_key, got.cache_salt) == (keys[1], b"", None)
    finally:
        reopened.close()
    without = DiskTier(tmp_path, 4, pool.block_nbytes)  # records are checked, not kept
    assert without.records == {} and len(without) == 3
    without.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_a_tier_dropped_without_close_gives_back_its_descriptors_and_its_directory(tmp_path: Path) -> None:
    # An engine that rebuilds its cache (a reconfiguration, an error path that skipped close())
    # left each dropped tier's two descriptors open and its directory locked for the rest of the
    # process: reopening the directory failed as "in use by another process".
    import gc

    pool = PagedKVPool(SPEC, 8)
    before = _open_fds()
    for _ in range(20):
        tc = TieredPrefixCache(pool, device_blocks=2, disk_dir=tmp_path, disk_blocks=4)
        digests = tc.hash_tokens(np.arange(12))
        ids = tc.allocate(3)
        tc.insert(digests, ids)
        pool.free(ids)
        tc.flush()  # the oldest block went to disk
        del tc
        gc.collect()
    assert _open_fds() <= before
    disk = DiskTier(tmp_path, 4, pool.block_nbytes)  # the directory is free, its slot intact
    assert len(disk) == 1
    disk.close()
    for i in range(20):
        DiskTier(tmp_path / f"bare{i}", 4, pool.block_nbytes)
        gc.collect()
    assert _open_fds() <= before


def test_blocks_promoted_off_the_disk_do_not_come_back_when_it_is_reopened(tmp_path: Path) -> None:
    # A promotion freed its disk slots but left their headers valid: reopening the directory brought
    # the promoted blocks back, so the reopened tier held (and announced) blocks it had removed.
    pool = PagedKVPool(SPEC, 16)
    with TieredPrefixCache(pool, device_blocks=4, disk_dir=tmp_path, disk_blocks=8, event_queue_capacity=64) as tc:
        tokens = np.arange(16)
        digests = tc.hash_tokens(tokens)
        ids = tc.allocate(4)
        tc.insert(digests, ids, token_ids=tokens)
        pool.free(ids)
        tc.demote(2)
        tc.flush()
        assert [tc.location(d.tobytes()) for d in digests] == ["device", "device", "disk", "disk"]
        match = tc.match(digests)
        assert match.tiers.tolist() == [TIER_DEVICE, TIER_DEVICE, TIER_DISK, TIER_DISK]
        tc.release(digests)
        tc.drain_events()
        assert tc.disk is not None and len(tc.disk) == 0 and tc.disk.slots.num_available == 8
    reopened = DiskTier(tmp_path, 8, pool.block_nbytes)
    assert len(reopened) == 0 and reopened.dropped_on_open == 0
    for bad in (8, -1, True, 1.0):
        with pytest.raises(ValueError, match="slot"):
            reopened.erase(bad)  # type: ignore[arg-type]
    reopened.close()


def _balanced(tc: TieredPrefixCache) -> tuple[int, int, int, int]:
    """Each lower tier's blocks, and what its counters say it holds (a fresh directory): stored minus gone."""
    s = tc.stats()
    spilled, rem = divmod(s["bytes_moved"]["host_to_disk"], tc.block_nbytes)
    assert rem == 0
    host = s["demoted_to_host"] - s["promoted_from_host"] - spilled - s["dropped"]["host"] - s["replaced"]["host"]
    disk = (s["demoted_to_disk"] - s["promoted_from_disk"] - s["corrupt_reads"] - s["dropped"]["disk"]
            - s["replaced"]["disk"])
    to_disk = (s["bytes_moved"]["host_to_disk"] + s["bytes_moved"]["device_to_disk"]) // tc.block_nbytes
    assert to_disk == s["demoted_to_disk"], "bytes moved to disk and blocks written disagree"
    return s["blocks"]["host"], host, s["blocks"]["disk"], disk


def _again(tc: TieredPrefixCache, pool: PagedKVPool, key: bytes) -> None:
    """``key`` computed again without a lookup: on the device too."""
    ids = tc.allocate(1)
    pool.scatter(content(key, pool.block_nbytes), ids)
    tc.insert([key], ids)
    pool.free(ids)


def test_the_lower_tiers_counters_balance_after_failed_and_repeated_writes(tmp_path: Path) -> None:
    # Real write errors (EFBIG past RLIMIT_FSIZE, refused whole or torn inside a slot). The blocks that
    # landed on disk before a spill's failing write moved no bytes in bytes_moved; a digest written again
    # over its own copy (in place) counted as one more block, and one whose rewrite tore its old copy
    # was lost uncounted. Now blocks == stored - promoted - spilled - corrupt - dropped - replaced.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, host_blocks=2, disk_dir=tmp_path / "a", disk_blocks=3,
                           background=False) as tc:
        assert tc.disk is not None and tc.host is not None
        first = fill(tc, prompt(0, blocks=2))
        tc.demote(2)
        fill(tc, prompt(1, blocks=2))
        with writes_fail_past(tc.disk.slot_nbytes):  # the spill: the first victim lands, the second fails
            failed = tc.demote(2)
        assert [type(f.exception()) for f in failed] == [OSError]
        # two writes failed: the spill's second, and the demoted block past the host tier
        assert _balanced(tc) == (2, 2, 1, 1) and tc.stats()["disk_write_errors"] == 2
        _again(tc, pool, next(iter(tc.disk.index)))  # on the device and on disk
        tc.demote(1)[0].result()  # to the host (its oldest spilled to disk): the disk copy is superseded
        assert _balanced(tc)[0] == _balanced(tc)[1] and _balanced(tc)[2] == _balanced(tc)[3]
        m = tc.match(first)
        tc.release(first[: m.num_matched])
        assert _balanced(tc)[0] == _balanced(tc)[1] and _balanced(tc)[2] == _balanced(tc)[3]
        assert _slots_accounted(tc.disk) and _slots_accounted(tc.host)
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, disk_dir=tmp_path / "b", disk_blocks=2, background=False) as tc:
        disk = tc.disk
        assert disk is not None
        key = fill(tc, prompt(0, blocks=1))[0].tobytes()
        tc.demote(1)
        _again(tc, pool, key)
        tc.demote(1)[0].result()  # written again over its own copy: still one block on disk
        assert _balanced(tc)[2:] == (1, 1)
        _again(tc, pool, key)
        with writes_fail_past(0):  # refused whole: the copy there stays
            refused = tc.demote(1)
        assert [type(f.exception()) for f in refused] == [OSError]
        assert _balanced(tc)[2:] == (1, 1)
        _again(tc, pool, key)
        # torn inside the header page, past its new generation: the slot holds no copy intact any more
        with writes_fail_past(disk.index[key].slot * disk.slot_nbytes + disk.payload_stride + 24):
            torn = tc.demote(1)
        assert [type(f.exception()) for f in torn] == [OSError]
        assert key not in disk.index and _slots_accounted(disk)
        assert _balanced(tc)[2:] == (0, 0)
        assert (tc.stats()["demoted_to_disk"], tc.stats()["disk_write_errors"]) == (2, 2)


@pytest.mark.parametrize(("host_blocks", "disk_writes"), [(0, 1), (0, 2), (2, 0), (2, 1), (3, 0)])
def test_a_failed_demotion_keeps_the_head_of_a_chain_not_its_tail(tmp_path: Path, host_blocks: int,
                                                                 disk_writes: int, background: bool) -> None:
    # A chain of 4 blocks demoted at once; the disk takes `disk_writes` slot writes, then fails (a real
    # EFBIG past RLIMIT_FSIZE). The demotion went leaf first: the tail landed (on disk, or on the host
    # and then pushed towards the disk by the head) and the head was dropped, so the blocks kept could
    # never be matched (a match stops at the first block no tier holds) and only took slots. Now the
    # blocks that land are a prefix of the chain, served by a match.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, host_blocks=host_blocks, disk_dir=tmp_path, disk_blocks=6,
                           background=background) as tc:
        assert tc.disk is not None
        chain = fill(tc, prompt(0, blocks=4))
        with writes_fail_past(tc.disk.slot_nbytes * disk_writes):
            demotion = tc.demote(4)
            failed = [type(f.exception(timeout=10)) for f in demotion]
        assert failed == [OSError]
        where = [tc.location(d.tobytes()) for d in chain]
        kept = min(host_blocks + disk_writes, 4)
        assert where.count(None) == 4 - kept and None not in where[:kept]
        assert tc.stats()["dropped"]["device"] == 4 - kept
        m = tc.match(chain)
        assert m.num_matched == kept
        assert_holds(pool, m.block_ids, chain[:kept])
        tc.release(chain[:kept])
        assert _slots_accounted(tc.disk) and (tc.host is None or _slots_accounted(tc.host))


def test_a_demotion_larger_than_the_disk_writes_only_the_heads_it_keeps(tmp_path: Path) -> None:
    # Written head first, the tail would displace the head on a disk smaller than the demotion: only the
    # newest disk-full are written (before, all were, and the tail's writes were displaced again).
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, disk_dir=tmp_path, disk_blocks=2, background=False) as tc:
        assert tc.disk is not None
        chain = fill(tc, prompt(0, blocks=4))
        tc.demote(4)[0].result()
        assert [tc.location(d.tobytes()) for d in chain] == ["disk", "disk", None, None]
        assert list(tc.disk.index) == [chain[1].tobytes(), chain[0].tobytes()]  # the tail's end goes first
        s = tc.stats()
        assert (s["demoted_to_disk"], s["dropped"]["device"], s["dropped"]["disk"]) == (2, 2, 0)
        assert _balanced(tc)[2:] == (2, 2)
        m = tc.match(chain)
        assert m.num_matched == 2
        assert_holds(pool, m.block_ids, chain[:2])
        tc.release(chain[:2])


def test_a_demotion_into_a_disk_whose_every_slot_a_promotion_claims_drops_the_host_tiers_oldest(
        tmp_path: Path, background: bool) -> None:
    # The disk tier (1 slot) holds x, the host tier (1 slot) y, the device is full. A lookup of x claims
    # it off the disk (its index is then empty, its only slot held) and makes room on the device: the
    # demoted block needs the host slot, whose y has to go to disk, where no slot can be had. The spill
    # raised a bare KeyError (popitem on the empty index), y stayed and the device block was dropped
    # instead. A full tier drops its oldest: y goes, the demoted block lands on the host.
    pool = PagedKVPool(SPEC, 2)
    with TieredPrefixCache(pool, device_blocks=2, host_blocks=1, disk_dir=tmp_path, disk_blocks=1,
                           background=background) as tc:
        x = fill(tc, prompt(0, blocks=1))
        tc.demote(1)[0].result()
        y = fill(tc, prompt(1, blocks=1))
        tc.demote(1)[0].result()  # x spilled to disk, y on the host
        old = fill(tc, prompt(2, blocks=1))
        fill(tc, prompt(3, blocks=1))  # the device: full, `old` its least recently used
        assert [tc.location(d.tobytes()) for d in (x[0], y[0])] == ["disk", "host"]
        m = tc.match(x)
        assert m.tiers.tolist() == [TIER_DISK]
        assert_holds(pool, m.block_ids, x)
        tc.release(x)
        tc.flush()
        assert (tc.location(old[0].tobytes()), tc.location(y[0].tobytes())) == ("host", None)
        s = tc.stats()
        assert s["dropped"] == {"device": 0, "host": 1, "disk": 0} and s["disk_write_errors"] == 0
        assert _balanced(tc)[:2] == (1, 1) and _balanced(tc)[2] == _balanced(tc)[3]
        assert tc.host is not None and tc.disk is not None
        assert _slots_accounted(tc.host) and _slots_accounted(tc.disk)
        m = tc.match(old)
        assert m.tiers.tolist() == [TIER_HOST]
        assert_holds(pool, m.block_ids, old)
        tc.release(old)


@pytest.mark.parametrize("host_blocks", [0, 2])
def test_threads_promoting_off_a_tiny_disk_while_others_demote_get_no_untyped_error(
        tmp_path: Path, host_blocks: int, background: bool) -> None:
    # Three threads serve requests over a 2-block disk tier (promotions claim its blocks, emptying its
    # index) while a fourth demotes. A demotion that reached the disk while every slot was claimed failed
    # with a bare KeyError (popitem on the empty index). Now its blocks are dropped, as past a full tier:
    # no demotion fails (the disk works), the counters balance and every slot is accounted for.
    pool = PagedKVPool(SPEC, 16)
    errors: list[BaseException] = []
    stop = threading.Event()
    with TieredPrefixCache(pool, device_blocks=4, host_blocks=host_blocks, disk_dir=tmp_path, disk_blocks=2,
                           background=background) as tc:
        def serve(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(600):
                    fill(tc, prompt(int(rng.integers(0, 6)), blocks=int(rng.integers(1, 3))))
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)

        def demote() -> None:
            while not stop.is_set():
                try:
                    errors.extend(e for f in tc.demote(2) if (e := f.exception()) is not None)
                except BaseException as exc:  # handed to the main thread
                    errors.append(exc)

        servers = [threading.Thread(target=serve, args=(seed,)) for seed in range(3)]
        demoter = threading.Thread(target=demote)
        for t in [*servers, demoter]:
            t.start()
        for t in servers:
            t.join()
        stop.set()
        demoter.join()
        tc.flush()
        assert not errors, errors[:3]
        host, host_count, disk, disk_count = _balanced(tc)
        assert (host, disk) == (host_count, disk_count)
        assert tc.disk is not None and _slots_accounted(tc.disk)
        assert tc.host is None or _slots_accounted(tc.host)
        assert tc.stats()["promoted_from_disk"] > 0


@pytest.mark.parametrize("host_blocks", [0, 1])
def test_blocks_read_past_a_corrupt_slot_go_back_uncounted_as_promoted(tmp_path: Path, host_blocks: int) -> None:
    # A chain of 3 demoted blocks (the head on the host when it has a slot, the rest on disk); the middle
    # block's disk slot has one payload byte flipped. A match serves the head only: the middle is a
    # corrupt read, and the tail (copied to the device too) goes back to its tier. That tail counted as
    # promoted, so the tier held one block more than its counters said.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=8, host_blocks=host_blocks, disk_dir=tmp_path, disk_blocks=4,
                           background=False) as tc:
        disk = tc.disk
        assert disk is not None
        chain = fill(tc, prompt(0, blocks=3))
        tc.demote(3)
        where = [tc.location(d.tobytes()) for d in chain]
        assert where == ["host" if host_blocks else "disk", "disk", "disk"]
        victim = disk.index[chain[1].tobytes()].slot
        with open(tmp_path / "slots.bin", "r+b") as f:  # flip one payload byte of the middle block's slot
            f.seek(victim * disk.slot_nbytes + 5)
            b = f.read(1)
            f.seek(victim * disk.slot_nbytes + 5)
            f.write(bytes([b[0] ^ 0xFF]))
        m = tc.match(chain)
        assert m.num_matched == 1
        assert_holds(pool, m.block_ids, chain[:1])
        tc.release(chain[:1])
        assert [tc.location(d.tobytes()) for d in chain] == ["device", None, "disk"]
        s = tc.stats()
        assert (s["corrupt_reads"], s["promoted_from_host"] + s["promoted_from_disk"]) == (1, 1)
        host, host_count, on_disk, disk_count = _balanced(tc)
        assert (host, on_disk) == (host_count, disk_count) == (0, 1)
        assert _slots_accounted(disk)


@pytest.mark.parametrize("how", ["claim_given_back", "two_writers"])
def test_a_disk_copy_given_up_for_another_does_not_come_back_when_the_disk_is_reopened(tmp_path: Path,
                                                                                         how: str) -> None:
    # A digest the disk holds in two slots keeps one (same bytes): the copy a promotion claimed and gave
    # back after the digest was stored again, or the copy the first of two demotions writing at once
    # published (both interleavings forced as in the tests above). The slot given up kept a valid header:
    # once the kept copy was promoted off the disk, a reopen brought the digest back, a block the tier
    # had removed.
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=4, disk_dir=tmp_path, disk_blocks=4, background=False) as tc:
        disk = tc.disk
        assert disk is not None
        if how == "claim_given_back":
            key = fill(tc, prompt(0, blocks=1))[0].tobytes()
            tc.demote(4)
            claim = tc._claim(key)
            assert claim is not None
            fill(tc, prompt(0, blocks=1))
            tc.demote(4)
            tc._unclaim([(key, *claim)])
        else:
            key = b"\x07" * 32
            _write_twice_at_once(tc, key)
        assert list(disk.index) == [key] and tc.stats()["replaced"]["disk"] == 1
        m = tc.match([key])
        assert m.tiers.tolist() == [TIER_DISK]
        tc.release([key])
        assert len(disk) == 0 and _slots_accounted(disk)
    reopened = DiskTier(tmp_path, 4, pool.block_nbytes)
    try:
        assert len(reopened) == 0 and reopened.dropped_on_open == 0
    finally:
        reopened.close()


def test_a_displaced_copy_kept_after_a_failed_write_but_stored_again_meanwhile_does_not_come_back(
        tmp_path: Path) -> None:
    # A write into a full disk takes its oldest block's slot and fails before any byte lands (a real
    # EFBIG); meanwhile that block was written again into another slot. The intact displaced copy is
    # given up for the new one, but kept its valid header: once the new copy was promoted off the disk,
    # a reopen brought the block back. (The interleaving is forced by a hook on the slot write.)
    pool = PagedKVPool(SPEC, 8)
    with TieredPrefixCache(pool, device_blocks=4, disk_dir=tmp_path, disk_blocks=2, background=False) as tc:
        disk = tc.disk
        assert disk is not None
        oldest, other, new = (bytes([i]) * 32 for i in (1, 2, 3))
        payload = disk.bounce_buffer().copy()
        tc._write_disk(oldest, payload)
        tc._write_disk(other, payload)
        real_write = disk.write

        def stored_again_then_refused(*args: Any) -> None:
            disk.write = real_write  # type: ignore[method-assign]
            tc._write_disk(oldest, payload)  # into the slot `other` leaves
            with writes_fail_past(0):
                real_write(*args)

        disk.write = stored_again_then_refused  # type: ignore[method-assign]
        with pytest.raises(OSError):
            tc._write_disk(new, payload)
        assert list(disk.index) == [oldest] and tc.stats()["replaced"]["disk"] == 1
        assert _slots_accounted(disk)
        m = tc.match([oldest])
        assert m.tiers.tolist() == [TIER_DISK]
        tc.release([oldest])
        assert len(disk) == 0
    reopened = DiskTier(tmp_path, 2, pool.block_nbytes)
    try:
        assert len(reopened) == 0 and reopened.dropped_on_open == 0
    finally:
        reopened.close()
