"""One request through a TieredPrefixCache, as the tier KV-event tests serve it, and a real disk write
error (shared by the tier tests)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest


def serve(tc: Any, tokens: Any, salt: bytes | None, extra: bytes | None) -> list[bytes]:
    """Match (promoting lower-tier hits), insert what missed with its tokens, release; the digests."""
    tokens = np.asarray(tokens, dtype=np.int64)
    digests = tc.hash_tokens(tokens, salt=salt, extra=extra)
    n = tc.match(digests).num_matched
    if n < len(digests):
        fresh = tc.allocate(len(digests) - n)
        tc.insert(digests[n:], fresh, parent=digests[n - 1] if n else None, token_ids=tokens[n * tc.block_size:],
                  extra_key=extra, cache_salt=salt)
        tc.pool.free(fresh)
    tc.release(digests[:n])
    return [row.tobytes() for row in digests]


@contextlib.contextmanager
def writes_fail_past(nbytes: int) -> Iterator[None]:
    """Inside, this process's writes past byte ``nbytes`` of a file fail with EFBIG (RLIMIT_FSIZE, with
    SIGXFSZ ignored): a real write error, raised before any byte of that write lands."""
    resource = pytest.importorskip("resource")
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
