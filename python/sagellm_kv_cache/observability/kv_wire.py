"""The KV-event wire format KV-aware routers decode: vLLM's msgpack schema, as of vLLM 0.33.0.

One module owns every rule of the wire, so the publisher, our subscriber and the tests agree:

* a batch is the msgpack array ``[ts, events, data_parallel_rank]`` (float, list, int): vLLM's
  ``EventBatch`` is array-like; NVIDIA Dynamo requires the third element;
* an event is a tagged msgpack map, ``{"type": "BlockStored", field: value, ...}`` (vLLM's and
  SGLang's ``KVCacheEvent`` are ``tag=True`` structs without ``array_like``; arrays are rejected);
* ``block_hashes`` and ``parent_block_hash`` are 64-bit unsigned integers: the low 64 bits of our
  32-byte digest, read big-endian, which is what vLLM sends with integer block hashes
  (:func:`wire_block_id`). Stores, removals and parents go through the same function, so a
  router's parent lookups and removals hit the ids it stored;
* ``BlockStored`` always carries ``lora_id`` (None: vLLM deprecated it and Dynamo drops an int there),
  ``medium``, ``lora_name`` (our extra key as text, or None) and, with a name or a tenant salt,
  ``extra_keys`` (one tuple per block: the name, then the salt in a sequence's first block, the order
  vLLM uses); ``cache_salt`` (the tenant salt as text) when the blocks were inserted with one;
  ``token_ids`` exactly ``block_size`` per block (Dynamo re-hashes the tokens itself);
* ``BlockRemoved`` always carries ``medium``; ``AllBlocksCleared`` carries nothing.

Media Dynamo understands: ``"GPU"`` (or None) for device memory, ``"CPU_PINNED"``/``"CPU"`` for host
memory, ``"DISK"``; it silently drops other spellings, so we refuse them.

Our internal event dicts (what ``RadixPrefixCache.drain_events`` returns) keep the 32-byte digests::

    {"type": "stored", "digests": [bytes, ...], "parent": bytes | None, "token_ids": [int, ...],
     "block_size": int, "extra_key": bytes | str | int | None, "cache_salt": bytes | str (optional),
     "medium": str (optional, overrides the publisher's)}
    {"type": "removed", "digests": [bytes, ...], "medium": str (optional)}
    {"type": "cleared"}
    {"type": "cleared", "events_lost": True}  (the cache's queue overflowed: forget, then apply the rest)

Both cleared forms go out as ``AllBlocksCleared``: after a loss a router must drop what it knows,
since it missed removals; it then holds only cached blocks (not all of them).

Decoded wire events (what our subscriber yields) carry the 64-bit ids::

    {"type": "stored", "block_hashes": [int, ...], "parent_block_hash": int | None,
     "token_ids": [int, ...], "block_size": int, "lora_name": str | None, "medium": str | None,
     "cache_salt": str | None, "extra_keys": list | None}
    {"type": "removed", "block_hashes": [int, ...], "medium": str | None}
    {"type": "cleared"}
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:
    import msgpack
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching _IMPORT_ERROR
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "MEDIA",
    "VLLM_WIRE_SCHEMA",
    "KVEventDecodeError",
    "decode_batch",
    "decode_batch_with_rank",
    "encode_batch",
    "wire_block_id",
    "wire_text",
]

VLLM_WIRE_SCHEMA = "0.33.0"
"""The vLLM release whose ``vllm.distributed.kv_events`` schema this module follows."""

MEDIA = (None, "GPU", "CPU_PINNED", "CPU", "DISK")
"""Medium spellings routers act on: device memory (None or "GPU"), pinned host memory, disk."""

_STORED, _REMOVED, _CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"
_DIGEST_BYTES = 32
_XXH3_PAD = bytes(16)  # an xxh3_128 digest fills 16 bytes and pads the rest with zeros


class KVEventDecodeError(ValueError):
    """A message on the wire that is not a well-formed KV event batch."""


def require_msgpack() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError("KV events need pyzmq and msgpack: pip install isagellm-kv-cache[events]") from _IMPORT_ERROR


def _low64(raw: bytes) -> int:
    significant = raw[:16] if raw[16:] == _XXH3_PAD else raw
    return int.from_bytes(significant[-8:], "big")


def wire_block_id(digest: bytes) -> int:
    """The 64-bit block id a router sees for one of our 32-byte digests.

    The low 64 bits of the digest read big-endian, as vLLM derives its integer block hashes
    (``int.from_bytes(d, "big") & (2**64 - 1)``); for an xxh3_128 digest (16 hash bytes, then
    zeros) the low 64 bits of its hash bytes. Every id on the wire comes from here.
    """
    if not isinstance(digest, (bytes, bytearray, memoryview)):
        raise TypeError(f"a block digest must be bytes, got {type(digest).__name__}")
    raw = bytes(digest)
    if len(raw) != _DIGEST_BYTES:
        raise ValueError(f"a block digest has {_DIGEST_BYTES} bytes, got {len(raw)}")
    return _low64(raw)


def wire_text(value: bytes | str | int) -> str:
    """A LoRA name or tenant salt as the text routers hash: str as is, int in decimal, UTF-8 bytes
    decoded, other bytes as ``0x`` + hex. A router queries with the same text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise TypeError("a key must be bytes, str or int, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + raw.hex()
    raise TypeError(f"a key must be bytes, str or int, got {type(value).__name__}")


# --- internal dict -> wire map ------------------------------------------------------------------------


def _digest_ids(index: int, value: object, key: str = "digests") -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"events[{index}][{key!r}] must be a list of bytes, got {type(value).__name__}")
    ids: list[int] = []
    for i, digest in enumerate(value):
        if not isinstance(digest, bytes):
            raise TypeError(f"events[{index}][{key!r}][{i}] must be bytes, got {type(digest).__name__}")
        if len(digest) != _DIGEST_BYTES:
            raise ValueError(f"events[{index}][{key!r}][{i}] must be a {_DIGEST_BYTES}-byte digest, got {len(digest)}")
        ids.append(_low64(digest))
    return ids


