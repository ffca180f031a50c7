"""Findings through Python's ``logging``, on the logger named "gradwatch"."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..coverage import Coverage
from ..findings import Finding
from ..rules.engine import SummaryRow
from ..stats import StepStats
from .base import Reporter
from .terminal import finding_fields

LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LoggingReporter(Reporter):
    """Logs each finding at the level matching its severity.

    The record carries the finding as ``record.gradwatch_finding`` (a dict), for
    handlers that ship structured logs. gradwatch attaches only a ``NullHandler``:
    configure logging (``logging.basicConfig``) to see these lines.

    >>> import logging
    >>> reporter = LoggingReporter(logger=logging.getLogger("my.training"))
    """

    name = "logging"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("gradwatch")

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        for finding in findings:
            parts = [f"{finding.title} at step {finding.step}: {finding.message}"]
            parts.extend(
                f"{label}: {text}" for label, text in finding_fields(finding, layer_limit=None)
            )
            self.logger.log(
                LEVELS.get(finding.severity, logging.INFO),
                " | ".join(parts),
                extra={"gradwatch_finding": finding.to_dict()},
            )

    def notice(self, text: str) -> None:
        self.logger.info(text)

    def coverage(self, coverage: Coverage) -> None:
        self._coverage = coverage

    def close(self, summary: Sequence[SummaryRow]) -> None:
        active = [row for row in summary if row.status == "active"]
        coverage = getattr(self, "_coverage", None)
        if coverage is not None and coverage.nothing_measured:
            self.logger.warning("gradwatch closed: %s", coverage.describe())
            return
        self.logger.info(
            "gradwatch closed: %d finding(s), %d still active%s",
            len(summary),
            len(active),
            f", over {coverage.describe()}" if coverage is not None else "",
        )
