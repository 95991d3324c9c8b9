"""Prefix fingerprints: short digests that group requests likely to share a KV prefix.

A fingerprint is computed from a request's leading tokens (encoded as little-endian int64) with
SHA-256, by one of four strategies:

* ``SIMPLE_HASH``: the digest of all tokens (requests group only when their prompts are equal);
* ``SEGMENTED_HASH``: the prompt's first ``max_segments`` segments of ``segment_size`` tokens are
  hashed one by one and the segment digests combined, so requests that agree on those leading
  tokens share a fingerprint whatever follows;
* ``WEIGHTED_HASH``: like segmented, with each segment digest tagged by its weight
  ``weight_decay ** i`` before combining (a different, equally stable key space);
* ``ADAPTIVE_HASH``: simple below ``adaptive_threshold`` tokens, segmented from there on.

An empty prompt has the empty fingerprint under the segment-based strategies.
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sagellm_kv_cache._numbers import array_of

__all__ = [
    "AdaptiveHashComputer",
    "BaseFingerprintComputer",
    "FingerprintComputer",
    "FingerprintConfig",
    "FingerprintStrategy",
    "SegmentedHashComputer",
    "SimpleHashComputer",
    "WeightedHashComputer",
]


class FingerprintStrategy(str, Enum):  # noqa: UP042 - str() renders "FingerprintStrategy.X" as in the seed
    SIMPLE_HASH = "simple_hash"
    SEGMENTED_HASH = "segmented_hash"
    WEIGHTED_HASH = "weighted_hash"
    ADAPTIVE_HASH = "adaptive_hash"


@dataclass
class FingerprintConfig:
    """How fingerprints are computed; checked on construction (``ValueError`` naming the field)."""

    strategy: FingerprintStrategy = FingerprintStrategy.SIMPLE_HASH
    segment_size: int = 16
    max_segments: int = 8
    weight_decay: float = 0.9
    adaptive_threshold: int = 32

    def __post_init__(self) -> None:
        try:
            self.strategy = FingerprintStrategy(self.strategy)
        except ValueError:
            known = ", ".join(s.value for s in FingerprintStrategy)
            raise ValueError(f"unknown fingerprint strategy {self.strategy!r} (known: {known})") from None
        for name in ("segment_size", "max_segments", "adaptive_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, int | float):
            raise TypeError(f"weight_decay must be a number, got {type(self.weight_decay).__name__}")
        if not 0 < self.weight_decay <= 1:
            raise ValueError(f"weight_decay must be in (0, 1], got {self.weight_decay}")


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array_of("tokens", tokens)
    if arr.size == 0:
        return b""
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be a flat sequence of ints, got {arr.dtype} with shape {arr.shape}")
    return arr.astype("<i8", copy=False).tobytes()


class BaseFingerprintComputer(ABC):
    """One strategy: ``compute(tokens) -> bytes``."""

    def __init__(self, config: FingerprintConfig) -> None:
        if not isinstance(config, FingerprintConfig):
            raise TypeError(f"config must be a FingerprintConfig, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def compute(self, tokens: Sequence[int]) -> bytes:
        """The fingerprint of ``tokens``."""

    def get_stats(self) -> dict[str, Any]:
        return {
            "strategy": self.config.strategy.value,
            "segment_size": self.config.segment_size,
            "max_segments": self.config.max_segments,
        }

    def _segments(self, tokens: Sequence[int]) -> list[bytes]:
        raw = _token_bytes(tokens)
        step = self.config.segment_size * 8
        raw = raw[: self.config.max_segments * step]
        return [hashlib.sha256(raw[i : i + step]).digest() for i in range(0, len(raw), step)]


class SimpleHashComputer(BaseFingerprintComputer):
    def compute(self, tokens: Sequence[int]) -> bytes:
        return hashlib.sha256(_token_bytes(tokens)).digest()


class SegmentedHashComputer(BaseFingerprintComputer):
    def compute(self, tokens: Sequence[int]) -> bytes:
        segments = self._segments(tokens)
        return hashlib.sha256(b"".join(segments)).digest() if segments else b""


class WeightedHashComputer(BaseFingerprintComputer):
    def compute(self, tokens: Sequence[int]) -> bytes:
        segments = self._segments(tokens)
        if not segments:
            return b""
        h = hashlib.sha256(b"weighted")
        for i, digest in enumerate(segments):
            h.update(struct.pack("<d", self.config.weight_decay**i))
            h.update(digest)
        return h.digest()


class AdaptiveHashComputer(BaseFingerprintComputer):
    def __init__(self, config: FingerprintConfig) -> None:
        super().__init__(config)
        self._short = SimpleHashComputer(config)
        self._long = SegmentedHashComputer(config)

    def compute(self, tokens: Sequence[int]) -> bytes:
        long = len(tokens) >= self.config.adaptive_threshold
        return (self._long if long else self._short).compute(tokens)


_COMPUTERS: dict[FingerprintStrategy, type[BaseFingerprintComputer]] = {
    FingerprintStrategy.SIMPLE_HASH: SimpleHashComputer,
    FingerprintStrategy.SEGMENTED_HASH: SegmentedHashComputer,
    FingerprintStrategy.WEIGHTED_HASH: WeightedHashComputer,
    FingerprintStrategy.ADAPTIVE_HASH: AdaptiveHashComputer,
}


class FingerprintComputer:
    """The computer for ``config.strategy`` (default config: simple hash)."""

    def __init__(self, config: FingerprintConfig | None = None) -> None:
        self.config = FingerprintConfig() if config is None else config
        if not isinstance(self.config, FingerprintConfig):
            raise TypeError(f"config must be a FingerprintConfig or None, got {type(config).__name__}")
        self._computer = _COMPUTERS[self.config.strategy](self.config)

    def compute(self, tokens: Sequence[int]) -> bytes:
        return self._computer.compute(tokens)

    def get_stats(self) -> dict[str, Any]:
        return self._computer.get_stats()

    def __repr__(self) -> str:
        return f"FingerprintComputer(strategy={self.config.strategy.value})"
