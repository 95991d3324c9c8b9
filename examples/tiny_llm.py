"""A tiny transformer that decodes from a :class:`PagedKVPool`, token for token equal to dense attention.

The proof that the pool's memory layout, the prefix cache and the transfer layer are right for real
attention, not just for bookkeeping:

* :class:`TinyLM` is a Llama-shaped decoder (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP)
  with random fp32 weights from a fixed seed, written with torch on the CPU.
* Its attention reads K and V from the pool through a block table: the layer caches are
  ``torch.from_dlpack(pool.dlpack_view(layer))`` (zero copy, the pool's true dtype, bf16 included);
  new K/V go to ``(block_table[pos // block_size], pos % block_size)`` and a step gathers only its
  own sequence's blocks (``cache[block_table]``), never the whole cache.
* Request A is prefilled into fresh blocks, whose full blocks go into the prefix cache; request B =
  A's first ``k`` blocks + new tokens matches them, allocates only the rest and prefills only its
  new tokens, attending over the cached prefix straight from the pool.
* Every step's logits are compared with a dense reference that recomputes attention over the whole
  sequence without any cache (K/V rounded to the pool's dtype, as the pool stores them), and its
  own greedy tokens must be the same.
* ``--handover``: a prefill process P prefills a prompt and sends its blocks over gloo with
  :class:`~sagellm_kv_cache.transfer.BlockTransfer` to a decode process D, which publishes the full
  blocks in its own prefix cache and decodes from them; D's tokens must equal the single-process run.

    python examples/tiny_llm.py                      # fp16 pool, block size 16
    python examples/tiny_llm.py --dtype bf16 --block-size 32 --handover

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from sagellm_kv_cache import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.prefix_cache import RadixPrefixCache

__all__ = [
    "DTYPES",
    "TOLERANCE",
    "DenseKV",
    "Generation",
    "PagedEngine",
    "PagedKVStore",
    "Request",
    "ScenarioReport",
    "TinyConfig",
    "TinyLM",
    "dense_generate",
    "generate",
    "main",
    "make_prompts",
    "pool_blocks_for",
    "run_handover",
    "run_prefix_scenario",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Largest |paged logit - dense logit| accepted per dtype (logits have a spread of about 3). The paged
#: and dense paths round the same K/V values to the cache dtype; what differs is only the fp32
#: summation order (a prefill of T rows or a 1-row decode vs one pass over the whole sequence), which
#: now and then moves a K/V value across a rounding boundary of the cache dtype; observed: <= 4e-5
#: for every dtype. Storing K/V in fp16 / bf16 at all moves the logits by ~1.5e-3 / ~1.5e-2 against
#: an fp32 reference, so these bounds are tight enough to tell the dtypes apart.
TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 5e-4, "bf16": 2e-3}

IntArray = npt.NDArray[np.int32]


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512
    hidden: int = 128
    num_layers: int = 3
    num_heads: int = 8
    num_kv_heads: int = 2  # grouped-query attention: 4 query heads share each K/V head
    head_dim: int = 16
    ffn: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    seed: int = 1234

    def kv_spec(self, dtype: str, block_size: int) -> KVCacheSpec:
        return KVCacheSpec(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           dtype=dtype, block_size=block_size)


class KVSource(Protocol):
    """Where attention gets its keys and values from (the model code is the same for both paths)."""

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the new tokens' K/V (T, kv_heads, head_dim) and returns fp32 K/V of positions 0..end."""
        ...


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


