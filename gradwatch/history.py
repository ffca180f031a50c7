"""A bounded record of recent monitored steps."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .stats import StepStats


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
        self._steps.append(stats)

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
