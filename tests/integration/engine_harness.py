"""Helpers for the engine integration tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINE = "sagellm_core"

SENTENCES = [
    "hello world this is a tiny model for testing the engine",
    "once upon a time there was a small cache that held keys and values",
    "the quick brown fox jumps over the lazy dog again and again",
    "prefix caching reuses blocks of a long shared system prompt",
]
WORDS = " ".join(SENTENCES[:2]).split()


def prompt(num_words: int, shift: int = 0) -> str:
    """A deterministic prompt of ``num_words`` words from the tokenizer's vocabulary (one token each)."""
    return " ".join(WORDS[(i * 7 + shift) % len(WORDS)] for i in range(num_words))


def build_tiny_llama(out: Path) -> Path:
    """A word-level tokenizer trained offline on SENTENCES and a seeded random 2-layer Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@dataclass
class KVTrace:
    """What the engine did with this package, recorded at our classes' boundaries."""

    allocated: dict[uuid.UUID, Any] = field(default_factory=dict)  # handle id -> handle
    freed: list[uuid.UUID] = field(default_factory=list)
    pools: dict[int, Any] = field(default_factory=dict)
    block_tables: list[list[Any]] = field(default_factory=list)  # as the engine's KVCacheManager built them
    inserted: list[list[Any]] = field(default_factory=list)  # block ids handed to PrefixCache.insert
    lookups: list[int] = field(default_factory=list)  # tokens each PrefixCache.lookup matched

    def live_handles(self) -> list[Any]:
        freed = set(self.freed)
        return [h for hid, h in self.allocated.items() if hid not in freed]


EngineBody = Callable[[Any], Awaitable[Any]]


def run_engine(model: Path, body: EngineBody, **config: Any) -> Any:
    """Starts an LLMEngine on the CPU with ``config``, awaits ``body(engine)``, stops the engine."""
    from sagellm_core import LLMEngine, LLMEngineConfig

    # An explicit dtype: with enable_kv_cache=False the engine's own fallback manager rejects "auto".
    settings = {"backend_type": "cpu", "dtype": "float32", "max_new_tokens": 16, **config}

    async def main() -> Any:
        engine = LLMEngine(LLMEngineConfig(model_path=str(model), **settings))
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())