class TinyLM:
    """Decoder-only transformer: RMSNorm, GQA attention with rotary positions, SwiGLU MLP; fp32 compute."""

    def __init__(self, config: TinyConfig | None = None) -> None:
        cfg = config or TinyConfig()
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.config = cfg
        gen = torch.Generator().manual_seed(cfg.seed)

        def weight(*shape: int, scale: float) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * scale

        def norm() -> torch.Tensor:
            return 1.0 + 0.1 * torch.randn(cfg.hidden, generator=gen)

        h, q_dim, kv_dim = cfg.hidden, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.embed = weight(cfg.vocab_size, h, scale=1.0)
        self.layers = [
            _Layer(
                attn_norm=norm(),
                wq=weight(q_dim, h, scale=h**-0.5),
                wk=weight(kv_dim, h, scale=h**-0.5),
                wv=weight(kv_dim, h, scale=h**-0.5),
                wo=weight(h, q_dim, scale=q_dim**-0.5),
                mlp_norm=norm(),
                w_gate=weight(cfg.ffn, h, scale=h**-0.5),
                w_up=weight(cfg.ffn, h, scale=h**-0.5),
                w_down=weight(h, cfg.ffn, scale=cfg.ffn**-0.5),
            )
            for _ in range(cfg.num_layers)
        ]
        self.final_norm = norm()
        self.lm_head = weight(cfg.vocab_size, h, scale=3.0 * h**-0.5)  # logits with a spread of ~3
        half = cfg.head_dim // 2
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.norm_eps) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (T, head_dim / 2)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """q (T, heads, d) at ``positions``; keys/values (L, kv_heads, d) of positions 0..L-1; causal."""
        group = self.config.num_heads // self.config.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,lhd->htl", q, keys) * self.config.head_dim**-0.5
        future = torch.arange(keys.shape[0])[None, :] > positions[:, None]  # (T, L)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return torch.einsum("htl,lhd->thd", probs, values)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVSource) -> torch.Tensor:
        """Logits (T, vocab) of ``tokens`` at ``positions``; attention over what ``kv`` returns."""
        cfg = self.config
        t = tokens.shape[0]
        x = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.attn_norm)
            q = self._rope((h @ layer.wq.T).view(t, cfg.num_heads, cfg.head_dim), positions)
            k = self._rope((h @ layer.wk.T).view(t, cfg.num_kv_heads, cfg.head_dim), positions)
            v = (h @ layer.wv.T).view(t, cfg.num_kv_heads, cfg.head_dim)
            keys, values = kv.update(i, positions, k, v)
            x = x + self._attention(q, keys, values, positions).reshape(t, -1) @ layer.wo.T
            h = self._rms_norm(x, layer.mlp_norm)
            x = x + (F.silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T
        return self._rms_norm(x, self.final_norm) @ self.lm_head.T


# --- the dense reference: no cache at all -------------------------------------------------------


class DenseKV:
    """The K/V of the forward pass itself (whole sequence at once), rounded to the cache dtype."""

    def __init__(self, dtype: str) -> None:
        self.dtype = DTYPES[dtype]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions[0]) != 0:
            raise ValueError("the dense reference recomputes the whole sequence from position 0")
        return k.to(self.dtype).float(), v.to(self.dtype).float()


def dense_generate(model: TinyLM, prompt: Any, max_new_tokens: int, dtype: str) -> tuple[list[int], np.ndarray]:
    """Greedy decoding that recomputes the whole sequence at every step: (tokens, logits (N, vocab))."""
    seq = torch.as_tensor(np.asarray(prompt), dtype=torch.int64)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            last = model.forward(seq, torch.arange(seq.shape[0]), DenseKV(dtype))[-1]
            tokens.append(int(last.argmax()))
            logits.append(last)
            seq = torch.cat((seq, torch.tensor([tokens[-1]])))
    return tokens, torch.stack(logits).numpy()


# --- paged attention over the pool ----------------------------------------------------------------


