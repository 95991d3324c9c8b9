"""Integration tests: the real sageLLM engine (``isagellm-core``) running on this package.

Nothing is installed from here. ``scripts/test.sh`` installs ``isagellm-core`` (pinned) next to
this package and runs ``pytest tests/integration`` with ``SAGELLM_KV_REQUIRE_ENGINE=1``, so a
missing engine fails there; elsewhere these tests are skipped without it.

The model is a tiny random Llama built here, offline: a word-level tokenizer trained on a few
sentences with ``tokenizers`` (wrapped as a ``PreTrainedTokenizerFast``) and a seeded
``LlamaForCausalLM`` saved with ``save_pretrained``. No hub downloads.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .engine_harness import ENGINE, KVTrace, build_tiny_llama

if importlib.util.find_spec(ENGINE) is None and os.environ.get("SAGELLM_KV_REQUIRE_ENGINE") == "1":
    raise pytest.UsageError("isagellm-core is not installed but SAGELLM_KV_REQUIRE_ENGINE=1 "
                            "(scripts/test.sh installs it: pip install isagellm-core==0.5.4.26)")

# Warnings raised inside the engine, torch or transformers while they run (the project turns
# warnings into errors). Each is named exactly; anything else still fails a test.
_ENGINE_WARNINGS = [
    r"ignore:.*past_key_values.*deprecated:FutureWarning",
    r"ignore:Both `past_key_values` and `cache` are set:FutureWarning",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
            for spec in _ENGINE_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip(ENGINE)
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def kv_trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[KVTrace]:
    """Wraps our KVPool.alloc/free and PrefixCache.insert/lookup and the engine's block tables."""
    pytest.importorskip(ENGINE)
    from sagellm_core.engine_core.kv_cache_manager import KVCacheManager as EngineKVCacheManager
    from sagellm_kv_cache.pool import KVPool
    from sagellm_kv_cache.prefix_cache import PrefixCache

    trace = KVTrace()
    alloc, free = KVPool.alloc, KVPool.free
    insert, lookup = PrefixCache.insert, PrefixCache.lookup
    get_block_table = EngineKVCacheManager.get_block_table

    def traced_alloc(self: Any, *args: Any, **kwargs: Any) -> Any:
        handle = alloc(self, *args, **kwargs)
        trace.allocated[handle.handle_id] = handle
        trace.pools[id(self)] = self
        return handle

    def traced_free(self: Any, handle: Any) -> None:
        free(self, handle)
        trace.freed.append(handle.handle_id)

    def traced_insert(self: Any, block_hashes: Any, blocks: Any) -> None:
        trace.inserted.append([b.get("block_id") for b in blocks])
        insert(self, block_hashes, blocks)

    def traced_lookup(self: Any, block_hashes: Any) -> Any:
        blocks, tokens = lookup(self, block_hashes)
        trace.lookups.append(tokens)
        return blocks, tokens

    def traced_table(self: Any, request_id: str) -> Any:
        table = get_block_table(self, request_id)
        trace.block_tables.append(list(table))
        return table

    monkeypatch.setattr(KVPool, "alloc", traced_alloc)
    monkeypatch.setattr(KVPool, "free", traced_free)
    monkeypatch.setattr(PrefixCache, "insert", traced_insert)
    monkeypatch.setattr(PrefixCache, "lookup", traced_lookup)
    monkeypatch.setattr(EngineKVCacheManager, "get_block_table", traced_table)
    yield trace
