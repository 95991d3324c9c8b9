"""One request through a TieredPrefixCache, as the tier KV-event tests serve it (shared by them)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
