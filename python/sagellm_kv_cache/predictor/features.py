"""Predictor inputs: a snapshot of the numbers of a ``KVHandle`` that bear on its future reuse."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from sagellm_kv_cache._numbers import iterable
from sagellm_kv_cache.models.kv_handle import KVHandle

__all__ = ["FeatureExtractor", "PredictorFeatures"]


class PredictorFeatures(BaseModel):
    """What a predictor sees of one handle at ``extracted_at`` (validated: counts and times >= 0)."""

    handle_id: uuid.UUID
    request_id: str
    session_id: str | None = None
    num_tokens: int = Field(ge=0)
    last_access: float = Field(ge=0)
    access_count: int = Field(ge=0)
    created_at: float = Field(ge=0)
    hit_len: int = Field(default=0, ge=0)
    is_pinned: bool = False
    device: str = "cpu"
    extracted_at: float = Field(default_factory=time.time)

    @classmethod
    def from_handle(cls, handle: KVHandle, hit_len: int = 0, extracted_at: float | None = None) -> PredictorFeatures:
        """The features of ``handle`` now (or at ``extracted_at``); ``hit_len`` is its prefix-cache hit length."""
        return cls(
            handle_id=handle.handle_id,
            request_id=handle.request_id or "unknown",
            session_id=handle.session_id,
            num_tokens=handle.num_tokens,
            last_access=handle.last_access,
            access_count=handle.access_count,
            created_at=handle.created_at,
            hit_len=hit_len,
            is_pinned=handle.pin_count > 0,
            device=handle.device,
            extracted_at=time.time() if extracted_at is None else extracted_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``handle_id`` as a string)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorFeatures:
        return cls.model_validate(data)


class FeatureExtractor:
    """Builds :class:`PredictorFeatures` for a batch of handles at one instant."""

    def extract_batch(
        self, handles: Iterable[KVHandle], hit_lens: Iterable[int] | None = None
    ) -> list[PredictorFeatures]:
        """Features of every handle, all stamped with the same instant; ``hit_lens[i]`` is handle
        ``i``'s prefix-cache hit length (0 when not given). Any iterable will do, as in the original;
        a non-iterable or a non-``KVHandle`` item is a ``TypeError`` naming it."""
        batch = _items("handles", handles)
        for i, handle in enumerate(batch):
            if not isinstance(handle, KVHandle):
                raise TypeError(f"handles[{i}] must be a KVHandle, got {type(handle).__name__}")
        lens: Sequence[Any] = [0] * len(batch) if hit_lens is None else _items("hit_lens", hit_lens)
        if len(lens) != len(batch):
            raise ValueError(f"hit_lens length ({len(lens)}) must match handles length ({len(batch)})")
        now = time.time()
        return [PredictorFeatures.from_handle(h, n, now) for h, n in zip(batch, lens, strict=True)]


def _items(name: str, values: object) -> list[Any]:
    return list(iterable(name, values, "an iterable"))