class PagedKVStore:
    """Torch views of a pool's per-layer K and V caches: zero copy, in the pool's own dtype."""

    def __init__(self, pool: PagedKVPool) -> None:
        self.pool = pool
        self.block_size = pool.spec.block_size
        layers = range(pool.spec.num_layers)
        self.keys = [torch.from_dlpack(pool.dlpack_view(i, value=False)) for i in layers]
        self.values = [torch.from_dlpack(pool.dlpack_view(i, value=True)) for i in layers]
        self.dtype = self.keys[0].dtype

    def write(self, layer: int, block_table: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """K/V of the tokens at ``positions`` into slot ``(block_table[pos // bs], pos % bs)``."""
        blocks, offsets = block_table[positions // self.block_size], positions % self.block_size
        self.keys[layer][blocks, offsets] = k.to(self.dtype)
        self.values[layer][blocks, offsets] = v.to(self.dtype)

    def read(self, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 K/V of positions 0..length-1: gathers this sequence's blocks only."""
        ids = block_table[: -(-length // self.block_size)]
        keys = self.keys[layer][ids].flatten(0, 1)[:length]
        values = self.values[layer][ids].flatten(0, 1)[:length]
        return keys.float(), values.float()


class _PagedKV:
    def __init__(self, store: PagedKVStore, block_table: torch.Tensor) -> None:
        self.store = store
        self.block_table = block_table

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store.write(layer, self.block_table, positions, k, v)
        return self.store.read(layer, self.block_table, int(positions[-1]) + 1)


@dataclass
class Request:
    """One sequence in the pool."""

    tokens: list[int]  # prompt, then generated tokens as they are fed back
    prompt_len: int
    digests: npt.NDArray[np.uint8]  # chained digests of the prompt's full blocks
    block_table: list[int]
    owned: list[int]  # blocks this request allocated: it holds one pool reference on each
    matched_blocks: int = 0  # blocks reused from the prefix cache (referenced in it until finish)
    num_computed: int = 0  # tokens whose K/V are in the pool
    prefill_tokens: int = 0  # tokens this request's prefill computed
    inserted_blocks: int = 0  # blocks it published in the prefix cache
    redundant_blocks: int = 0  # of its full blocks, ones the cache already had under the same digest
    matched_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    finished: bool = False


class PagedEngine:
    """Admission with prefix reuse, prefill, decode and release of requests on one pool."""

    def __init__(self, model: TinyLM, pool: PagedKVPool, cache: RadixPrefixCache | None = None) -> None:
        self.model = model
        self.pool = pool
        self.cache = cache
        self.store = PagedKVStore(pool)
        self.block_size = pool.spec.block_size

    def admit(self, prompt: Any) -> Request:
        """Matches the longest cached prefix (references it) and allocates only the missing blocks."""
        tokens = np.asarray(prompt, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("prompt must be a non-empty 1-D sequence of token ids")
        bs = self.block_size
        digests = (self.cache.hash_tokens(tokens) if self.cache is not None
                   else np.empty((0, 32), dtype=np.uint8))
        # Keep at least one prompt token to compute: its logits pick the first generated token.
        reusable = (tokens.size - 1) // bs
        hit, hit_ids = 0, np.empty(0, dtype=np.int32)
        if self.cache is not None and reusable:
            hit, hit_ids = self.cache.match(digests[:reusable])
        try:
            new = self.pool.allocate(-(-tokens.size // bs) - hit)
        except BaseException:
            if hit:
                self.cache.release(digests[:hit])  # type: ignore[union-attr]
            raise
        return Request(tokens=tokens.tolist(), prompt_len=int(tokens.size), digests=digests,
                       block_table=[*hit_ids.tolist(), *new.tolist()], owned=new.tolist(), matched_blocks=hit,
                       matched_tokens=hit * bs, num_computed=hit * bs)

    def adopt(self, prompt: Any, block_ids: Any) -> Request:
        """A request whose prompt K/V already sit in ``block_ids`` (one caller reference each)."""
        tokens = np.asarray(prompt, dtype=np.int64)
        ids = np.asarray(block_ids, dtype=np.int32).tolist()
        if len(ids) != -(-tokens.size // self.block_size):
            raise ValueError(f"{tokens.size} tokens need {-(-tokens.size // self.block_size)} blocks, got {len(ids)}")
        return Request(tokens=tokens.tolist(), prompt_len=int(tokens.size), digests=np.empty((0, 32), np.uint8),
                       block_table=ids, owned=list(ids), num_computed=int(tokens.size))

    def _forward(self, req: Request) -> tuple[torch.Tensor, int]:
        """Runs the tokens whose K/V are not in the pool yet: (logits of the last one, how many ran)."""
        if req.finished:
            raise RuntimeError("the request has finished")
        start = req.num_computed
        tokens = torch.tensor(req.tokens[start:], dtype=torch.int64)
        positions = torch.arange(start, len(req.tokens))
        table = torch.tensor(req.block_table, dtype=torch.int64)
        with torch.inference_mode():
            logits = self.model.forward(tokens, positions, _PagedKV(self.store, table))
        req.num_computed = len(req.tokens)
        return logits[-1], int(tokens.shape[0])

    def prefill(self, req: Request) -> torch.Tensor:
        """Computes the prompt tokens after the matched prefix; publishes the full blocks. Last logits."""
        if req.num_computed >= req.prompt_len:
            raise RuntimeError("the prompt is already in the pool")
        logits, req.prefill_tokens = self._forward(req)
        full = req.prompt_len // self.block_size
        if self.cache is not None and full > req.matched_blocks:
            m = req.matched_blocks
            n, redundant = self.cache.insert(req.digests[m:full], np.asarray(req.block_table[m:full], np.int32),
                                             parent=req.digests[m - 1] if m else None)
            req.inserted_blocks, req.redundant_blocks = n, int(redundant.size)
        return logits

    def decode(self, req: Request, token: int) -> torch.Tensor:
        """Feeds one token back (its K/V into the next slot, a new block when one fills). Its logits."""
        if req.num_computed != len(req.tokens):
            raise RuntimeError("prefill the request before decoding")
        if len(req.tokens) == len(req.block_table) * self.block_size:
            block = int(self.pool.allocate(1)[0])
            req.block_table.append(block)
            req.owned.append(block)
        req.tokens.append(int(token))
        return self._forward(req)[0]

    def finish(self, req: Request) -> None:
        """Drops the request's pool references and its prefix-cache references."""
        if req.finished:
            raise RuntimeError("the request has already finished")
        req.finished = True
        self.pool.free(np.asarray(req.owned, dtype=np.int32))
        if self.cache is not None and req.matched_blocks:
            self.cache.release(req.digests[: req.matched_blocks])


@dataclass
class Generation:
    tokens: list[int]
    logits: np.ndarray  # (steps, vocab): the prefill's last position (unless handed over), then each decode step
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)


def generate(engine: PagedEngine, req: Request, max_new_tokens: int, first_token: int | None = None) -> Generation:
    """Greedy decoding: the prefill then decode steps. After a handover the prompt is in the pool
    already and ``first_token`` (picked by the prefill process) starts the decode; its logits then
    cover the decode steps only."""
    logits: list[np.ndarray] = []
    start = time.perf_counter()
    if first_token is None:
        last = engine.prefill(req)
        token = int(last.argmax())
        logits.append(last.numpy())
    else:
        token = int(first_token)
    prefill_seconds = time.perf_counter() - start
    tokens: list[int] = [token]
    decode_seconds: list[float] = []
    for _ in range(max_new_tokens - 1):
        start = time.perf_counter()
        last = engine.decode(req, token)
        decode_seconds.append(time.perf_counter() - start)
        token = int(last.argmax())
        tokens.append(token)
        logits.append(last.numpy())
    empty = np.empty((0, engine.model.config.vocab_size), dtype=np.float32)
    return Generation(tokens, np.stack(logits) if logits else empty, prefill_seconds, decode_seconds)


# --- the prefix-reuse scenario ------------------------------------------------------------------


@dataclass
class RequestReport:
    name: str
    prompt_len: int
    matched_tokens: int
    prefill_tokens: int
    allocated_blocks: int  # at admission
    inserted_blocks: int
    redundant_blocks: int
    generation: Generation
    reference_tokens: list[int]
    reference_logits: np.ndarray

    @property
    def tokens(self) -> list[int]:
        return self.generation.tokens

    @property
    def step_diffs(self) -> np.ndarray:
        """max |paged - dense| logit per step."""
        return np.abs(self.generation.logits - self.reference_logits).max(axis=1)

    @property
    def max_diff(self) -> float:
        return float(self.step_diffs.max())

    @property
    def reference_margin(self) -> float:
        """Smallest gap between the best and second-best dense logit: how decisive greedy was."""
        top2 = np.sort(self.reference_logits, axis=1)[:, -2:]
        return float((top2[:, 1] - top2[:, 0]).min())


@dataclass
class ScenarioReport:
    dtype: str
    block_size: int
    num_blocks: int
    requests: list[RequestReport]
    free_before: dict[str, int]  # pool free count right before each request's admission
    free_after: dict[str, int]  # ... and right after it finished
    cached_blocks: int  # blocks the prefix cache holds once every request finished
    cache_in_use: int  # of those, still referenced by a request (0: all evictable)
    evicted: int
    free_after_eviction: int

    def request(self, name: str) -> RequestReport:
        return next(r for r in self.requests if r.name == name)

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    @property
    def ok(self) -> bool:
        return all(r.tokens == r.reference_tokens and r.max_diff <= self.tolerance for r in self.requests)


def make_prompts(config: TinyConfig, block_size: int, reuse_blocks: int = 2,
                 new_tokens: int = 20) -> dict[str, list[int]]:
    """A = 3 full blocks + 7 tokens; B = A's first ``reuse_blocks`` blocks + ``new_tokens`` fresh tokens."""
    rng = np.random.default_rng(config.seed + block_size)
    a = rng.integers(0, config.vocab_size, size=3 * block_size + 7).tolist()
    b = a[: reuse_blocks * block_size] + rng.integers(0, config.vocab_size, size=new_tokens).tolist()
    return {"A": a, "B": b}


def run_prefix_scenario(
    dtype: str = "fp16",
    block_size: int = 16,
    *,
    reuse_blocks: int = 2,
    new_tokens: int = 20,
    max_new_tokens: int = 16,
    num_blocks: int = 64,
    model: TinyLM | None = None,
    prompts: dict[str, list[int]] | None = None,
) -> ScenarioReport:
    """Runs the requests of ``prompts`` (default A then B) one after the other on one pool and cache."""
    model = model or TinyLM()
    pool = PagedKVPool(model.config.kv_spec(dtype, block_size), num_blocks)
    cache = RadixPrefixCache(block_size=block_size, pool=pool)
    engine = PagedEngine(model, pool, cache)
    prompts = prompts or make_prompts(model.config, block_size, reuse_blocks, new_tokens)
    reports: list[RequestReport] = []
    free_before: dict[str, int] = {}
    free_after: dict[str, int] = {}
    for name, prompt in prompts.items():
        free_before[name] = pool.num_free_blocks
        req = engine.admit(prompt)
        allocated = free_before[name] - pool.num_free_blocks
        gen = generate(engine, req, max_new_tokens)
        engine.finish(req)
        free_after[name] = pool.num_free_blocks
        ref_tokens, ref_logits = dense_generate(model, prompt, max_new_tokens, dtype)
        reports.append(RequestReport(
            name=name, prompt_len=req.prompt_len, matched_tokens=req.matched_tokens,
            prefill_tokens=req.prefill_tokens, allocated_blocks=allocated, inserted_blocks=req.inserted_blocks,
            redundant_blocks=req.redundant_blocks, generation=gen, reference_tokens=ref_tokens,
            reference_logits=ref_logits,
        ))
    stats = cache.stats()
    cached, in_use = int(stats["cached_blocks"]), int(stats["in_use_blocks"])
    evicted = cache.evict(len(cache))
    return ScenarioReport(dtype=dtype, block_size=block_size, num_blocks=num_blocks, requests=reports,
                          free_before=free_before, free_after=free_after, cached_blocks=cached, cache_in_use=in_use,
                          evicted=evicted, free_after_eviction=pool.num_free_blocks)


# --- prefill/decode handover between two processes ----------------------------------------------

def pool_blocks_for(max_len: int, block_size: int) -> int:
    """A pool with room for two sequences of ``max_len`` tokens, and a few blocks to spare."""
    return 2 * -(-max_len // block_size) + 8


def _prefill_role(backend: Any, dtype: str, block_size: int, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Rank 0 (P): prefill, then send the first token, the prompt and the prompt's blocks to rank 1."""
    from sagellm_kv_cache.transfer import BlockTransfer

    model = TinyLM()
    pool = PagedKVPool(model.config.kv_spec(dtype, block_size), pool_blocks_for(len(prompt) + max_new_tokens,
                                                                                   block_size))
    cache = RadixPrefixCache(block_size=block_size, pool=pool)
    engine = PagedEngine(model, pool, cache)
    transfer = BlockTransfer(backend, timeout=30.0)
    free_start = pool.num_free_blocks
    req = engine.admit(prompt)
    start = time.perf_counter()
    logits = engine.prefill(req)
    prefill_seconds = time.perf_counter() - start
    first = int(logits.argmax())
    full = req.prompt_len // block_size
    tail = len(req.block_table) - full
    backend.send(torch.tensor([first, req.prompt_len, full, tail], dtype=torch.int64), 1)
    backend.send(torch.tensor(req.tokens, dtype=torch.int64), 1)
    start = time.perf_counter()
    table = np.asarray(req.block_table, dtype=np.int32)
    # Full blocks travel with their digests (D publishes them in its prefix cache); the partial
    # last block without (it is not a cacheable block yet).
    transfer.send_blocks(pool, table[:full], 1, digests=req.digests[:full])
    if tail:
        transfer.send_blocks(pool, table[full:], 1)
    send_seconds = time.perf_counter() - start
    engine.finish(req)
    cache.evict(len(cache))
    return {"first_token": first, "logits": logits.numpy(), "prefill_tokens": req.prefill_tokens,
            "prefill_seconds": prefill_seconds, "sent_blocks": full + tail, "sent_bytes": (full + tail) *
            pool.block_nbytes, "send_seconds": send_seconds, "free_restored": pool.num_free_blocks == free_start}


def _decode_role(backend: Any, dtype: str, block_size: int, max_len: int, max_new_tokens: int) -> dict[str, Any]:
    """Rank 1 (D): receive the prompt's blocks from rank 0, publish the full ones, decode from them."""
    from sagellm_kv_cache.transfer import BlockTransfer

    model = TinyLM()
    pool = PagedKVPool(model.config.kv_spec(dtype, block_size), pool_blocks_for(max_len, block_size))
    cache = RadixPrefixCache(block_size=block_size, pool=pool)
    engine = PagedEngine(model, pool, cache)
    transfer = BlockTransfer(backend, timeout=30.0)
    free_start = pool.num_free_blocks
    meta = torch.empty(4, dtype=torch.int64)
    backend.recv(meta, 0)
    first, prompt_len, full, tail = (int(x) for x in meta)
    prompt_tensor = torch.empty(prompt_len, dtype=torch.int64)
    backend.recv(prompt_tensor, 0)
    prompt = prompt_tensor.tolist()
    start = time.perf_counter()
    received = transfer.receive(pool, 0, publish=cache)
    tail_ids = transfer.recv_blocks(pool, 0) if tail else np.empty(0, dtype=np.int32)
    recv_seconds = time.perf_counter() - start
    # The prefix cache now serves the handed-over prompt: D's own hashing finds P's blocks.
    served, served_ids = cache.peek(cache.hash_tokens(np.asarray(prompt, dtype=np.int64)))
    req = engine.adopt(prompt, np.concatenate((received.block_ids, tail_ids)))
    gen = generate(engine, req, max_new_tokens, first_token=first)
    engine.finish(req)
    free_after_finish = pool.num_free_blocks
    evicted = cache.evict(len(cache))
    return {"tokens": gen.tokens, "logits": gen.logits, "decode_seconds": gen.decode_seconds,
            "received_blocks": len(received.block_ids) + len(tail_ids), "recv_seconds": recv_seconds,
            "prompt": prompt, "served_by_cache": served, "served_ids_match": served_ids.tolist() ==
            received.block_ids.tolist(), "full_blocks": full, "cache_held_after_finish": free_start -
            free_after_finish, "evicted": evicted, "free_restored": pool.num_free_blocks == free_start}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _handover_entry(rank: int, port: int, jobs: list[tuple[str, int, list[int], int]], results: Any) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    try:
        from sagellm_comm import GlooBackend

        backend = GlooBackend()
        backend.init(rank, 2, "127.0.0.1", port)
        out = []
        for dtype, block_size, prompt, max_new_tokens in jobs:
            if rank == 0:
                out.append(_prefill_role(backend, dtype, block_size, prompt, max_new_tokens))
            else:  # D learns the prompt from P; the job's prompt only sizes its pool
                out.append(_decode_role(backend, dtype, block_size, len(prompt) + max_new_tokens, max_new_tokens))
        backend.barrier()
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)  # skip process-group teardown


def run_handover(jobs: list[tuple[str, int, list[int], int]], timeout: float = 120.0) -> list[dict[str, Any]]:
    """Starts P (rank 0) and D (rank 1) and runs each (dtype, block_size, prompt, max_new_tokens) job.

    Returns one ``{"P": ..., "D": ...}`` per job. The processes are spawned, so the caller's module
    must be importable by the children (true for a script and for a module on ``sys.path``).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_handover_entry, args=(rank, port, jobs, results), daemon=True) for rank in (0, 1)]
    for p in procs:
        p.start()
    out: dict[int, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"handover: only ranks {sorted(out)} reported within {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError(f"handover: ranks exited, only {sorted(out)} reported") from None
                continue
            if status != "ok":
                raise RuntimeError(f"handover rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [{"P": p, "D": d} for p, d in zip(out[0], out[1], strict=True)]


# --- the command line -----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="pool dtype (default fp16)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    parser.add_argument("--reuse-blocks", type=int, default=2, help="blocks of A that B starts with (default 2)")
    parser.add_argument("--new-tokens", type=int, default=20, help="fresh prompt tokens of B (default 20)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    parser.add_argument("--handover", action="store_true", help="also prefill in one process, decode in another")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if not 0 < args.reuse_blocks <= 3:
        parser.error("--reuse-blocks must be 1, 2 or 3 (A has 3 full blocks)")
    if args.new_tokens < 1 or args.max_new_tokens < 1 or args.block_size < 1:
        parser.error("--new-tokens, --max-new-tokens and --block-size must be positive")
    if args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)

    model = TinyLM()
    cfg = model.config
    prompts = make_prompts(cfg, args.block_size, args.reuse_blocks, args.new_tokens)
    dense_generate(model, prompts["A"][:8], 1, args.dtype)  # warm-up: torch's first calls are slow
    num_blocks = pool_blocks_for(max(map(len, prompts.values())) + args.max_new_tokens, args.block_size)
    rep = run_prefix_scenario(args.dtype, args.block_size, max_new_tokens=args.max_new_tokens,
                              num_blocks=num_blocks, model=model, prompts=prompts)
    print(f"tiny_llm: {cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads (GQA), "
          f"head_dim {cfg.head_dim}, vocab {cfg.vocab_size}; pool {args.dtype}, block size {args.block_size}, "
          f"{num_blocks} blocks")
    for r in rep.requests:
        print(f"request {r.name}: prompt {r.prompt_len} tokens, {r.matched_tokens} from the prefix cache "
              f"({r.matched_tokens // args.block_size} blocks), prefill computed {r.prefill_tokens}, "
              f"{r.allocated_blocks} block(s) allocated; generated {len(r.tokens)} tokens: {r.tokens}")
    total = sum(r.prompt_len for r in rep.requests)
    saved = sum(r.matched_tokens for r in rep.requests)
    print(f"prefill tokens saved by the prefix cache: {saved} of {total} ({100 * saved / total:.0f}%)")
    steps = [s for r in rep.requests for s in r.generation.decode_seconds]
    prefills = ", ".join(f"{r.name} {_ms(r.generation.prefill_seconds)}" for r in rep.requests)
    print(f"time: {len(steps)} decode steps, {_ms(statistics.mean(steps))}/step (median "
          f"{_ms(statistics.median(steps))}); prefill {prefills}")
    same = all(r.tokens == r.reference_tokens for r in rep.requests)
    worst = max(r.max_diff for r in rep.requests)
    print(f"dense reference (no cache, K/V rounded to {args.dtype}): greedy tokens "
          f"{'identical' if same else 'DIFFERENT'}, max |logit diff| {worst:.1e} over "
          f"{sum(len(r.tokens) for r in rep.requests)} steps (tolerance {rep.tolerance:.0e})")
    print(f"after both finished: prefix cache holds {rep.cached_blocks} blocks, {rep.cache_in_use} in use; "
          f"evicted {rep.evicted}, pool free {rep.free_after_eviction}/{rep.num_blocks}")
    ok = rep.ok and rep.cache_in_use == 0 and rep.free_after_eviction == rep.num_blocks

    if args.handover:
        prompt = prompts["A"]
        single = run_prefix_scenario(args.dtype, args.block_size, max_new_tokens=args.max_new_tokens,
                                     num_blocks=num_blocks, model=model, prompts={"A": prompt}).request("A")
        start = time.perf_counter()
        result = run_handover([(args.dtype, args.block_size, prompt, args.max_new_tokens)])[0]
        wall = time.perf_counter() - start
        p, d = result["P"], result["D"]
        equal = d["tokens"] == single.tokens
        diff = float(np.abs(d["logits"] - single.generation.logits[1:]).max()) if len(d["logits"]) else 0.0
        print(f"handover over gloo: P (rank 0) prefilled {p['prefill_tokens']} tokens in "
              f"{_ms(p['prefill_seconds'])} and sent {p['sent_blocks']} blocks ({p['sent_bytes'] / 1024:.0f} KiB) "
              f"in {_ms(p['send_seconds'])}; D (rank 1) decoded {len(d['tokens'])} tokens at "
              f"{_ms(statistics.mean(d['decode_seconds'] or [0.0]))}/step: "
              f"{'identical to' if equal else 'DIFFERENT from'} the single-process run "
              f"(max |logit diff| {diff:.1e}); {wall:.1f} s with process start")
        ok = (ok and equal and diff <= rep.tolerance and d["served_by_cache"] == d["full_blocks"]
              and d["served_ids_match"] and d["free_restored"] and p["free_restored"])
    print("all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
