"""Lifetime predictors: features from handles, and a HistoricalPredictor that learns from outcomes."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pytest
from pydantic import ValidationError
from sagellm_kv_cache import KVHandle
from sagellm_kv_cache.predictor import FeatureExtractor, HistoricalPredictor, LifetimePredictor, PredictorFeatures
from sagellm_protocol.kv import LifetimePrediction


def features(session: str | None = "s1", *, tokens: int = 100, accesses: int = 0, idle: float = 0.0,
             hit_len: int = 0) -> PredictorFeatures:
    handle = KVHandle.create(tokens, request_id="r1", session_id=session)
    for _ in range(accesses):
        handle.touch()
    handle.last_access = time.time() - idle
    return PredictorFeatures.from_handle(handle, hit_len=hit_len)


def test_features_from_handle_round_trip() -> None:
    handle = KVHandle.create(64, session_id="s")
    handle.touch()
    handle.pin()
    f = PredictorFeatures.from_handle(handle, hit_len=16, extracted_at=5.0)
    assert (f.request_id, f.session_id, f.num_tokens, f.access_count, f.hit_len, f.is_pinned, f.extracted_at) == \
        ("unknown", "s", 64, 1, 16, True, 5.0)
    data = f.to_dict()
    assert data["handle_id"] == str(handle.handle_id)
    assert PredictorFeatures.from_dict(data) == f
    with pytest.raises(ValidationError):
        PredictorFeatures(handle_id=handle.handle_id, request_id="x", num_tokens=-1, last_access=0, access_count=0,
                          created_at=0)


def test_extractor() -> None:
    handles = [KVHandle.create(8), KVHandle.create(16)]
    batch = FeatureExtractor().extract_batch(handles, [1, 2])
    assert [f.hit_len for f in batch] == [1, 2] and batch[0].extracted_at == batch[1].extracted_at
    assert FeatureExtractor().extract_batch([]) == []
    with pytest.raises(ValueError, match=r"hit_lens length \(2\) must match handles length \(1\)"):
        FeatureExtractor().extract_batch(handles[:1], [1, 2])


def test_extractor_takes_iterables_and_names_bad_items() -> None:
    # The original took a generator; here it was "object of type 'generator' has no len()". A
    # non-handle item was an AttributeError ("'int' object has no attribute 'handle_id'").
    handles = [KVHandle.create(8), KVHandle.create(16)]
    batch = FeatureExtractor().extract_batch(h for h in handles)
    assert [f.handle_id for f in batch] == [h.handle_id for h in handles] and [f.hit_len for f in batch] == [0, 0]
    assert [f.hit_len for f in FeatureExtractor().extract_batch(iter(handles), iter([3, 4]))] == [3, 4]
    with pytest.raises(TypeError, match=r"handles\[1\] must be a KVHandle, got int"):
        FeatureExtractor().extract_batch([handles[0], 7])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="handles must be an iterable, got NoneType"):
        FeatureExtractor().extract_batch(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hit_lens must be an iterable, got int"):
        FeatureExtractor().extract_batch(handles, 3)  # type: ignore[arg-type]


def test_defaults_before_any_history() -> None:
    predictor = HistoricalPredictor()
    assert predictor.get_model_version() == "historical-v0.1.0"
    assert predictor.get_statistics() == {"global": {"avg_lifetime": 1000.0, "avg_reuse_prob": 0.5,
                                                     "sample_count": 0}}
    (p,) = predictor.predict_batch([features()])
    assert isinstance(p, LifetimePrediction)
    assert p.reuse_prob == pytest.approx(0.5, abs=1e-3) and p.remaining_lifetime == pytest.approx(1000.0, abs=0.1)
    assert p.confidence == 0.5
    assert set(p.features_summary) == {"num_tokens", "access_count", "session_id", "time_since_access", "sample_count"}
    with pytest.raises(ValueError, match="must not be empty"):
        predictor.predict_batch([])


def test_learns_lifetimes_per_session() -> None:
    predictor = HistoricalPredictor(alpha=0.5)
    for lifetime in (100.0, 200.0, 300.0, 400.0):
        predictor.update(features("chat"), lifetime)
    for _ in range(4):
        predictor.update(features("batch"), 0.0)  # never reused
    stats = predictor.get_statistics()
    assert stats["chat"] == {"avg_lifetime": 312.5, "avg_reuse_prob": 1.0, "sample_count": 4}
    assert stats["batch"] == {"avg_lifetime": 0.0, "avg_reuse_prob": 0.0, "sample_count": 4}
    assert stats["global"]["sample_count"] == 8
    chat, batch, unknown = predictor.predict_batch([features("chat"), features("batch"), features("new")])
    assert chat.remaining_lifetime == pytest.approx(312.5, abs=0.1) and chat.reuse_prob > 0.99
    assert batch.reuse_prob == 0.0 and batch.remaining_lifetime == 0.0
    assert batch.evict_score > chat.evict_score  # the never-reused session is the better victim
    assert unknown.features_summary["sample_count"] == 8  # falls back to the global averages
    assert chat.confidence == pytest.approx(0.5 + 0.5 * 4 / 100)


def test_running_mean_then_ema() -> None:
    predictor = HistoricalPredictor(alpha=0.1)
    for lifetime in (10.0, 20.0, 30.0):
        predictor.update(features(), lifetime)
    assert predictor.get_statistics()["s1"]["avg_lifetime"] == pytest.approx(20.0)  # 1/n > alpha: the mean
    for _ in range(200):
        predictor.update(features(), 50.0)
    assert predictor.get_statistics()["s1"]["avg_lifetime"] == pytest.approx(50.0, abs=0.01)  # follows drift


def test_recency_accesses_and_pins_shape_the_prediction() -> None:
    predictor = HistoricalPredictor(default_reuse_prob=0.4, default_lifetime=10.0)
    fresh, idle, busy = predictor.predict_batch([features(), features(idle=20.0), features(accesses=3)])
    assert idle.reuse_prob < fresh.reuse_prob < busy.reuse_prob
    assert idle.remaining_lifetime == 0.0 and idle.evict_score > fresh.evict_score
    handle = KVHandle.create(8)
    handle.pin()
    (pinned,) = predictor.predict_batch([PredictorFeatures.from_handle(handle)])
    assert pinned.evict_score == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"window_size": 0}, "window_size"), ({"alpha": 0}, "alpha"), ({"alpha": 1.5}, "alpha"),
     ({"default_reuse_prob": 2}, "default_reuse_prob"), ({"default_lifetime": -1}, "default_lifetime"),
     ({"alpha": float("nan")}, "alpha")],
)
def test_bad_configuration(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HistoricalPredictor(**kwargs)  # type: ignore[arg-type]


def test_bad_updates_change_nothing() -> None:
    predictor = HistoricalPredictor()
    before = predictor.get_statistics()
    for bad in (-5.0, float("inf"), float("nan"), "3"):
        with pytest.raises(ValueError, match="actual_lifetime"):
            predictor.update(features(), bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        predictor.update({"session_id": "s"}, 1.0)  # type: ignore[arg-type]
    assert predictor.get_statistics() == before


def test_numpy_numbers_are_numbers() -> None:
    # The original took numpy numbers; a float32 lifetime was "must be a finite number of seconds
    # >= 0, got np.float32(2.0)" and an int64 window "must be a positive int".
    predictor = HistoricalPredictor(window_size=np.int64(10), alpha=np.float32(0.5),
                                    default_reuse_prob=np.float64(0.25), default_lifetime=np.int32(100),
                                    max_sessions=np.uint8(4))
    assert predictor.window_size == 10 and predictor.alpha == 0.5 and predictor.max_sessions == 4
    predictor.update(features(), np.float32(2.0))
    predictor.update(features(), np.int64(0))
    assert predictor.get_statistics()["s1"] == {"avg_lifetime": 1.0, "avg_reuse_prob": 0.5, "sample_count": 2}
    for bad in (np.float32("nan"), np.int64(-1), np.bool_(True)):
        with pytest.raises(ValueError, match="actual_lifetime"):
            predictor.update(features(), bad)  # type: ignore[arg-type]
    assert predictor.global_sample_count == 2


def test_a_token_count_past_the_float_range_is_predicted() -> None:
    # predict_batch raised OverflowError from math.log1p for a (validated) num_tokens of 10**400.
    huge = features().model_copy(update={"num_tokens": 10**400})
    small, big = HistoricalPredictor().predict_batch([features(), huge])
    assert math.isfinite(big.evict_score) and big.evict_score > small.evict_score


def test_predict_batch_names_what_is_not_features() -> None:
    """One PredictorFeatures instead of a list (a pydantic model iterates as (field, value) pairs), a
    dict or None in the list: each was an AttributeError about session_id."""
    predictor = HistoricalPredictor()
    f = features()
    with pytest.raises(TypeError, match="sequence of PredictorFeatures, got one PredictorFeatures"):
        predictor.predict_batch(f)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"features\[1\] must be PredictorFeatures, got dict"):
        predictor.predict_batch([f, f.to_dict()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"features\[0\] must be PredictorFeatures, got NoneType"):
        predictor.predict_batch([None])  # type: ignore[list-item]
    assert len(predictor.predict_batch(iter([f, f]))) == 2  # type: ignore[arg-type]


def test_the_interface_is_abstract() -> None:
    with pytest.raises(TypeError):
        LifetimePredictor()  # type: ignore[abstract]

    class Constant(LifetimePredictor):
        def predict_batch(self, features: Sequence[PredictorFeatures]) -> list[LifetimePrediction]:
            return [LifetimePrediction(handle_id=f.handle_id, request_id=f.request_id, reuse_prob=1.0,
                                       remaining_lifetime=1.0, evict_score=0.0) for f in features]

        def update(self, features: PredictorFeatures, actual_lifetime: float) -> None:
            return None

        def get_model_version(self) -> str:
            return "constant-1"

    assert Constant().predict_batch([features()])[0].reuse_prob == 1.0


def test_seed_attributes() -> None:
    predictor = HistoricalPredictor()
    predictor.update(features("s"), 10.0)
    predictor.update(features("s"), 20.0)
    assert predictor.session_stats == {"s": {"avg_lifetime": 15.0, "avg_reuse_prob": 1.0, "sample_count": 2}}
    assert (predictor.global_avg_lifetime, predictor.global_avg_reuse_prob, predictor.global_sample_count) == \
        (15.0, 1.0, 2)


def test_per_session_averages_stay_bounded_and_the_global_one_is_kept() -> None:
    # A server sees new session ids for as long as it runs.
    p = HistoricalPredictor(max_sessions=16)
    sample = features("hot")
    for i in range(2000):
        p.update(features(f"s{i}") if i % 2 else sample, 5.0)
    stats = p.get_statistics()
    assert len(stats) == 17 and next(iter(stats)) == "global" and p.global_sample_count == 2000
    assert stats["hot"]["sample_count"] == 1000  # updated every other call: never the least recent
    assert "s1" not in stats and stats["s1999"]["sample_count"] == 1
    assert len(HistoricalPredictor().session_stats) == 0 and HistoricalPredictor().max_sessions == 10_000
    with pytest.raises(ValueError, match="max_sessions"):
        HistoricalPredictor(max_sessions=0)
