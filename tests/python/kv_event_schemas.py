"""Independent strict msgspec schemas of the KV-event batches vLLM 0.33 and SGLang 0.5.23 decode.

Written from their field rules (names, order, which fields are required, tagged-map events, an
array-like batch), stricter where a router needs it: integer block ids, ``lora_id`` None, the media
Dynamo understands, an int data-parallel rank, no unknown fields. Used by test_kv_events_routers.py
where the engines themselves cannot be imported. No ``from __future__ import annotations`` here:
msgspec resolves these annotations at class creation.
"""

from typing import Literal

import msgspec

Medium = Literal["GPU", "CPU_PINNED", "CPU", "DISK"] | None


class _Event(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


class VllmBlockStored(_Event, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: None  # vLLM: deprecated, `int | None`; an int there is a LoRA id to Dynamo
    medium: Medium
    lora_name: str | None
    extra_keys: list[list[str] | None] | None = None
    cache_salt: str | None = None  # not a vLLM 0.33 field (vLLM skips it); Dynamo and SGLang read it


class SglangBlockStored(_Event, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: None
    medium: Medium = None
    cache_salt: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[str] | None] | None = None  # not an SGLang field (SGLang skips it)


class BlockRemoved(_Event):
    block_hashes: list[int]
    medium: Medium


class AllBlocksCleared(_Event):
    pass


class VllmBatch(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    ts: float
    events: list[VllmBlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int  # optional in vLLM; Dynamo needs it


class SglangBatch(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    ts: float
    events: list[SglangBlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int


DECODERS = {
    "vllm": msgspec.msgpack.Decoder(type=VllmBatch),
    "sglang": msgspec.msgpack.Decoder(type=SglangBatch),
}
