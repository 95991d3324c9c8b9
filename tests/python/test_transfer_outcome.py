"""Both sides of a block transfer agree on its outcome, whenever the final reply lands.

Real processes over gloo on 127.0.0.1. The destination's test hook holds its final OK until a
chosen moment relative to the source's deadline (both read the same CLOCK_MONOTONIC), so the
reply lands well before, just before, at, just after or well after it. The destination commits
before that reply in every case; the source must then report success or "outcome unknown", never
a failure, and a later exchange (over a new process group, as after any timeout) must settle an
unknown outcome to what the destination really did.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sagellm_comm")

from ports import free_port  # noqa: E402
from test_transfer_multiprocess import SPEC, _fill, _outcome, _run, _sha  # noqa: E402

pytestmark = pytest.mark.multiprocess

TIMEOUT = 1.5  # the source's deadline per trial
#: When the destination's final OK goes out, relative to the source's deadline (seconds).
OFFSETS = (-0.5, -0.003, 0.0, 0.003, 0.5)
BLOCKS = 40


def _wait_for(path: Path) -> float:
    while not path.exists():
        time.sleep(0.001)
    return float(path.read_text())


def _announce(path: Path, value: float) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(value))
    os.replace(tmp, path)


def _new_group(backend: Any, rank: int, port: int) -> None:
    """A timeout breaks the gloo pair: both ranks move to a fresh process group, as a user would."""
    backend.destroy()
    backend.init(rank, 2, "127.0.0.1", port)


def _session(shared: str, ports: list[int], rank: int, backend: Any) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, KVTransferEngine, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    spec = KVCacheSpec(**SPEC)
    folder = Path(shared)
    trials = [("offset", o) for o in OFFSETS] + [("publish_fails", 0.3), ("closed_link", 1.0), ("interrupted", -0.3)]
    out: dict[str, Any] = {}
    pool = PagedKVPool(spec, 4 * BLOCKS)
    for i, (kind, offset) in enumerate(trials):
        name = f"{kind}{offset:+.3f}"
        if rank == 0:
            _fill(pool, seed=i)
            engine = KVTransferEngine(backend, chunk_bytes=4096, timeout=TIMEOUT)
            ids = pool.allocate(BLOCKS)
            digests = np.random.default_rng(i).integers(0, 256, size=(BLOCKS, 32), dtype=np.uint8)
            _announce(folder / f"deadline{i}", time.monotonic() + TIMEOUT)
            records_before = set(engine._records)
            if kind == "interrupted":
                sent = _interrupted_after_last_chunk(engine, pool, ids, digests)
            else:
                sent = _outcome(functools.partial(engine.send_blocks, pool, ids, 1, digests=digests))
            (tid,) = set(engine._records) - records_before
            before_settle = (engine.get_transfer_outcome(tid), engine.get_transfer_status(tid).value)
            if kind == "closed_link":
                backend.destroy()  # close the link while the destination still holds its reply
                _announce(folder / f"closed{i}", time.monotonic())
                backend.init(0, 2, "127.0.0.1", ports[i])
            else:
                _new_group(backend, 0, ports[i])
            settle = _outcome(lambda: BlockTransfer(backend, timeout=10.0).send_blocks(pool, [], 1))
            out[name] = {
                "sent": sent[0], "message": sent[1]["message"] if sent[0] != "ok" else "",
                "before_settle": before_settle, "settle": settle[0],
                "outcome": BlockTransfer.outcome(tid), "engine_after": engine.get_transfer_outcome(tid),
                "sha": _sha(pool, ids),
            }
            pool.free(ids)
            continue

        bt = BlockTransfer(backend, timeout=20.0)
        published: dict[str, Any] = {}
        deadline_file = folder / f"deadline{i}"

        def hold_reply(offset: float = offset, deadline_file: Path = deadline_file) -> None:
            time.sleep(max(0.0, _wait_for(deadline_file) + offset - time.monotonic()))

        if kind == "publish_fails":

            def publish(digests: np.ndarray, block_ids: np.ndarray) -> None:
                hold_reply()
                raise RuntimeError("the prefix cache refused the blocks")
        else:

            def publish(digests: np.ndarray, block_ids: np.ndarray, published: dict[str, Any] = published) -> None:
                published["n"] = len(block_ids)
                published["sha"] = _sha(pool, block_ids)

            bt._before_final_reply = hold_reply
        free_before = pool.num_free_blocks
        start = time.monotonic()
        got = _outcome(functools.partial(bt.receive, pool, 0, publish=publish))
        returned = time.monotonic()
        kept = free_before - pool.num_free_blocks
        result: dict[str, Any] = {"received": got[0], "published": published.get("n", 0), "kept": kept,
                                  "sha": published.get("sha"), "seconds": returned - start}
        if got[0] == "ok":
            result["reply_sent"] = got[1].reply_sent
            pool.free(got[1].block_ids)
        if kind == "closed_link":
            result["after_close"] = returned - _wait_for(folder / f"closed{i}")
        _new_group(backend, 1, ports[i])
        result["settle"] = _outcome(lambda: BlockTransfer(backend, timeout=10.0).recv_blocks(pool, 0))[0]
        out[name] = result
    return out


def _interrupted_after_last_chunk(engine: Any, pool: Any, ids: Any, digests: Any) -> tuple[str, Any, float]:
    """engine.send_blocks, with a KeyboardInterrupt landing in this (main) thread 0.2 s after its last
    chunk went out, while it waits for the destination's final reply (held until 0.3 s before the
    deadline)."""
    import _thread
    import threading

    last_chunk = -(-BLOCKS // max(1, 4096 // pool.block_nbytes)) - 1
    sent_last = threading.Event()

    def hook(k: int, payload: Any) -> None:
        if k == last_chunk:
            sent_last.set()

    def interrupt() -> None:
        if sent_last.wait(10.0):
            time.sleep(0.2)
            _thread.interrupt_main()

    engine.blocks._chunk_hook = hook
    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    start = time.monotonic()
    try:
        engine.send_blocks(pool, ids, 1, digests=digests)
        outcome: tuple[str, Any, float] = ("ok", None, time.monotonic() - start)
    except KeyboardInterrupt:
        outcome = ("KeyboardInterrupt", {"message": ""}, time.monotonic() - start)
    timer.join()
    engine.blocks._chunk_hook = None
    return outcome


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    shared = tmp_path_factory.mktemp("outcome")
    ports = [free_port() for _ in range(len(OFFSETS) + 3)]
    return _run(functools.partial(_session, str(shared), ports), world=2, timeout=150.0)


@pytest.mark.parametrize("offset", OFFSETS)
def test_sides_agree_wherever_the_final_reply_lands(reports: dict[int, Any], offset: float) -> None:
    name = f"offset{offset:+.3f}"
    src, dst = reports[0][name], reports[1][name]
    # The destination committed (the hook runs after the commit point) with the source's bytes.
    assert dst["received"] == "ok" and dst["published"] == BLOCKS and dst["sha"] == src["sha"], dst
    # So the source may say success or "unknown", never failure...
    assert src["sent"] in ("ok", "KVTransferOutcomeUnknownError"), src
    if offset < -0.1:
        assert src["sent"] == "ok"
    if offset > 0.1:
        assert src["sent"] == "KVTransferOutcomeUnknownError"
    if src["sent"] == "ok":
        assert src["before_settle"] == ("completed", "completed") and src["outcome"] is None
    else:
        assert "outcome unknown, the destination may hold the blocks" in src["message"]
        assert src["before_settle"] == ("unknown", "in_progress")  # never FAILED
        # ...and the next exchange, over a fresh process group, settles it to what really happened.
        assert src["settle"] == "ok" and dst["settle"] == "ok"
        assert src["outcome"] == "completed" and src["engine_after"] == "completed"


def test_publish_failing_after_the_deadline_settles_as_failed(reports: dict[int, Any]) -> None:
    src, dst = reports[0]["publish_fails+0.300"], reports[1]["publish_fails+0.300"]
    assert dst["received"] == "KVTransferFailedError" and dst["kept"] == 0, dst
    assert src["sent"] == "KVTransferOutcomeUnknownError" and src["before_settle"][0] == "unknown", src
    assert src["settle"] == "ok" and src["outcome"] == "failed" and src["engine_after"] == "failed"


def test_closed_link_does_not_hold_the_destination(reports: dict[int, Any]) -> None:
    src, dst = reports[0]["closed_link+1.000"], reports[1]["closed_link+1.000"]
    assert src["sent"] == "KVTransferOutcomeUnknownError", src
    # Committed, and back well before its own 20 s deadline although the source had closed the link.
    assert dst["received"] == "ok" and dst["published"] == BLOCKS, dst
    assert dst["after_close"] < 5.0, dst
    assert src["outcome"] == "completed"


def test_an_interrupt_after_the_last_chunk_leaves_the_outcome_unknown_not_failed(reports: dict[int, Any]) -> None:
    # A Ctrl-C (or a cancelled task) while the source waits for the final reply: the destination may
    # have committed, so the source must not record a failure; the next exchange settles it. Was: FAILED.
    src, dst = reports[0]["interrupted-0.300"], reports[1]["interrupted-0.300"]
    assert src["sent"] == "KeyboardInterrupt", src
    assert dst["received"] == "ok" and dst["published"] == BLOCKS and dst["sha"] == src["sha"], dst
    assert src["before_settle"] == ("unknown", "in_progress"), src
    assert src["settle"] == "ok" and dst["settle"] == "ok"
    assert src["outcome"] == "completed" and src["engine_after"] == "completed"


def test_outcome_of_a_transfer_never_in_doubt_is_none() -> None:
    import uuid

    from sagellm_kv_cache.transfer import BlockTransfer

    assert BlockTransfer.outcome(uuid.uuid4()) is None


def test_damaged_footer_names_both_payload_checksums() -> None:
    out = _run(_footer_session, world=2, timeout=60.0)
    src, dst = out[0], out[1]
    assert src["kind"] == "KVChecksumMismatchError" and dst["kind"] == "KVChecksumMismatchError"
    assert src["context"]["where"] == "chunk 0 footer"
    # The source's message carries the checksum the destination computed over the payload it got.
    assert dst["context"]["payload_checksum"] in src["message"], (src["message"], dst["context"])
    assert "0000000000000000" not in src["message"]
    assert dst["kept"] == 0


def _footer_session(rank: int, backend: Any) -> dict[str, Any]:
    from sagellm_kv_cache import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.transfer import BlockTransfer

    pool = PagedKVPool(KVCacheSpec(**SPEC), 32)
    # The gloo path, where a chunk's footer travels in the same frame, right after its payload.
    bt = BlockTransfer(backend, timeout=20.0, same_host=False)
    if rank == 0:
        _fill(pool, seed=3)

        def damage_footer(k: int, payload: np.ndarray) -> None:
            frame = payload.base  # the staging slot: payload, then the 32-byte footer
            assert isinstance(frame, np.ndarray)
            frame[payload.size + 9] ^= 0xFF

        bt._chunk_hook = damage_footer
        kind, details, _ = _outcome(lambda: bt.send_blocks(pool, pool.allocate(4), 1))
        return {"kind": kind, **details}
    before = pool.num_free_blocks
    kind, details, _ = _outcome(lambda: bt.recv_blocks(pool, 0))
    return {"kind": kind, **details, "kept": before - pool.num_free_blocks}


def test_wire_header_round_trips_a_query() -> None:
    import uuid

    from sagellm_kv_cache.transfer import wire

    q = uuid.uuid4()
    header = wire.TransferHeader(
        transfer_id=uuid.uuid4(), num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, dtype="fp16",
        num_blocks=3, block_nbytes=512, chunk_blocks=2, checksum_algorithm=1, has_digests=True,
        digests_checksum=7, src_rank=0, dst_rank=1, query_id=q,
    )
    frame = np.zeros(wire.HEADER_NBYTES, dtype=np.uint8)
    header.pack(frame)
    assert wire.TransferHeader.unpack(frame) == header
    plain = wire.TransferHeader(**{**header.__dict__, "query_id": None})
    plain.pack(frame)
    assert wire.TransferHeader.unpack(frame).query_id is None
