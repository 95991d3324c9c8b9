"""End to end: a tiny transformer decoding from the paged pool equals dense attention (examples/tiny_llm.py).

The example module is imported from ``examples/`` (put on ``sys.path``, so the processes that the
handover test spawns can import it too). Each scenario asserts, step by step, that the logits of
paged attention over the pool match a dense reference that recomputes the whole sequence without a
cache (K/V rounded to the pool's dtype), and that the greedy tokens are the same.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
tiny_llm = importlib.import_module("tiny_llm")

MAX_NEW_TOKENS = 16
REUSE_BLOCKS = 2
NEW_TOKENS = 20


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The model is tiny: a second thread only adds contention on a small, shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llm.TinyLM()


def _assert_matches_dense(report: Any, tolerance: float) -> None:
    r = report
    assert len(r.tokens) == MAX_NEW_TOKENS
    assert r.tokens == r.reference_tokens, f"request {r.name}: greedy tokens differ from the dense reference"
    diffs = r.step_diffs
    assert diffs.shape == (MAX_NEW_TOKENS,)
    bad = [(step, float(d)) for step, d in enumerate(diffs) if not d <= tolerance]
    assert not bad, f"request {r.name}: |paged - dense| logits above {tolerance} at (step, diff) {bad}"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_prefix_reuse_decodes_like_dense_attention(model: Any, dtype: str, block_size: int) -> None:
    rep = tiny_llm.run_prefix_scenario(dtype, block_size, reuse_blocks=REUSE_BLOCKS, new_tokens=NEW_TOKENS,
                                       max_new_tokens=MAX_NEW_TOKENS, model=model)
    a, b = rep.request("A"), rep.request("B")
    bs = block_size

    # A: nothing cached yet; every prompt token is computed; its full blocks are published.
    assert a.prompt_len == 3 * bs + 7
    assert (a.matched_tokens, a.prefill_tokens) == (0, a.prompt_len)
    assert a.allocated_blocks == _blocks(a.prompt_len, bs)
    assert (a.inserted_blocks, a.redundant_blocks) == (3, 0)

    # B = A's first 2 blocks + 20 new tokens: the 2 blocks come from the cache, only the rest is
    # allocated, and only the new tokens are prefilled (attending over the cached prefix in the pool).
    assert b.prompt_len == REUSE_BLOCKS * bs + NEW_TOKENS
    assert b.matched_tokens == REUSE_BLOCKS * bs
    assert b.prefill_tokens == b.prompt_len - b.matched_tokens == NEW_TOKENS
    assert b.allocated_blocks == _blocks(b.prompt_len, bs) - REUSE_BLOCKS
    assert b.inserted_blocks == b.prompt_len // bs - REUSE_BLOCKS

    for r in rep.requests:
        _assert_matches_dense(r, tiny_llm.TOLERANCE[dtype])

    # After B finished and released: the pool got back all of B's blocks except those the cache now
    # holds (the full blocks B published); nothing in the cache is referenced, so all of it is
    # evictable, and evicting it brings the pool back to fully free.
    assert rep.free_after["B"] == rep.free_before["B"] - b.inserted_blocks
    assert rep.free_after["A"] == rep.num_blocks - a.inserted_blocks
    assert rep.cache_in_use == 0
    assert rep.cached_blocks == a.inserted_blocks + b.inserted_blocks
    assert rep.evicted == rep.cached_blocks
    assert rep.free_after_eviction == rep.num_blocks


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_pool_holds_rounded_kv(model: Any, dtype: str) -> None:
    """The fair reference matters: against an fp32-K/V dense run the logits are off by more than the
    tolerance, so the pool really stores (and attention really reads) fp16 / bf16 K/V."""
    rep = tiny_llm.run_prefix_scenario(dtype, 16, max_new_tokens=MAX_NEW_TOKENS, model=model,
                                       prompts={"A": tiny_llm.make_prompts(model.config, 16)["A"]})
    a = rep.request("A")
    _assert_matches_dense(a, tiny_llm.TOLERANCE[dtype])
    _, fp32_logits = tiny_llm.dense_generate(model, tiny_llm.make_prompts(model.config, 16)["A"], 1, "fp32")
    assert np.abs(a.generation.logits[0] - fp32_logits[0]).max() > 2 * tiny_llm.TOLERANCE[dtype]


def test_kv_views_are_the_pool_memory(model: Any) -> None:
    pool = tiny_llm.PagedKVPool(model.config.kv_spec("bf16", 16), 8)
    store = tiny_llm.PagedKVStore(pool)
    assert store.dtype == torch.bfloat16
    assert tuple(store.keys[0].shape) == (8, 16, model.config.num_kv_heads, model.config.head_dim)
    ids = pool.allocate(2)
    table = torch.tensor([int(ids[1]), int(ids[0])])
    k = torch.randn(20, model.config.num_kv_heads, model.config.head_dim)
    store.write(1, table, torch.arange(20), k, -k)
    # Token 17 went to block table[1] = ids[0], slot 1, in the pool's own (bf16) bits.
    raw = pool.key_cache(1)[ids[0], 1]
    assert raw.dtype == np.uint16
    assert np.array_equal(raw, k[17].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    keys, values = store.read(1, table, 20)
    assert torch.equal(keys, k.to(torch.bfloat16).float()) and torch.equal(values, -keys)
    pool.free(ids)


def test_attention_reads_the_pool(model: Any) -> None:
    """Overwriting a cached block in the pool changes the next step: the K/V come from pool memory."""
    prompt = tiny_llm.make_prompts(model.config, 16)["A"]
    ref_tokens, ref_logits = tiny_llm.dense_generate(model, prompt, 2, "fp16")
    pool = tiny_llm.PagedKVPool(model.config.kv_spec("fp16", 16), 16)
    engine = tiny_llm.PagedEngine(model, pool)
    req = engine.admit(prompt)
    first = engine.prefill(req)
    assert int(first.argmax()) == ref_tokens[0]
    pool.scatter(np.zeros(pool.block_nbytes, dtype=np.uint8), req.block_table[:1])  # block 0's K/V := 0
    second = engine.decode(req, ref_tokens[0]).numpy()
    assert np.abs(second - ref_logits[1]).max() > 100 * tiny_llm.TOLERANCE["fp16"]
    engine.finish(req)
    assert pool.num_free_blocks == 16


def test_fully_cached_prompt_still_computes_its_last_block(model: Any) -> None:
    """C = A's 3 full blocks exactly: 2 are reused, the last is recomputed (its logits start decoding);
    the cache already holds that block, so C's copy is redundant and goes back to the pool."""
    a = tiny_llm.make_prompts(model.config, 16)["A"]
    rep = tiny_llm.run_prefix_scenario("fp32", 16, max_new_tokens=MAX_NEW_TOKENS, model=model,
                                       prompts={"A": a, "C": a[:48]})
    c = rep.request("C")
    assert (c.matched_tokens, c.prefill_tokens, c.allocated_blocks) == (32, 16, 1)
    assert (c.inserted_blocks, c.redundant_blocks) == (0, 1)
    assert rep.free_after["C"] == rep.free_before["C"]
    _assert_matches_dense(c, tiny_llm.TOLERANCE["fp32"])


