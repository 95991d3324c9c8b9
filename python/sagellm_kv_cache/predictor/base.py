"""The lifetime-predictor interface: from features of a KV handle, predict whether it will be reused
and for how long it stays useful, so eviction can prefer blocks unlikely to be needed again."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagellm_protocol.kv import LifetimePrediction

    from sagellm_kv_cache.predictor.features import PredictorFeatures

__all__ = ["LifetimePredictor"]


class LifetimePredictor(ABC):
    """Predicts :class:`~sagellm_protocol.kv.LifetimePrediction` records and learns from outcomes."""

    @abstractmethod
    def predict_batch(self, features: Sequence[PredictorFeatures]) -> list[LifetimePrediction]:
        """One prediction per feature record, in order."""

    @abstractmethod
    def update(self, features: PredictorFeatures, actual_lifetime: float) -> None:
        """Learns from an observed outcome: ``actual_lifetime`` seconds of usefulness (0 = never reused)."""

    @abstractmethod
    def get_model_version(self) -> str:
        """A name and version of the model, recorded with predictions."""