def _medium(index: int, event: Mapping[str, Any], default: str | None) -> str | None:
    medium = event.get("medium", default)
    if medium not in MEDIA:
        raise ValueError(f"events[{index}]['medium'] is {medium!r}; routers understand {MEDIA}")
    return medium


def _tokens(index: int, raw: object) -> list[int]:
    if hasattr(raw, "tolist"):  # numpy arrays from the native fast path
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TypeError(f"events[{index}]['token_ids'] must be a list of int, got {type(raw).__name__}")
    tokens: list[int] = []
    for token in raw:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"events[{index}]['token_ids'] must hold ints, found {type(token).__name__}")
        if not 0 <= token < 1 << 32:
            raise ValueError(f"events[{index}]['token_ids'] holds {token}, outside the router's u32 token range")
        tokens.append(token)
    return tokens


def _optional_text(index: int, event: Mapping[str, Any], key: str) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (bytes, str, int)):
        raise TypeError(f"events[{index}][{key!r}] must be bytes, str, int or None, got {type(value).__name__}")
    return wire_text(value)


def _stored_map(index: int, event: Mapping[str, Any], medium: str | None) -> dict[str, Any]:
    ids = _digest_ids(index, event.get("digests"))
    parent = event.get("parent")
    if parent is not None and not isinstance(parent, bytes):
        raise TypeError(f"events[{index}]['parent'] must be bytes or None, got {type(parent).__name__}")
    parent_id = None if parent is None else _digest_ids(index, [parent], "parent")[0]
    block_size = event.get("block_size")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"events[{index}]['block_size'] must be an int > 0, got {block_size!r}")
    tokens = _tokens(index, event.get("token_ids", []))
    if len(tokens) != block_size * len(ids):
        raise ValueError(
            f"events[{index}] has {len(tokens)} token ids for {len(ids)} blocks of {block_size}: routers re-hash "
            f"the tokens and need all {block_size * len(ids)} (insert blocks with their token_ids)"
        )
    lora_name = _optional_text(index, event, "extra_key")
    salt = _optional_text(index, event, "cache_salt")
    wire: dict[str, Any] = {
        "type": _STORED,
        "block_hashes": ids,
        "parent_block_hash": parent_id,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": _medium(index, event, medium),
        "lora_name": lora_name,
    }
    if lora_name is not None or salt is not None:
        keys: list[list[str] | None] = []
        for block in range(len(ids)):
            block_keys = [] if lora_name is None else [lora_name]
            if salt is not None and block == 0 and parent_id is None:
                block_keys.append(salt)  # vLLM mixes the salt into a sequence's first block only
            keys.append(block_keys or None)
        wire["extra_keys"] = keys
    if salt is not None:
        wire["cache_salt"] = salt
    return wire


def _to_wire(index: int, event: object, medium: str | None) -> dict[str, Any]:
    """Validates one internal event dict and converts it to vLLM's tagged map."""
    if not isinstance(event, Mapping):
        raise TypeError(f"events[{index}] must be a dict, got {type(event).__name__}")
    kind = event.get("type")
    if kind == "stored":
        return _stored_map(index, event, medium)
    if kind == "removed":
        return {"type": _REMOVED, "block_hashes": _digest_ids(index, event.get("digests")),
                "medium": _medium(index, event, medium)}
    if kind == "cleared":
        return {"type": _CLEARED}
    raise ValueError(f"events[{index}] has unknown type {kind!r} (expected 'stored', 'removed' or 'cleared')")