def test_example_runs_from_any_directory(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "tiny_llm.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "pool fp16, block size 16" in out
    assert "prefill tokens saved by the prefix cache: 32 of 107" in out
    assert "greedy tokens identical" in out and "all checks passed" in out
    assert "ms/step" in out


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_example_refuses_a_thread_count_below_one_as_a_usage_error(threads: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        tiny_llm.main(["--threads", threads])
    assert exit_.value.code == 2
    assert f"--threads must be positive, got {threads}" in capsys.readouterr().err


# --- prefill in one process, decode in another --------------------------------------------------

HANDOVER_JOBS = [("fp32", 16), ("fp16", 32), ("bf16", 16)]


@pytest.fixture(scope="module")
def handover(model: Any) -> dict[tuple[str, int], Any]:
    jobs = [(dtype, bs, tiny_llm.make_prompts(model.config, bs)["A"], MAX_NEW_TOKENS) for dtype, bs in HANDOVER_JOBS]
    results = tiny_llm.run_handover(jobs, timeout=120.0)
    return {(dtype, bs): (prompt, r) for (dtype, bs, prompt, _), r in zip(jobs, results, strict=True)}


@pytest.mark.multiprocess
@pytest.mark.parametrize(("dtype", "block_size"), HANDOVER_JOBS)
def test_handover_decodes_like_the_single_process_run(model: Any, handover: Any, dtype: str,
                                                      block_size: int) -> None:
    prompt, result = handover[(dtype, block_size)]
    p, d = result["P"], result["D"]
    single = tiny_llm.run_prefix_scenario(dtype, block_size, max_new_tokens=MAX_NEW_TOKENS, model=model,
                                          prompts={"A": prompt}).request("A")
    _assert_matches_dense(single, tiny_llm.TOLERANCE[dtype])

    full, blocks = len(prompt) // block_size, _blocks(len(prompt), block_size)
    assert p["prefill_tokens"] == len(prompt)
    assert p["first_token"] == single.tokens[0]
    assert np.abs(p["logits"] - single.generation.logits[0]).max() <= tiny_llm.TOLERANCE[dtype]
    assert p["sent_blocks"] == blocks and p["free_restored"]

    assert d["prompt"] == prompt
    assert d["received_blocks"] == blocks
    assert d["tokens"] == single.tokens == single.reference_tokens
    assert d["logits"].shape == (MAX_NEW_TOKENS - 1, model.config.vocab_size)
    assert np.abs(d["logits"] - single.generation.logits[1:]).max() <= tiny_llm.TOLERANCE[dtype]
    # D published the full blocks in its prefix cache: its own hashing of the prompt finds them,
    # they outlive the request, and evicting them gives D's pool back whole.
    assert d["served_by_cache"] == d["full_blocks"] == full
    assert d["served_ids_match"]
    assert d["cache_held_after_finish"] == full
    assert d["evicted"] == full and d["free_restored"]
