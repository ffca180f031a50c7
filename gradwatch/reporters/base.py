"""The reporter protocol: where findings and statistics go."""

from __future__ import annotations

from collections.abc import Sequence

from ..coverage import Coverage
from ..findings import Finding
from ..rules.engine import SummaryRow
from ..stats import StepStats


class Reporter:
    """Receives every monitored step and the findings new at it.

    Subclass it and override what you need; both methods default to doing nothing.
    A reporter that raises is switched off (once, with a logged message) and training
    continues.

    >>> class Count(Reporter):
    ...     def __init__(self):
    ...         self.steps = 0
    ...     def report(self, stats, findings):
    ...         self.steps += 1
    """

    name = "reporter"

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        """Called at each monitored step, after the rules ran."""

    def notice(self, text: str) -> None:
        """A one-line notice about the watching itself, not about the model (the watched
        layers changed: some were frozen, unfrozen or replaced)."""

    def coverage(self, coverage: Coverage) -> None:
        """Called by ``Watcher.close()`` just before :meth:`close`: how many steps and
        layers were measured (:class:`gradwatch.coverage.Coverage`)."""

    def close(self, summary: Sequence[SummaryRow]) -> None:
        """Called once by ``Watcher.close()`` with one row per announced problem."""

