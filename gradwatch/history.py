"""A bounded record of recent monitored steps."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .packed_layers import PackedLayers
from .stats import StepStats

#: Steps whose layers stay as they were measured. The built-in rules read the layers of
#: at most the last 24 (``RuleContext.recent(16)`` looks 8 further back for steps measured
#: off schedule); older ones keep their layers packed (see :mod:`gradwatch.packed_layers`).
RECENT_STEPS = 32


class History:
    """The last ``maxlen`` :class:`StepStats`, oldest first; memory stays flat however long
    training runs.

    >>> h = History(maxlen=2)
    >>> for s in range(5):
    ...     h.append(StepStats(step=s, layers={}, global_grad_norm=0.0))
    >>> [s.step for s in h]
    [3, 4]
    """

    def __init__(self, maxlen: int = 256) -> None:
        if maxlen < 1:
            raise ValueError(f"history must keep at least 1 step, got {maxlen}")
        self._steps: deque[StepStats] = deque(maxlen=maxlen)

    def append(self, stats: StepStats) -> None:
        steps = self._steps
        steps.append(stats)
        if len(steps) > RECENT_STEPS:
            _pack_layers(steps[-RECENT_STEPS - 1])

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[StepStats]:
        return iter(self._steps)

    def __getitem__(self, index: int) -> StepStats:
        return self._steps[index]

    def last(self, n: int) -> list[StepStats]:
        """The ``n`` most recent steps, oldest first."""
        if n <= 0:
            return []
        return list(self._steps)[-n:]

    @property
    def latest(self) -> StepStats | None:
        return self._steps[-1] if self._steps else None

    def clear(self) -> None:
        self._steps.clear()


def _pack_layers(stats: StepStats) -> None:
    """Keep an older step's layers as tuples the garbage collector does not walk."""
    if isinstance(stats.layers, dict):
        stats.layers = PackedLayers(stats.layers)  # type: ignore[assignment]
        # What the rules worked out from this step and kept on it (by_depth's order,
        # matrix layers, cuts...) holds the LayerStats themselves: dropped, and worked
        # out again from the packed layers if a rule asks this far back.
        for memo in [key for key in stats.__dict__ if key.startswith("_")]:
            del stats.__dict__[memo]
