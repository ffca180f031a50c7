"""Findings through Python's ``logging``, on the logger named "gradwatch"."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..coverage import Coverage
from ..findings import Finding
from ..logsink import log_off_terminal
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

    ``console=False`` (what :func:`gradwatch.default_reporters` uses, next to the
    terminal reporter) hands the records to every handler except those that print to
    the terminal (a ``StreamHandler`` on ``sys.stderr``/``sys.stdout``, such as the one
    ``logging.basicConfig(level=logging.INFO)`` installs): the terminal reporter already
    shows each finding there, and a log file still gets every record.

    >>> import logging
    >>> reporter = LoggingReporter(logger=logging.getLogger("my.training"))
    """

    name = "logging"

    def __init__(self, logger: logging.Logger | None = None, *, console: bool = True) -> None:
        self.logger = logger or logging.getLogger("gradwatch")
        self.console = console

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        for finding in findings:
            parts = [f"{finding.title} at step {finding.step}: {finding.message}"]
            parts.extend(
                f"{label}: {text}" for label, text in finding_fields(finding, layer_limit=None)
            )
            self._log(
                LEVELS.get(finding.severity, logging.INFO),
                " | ".join(parts),
                extra={"gradwatch_finding": finding.to_dict()},
            )

    def notice(self, text: str) -> None:
        self._log(logging.INFO, text)

    def coverage(self, coverage: Coverage) -> None:
        self._coverage = coverage

    def close(self, summary: Sequence[SummaryRow]) -> None:
        active = [row for row in summary if row.status == "active"]
        coverage = getattr(self, "_coverage", None)
        if coverage is not None and coverage.nothing_measured:
            self._log(logging.WARNING, f"gradwatch closed: {coverage.describe()}")
            return
        over = f", over {coverage.describe()}" if coverage is not None else ""
        self._log(
            logging.INFO,
            f"gradwatch closed: {len(summary)} finding(s), {len(active)} still active{over}",
        )

    def _log(self, level: int, text: str, extra: dict[str, Any] | None = None) -> None:
        if self.console:
            self.logger.log(level, text, extra=extra)
        else:
            log_off_terminal(self.logger, level, text, extra=extra)
