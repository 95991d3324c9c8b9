"""W2/W3 shared workload and the pure-Python reference with vLLM's prefix-caching semantics.

Workload: 20,000 requests, each one of 1,000 shared 1,024-token system prompts (chosen uniformly
with a fixed seed) followed by 256 fresh tokens; block size 16, so 80 blocks per request of which
64 can be shared.

Reference (vLLM's KV cache manager, in plain Python): chained SHA-256 block hashes through hashlib,
a dict digest -> block, ref counts, and an LRU free queue: a finished request's blocks go to the
tail of the queue (last block first), a hit takes a cached block back out of the queue, and a new
block comes from the head of the queue, dropping whatever digest that block held.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

BLOCK = 16
PROMPT_TOKENS = 1024
FRESH_TOKENS = 256
VOCAB = 32_000


def make_requests(num_requests: int = 20_000, num_prompts: int = 1_000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, VOCAB, size=(num_prompts, PROMPT_TOKENS), dtype=np.int32)
    choice = rng.integers(0, num_prompts, size=num_requests)
    fresh = rng.integers(0, VOCAB, size=(num_requests, FRESH_TOKENS), dtype=np.int32)
    return [np.concatenate([prompts[c], fresh[i]]) for i, c in enumerate(choice)]


class PyPrefixCacheReference:
    """vLLM-style block manager in pure Python (hashlib + dict + LRU free queue)."""

    def __init__(self, num_blocks: int) -> None:
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.hits = 0
        self.queried = 0

    @staticmethod
    def hash_blocks(tokens: np.ndarray) -> list[bytes]:
        digests = []
        parent = b"\0" * 32
        data = tokens.astype("<i4").tobytes()
        step = BLOCK * 4
        for off in range(0, len(data) - step + 1, step):
            parent = hashlib.sha256(parent + data[off : off + step]).digest()
            digests.append(parent)
        return digests

    def _take_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            del self.cached[old]
            self.block_hash[block] = None
        return block

    def run_request(self, tokens: np.ndarray) -> None:
        digests = self.hash_blocks(tokens)
        blocks: list[int] = []
        for d in digests:  # longest prefix match
            b = self.cached.get(d)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.free_queue[b]
            self.ref[b] += 1
            blocks.append(b)
        self.hits += len(blocks)
        self.queried += len(digests)
        for d in digests[len(blocks):]:  # allocate and cache the rest
            b = self._take_free()
            self.ref[b] = 1
            self.block_hash[b] = d
            self.cached[d] = b
            blocks.append(b)
        for b in reversed(blocks):  # request ends: tail blocks become the first eviction candidates
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None
