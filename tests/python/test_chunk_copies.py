"""ChunkCopier: the vLLM tier's GPU copy path (torch only, no vLLM). CPU tensors in CI; the stream and
event behaviour on a CUDA device when one is present (skipped cleanly otherwise)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from sagellm_kv_cache.integrations.chunk_copies import ChunkCopier  # noqa: E402

ROWS = (64, 32, 96)  # three tensors of different row sizes: R = 192 bytes per block


def _tensors(num_blocks: int = 16, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in ROWS:
        # a strided view, as vLLM's canonical layer-outer tensors are: every other row of a buffer
        buf = torch.randint(-128, 127, (2 * num_blocks, row), dtype=torch.int8, generator=g)
        out.append(buf.to(device)[::2])
    return out


def _block(tensors: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.cat([t[b].cpu() for t in tensors])


@pytest.mark.parametrize(("bpc", "skip"), [(1, 0), (2, 0), (2, 1), (4, 0), (4, 3)])
@pytest.mark.parametrize("staging_bytes", [64 << 20, 1])  # 1: staging of one chunk, a batch per chunk
def test_store_then_load_is_byte_exact_and_block_major(bpc: int, skip: int, staging_bytes: int) -> None:
    tensors = _tensors()
    copier = ChunkCopier(tensors, num_chunks=6, blocks_per_chunk=bpc, staging_bytes=staging_bytes)
    src = [9, 3, 14, 0, 7, 1, 12, 5, 6, 10, 11, 13][: 3 * bpc - skip]
    slots = [4, 1, 0]
    want = [_block(tensors, b) for b in src]
    copier.store(1, src, slots, skip)
    for i, w in enumerate(want):  # block i sits at position skip + i, block-major in its slot
        c, j = divmod(skip + i, bpc)
        assert torch.equal(copier.chunk_view(slots[c])[j], w)
    for t in tensors:
        t.zero_()
    dst = [2, 5, 8, 11, 13, 15, 4, 0, 1, 3, 6, 7][: len(src)]
    copier.load(2, slots, dst, skip)
    for d, w in zip(dst, want, strict=True):
        assert torch.equal(_block(tensors, d), w)
    assert all(not _block(tensors, b).any() for b in set(range(16)) - set(dst))
    done = copier.finished()
    assert [(f.job_id, f.nbytes) for f in done] == [(1, len(src) * sum(ROWS)), (2, len(src) * sum(ROWS))]
    assert copier.finished() == []


def test_positions_outside_a_job_keep_their_bytes() -> None:
    tensors = _tensors()
    copier = ChunkCopier(tensors, num_chunks=2, blocks_per_chunk=4)
    copier.store(1, [0, 1, 2, 3], [0])
    before = copier.chunk_view(0).clone()
    copier.store(2, [10], [0], skip=2)  # one block into position 2 of the same chunk
    after = copier.chunk_view(0)
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])
    assert torch.equal(after[2], _block(tensors, 10))


@pytest.mark.parametrize(("ids", "slots", "skip", "match"), [
    ([0, 1, 2], [0], 0, "need 2 chunks, got 1"),
    ([0, 1], [0, 1, 2], 0, "need 1 chunks, got 3"),
    ([0, 16], [0], 0, "block id 16 out of range"),
    ([-1, 0], [0], 0, "block id -1 out of range"),
    ([0], [5], 0, "slot 5 out of range"),
    ([0], [0], 2, "skip must be an int in"),
    ([0], [0], True, "skip must be an int in"),
    ([0, 2**64 - 1], [0], 0, "block id 18446744073709551615 out of range"),  # not wrapped to -1
    (np.array([3, 2**64 - 1], dtype=np.uint64), [0], 0, "block id 18446744073709551615 out of range"),
    ([1.7, 2.2], [0], 0, "block ids must be integers, got float at position 0"),  # not truncated to blocks 1, 2
    (np.array([1.7, 2.2]), [0], 0, "block ids must be integers, got dtype float64"),
    ([0, 1], [0.9], 0, "slots must be integers, got float at position 0"),
    ([True, False], [0], 0, "block ids must be integers, got bool at position 0"),
    ([0, None], [0], 0, "block ids must be integers, got NoneType at position 1"),
])
def test_bad_arguments_raise_and_queue_nothing(ids: Any, slots: list[Any], skip: int, match: str) -> None:
    tensors = _tensors()
    before = [t.clone() for t in tensors]
    copier = ChunkCopier(tensors, num_chunks=2, blocks_per_chunk=2)
    host = copier.host.clone()
    error = TypeError if "must be integers" in match else ValueError
    with pytest.raises(error, match=match):
        copier.store(1, ids, slots, skip)
    with pytest.raises(error, match=match):
        copier.load(2, slots, ids, skip)
    assert torch.equal(copier.host, host) and all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    assert copier.finished() == []


def test_a_tensor_resized_after_construction_is_refused_before_any_copy() -> None:
    tensors = _tensors()
    copier = ChunkCopier(tensors, num_chunks=2, blocks_per_chunk=2)
    host = copier.host.clone()
    tensors[1].resize_(4, tensors[1].shape[1])  # rows 4.. gone: on a GPU, index_select would assert
    with pytest.raises(ValueError, match=r"tensors\[1\] is now \(4, \d+\), was \(16, \d+\)"):
        copier.store(1, [0, 12], [0])
    with pytest.raises(ValueError, match=r"tensors\[1\] is now"):
        copier.load(2, [0], [0, 1])
    assert torch.equal(copier.host, host) and copier.finished() == []


def test_construction_checks_the_tensors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ChunkCopier([], 2, 1)
    with pytest.raises(TypeError, match="a sequence of KV tensors, got Tensor"):
        ChunkCopier(torch.zeros(4, 8, dtype=torch.int8), 2, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a torch.Tensor, got ndarray"):
        ChunkCopier([np.zeros((4, 8), dtype=np.int8)], 2, 1)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="int8"):
        ChunkCopier([torch.zeros(4, 8, dtype=torch.float16)], 2, 1)
    with pytest.raises(ValueError, match="does not match"):
        ChunkCopier([torch.zeros(4, 8, dtype=torch.int8), torch.zeros(5, 8, dtype=torch.int8)], 2, 1)
    with pytest.raises(ValueError, match="num_chunks"):
        ChunkCopier([torch.zeros(4, 8, dtype=torch.int8)], 0, 1)
    with pytest.raises(ValueError, match="blocks_per_chunk"):
        ChunkCopier([torch.zeros(4, 8, dtype=torch.int8)], 2, 0)


# --- CUDA: streams, events, pinned slots -----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_jobs_wait_for_the_compute_stream_and_report_only_when_done() -> None:
    tensors = _tensors(device="cuda")
    copier = ChunkCopier(tensors, num_chunks=4, blocks_per_chunk=2)
    assert copier.pinned
    # Work queued on the compute stream before the store: a long sleep, then a write the store must see.
    torch.cuda._sleep(1_000_000_000)
    tensors[0][3].fill_(7)
    want = _block(tensors, 3)  # synchronises: the block as the compute stream leaves it
    torch.cuda._sleep(1_000_000_000)
    tensors[1][3].fill_(9)
    copier.store(1, [3, 4], [2])
    assert copier.finished() == []  # still behind the sleep on the compute stream
    copier.wait({1})
    done = copier.finished()
    assert [f.job_id for f in done] == [1] and done[0].seconds > 0
    want[ROWS[0]:ROWS[0] + ROWS[1]] = 9
    assert torch.equal(copier.chunk_view(2)[0], want)
    # A load lands after pending writes to its destination on the compute stream.
    tensors[0][5].fill_(1)
    copier.load(2, [2], [5, 6])
    copier.wait({2})
    assert [f.job_id for f in copier.finished()] == [2]
    assert torch.equal(_block(tensors, 5), want)


@pytest.mark.cuda
@cuda
def test_cuda_round_trip_is_byte_exact_with_expedited_loads() -> None:
    tensors = _tensors(num_blocks=64, device="cuda", seed=3)
    copier = ChunkCopier(tensors, num_chunks=16, blocks_per_chunk=4)
    src = list(range(0, 40, 2))
    want = [_block(tensors, b) for b in src]
    copier.store(1, src, list(range(15, 10, -1)))
    copier.shutdown()
    for t in tensors:
        t.zero_()
    copier.load(2, list(range(15, 10, -1))[:3], list(range(1, 12)), skip=1)
    copier.load(3, [11, 12], list(range(40, 48)), expedited=True)
    copier.wait({2, 3})
    assert sorted(f.job_id for f in copier.finished()) == [1, 2, 3]
    # slots 15, 14, 13 from position 1 hold blocks 1..11 of `src`; slot 11 holds 16..19, slot 12 12..15
    for i, d in enumerate(range(1, 12)):
        assert torch.equal(_block(tensors, d), want[1 + i])
    for d, i in zip(range(40, 48), [16, 17, 18, 19, 12, 13, 14, 15], strict=True):
        assert torch.equal(_block(tensors, d), want[i])


@pytest.mark.cuda
@cuda
def test_cuda_slots_named_twice_as_on_the_cpu() -> None:
    # A store naming a slot twice is refused before anything is queued; a load reading one twice
    # fills both sets of device blocks (two reads of one pinned slot).
    tensors = _tensors(device="cuda", seed=4)
    copier = ChunkCopier(tensors, num_chunks=3, blocks_per_chunk=2)
    host = copier.host.clone()
    with pytest.raises(ValueError, match="store: slot 1 appears at positions 0 and 1"):
        copier.store(1, [0, 1, 2, 3], [1, 1])
    assert torch.equal(copier.host, host) and copier.finished() == []
    copier.store(2, [3, 4], [1])
    copier.load(3, [1, 1], [10, 11, 12, 13])
    copier.wait({2, 3})
    assert sorted(f.job_id for f in copier.finished()) == [2, 3]
    for dst, src in ((10, 3), (11, 4), (12, 3), (13, 4)):
        assert torch.equal(_block(tensors, dst), _block(tensors, src))


# --- random jobs against a model of the slots ------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data(), bpc=st.integers(1, 4), staging_blocks=st.integers(1, 6))
def test_random_jobs_match_a_model_of_the_slots(data: st.DataObject, bpc: int, staging_blocks: int) -> None:
    """Stores and loads of random blocks, positions and slots, with staging small enough to batch:
    every slot position holds what the model says and every load writes exactly its blocks."""
    tensors = _tensors(num_blocks=12, seed=5)
    copier = ChunkCopier(tensors, num_chunks=5, blocks_per_chunk=bpc, staging_bytes=staging_blocks * sum(ROWS))
    model: dict[tuple[int, int], torch.Tensor] = {}  # (slot, position) -> block bytes
    for job in range(data.draw(st.integers(1, 8))):
        n_chunks = data.draw(st.integers(1, 3))
        slots = data.draw(st.lists(st.integers(0, 4), min_size=n_chunks, max_size=n_chunks,
                                   unique=True))
        skip = data.draw(st.integers(0, bpc - 1))
        n = data.draw(st.integers(max(1, (n_chunks - 1) * bpc - skip + 1), n_chunks * bpc - skip))
        blocks = data.draw(st.lists(st.integers(0, 11), min_size=n, max_size=n, unique=True))
        places = [(slots[(skip + i) // bpc], (skip + i) % bpc) for i in range(n)]
        if data.draw(st.booleans()) or not all(p in model for p in places):
            copier.store(job, blocks, slots, skip)
            for b, p in zip(blocks, places, strict=True):
                model[p] = _block(tensors, b)
        else:
            others = {b: _block(tensors, b) for b in range(12) if b not in blocks}
            copier.load(job, slots, blocks, skip)
            for b, p in zip(blocks, places, strict=True):
                assert torch.equal(_block(tensors, b), model[p])
            assert all(torch.equal(_block(tensors, b), v) for b, v in others.items())
        for (slot, pos), want in model.items():
            assert torch.equal(copier.chunk_view(slot)[pos], want)
    assert len(copier.finished()) == job + 1


def test_a_store_naming_a_slot_twice_is_refused_like_the_pool_path() -> None:
    """The stream path took it: the second chunk overwrote the first's blocks in the slot, and both were
    reported stored. The pool path (test_vllm_offload.py) refuses it in the same words."""
    tensors = _tensors()
    copier = ChunkCopier(tensors, num_chunks=3, blocks_per_chunk=2)
    host = copier.host.clone()
    for slots, first, second in (([1, 1], 0, 1), ([0, 2, 1, 2], 1, 3)):
        n = 2 * len(slots)
        with pytest.raises(ValueError, match=f"store: slot {slots[first]} appears at positions {first} and "
                                             f"{second}; each slot may be written once per job"):
            copier.store(1, list(range(n)), slots)
    assert torch.equal(copier.host, host) and copier.finished() == []
    # A load only reads its slots: the same chunk may go to two sets of device blocks.
    copier.store(2, [3, 4], [1])
    copier.load(3, [1, 1], [10, 11, 12, 13])
    for dst, src in ((10, 3), (11, 4), (12, 3), (13, 4)):
        assert torch.equal(_block(tensors, dst), _block(tensors, src))


def test_a_load_naming_a_device_block_twice_is_refused() -> None:
    """Two chunk positions into one device block: index_copy_ with a repeated index, whose winner is
    undefined on CUDA. Refused before anything is queued, naming the block and its positions."""
    tensors = _tensors()
    copier = ChunkCopier(tensors, num_chunks=3, blocks_per_chunk=2)
    copier.store(1, [0, 1, 2, 3], [0, 1])
    before = [t.clone() for t in tensors]
    host = copier.host.clone()
    for ids, skip, block, first, second in (([5, 5], 0, 5, 0, 1), ([6, 7, 6], 1, 6, 0, 2),
                                            (np.array([9, 4, 4, 8]), 0, 4, 1, 2)):
        slots = [0, 1] if len(ids) + skip > 2 else [0]
        with pytest.raises(ValueError, match=f"load: block id {block} appears at positions {first} and {second}; "
                                             "each block id may be written once per job"):
            copier.load(2, slots, ids, skip)
    assert torch.equal(copier.host, host) and all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    assert [f.job_id for f in copier.finished()] == [1]
    # A store only reads its device blocks: one block may go to two positions.
    copier.store(3, [5, 5], [2])
    assert torch.equal(copier.chunk_view(2)[0], copier.chunk_view(2)[1])
