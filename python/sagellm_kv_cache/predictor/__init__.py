"""KV lifetime prediction (the seed's 0.5.4 ``predictor`` package): features of a handle, the
predictor interface, and a predictor that learns from observed lifetimes."""

from sagellm_kv_cache.predictor.base import LifetimePredictor
from sagellm_kv_cache.predictor.features import FeatureExtractor, PredictorFeatures
from sagellm_kv_cache.predictor.historical import HistoricalPredictor

__all__ = ["FeatureExtractor", "HistoricalPredictor", "LifetimePredictor", "PredictorFeatures"]
