"""KV-block layouts: contiguous and chunked storage behave the same through the interface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sagellm_kv_cache
from sagellm_kv_cache.layout import BaseKVBlock, ChunkedKVBlock, ContiguousKVBlock

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("make", "allocations"), [(lambda: ContiguousKVBlock(10, 8), 1),
                                                   (lambda: ChunkedKVBlock(10, 8, chunk_size=4), 3),
                                                   (lambda: ChunkedKVBlock(10, 8, chunk_size=3), 4)])
def test_round_trip_memory_and_allocations(make: Any, allocations: int) -> None:
    block: BaseKVBlock = make()
    assert block.dtype == torch.float16 and block.get_memory_usage() == 2 * 10 * 8 * 2
    assert block.get_num_allocations() == allocations
    for i in range(10):
        block.set_kv(i, torch.full((2, 8), float(i)))
    for i in range(10):
        assert torch.equal(block.get_kv(i), torch.full((2, 8), float(i), dtype=torch.float16))
    view = block.get_kv(5)
    view[0, 0] = 99.0  # a view into the block
    assert block.get_kv(5)[0, 0] == 99.0
    assert repr(block).endswith("(num_tokens=10, hidden_dim=8, dtype=torch.float16)")


def test_bad_input_changes_nothing() -> None:
    block = ChunkedKVBlock(4, 2, dtype=torch.float32, chunk_size=2)
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=f"token_idx {bad} out of range"):
            block.get_kv(bad)
    with pytest.raises(ValueError, match=r"Expected kv_data shape \(2, 2\)"):
        block.set_kv(0, torch.ones(2, 3))
    with pytest.raises(TypeError, match="torch tensor"):
        block.set_kv(0, [[1.0, 1.0], [1.0, 1.0]])
    assert all(torch.count_nonzero(c) == 0 for c in block.chunks)
    for args, message in [((0, 8), "num_tokens must be positive, got 0"), ((10, 0), "hidden_dim must be positive")]:
        with pytest.raises(ValueError, match=message):
            ContiguousKVBlock(*args)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        ChunkedKVBlock(10, 8, chunk_size=0)
    with pytest.raises(TypeError):
        BaseKVBlock(1, 1, None)  # type: ignore[abstract]


_MEMORY_PROBE = r"""
import resource, sys
import torch
from sagellm_kv_cache.errors import KVMemoryExhaustedError
from sagellm_kv_cache.layout import ChunkedKVBlock, ContiguousKVBlock

# An address-space limit a little above what the process maps now: a block past it cannot be allocated,
# and a regression that allocates chunk by chunk fails here instead of waking the OOM killer.
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def refused(make, want_bytes):
    try:
        make()
    except KVMemoryExhaustedError as err:
        assert isinstance(err, MemoryError) and err.required_bytes == want_bytes and err.device == "cpu", err
        assert str(want_bytes) in str(err), err
        return err
    raise AssertionError("allocated")

# More than the machine's RAM: refused before the first chunk (a chunked block used to zero-fill 64 tokens
# at a time until the OOM killer ended the process).
huge = 10**15
for make in (lambda: ChunkedKVBlock(huge, 8), lambda: ContiguousKVBlock(huge, 8)):
    err = refused(make, 2 * huge * 8 * 2)
    assert "physical memory" in err.context["reason"], err.context
# 4 GB of data in a billion one-token chunks: the tensors' own bookkeeping (about 0.5 KiB each) cannot fit.
err = refused(lambda: ChunkedKVBlock(10**9, 1, chunk_size=1), 2 * 10**9 * 1 * 2)
assert "in 1000000000 tensors" in err.context["reason"], err.context
assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < (64 << 10), "allocated before refusing"

# Fits the machine but not the limit: torch's allocation failure (a bare RuntimeError) is the typed error.
tokens = 1 << 20  # 2 GiB of float16 K and V
err = refused(lambda: ContiguousKVBlock(tokens, 512), 2 * tokens * 512 * 2)
assert "can't allocate memory" in err.context["reason"], err.context
refused(lambda: ChunkedKVBlock(tokens, 512, chunk_size=1 << 16), 2 * tokens * 512 * 2)
# The chunks built before the failure were dropped: a block that fits the limit is still allocated.
assert ContiguousKVBlock(1 << 16, 512).get_memory_usage() == 128 << 20
print("ok")
"""


def test_a_block_that_cannot_fit_is_a_typed_error_before_or_instead_of_allocating(tmp_path: Any) -> None:
    # In a child process: the address-space limit must not bind the test runner.
    env = {**os.environ, "PYTHONPATH": str(Path(sagellm_kv_cache.__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_dtype_must_be_a_torch_dtype() -> None:
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype, got 'float16'"):
        ContiguousKVBlock(4, 2, dtype="float16")
