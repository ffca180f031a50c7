"""The every-step check's judgement: the cheap tests it makes first (a value not above the
last one is not above the window's maximum) never change which steps trip."""

from __future__ import annotations

import math
import random
import statistics
from collections import deque

from gradwatch.sentinel import Sentinel


def _reference_trips(series: list[tuple[float, float]], sentinel: Sentinel) -> list[tuple]:
    """The surge and loss-surge tests written out plainly, window maximum first."""
    grads: deque[float] = deque(maxlen=sentinel.window)
    losses: deque[float] = deque(maxlen=sentinel.window)
    level = None
    nonfinite = False
    trips = []
    for step, (value, loss) in enumerate(series):
        reason = None
        if not math.isfinite(value) or not math.isfinite(loss):
            if not nonfinite:
                reason = "nonfinite" if not math.isfinite(value) else "loss-nonfinite"
            nonfinite = True
        else:
            nonfinite = False
            if (
                len(grads) >= sentinel.min_history
                and value > max(grads)
                and value > sentinel.surge * statistics.median(grads) > 0
            ):
                if level is None or value > 2.0 * level:
                    reason, level = "surge", value
            else:
                level = None
                if len(losses) >= sentinel.min_history and loss > max(losses):
                    centre = statistics.median(losses)
                    spread = statistics.median([abs(v - centre) for v in losses])
                    if loss - centre > max(6.0 * 1.4826 * spread, 0.5 * abs(centre)):
                        reason = "loss-surge"
        if reason is not None:
            trips.append((step, reason))
        if math.isfinite(value):
            grads.append(value)
        if math.isfinite(loss):
            losses.append(loss)
    return trips


def test_judgement_matches_the_plain_tests_on_noisy_runs_with_spikes() -> None:
    rng = random.Random(0)
    reasons: set[str] = set()
    for run in range(40):
        level, loss_level = 1.0, 2.0
        series = []
        for _ in range(200):
            level *= math.exp(rng.gauss(-0.01 if run % 2 else 0.01, 0.2))
            loss_level *= math.exp(rng.gauss(-0.005, 0.1))
            value, loss = level, loss_level
            roll = rng.random()
            if roll < 0.03:
                value *= rng.choice([5.0, 15.0, 40.0, 200.0])
            elif roll < 0.05:
                loss *= rng.choice([1.5, 3.0, 10.0])
            elif roll < 0.055:
                value = rng.choice([math.nan, math.inf])
            series.append((value, loss))
        sentinel = Sentinel([])
        got = []
        for step, (value, loss) in enumerate(series):
            trip = sentinel._judge(step, [value, loss, 1.0, 1.0])
            if trip is not None:
                got.append((step, trip.reason))
        assert got == _reference_trips(series, sentinel), run
        reasons.update(reason for _, reason in got)
    assert reasons == {"surge", "loss-surge", "nonfinite"}  # every test is exercised
