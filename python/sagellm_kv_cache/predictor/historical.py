"""A predictor that learns from history: per session (and globally) it keeps exponential moving
averages of observed lifetimes and of how often a handle was reused at all.

Learning rule: each ``update`` moves the session's and the global averages toward the observed
lifetime (and the reuse indicator ``actual_lifetime > 0``) by ``max(alpha, 1 / n)``, ``n`` being
the number of samples so far: the first samples form a plain mean, later ones an EMA that follows
drift. Prediction for a handle uses its session's averages once the session has samples, else the
global ones, else the defaults; recent accesses raise the reuse probability, long idleness lowers it.
``confidence`` grows with the samples behind the estimate (up to ``window_size`` of them).

Per-session averages are kept for at most ``max_sessions`` sessions (default
``DEFAULT_MAX_SESSIONS``; ``None`` lifts the bound), the least recently updated forgotten first: a
server sees new session ids for as long as it runs. A forgotten session is predicted from the
global averages, as a session never seen is.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from sagellm_protocol.kv import LifetimePrediction

from sagellm_kv_cache._numbers import is_finite_number, plain, shown
from sagellm_kv_cache.predictor.base import LifetimePredictor
from sagellm_kv_cache.predictor.features import PredictorFeatures

__all__ = ["DEFAULT_MAX_SESSIONS", "HistoricalPredictor"]

_GLOBAL = "global"

#: Sessions whose averages a predictor keeps by default (see the module docstring).
DEFAULT_MAX_SESSIONS = 10_000


@dataclass
class _Average:
    lifetime: float
    reuse_prob: float
    samples: int = 0

    def add(self, lifetime: float, reused: float, alpha: float) -> None:
        self.samples += 1
        rate = max(alpha, 1.0 / self.samples)
        self.lifetime += rate * (lifetime - self.lifetime)
        self.reuse_prob += rate * (reused - self.reuse_prob)


class HistoricalPredictor(LifetimePredictor):
    """See the module docstring. Thread-safe."""

    VERSION = "historical-v0.1.0"

    def __init__(
        self,
        window_size: int = 100,
        alpha: float = 0.1,
        default_reuse_prob: float = 0.5,
        default_lifetime: float = 1000.0,
        *,
        max_sessions: int | None = DEFAULT_MAX_SESSIONS,
    ) -> None:
        window_size, alpha, default_reuse_prob, default_lifetime, max_sessions = (
            plain(window_size), plain(alpha), plain(default_reuse_prob), plain(default_lifetime),
            plain(max_sessions))
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        if not is_finite_number(alpha) or not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {shown(alpha)}")
        if not is_finite_number(default_reuse_prob) or not 0 <= default_reuse_prob <= 1:
            raise ValueError(f"default_reuse_prob must be in [0, 1], got {shown(default_reuse_prob)}")
        if not is_finite_number(default_lifetime) or default_lifetime < 0:
            raise ValueError(f"default_lifetime must be a finite number >= 0, got {shown(default_lifetime)}")
        if max_sessions is not None and (isinstance(max_sessions, bool) or not isinstance(max_sessions, int)
                                         or max_sessions < 1):
            raise ValueError(f"max_sessions must be a positive int or None, got {max_sessions!r}")
        self.max_sessions = max_sessions
        self.window_size = window_size
        self.alpha = float(alpha)
        self.default_reuse_prob = float(default_reuse_prob)
        self.default_lifetime = float(default_lifetime)
        self._global = self._fresh()
        self._sessions: OrderedDict[str, _Average] = OrderedDict()  # least recently updated first
        self._lock = threading.Lock()

    def _fresh(self) -> _Average:
        return _Average(self.default_lifetime, self.default_reuse_prob)

    def update(self, features: PredictorFeatures, actual_lifetime: float) -> None:
        """Learns one outcome: the handle stayed useful for ``actual_lifetime`` seconds (0: not reused)."""
        if not isinstance(features, PredictorFeatures):
            raise TypeError(f"features must be PredictorFeatures, got {type(features).__name__}")
        actual_lifetime = plain(actual_lifetime)
        if not is_finite_number(actual_lifetime) or actual_lifetime < 0:
            raise ValueError(f"actual_lifetime must be a finite number of seconds >= 0, got {shown(actual_lifetime)}")
        reused = 1.0 if actual_lifetime > 0 else 0.0
        with self._lock:
            self._global.add(float(actual_lifetime), reused, self.alpha)
            session = features.session_id
            if session is not None and session != _GLOBAL:
                self._sessions.setdefault(session, self._fresh()).add(float(actual_lifetime), reused, self.alpha)
                self._sessions.move_to_end(session)
                if self.max_sessions is not None and len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)

    def predict_batch(self, features: Sequence[PredictorFeatures]) -> list[LifetimePrediction]:
        if isinstance(features, PredictorFeatures):  # a model iterates as (field, value) pairs
            raise TypeError("features must be a sequence of PredictorFeatures, got one PredictorFeatures")
        features = list(features)
        if not features:
            raise ValueError("features must not be empty")
        for i, f in enumerate(features):
            if not isinstance(f, PredictorFeatures):
                raise TypeError(f"features[{i}] must be PredictorFeatures, got {type(f).__name__}")
        now = time.time()
        with self._lock:
            return [self._predict(f, now) for f in features]

    def _predict(self, f: PredictorFeatures, now: float) -> LifetimePrediction:
        avg = self._sessions.get(f.session_id) if f.session_id is not None else None
        if avg is None or not avg.samples:
            avg = self._global
        idle = max(now - f.last_access, 0.0)
        # Each earlier access and a prefix hit make reuse likelier; idleness beyond the expected
        # lifetime makes it unlikelier (halved every expected lifetime).
        boost = 1.0 + 0.1 * min(f.access_count, 10) + (0.1 if f.hit_len > 0 else 0.0)
        decay = 0.5 ** (idle / avg.lifetime) if avg.lifetime > 0 else 0.0
        reuse = min(max(avg.reuse_prob * boost * decay, 0.0), 1.0)
        remaining = max(avg.lifetime - idle, 0.0)
        # Higher score = better victim: unlikely to be reused, soon useless, many tokens freed.
        # num_tokens is an unbounded int: past the float range log1p raised OverflowError.
        evict_score = (1.0 - reuse) * (1.0 + math.log1p(min(f.num_tokens, sys.float_info.max))) / (1.0 + remaining)
        if f.is_pinned:
            evict_score = 0.0
        return LifetimePrediction(
            handle_id=f.handle_id,
            request_id=f.request_id,
            reuse_prob=reuse,
            remaining_lifetime=remaining,
            evict_score=evict_score,
            confidence=0.5 + 0.5 * min(avg.samples, self.window_size) / self.window_size,
            features_summary={
                "num_tokens": f.num_tokens,
                "access_count": f.access_count,
                "session_id": f.session_id or _GLOBAL,
                "time_since_access": idle,
                "sample_count": avg.samples,
            },
            predicted_at=now,
        )

    def get_model_version(self) -> str:
        return self.VERSION

    # --- the seed's public attributes (read-only snapshots) ---------------------------------

    @property
    def session_stats(self) -> dict[str, dict[str, float]]:
        """Per session: ``avg_lifetime``, ``avg_reuse_prob``, ``sample_count`` (a copy)."""
        stats = self.get_statistics()
        stats.pop(_GLOBAL)
        return stats

    @property
    def global_avg_lifetime(self) -> float:
        return self._global.lifetime

    @property
    def global_avg_reuse_prob(self) -> float:
        return self._global.reuse_prob

    @property
    def global_sample_count(self) -> int:
        return self._global.samples

    def get_statistics(self) -> dict[str, dict[str, float]]:
        """Per key (``"global"`` and each session): average lifetime, reuse probability, samples."""
        with self._lock:
            return {
                key: {"avg_lifetime": a.lifetime, "avg_reuse_prob": a.reuse_prob, "sample_count": a.samples}
                for key, a in ((_GLOBAL, self._global), *self._sessions.items())
            }

