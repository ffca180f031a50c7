"""Notice when reporting costs more than training.

A reporter runs inside the training loop at every monitored step, so a slow one (a
network call, a large file write) stretches those steps without saying so. The clock
compares, over the last few monitored steps, the median time each reporter took with
the median time of one training step (the wall time between monitored steps, less the
reporting, divided by the steps in between). Medians, so that one slow call (a finding
printed, a first connection) is not taken for a slow reporter. It costs two clock reads
per reporter per monitored step, and nothing on other steps.
"""

from __future__ import annotations

import time
from collections import deque

from ..rules.base import median


class ReportingClock:
    """Times the reporters of one watcher.

    >>> clock = ReportingClock(window=2)
    >>> clock.begin(step=0)
    >>> clock.add("slow", 0.5)
    >>> clock.begin(step=1)
    >>> clock.add("slow", 0.5)
    >>> clock.slowest() is None  # one training step measured so far: too early to judge
    True
    """

    def __init__(self, window: int = 5) -> None:
        self._window = window
        self._per_step: deque[float] = deque(maxlen=window)  # seconds of training per step
        self._spent: dict[str, deque[float]] = {}
        self._started: float | None = None  # when the current monitored step's reporting began
        self._step = 0
        self._reporting = 0.0  # seconds spent reporting at the current monitored step

    def begin(self, step: int, *, judge: bool = True) -> None:
        """Reporting for monitored step ``step`` starts now. ``judge=False`` (when the
        watcher closes): the time since the last monitored step is not a training step."""
        now = time.perf_counter()
        if self._started is not None and judge and step > self._step:
            training = now - self._started - self._reporting
            self._per_step.append(max(training, 0.0) / (step - self._step))
        self._started = now if judge else None
        self._step = step
        self._reporting = 0.0

    def add(self, name: str, seconds: float) -> None:
        """Reporter ``name`` took ``seconds`` at this monitored step."""
        self._reporting += seconds
        spent = self._spent.get(name)
        if spent is None:
            spent = self._spent[name] = deque(maxlen=self._window)
        spent.append(seconds)

    def slowest(self) -> tuple[str, float, float] | None:
        """``(reporter, its median seconds, median seconds of a training step)`` for the
        slowest reporter whose median call outlasts a training step; ``None`` if none does
        or fewer than ``window`` monitored steps have been timed."""
        if len(self._per_step) < self._window:
            return None
        step = median(self._per_step)
        worst: tuple[str, float, float] | None = None
        for name, spent in self._spent.items():
            if len(spent) < self._window:
                continue
            seconds = median(spent)
            if seconds > step and (worst is None or seconds > worst[1]):
                worst = (name, seconds, step)
        return worst


def slow_reporter_notice(name: str, seconds: float, step: float, every_n_steps: int) -> str:
    """The one-time warning for a reporter that outlasts a training step."""
    return (
        f"gradwatch: reporter {name} takes {seconds * 1e3:.1f} ms at each monitored step, "
        f"longer than a whole training step ({step * 1e3:.2f} ms); with every_n_steps="
        f"{every_n_steps} that adds about {100 * seconds / (step * every_n_steps):.0f}% to "
        "training. Measure less often (a larger every_n_steps), or make the reporter hand "
        "its work to a background thread."
    )