def encode_batch(
    events: Iterable[Mapping[str, Any]],
    timestamp: float | None = None,
    medium: str | None = "GPU",
    data_parallel_rank: int = 0,
) -> bytes:
    """The msgpack payload of one batch; validates every event first (``TypeError``/``ValueError``).

    ``medium`` applies to events that do not name their own.
    """
    require_msgpack()
    if medium not in MEDIA:
        raise ValueError(f"medium is {medium!r}; routers understand {MEDIA}")
    if isinstance(data_parallel_rank, bool) or not isinstance(data_parallel_rank, int) or data_parallel_rank < 0:
        raise ValueError(f"data_parallel_rank must be an int >= 0, got {data_parallel_rank!r}")
    wire = [_to_wire(i, event, medium) for i, event in enumerate(events)]
    ts = time.time() if timestamp is None else float(timestamp)
    return msgpack.packb([ts, wire, data_parallel_rank], use_bin_type=True)


# --- wire -> decoded dict ---------------------------------------------------------------------------


def _ids(index: int, value: object, what: str) -> list[int | bytes]:
    if not isinstance(value, list):
        raise KVEventDecodeError(f"event {index}: {what} is not a list")
    for item in value:
        # vLLM sends bytes hashes unless told to send ints; accept both, as its own decoder does.
        if isinstance(item, bool) or not isinstance(item, (int, bytes)):
            raise KVEventDecodeError(f"event {index}: {what} holds {type(item).__name__}, not an int")
    return list(value)


def _opt_str(index: int, value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise KVEventDecodeError(f"event {index}: {what} must be a str or None, got {type(value).__name__}")
    return value


def _decode_stored(index: int, item: Mapping[str, Any]) -> dict[str, Any]:
    for field in ("block_hashes", "parent_block_hash", "token_ids", "block_size"):
        if field not in item:
            raise KVEventDecodeError(f"event {index}: BlockStored lacks {field!r}")
    parent = item["parent_block_hash"]
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, (int, bytes))):
        raise KVEventDecodeError(f"event {index}: parent_block_hash must be an int or None")
    tokens = item["token_ids"]
    if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise KVEventDecodeError(f"event {index}: token_ids must be a list of ints")
    block_size = item["block_size"]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise KVEventDecodeError(f"event {index}: block_size must be an int > 0, got {block_size!r}")
    extra_keys = item.get("extra_keys")
    if extra_keys is not None and not isinstance(extra_keys, list):
        raise KVEventDecodeError(f"event {index}: extra_keys must be a list or None")
    return {
        "type": "stored",
        "block_hashes": _ids(index, item["block_hashes"], "block_hashes"),
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_name": _opt_str(index, item.get("lora_name"), "lora_name"),
        "medium": _opt_str(index, item.get("medium"), "medium"),
        "cache_salt": _opt_str(index, item.get("cache_salt"), "cache_salt"),
        "extra_keys": extra_keys,
    }


def _from_wire(index: int, item: object) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("type"), str):
        raise KVEventDecodeError(f"event {index} is not a tagged map: {item!r:.80}")
    tag = item["type"]
    if tag == _STORED:
        return _decode_stored(index, item)
    if tag == _REMOVED:
        if "block_hashes" not in item:
            raise KVEventDecodeError(f"event {index}: BlockRemoved lacks 'block_hashes'")
        return {"type": "removed", "block_hashes": _ids(index, item["block_hashes"], "block_hashes"),
                "medium": _opt_str(index, item.get("medium"), "medium")}
    if tag == _CLEARED:
        return {"type": "cleared"}
    raise KVEventDecodeError(f"event {index} has unknown tag {tag!r}")


def decode_batch_with_rank(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    """``(timestamp, events, data_parallel_rank)`` from a payload; malformed ones raise :class:`KVEventDecodeError`."""
    require_msgpack()
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as err:
        raise KVEventDecodeError(f"payload is not msgpack: {err}") from err
    if not isinstance(batch, list) or len(batch) not in (2, 3):
        raise KVEventDecodeError("payload is not a [timestamp, events, data_parallel_rank] batch")
    timestamp, items = batch[0], batch[1]
    rank = batch[2] if len(batch) == 3 else None
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not isinstance(items, list):
        raise KVEventDecodeError("payload is not a [timestamp, events, data_parallel_rank] batch")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise KVEventDecodeError(f"data_parallel_rank must be an int or None, got {type(rank).__name__}")
    return float(timestamp), [_from_wire(i, item) for i, item in enumerate(items)], rank


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]]]:
    """``(timestamp, events)`` from a payload; anything malformed is a :class:`KVEventDecodeError`."""
    timestamp, events, _ = decode_batch_with_rank(payload)
    return timestamp, events
